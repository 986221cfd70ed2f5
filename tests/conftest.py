"""Shared fixtures: the bundled real sample, a manifest of it, and a tiny trained run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SAMPLE = Path(__file__).parent / "data" / "malaria_sample"


def pytest_configure(config):
    """Same tiny models on every run: seeded training is only repeatable with deterministic TF ops."""
    try:
        import tensorflow as tf
    except ImportError:  # the edge-only environment: nothing is trained there
        return
    tf.config.experimental.enable_op_determinism()


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE


@pytest.fixture(scope="session")
def sample_manifest(tmp_path_factory) -> Path:
    from train import split

    out = tmp_path_factory.mktemp("manifest") / "sample.csv"
    res = split.build_split(SAMPLE, progress=False)
    split.write_manifest(res.records, out)
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, sample_manifest) -> Path:
    """`tiny` trained for one epoch on the bundled sample (a few seconds)."""
    from train.malaria.fit import train_malaria

    out = tmp_path_factory.mktemp("runs") / "tiny"
    train_malaria(sample_manifest, "tiny", out, epochs=1, verbose=0)
    return out
