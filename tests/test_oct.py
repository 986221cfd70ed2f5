"""The OCT chain on a tiny synthetic set with a random base (no downloads, ~2-3 min on 2 busy cores).

synth -> split -> extract (store) -> head -> fused model -> evaluate / Grad-CAM / predict,
plus the refusals (mismatched store, bad head shape, offline URL) and a resumed extraction.
InceptionV3 at 299x299 costs ~0.1-0.25 s per image here, so the set is 24 images.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_runtime.clinical import OCT_LABELS
from train.oct.facts import SYNTHETIC_MARKER, referral_metrics

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- fixtures (built once)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("oct")


@pytest.fixture(scope="module")
def data(work) -> Path:
    from train.oct.synth import generate

    generate(work / "data", per_class=4, patients=2, test_per_class=2, test_patients=1, seed=3)
    return work / "data"


@pytest.fixture(scope="module")
def manifest(data, work) -> Path:
    from train.cli import main

    out = work / "manifest.csv"
    assert main(["split", "--data", str(data), "--out", str(out), "--val", "0.5"]) == 0
    return out


@pytest.fixture(scope="module")
def store(manifest, work) -> Path:
    from train.oct.store import extract

    out = work / "features.h5"
    extract(manifest, out, base_weights="none", base_seed=0, dtype="float16", batch_size=8, progress=False)
    return out


@pytest.fixture(scope="module")
def head_run(store, work) -> Path:
    from train.oct.fit import train

    return train(store, work / "run-head", epochs=3, batch_size=8, verbose=0)


@pytest.fixture(scope="module")
def loaded(head_run):
    from train.oct.predict import load_for_inference

    return load_for_inference(head_run)


# ----------------------------------------------------------------------------- data


def test_referral_metrics_counts():
    labels = list(OCT_LABELS)  # CNV DME urgent, DRUSEN routine, NORMAL observation
    y_true = [0, 1, 2, 3, 0, 3]
    y_pred = [1, 2, 2, 3, 0, 0]  # CNV->DME still urgent; DME->DRUSEN misses urgent; NORMAL->CNV false urgent
    r = referral_metrics(y_true, y_pred, labels)
    assert r["urgent_sensitivity"] == pytest.approx(2 / 3)
    assert r["urgent_specificity"] == pytest.approx(2 / 3)
    assert r["level_confusion_matrix"] == [[2, 1, 0], [0, 1, 0], [1, 0, 1]]


def test_synth_layout_and_marker(data):
    from train.split import patient_id

    assert (data / SYNTHETIC_MARKER).is_file()
    assert "SYNTHETIC" in (data / SYNTHETIC_MARKER).read_text()
    patients = {}
    for split in ("train", "test"):
        for label in OCT_LABELS:
            files = sorted((data / split / label).glob("*.jpeg"))
            assert len(files) == (4 if split == "train" else 2)
            for f in files:
                assert re.fullmatch(rf"{label}-\d+-\d+\.jpeg", f.name)
                patients.setdefault(split, set()).add(patient_id(f.name))
    assert not patients["train"] & patients["test"], "test patients must not appear in train"
    img = Image.open(next((data / "test" / "DME").glob("*.jpeg")))
    assert img.mode == "L" and img.size == (512, 496)
    a = np.asarray(img, np.float32)
    assert 10 < a.mean() < 150 and a.std() > 20  # a dark scan with bright layers, not a blank


def test_synth_refuses_foreign_folder(tmp_path):
    from train.oct.synth import generate

    (tmp_path / "mine.txt").write_text("not yours")
    with pytest.raises(ValueError, match="not a synthetic"):
        generate(tmp_path, per_class=1, patients=1)


# ----------------------------------------------------------------------------- store


def test_store_contents(store, manifest):
    import h5py

    from train.oct.store import read_info
    from train.split import read_manifest

    info = read_info(store)
    assert info.complete and info.n == 24 and info.labels == list(OCT_LABELS)
    assert info.synthetic and info.dtype == "float16" and info.base_weights == "none"
    recs = read_manifest(manifest)
    with h5py.File(store) as f:
        assert f["features"].shape == (24, 8, 8, 2048)
        assert f["features"].chunks == (1, 8, 8, 2048)  # one image per chunk: shuffled reads stay cheap
        assert list(f["path"].asstr()[:]) == [r.path for r in recs]
        assert list(f["split"].asstr()[:]) == [r.split for r in recs]
        assert list(f["patient"].asstr()[:]) == [r.patient for r in recs]
        feats = f["features"][:4].astype(np.float32)
    assert np.isfinite(feats).all() and feats.std() > 0.01  # He-scaled random base: O(1) features


def test_sigkilled_extraction_resumes(manifest, store, work):
    """A real `kill -9` in the middle of `oct extract`, then the same command finishes the store."""
    import signal

    import h5py

    from train.oct.store import extract, read_info

    out = work / "killed.h5"
    # The real extraction in a child process, held still by its own progress hook right after its
    # second batch is flushed, then killed there: no race with how fast the machine is.
    child = (
        "import sys, time\n"
        "from train.oct.store import extract\n"
        "def hold(done):\n"
        "    if done >= 4:\n"
        "        print(f'flushed {done}', flush=True)\n"
        "        time.sleep(600)\n"
        f"extract({str(manifest)!r}, {str(out)!r}, base_weights='none', dtype='float16', batch_size=2,\n"
        "        splits=['test'], progress=False, on_batch=hold)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)
    try:
        for line in proc.stdout:
            if line.startswith("flushed"):
                break
        else:
            pytest.fail(f"extraction ended before it could be killed:\n{proc.stderr.read()[-2000:]}")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    info = read_info(out)
    assert info.n == 8 and info.n_done == 4 and not info.complete
    with pytest.raises(ValueError, match="incomplete"):
        from train.oct.store import make_sequence

        make_sequence(out, "test", 4, shuffle=False)
    seen_after = []
    extract(manifest, out, base_weights="none", dtype="float16", batch_size=4, splits=["test"],
            progress=False, on_batch=seen_after.append)
    assert seen_after[0] == info.n_done + 4 and seen_after[-1] == 8, "resumed where it stopped, not at 0"
    with h5py.File(out) as a, h5py.File(store) as b:
        rows = np.flatnonzero(b["split"].asstr()[:] == "test")
        np.testing.assert_allclose(a["features"][:].astype(np.float32),
                                   b["features"][rows].astype(np.float32), rtol=2e-2, atol=2e-3)


def test_mismatched_base_or_preprocessing_is_refused(manifest, store, work):
    from train.cli import main
    from train.oct.fit import train
    from train.oct.store import extract

    # Extending a store with other preprocessing.
    with pytest.raises(ValueError, match="cannot share a store"):
        extract(manifest, store, base_weights="none", preprocess="rescale", progress=False)
    # Training a head on features of another base.
    with pytest.raises(ValueError, match="wrong on another"):
        train(store, work / "run-bad", epochs=1, base_weights="none", base_seed=1, verbose=0)
    assert not (work / "run-bad" / "config.json").exists()
    # The same through the CLI: exit 2 and a message, no traceback.
    assert main(["oct", "head", "--store", str(store), "--out", str(work / "run-bad2"),
                 "--preprocess", "rescale", "--epochs", "1"]) == 2


# ----------------------------------------------------------------------------- head, fused model, reports


def test_head_run_and_fused_model(head_run, store, loaded):
    import keras

    from train import runs
    from train.evaluate import load_model
    from train.oct.predict import predict_images
    from train.oct.store import read_column, split_indices

    cfg = runs.read_config(head_run)
    assert cfg.task == "oct" and cfg.mode == "head" and cfg.model_file == "fused.keras"
    assert cfg.synthetic is True and cfg.referral["DME"] == "urgent"
    hist = runs.read_history(head_run)
    assert len(hist) == 3 and all(r["seconds"] > 0 for r in hist) and "learning_rate" in hist[0]

    head = load_model(head_run / "head.keras")
    assert tuple(head.input_shape[1:]) == (8, 8, 2048) and tuple(head.output_shape[1:]) == (4,)
    assert [type(l).__name__ for l in head.layers][1:] == [
        "Conv2D", "BatchNormalization", "Activation", "Dropout", "Flatten", "Dense"]
    assert head.get_layer("head_conv").use_bias is False

    fused = load_model(head_run / "fused.keras")
    assert tuple(fused.input_shape[1:]) == (299, 299, 3) and tuple(fused.output_shape[1:]) == (4,)

    # Fused model on image files == head on the stored features of the same images.
    idx = split_indices(store, "test")
    paths = read_column(store, "path", idx)
    p_img = predict_images(loaded, [Image.open(p) for p in paths])
    import h5py

    with h5py.File(store) as f:
        p_feat = head.predict(f["features"][idx].astype(np.float32), verbose=0)
    np.testing.assert_allclose(p_img.sum(axis=1), 1.0, atol=1e-5)
    # Pillow (predict) vs TensorFlow (extract) resizing and float16 storage: small differences only.
    assert np.abs(p_img - p_feat).max() < 0.05

    rep = json.loads((head_run / "eval-store-test" / "report.json").read_text())
    assert rep["n_images"] == 8 and rep["synthetic"] is True
    assert {"urgent_sensitivity", "urgent_specificity"} <= set(rep["referral"])
    assert keras.__version__.startswith("3.")


def test_train_evaluate_on_oct_run(head_run, manifest):
    from train.cli import main

    out = head_run / "eval-cli"
    assert main(["evaluate", str(head_run), "--manifest", str(manifest), "--split", "test", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["n_images"] == 8 and rep["synthetic"] is True
    r = rep["referral"]
    assert r["levels"] == {"CNV": "urgent", "DME": "urgent", "DRUSEN": "routine", "NORMAL": "observation"}
    assert r["urgent_sensitivity"] is not None and r["urgent_specificity"] is not None
    md = (out / "report.md").read_text()
    assert "SYNTHETIC" in md and "Urgent referral" in md


def test_gradcam_png_per_image(head_run, loaded, data, manifest, work):
    from train.cli import main
    from train.oct.gradcam import gradcam, split_head

    img = next((data / "test" / "CNV").glob("*.jpeg"))
    out = work / "gradcam"
    assert main(["oct", "gradcam", str(head_run), str(img), "--out", str(out),
                 "--misclassified", str(manifest), "--split", "test"]) == 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 1
    png = Image.open(pngs[0])
    assert png.format == "PNG" and png.mode == "RGB" and png.size == Image.open(img).size
    rows = (out / "misclassified-test" / "gradcam.csv").read_text().splitlines()
    wrong = list((out / "misclassified-test").glob("*_as_*.png"))
    assert len(wrong) == len(rows) - 1  # one PNG per wrong prediction

    model = loaded
    pre, post = split_head(model.head)
    assert pre[-1].name == "head_conv"  # the map is taken on the head's 1x1 conv, 8x8x64
    from edge_runtime.images import load_and_preprocess

    probs, cams = gradcam(model, load_and_preprocess(img, model.spec)[None])
    assert cams.shape == (1, 8, 8) and 0.0 <= cams.min() and cams.max() <= 1.0
    assert probs.shape == (1, 4)


# ----------------------------------------------------------------------------- Keras 2 heads, prediction


KERAS2_HEAD = """
import os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
import tf_keras as k
L = k.layers
m = k.Sequential([L.Conv2D(64, (1, 1), use_bias=False, input_shape=(8, 8, 2048)), L.BatchNormalization(),
                  L.Activation("relu"), L.Dropout(0.5), L.Flatten(), L.Dense(4, activation="softmax")])
