"""Shared fixtures: the bundled real sample, a manifest of it, a tiny trained run and the artifacts made from it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from helpers import ARTIFACT_FILES, SAMPLE, make_artifacts, train_tiny, write_sample_manifest

ART_ENV = "MEDGE_EDGE_ARTIFACTS"


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


@pytest.fixture(scope="session")
def art(tmp_path_factory, request) -> Path:
    """The artifacts edge_runtime is tested on: $MEDGE_EDGE_ARTIFACTS (edge-only env), else made from `tiny_run`."""
    env = os.environ.get(ART_ENV)
    if env:
        p = Path(env)
        missing = [n for n in ARTIFACT_FILES if not (p / n).is_file()]
        if missing:
            pytest.fail(f"{ART_ENV}={p} lacks {missing}; make it with `python -m tests.helpers --make-artifacts {p}`")
        return p
    pytest.importorskip("tensorflow")
    # conftest's tiny run, shared with the other test files.
    return make_artifacts(tmp_path_factory.mktemp("edge_artifacts"), run=request.getfixturevalue("tiny_run"))
