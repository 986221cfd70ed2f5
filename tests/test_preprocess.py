"""One preprocessing, two implementations: TensorFlow (training) and Pillow (edge_runtime).

TF's antialiased resize and Pillow's differ in rounding and filter edges; this
measures that the difference is tiny on real cells and changes no prediction.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from edge_runtime import load_and_preprocess
from edge_runtime.spec import MALARIA_SPEC, PreprocessSpec

from helpers import assert_same_class_off_ties


def test_spec_round_trip_and_validation():
    assert PreprocessSpec.from_dict(MALARIA_SPEC.to_dict()) == MALARIA_SPEC
    with pytest.raises(ValueError, match="color_mode"):
        PreprocessSpec(color_mode="cmyk")
    with pytest.raises(ValueError, match="unknown preprocessing keys"):
        PreprocessSpec.from_dict({"input_size": [64, 64], "mean": 0.5})


def test_edge_runtime_never_imports_tensorflow():
    code = (
        "import sys, edge_runtime\n"
        "from edge_runtime import load_and_preprocess\n"
        "from edge_runtime.spec import MALARIA_SPEC\n"
        "bad = [m for m in ('tensorflow', 'keras', 'tf_keras') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"edge_runtime imported {out.stdout.strip()}"


@pytest.mark.slow
def test_tf_pipeline_and_pillow_give_the_same_inputs_and_predictions(sample_manifest, tiny_run):
    tf = pytest.importorskip("tensorflow")
    from train.data import decode_and_resize
    from train.evaluate import load_model
    from train.split import read_manifest

    recs = read_manifest(sample_manifest)[::4]  # 100 real cells of all 20 patients
    tf_x = np.stack([decode_and_resize(tf.constant(r.path), MALARIA_SPEC).numpy() for r in recs])
    pil_x = np.stack([load_and_preprocess(r.path, MALARIA_SPEC) for r in recs])
    diff = np.abs(tf_x - pil_x)
    # In 0..255 units: measured mean 0.2, max 1.0 grey level on 200 real cells (rounding).
    assert diff.mean() * 255 < 0.5, diff.mean() * 255
    assert diff.max() * 255 < 2, diff.max() * 255
    model = load_model(tiny_run / "best.keras")
    p_tf, p_pil = model.predict(tf_x, verbose=0), model.predict(pil_x, verbose=0)
    assert np.abs(p_tf - p_pil).max() < 0.02
    # Same class wherever the tiny model is not on the fence (a flip within 2 x 0.02 of a tie is not a bug).
    assert_same_class_off_ties(p_tf, p_pil, 0.04)


def test_resize_mix_gives_a_share_of_cells_the_plain_bilinear_resize(sample_manifest):
    """`resize_mix`: training images shrunk as an app without antialiasing shrinks them, that share per epoch."""
    import tensorflow as tf

    from train.data import decode_and_resize, make_dataset
    from train.split import read_manifest

    recs = list(read_manifest(sample_manifest))[:24]
    labels = sorted({r.label for r in recs})
    smooth = np.stack([decode_and_resize(tf.constant(r.path), MALARIA_SPEC).numpy() for r in recs])
    plain = np.stack([decode_and_resize(tf.constant(r.path), MALARIA_SPEC, antialias=False).numpy() for r in recs])
    differ = np.abs(smooth - plain).reshape(len(recs), -1).max(axis=1) > 1e-3
    assert differ.all()  # every NIH cell is larger than 64 px: the two resizes differ on each

    def kinds(mix: float) -> list[list[str]]:
        ds = make_dataset(recs, labels, MALARIA_SPEC, batch_size=8, training=True, resize_mix=mix, seed=3)
        out = []
        for _ in range(2):  # two epochs
            xs = np.concatenate([x.numpy() for x, _ in ds])
            seen = []
            for x in xs:
                if np.abs(smooth - x).reshape(len(recs), -1).max(axis=1).min() < 1e-5:
                    seen.append("smooth")
                elif np.abs(plain - x).reshape(len(recs), -1).max(axis=1).min() < 1e-5:
                    seen.append("plain")
                else:
                    seen.append("?")
            out.append(seen)
        return out

    assert kinds(0.0) == [["smooth"] * len(recs)] * 2  # the default: what edge_runtime feeds, as before
    assert kinds(1.0) == [["plain"] * len(recs)] * 2
    half = kinds(0.5)
    assert all(set(epoch) == {"smooth", "plain"} for epoch in half)
    assert half[0] != half[1]  # drawn again each epoch
    with pytest.raises(ValueError, match="resize_mix"):
        make_dataset(recs, labels, MALARIA_SPEC, batch_size=8, training=True, resize_mix=1.5)