m.save(sys.argv[1])
"""


@pytest.fixture(scope="module")
def keras2_head(work) -> Path:
    path = work / "keras2_head.h5"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    subprocess.run([sys.executable, "-c", KERAS2_HEAD, str(path)], check=True, env=env, capture_output=True)
    return path


def test_keras2_h5_head_is_accepted(keras2_head, store, work, data, capsys):
    from train.cli import main
    from train.oct.models import _load_h5_by_order, load_head

    head = load_head(keras2_head)
    byorder = _load_h5_by_order(keras2_head, 4)  # the fallback for configs too old for Keras 3
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 2048)).astype(np.float32)
    np.testing.assert_allclose(head.predict(x, verbose=0), byorder.predict(x, verbose=0), atol=1e-5)

    run = work / "run-imported"
    assert main(["oct", "fuse", "--head", str(keras2_head), "--base-weights", "none", "--store", str(store),
                 "--out", str(run)]) == 0
    assert (run / "fused.keras").is_file() and (run / "head.keras").is_file()
    img = next((data / "test" / "NORMAL").glob("*.jpeg"))
    capsys.readouterr()
    assert main(["oct", "predict", "--head", str(keras2_head), "--base-weights", "none", str(img),
                 "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["label"] in OCT_LABELS and rows[0]["referral"] in ("urgent", "routine", "observation")
    assert main(["oct", "gradcam", "--head", str(keras2_head), "--base-weights", "none", str(img),
                 "--out", str(work / "gradcam-k2")]) == 0
    assert Image.open(next((work / "gradcam-k2").glob("*.png"))).size == (512, 496)


def test_head_of_wrong_shape_is_refused(work):
    import keras

    from train.oct.models import load_head

    inp = keras.Input((8, 8, 1024))
    bad = keras.Model(inp, keras.layers.Dense(4, activation="softmax")(keras.layers.Flatten()(inp)))
    bad.save(work / "bad_head.keras")
    with pytest.raises(ValueError, match="expected \\(None, 8, 8, 2048\\)"):
        load_head(work / "bad_head.keras")
    with pytest.raises(FileNotFoundError):
        load_head(work / "missing.h5")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_root(data):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(data)))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_fetch_limits_and_offline_error(http_root, data):
    import socket

    from train.oct.predict import fetch

    rel = next((data / "test" / "CNV").glob("*.jpeg")).relative_to(data).as_posix()
    body = fetch(f"{http_root}/{rel}")
    assert body == (data / rel).read_bytes()
    with pytest.raises(ValueError, match="limit"):
        fetch(f"{http_root}/{rel}", max_bytes=100)
    with pytest.raises(ValueError, match="HTTP 404"):
        fetch(f"{http_root}/nope.jpeg")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: what an offline machine sees
    with pytest.raises(ValueError, match="offline"):
        fetch(f"http://127.0.0.1:{port}/scan.jpeg", timeout=2)
    with pytest.raises(ValueError, match="not an http"):
        fetch("ftp://example.org/scan.jpeg")


def test_predict_url_equals_path(head_run, loaded, http_root, data, capsys):
    from train.cli import main
    from train.oct.predict import predict

    rel = next((data / "test" / "DRUSEN").glob("*.jpeg")).relative_to(data).as_posix()
    by_path, by_url = predict(loaded, [str(data / rel), f"{http_root}/{rel}"])
    assert by_path["label"] == by_url["label"]
    for l in OCT_LABELS:
        assert by_path["probabilities"][l] == pytest.approx(by_url["probabilities"][l], abs=1e-6)
    capsys.readouterr()
    assert main(["oct", "predict", str(head_run), str(data / "not-there.jpeg")]) == 2
    assert "file not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------- approach A


def test_end_to_end_mode(store, work):
    from train import runs
    from train.oct.fit import train

    run = train(store, work / "run-e2e", mode="end-to-end", epochs=1, batch_size=8, verbose=0)
    cfg = runs.read_config(run)
    assert cfg.mode == "end-to-end" and cfg.head_file is None
    assert (run / "fused.keras").is_file() and not (run / "head.keras").exists()
    assert runs.read_history(run)[0]["seconds"] > 0


def test_qat_int8_of_the_fused_model(head_run, data):
    """`tflite-qat-int8` on the real network (random-weight InceptionV3 + head): the tf-keras twin takes every
    Keras weight (probabilities equal), its fake-quantized model starts close to Keras, only the head is fine-tuned
    (the base stays frozen as in training), and
    the full-integer file classifies a scan through edge_runtime. Agreement is not asserted: a 3-epoch head on
    8 synthetic training scans sits near chance, where any perturbation flips answers."""
    import edge_runtime
    from convert.cli import main
    from train.evaluate import load_model

    out = head_run.parent / "qat"
    assert main([str(head_run), "--out", str(out), "--formats", "tflite-qat-int8", "--calib-n", "4", "--eval-n",
                 "4", "--qat-epochs", "1", "--qat-batch-size", "4", "--allow-drop"]) == 0
    row = json.loads((out / "conversion.json").read_text())["rows"][0]
    assert row["status"] in ("ok", "kept-below-threshold"), row.get("error")
    q = row["quantization"]
    head = load_model(head_run / "head.keras")
    assert q["twin"] == "oct-fused" and q["twin_max_abs_diff"] < 1e-4
    # Fake-quantized, before fine-tuning, it still answers like Keras. Measured 0.03; with tfmot's concat
    # transform (which reorders the inputs of InceptionV3's mixed3/mixed8) it was 0.84.
    assert q["qat_start_max_abs_diff"] < 0.2
    # Only the head learns (conv, batch-norm scale and shift, dense): the base is frozen as in training.
    assert q["qat_trainable_weights"] == sum(int(np.prod(w.shape)) for w in head.trainable_weights) == 147_588
    assert q["batchnorm_frozen"] == 94 + 1  # InceptionV3's and the head's: moving statistics kept
    assert q["activation_ranges_from_calibration"] > 50  # every quantized tensor starts at its calibration range

    model = edge_runtime.load(out / row["file"])
    assert model.metadata.precision == "int8" and model.metadata.task == "oct"
    scan = next(p for p in sorted((data / "test").rglob("*.jpeg")))
    (pred,) = model.predict([scan])
    assert pred.label in OCT_LABELS and abs(sum(pred.probabilities.values()) - 1) < 0.05
