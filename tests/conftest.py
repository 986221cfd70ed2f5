"""Shared fixtures: the bundled real sample, a manifest of it, and a tiny trained run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from helpers import SAMPLE, train_tiny, write_sample_manifest


def pytest_configure(config):
    """Same tiny models on every run: seeded training is only repeatable with deterministic TF ops."""
    try:
        import tensorflow as tf
    except ImportError:  # the edge-only environment: nothing is trained there
        return
    tf.config.experimental.enable_op_determinism()


# Fixtures that train a TensorFlow model; a test that uses one (directly or through another fixture) is slow.
TRAINING_FIXTURES = {"tiny_run", "art"}


def pytest_collection_modifyitems(config, items):
    """Mark `slow` every test that trains TF through a fixture (`-m "not slow"` is then TF-training free).

    In the edge-only environment the artifacts come ready-made (MEDGE_EDGE_ARTIFACTS), so nothing trains there.
    """
    if os.environ.get("MEDGE_EDGE_ARTIFACTS"):
        return
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE


@pytest.fixture(scope="session")
def sample_manifest(tmp_path_factory) -> Path:
    return write_sample_manifest(tmp_path_factory.mktemp("manifest") / "sample.csv")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, sample_manifest) -> Path:
    """The one tiny malaria run of the session (`helpers.train_tiny`), shared by every test file."""
    return train_tiny(sample_manifest, tmp_path_factory.mktemp("tiny") / "run")
