"""edge_runtime: the light package a device runs, on real cells and artifacts made by `convert`.

Two ways to run this file:

- In the main environment (TensorFlow installed): the artifacts are made once
  per session from a tiny malaria run (through `convert.export.run_export`)
  and a tiny OCT base+head model (through the TFLite converter), and the
  tests that compare with Keras run too.
- In an environment with only `pip install .[edge]` (no TensorFlow): set
  `MEDGE_EDGE_ARTIFACTS=DIR` to a folder made beforehand by

      python -m tests.helpers --make-artifacts DIR

  and the tests that need TensorFlow skip themselves.

Tolerances, stated once:
- float32 artifact vs Keras on the same tensors: max |dprob| <= 1e-4; on the
  same files, each through its own pipeline (TF decode+resize vs Pillow, at
  most 2 grey levels apart): identical top-1 and max |dprob| <= 0.02
  (measured 0.002 on 100 real cells);
- int8 vs float32 artifact: max |dprob| <= 0.25 and the same top-1 on every
  cell where float32's top-two margin exceeds 0.2 (the tiny model's
  probabilities sit near 0.5, see tests/test_convert.py);
- Grad-CAM (numpy, closed form) vs tf.GradientTape on the same image: Pearson
  correlation >= 0.99 for the float32 artifact, >= 0.95 for int8 (its
  features carry the int8 rounding).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import edge_runtime
from edge_runtime import backends
from edge_runtime.backends import BackendError
from edge_runtime.cli import build_parser
from edge_runtime.cli import main as cli_main
from edge_runtime.clinical import OCT_LABELS, oct_summary, referral_level, slide_summary
from edge_runtime.model import UNCERTAIN, ModelError, Prediction, dequantize, quantize
from edge_runtime.spec import CONTENT_HASH_KEY, TensorInfo

from helpers import (
    INT8_IO_FILE,
    MALARIA_FILES,
    MALARIA_FORMATS,
    OCT_FILES,
    OCT_SPEC,
    ROOT,
    SAMPLE,
    assert_same_class_off_ties,
    cells,
    flip_strongest_first_conv_weights,
    run_cli,
    tflite_without_metadata,
)

GRADCAM_MIN_CORR = {"float32": 0.99, "int8": 0.95}
QUANT_MAX_ABS_DIFF, QUANT_SURE_MARGIN = 0.25, 0.2
HEAVY = ("tensorflow", "keras", "tf_keras")
# LiteRT where installed; the legacy tflite-runtime in a Pi-like environment without it.
HAS_LITERT = backends.BACKENDS["litert"].installed()
TFLITE_BACKEND = "litert" if HAS_LITERT else "tflite-runtime"


@pytest.fixture(scope="session")
def malaria_float(art):
    return edge_runtime.load(art / MALARIA_FILES["tflite-float32"], threads=2)


@pytest.fixture(scope="session")
def malaria_int8(art):
    return edge_runtime.load(art / MALARIA_FILES["tflite-int8"], threads=2)


# ---------------------------------------------------------------- light by construction


def test_backend_table_and_errors(monkeypatch):
    assert list(backends.BACKENDS) == ["litert", "tflite-runtime", "onnxruntime"]
    assert backends.resolve("m.tflite").name == TFLITE_BACKEND  # LiteRT preferred when installed
    assert backends.resolve("m.ONNX").name == "onnxruntime"
    assert backends.resolve("m.ort").name == "onnxruntime"
    with pytest.raises(BackendError, match=r"known: litert, tflite-runtime, onnxruntime.*medge\[edge\]"):
        backends.resolve("m.tflite", "tensorrt")
    with pytest.raises(BackendError, match="runs .onnx/.ort files, not .tflite"):
        backends.resolve("m.tflite", "onnxruntime")
    with pytest.raises(BackendError, match="must end in"):
        backends.resolve("m.pb")
    monkeypatch.setattr(backends.Backend, "installed", lambda self: False)
    with pytest.raises(BackendError, match=r"no runtime for .tflite.*medge\[edge\]"):
        backends.resolve("m.tflite")
    with pytest.raises(BackendError, match="tflite-runtime is not installed: pip install tflite-runtime"):
        backends.resolve("m.tflite", "tflite-runtime")
    # ONNX Runtime is the `onnx` extra, not `edge`'s: the message names the one that brings it.
    with pytest.raises(BackendError, match=r"no runtime for .onnx .*pip install 'medge\[onnx\]'"):
        backends.resolve("m.onnx")
    with pytest.raises(BackendError, match=r"onnxruntime is not installed: pip install 'medge\[onnx\]'"):
        backends.resolve("m.ort", "onnxruntime")


def test_onnx_without_onnxruntime_names_the_extra(art, monkeypatch):
    """A device with `.[edge]` only (no onnxruntime) that is handed an .onnx is told which extra runs it."""
    onnx_row = dataclasses.replace(backends.BACKENDS["onnxruntime"], import_name="onnxruntime_not_installed")
    monkeypatch.setitem(backends.BACKENDS, "onnxruntime", onnx_row)
    with pytest.raises(BackendError, match=r"medge\[onnx\]"):
        edge_runtime.load(art / MALARIA_FILES["onnx-int8"])


def test_no_tensorflow_after_load_predict_and_gradcam(art):
    """A real device session in a fresh process: load, predict real cells, OCT Grad-CAM; no TF/Keras imported."""
    code = (
        "import sys, edge_runtime\n"
        "from edge_runtime.gradcam import GradCam\n"
        f"m = edge_runtime.load({str(art / MALARIA_FILES['tflite-int8'])!r})\n"
        f"r = m.predict({[str(p) for p in cells(4, 50)]!r})\n"
        "assert all(p.ok for p in r), r\n"
        "lazy = [k for k in ('onnxruntime',) if k in sys.modules]\n"
        f"o = edge_runtime.load({str(art / OCT_FILES['int8'])!r})\n"
        f"GradCam(o).explain(o.preprocess({str(sorted((art / 'oct_scans').glob('*.jpeg'))[0])!r}))\n"
        f"edge_runtime.load({str(art / MALARIA_FILES['onnx-int8'])!r}).predict({str(cells(1)[0])!r})\n"
        f"heavy = sorted(k for k in sys.modules if k.split('.')[0] in {HEAVY!r})\n"
        "print(heavy, lazy)\n"
        "sys.exit(1 if heavy or lazy else 0)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


# ---------------------------------------------------------------- API on real cells


@pytest.mark.parametrize("fmt", MALARIA_FORMATS)
def test_every_format_classifies_real_cells(art, fmt, malaria_float):
    model = edge_runtime.load(art / MALARIA_FILES[fmt], threads=2)
    assert model.backend == (TFLITE_BACKEND if fmt.startswith("tflite") else "onnxruntime")
    assert model.labels == ("Parasitized", "Uninfected") and model.task == "malaria"
    # Embedded metadata is read on every runtime (tflite-runtime too: no flatbuffer schema needed).
    assert model.metadata.format == fmt and model.metadata_source == "embedded"
    assert model.warmup_ms > 0 and model.load_ms > 0
    files = cells(40, 10)
    preds = model.predict(files)
    assert [p.source for p in preds] == [str(f) for f in files]
    for p in preds:
        assert p.ok and p.label in model.labels and p.referral is None
        assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=0.02)
        assert p.confidence == pytest.approx(max(p.probabilities.values()))
        assert p.decision == (UNCERTAIN if p.confidence < model.threshold else p.label)
        assert p.timing["inference_ms"] > 0 and p.timing["preprocess_ms"] > 0
    ref = malaria_float.run(np.stack([malaria_float.preprocess(f) for f in files]))
    probs = np.array([[p.probabilities[l] for l in model.labels] for p in preds])
    if model.metadata.precision == "float32":
        assert np.abs(probs - ref).max() < 1e-4
    else:
        assert np.abs(probs - ref).max() <= QUANT_MAX_ABS_DIFF
        # The tiny model sits near 0.5: int8 may flip only cells the float model is unsure about.
        assert_same_class_off_ties(ref, probs, QUANT_SURE_MARGIN)


def test_int8_io_is_quantized_with_the_tensors_own_parameters(art, malaria_int8):
    m8 = edge_runtime.load(art / INT8_IO_FILE, threads=2)
    inp, out = m8.session.input, m8.session.output
    assert inp.dtype == np.int8 and out.dtype == np.int8 and inp.quantized and out.quantized
    assert m8.metadata.input.dtype == "int8" and m8.metadata.input.scale == pytest.approx(inp.scale)
    x = np.stack([m8.preprocess(f) for f in cells(40, 10)])
    p8, pf = m8.run(x), malaria_int8.run(x)
    # Same quantized graph, only the I/O conversion differs: output rounding to 1/256 at most.
    assert np.abs(p8 - pf).max() <= 2 * out.scale + 1e-6
    assert (p8.argmax(1) == pf.argmax(1)).mean() >= 0.95


def test_quantize_dequantize_round_trip():
    spec = TensorInfo("x", (1, 4), "int8", scale=1 / 255, zero_point=-128)
    x = np.array([0.0, 0.6, 1.0, 2.0], np.float32)
    q = quantize(x, spec)
    assert q.dtype == np.int8 and q.tolist() == [-128, 25, 127, 127]  # 2.0 saturates
    np.testing.assert_allclose(dequantize(q, spec)[:3], [0.0, 153 / 255, 1.0], atol=1e-6)
    u = TensorInfo("y", (1, 2), np.uint8, scale=0.5, zero_point=10)
    assert quantize(np.array([-10.0, 1.0]), u).tolist() == [0, 12]


def test_only_the_backends_open_a_runtime():
    """One session factory per runtime: only edge_runtime/backends creates an Interpreter or an InferenceSession."""
    import re

    pattern = re.compile(r"\b(Interpreter|InferenceSession)\s*\(")
    offenders = []
    for pkg in ("convert", "benchmarks", "edge_runtime", "train"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            if (ROOT / "edge_runtime" / "backends") in f.parents:
                continue
            for i, line in enumerate(f.read_text().splitlines(), 1):
                code = line.split("#")[0]
                if pattern.search(code) and not code.lstrip().startswith(('"', "'", "f\"", "f'")):
                    offenders.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, offenders


@pytest.mark.parametrize("fmt", ["tflite-int8", "onnx-int8"])
def test_session_interface(art, fmt):
    """Batched runs, metadata and inner tensors through the public Session interface."""
    path = art / MALARIA_FILES[fmt]
    s = backends.open_session(path, threads=1)
    x = np.stack([edge_runtime.load(path, warmup=False).preprocess(f) for f in cells(5, 30)])
    xq = quantize(x, s.input) if s.input.quantized else x.astype(s.input.dtype)
    looped = np.concatenate([s.run(xq[i: i + 1]) for i in range(len(xq))])
    np.testing.assert_allclose(s.run_batch(xq), looped, atol=1e-5)
    assert s.run_with(xq[:1])[1] == [] and s.extra_outputs == ()
    if fmt.startswith("tflite"):
        assert s.batch == 1 and s.metadata() is None  # the flatbuffer's entries are read by edge_runtime.metadata
        tensors = s.tensors()
        assert s.input in tensors.values()
        convs = [op for op in s.ops() if op.name == "CONV_2D"]
        assert convs and all(i in tensors for op in convs for i in op.inputs if i >= 0)
        four = backends.open_session(path, threads=1, batch=4)
        assert four.batch == 4
        np.testing.assert_allclose(four.run_batch(xq[:4]), looped[:4], atol=1e-5)
        with pytest.raises(ValueError, match="batches of 4"):
            four.run_batch(xq)
    else:
        assert s.batch is None and "medge" in s.metadata()  # dynamic batch: one call for the whole batch
        with pytest.raises(NotImplementedError, match="no inner"):
            s.ops()
        with pytest.raises(ValueError, match="no inner"):
            backends.open_session(path, extra_outputs=(3,))


def test_preprocess_names_what_it_refuses(malaria_float):
    assert malaria_float.preprocess(cells(1)[0]).shape == malaria_float.input_shape
    with pytest.raises(edge_runtime.ImageError, match="input.*neither an image"):
        malaria_float.preprocess(np.zeros((5, 5, 7), np.float32))
    with pytest.raises(edge_runtime.ImageError, match="nope.png"):
        malaria_float.preprocess("nope.png")


def test_same_preprocessing_and_predictions_as_the_keras_pipeline(art, malaria_float):
    """Issue item 3: the training pipeline's tensors and Keras' predictions against edge_runtime's."""
    tf = pytest.importorskip("tensorflow")
    from train.data import decode_and_resize
    from train.evaluate import load_model

    files = cells(100, 4)
    tf_x = np.stack([decode_and_resize(tf.constant(str(f)), malaria_float.spec).numpy() for f in files])
    edge_x = np.stack([malaria_float.preprocess(f) for f in files])
    assert np.abs(tf_x - edge_x).max() * 255 < 2
    keras_p = load_model(art / "malaria.keras").predict(tf_x, verbose=0)
    preds = malaria_float.predict(files)
    edge_p = np.array([[p.probabilities[l] for l in malaria_float.labels] for p in preds])
    # The artifact's numerics alone (same tensors): float32 agrees with Keras to ~1e-6.
    assert np.abs(load_model(art / "malaria.keras").predict(edge_x, verbose=0) - edge_p).max() < 1e-4
    # The whole path (TF decoding vs Pillow, <= 2 grey levels apart): same classes, probabilities within 0.02.
    assert np.abs(keras_p - edge_p).max() < 0.02
    # Same class wherever the tiny model is not on the fence (a flip within 2 x 0.02 of a tie is not a bug).
    assert_same_class_off_ties(keras_p, edge_p, 0.04)


def test_paths_pil_arrays_and_batches_agree(malaria_float):
    files = cells(3, 100)
    by_path = malaria_float.run(np.stack([malaria_float.preprocess(f) for f in files]))
    pil = [Image.open(f) for f in files]
    u8 = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    pre = np.stack([malaria_float.preprocess(f) for f in files])
    for inputs in (files, [str(f) for f in files], pil, u8, pre, list(pre)):
        preds = malaria_float.predict(inputs)
        got = np.array([[p.probabilities[l] for l in malaria_float.labels] for p in preds])
        np.testing.assert_allclose(got, by_path, atol=1e-6)
    single = malaria_float.predict(files[0])
    assert len(single) == 1 and single[0].source == str(files[0])
    assert malaria_float.predict(pil[:1])[0].source == str(files[0])  # PIL keeps its filename
    assert malaria_float.predict(u8[:1])[0].source == "array[0]"
    bad = malaria_float.predict([np.zeros((5, 5, 7), np.float32)])[0]
    assert not bad.ok and "neither an image" in bad.error


def test_threshold_makes_uncertain_answers(art):
    m = edge_runtime.load(art / MALARIA_FILES["tflite-float32"])
    assert m.threshold == 0.8  # the malaria threshold convert embeds (metadata confidence_threshold)
    files = cells(20, 20)
    assert all(p.decision == p.label and not p.uncertain for p in m.predict(files, threshold=0.0))
    # "Below the threshold" is uncertain: a bar between the confidences splits them exactly.
    conf = sorted({p.confidence for p in m.predict(files)})
    assert len(conf) > 1, "the tiny model gave one confidence to every cell"
    bar = (conf[0] + conf[-1]) / 2
    for p in m.predict(files, threshold=bar):
        assert p.uncertain == (p.confidence < bar)
        assert p.decision == (UNCERTAIN if p.confidence < bar else p.label)
    strict = edge_runtime.load(art / MALARIA_FILES["tflite-float32"], threshold=0.99)
    assert strict.threshold == 0.99
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\]"):
        edge_runtime.load(art / MALARIA_FILES["tflite-float32"], threshold=1.5)


# ---------------------------------------------------------------- bad input, nothing lost


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
    """Each awkward image mode next to the plain 8-bit RGB image it must be classified like."""
    d = tmp_path_factory.mktemp("odd")
    src = Image.open(cells(1, 1)[0]).convert("RGB")
    rgb = np.asarray(src)
    out = {}
    src.save(d / "plain.png")
    out["rgba"] = (d / "rgba.png", d / "plain.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 90, np.uint8)])).save(out["rgba"][0])
    grey = src.convert("L")
    grey.save(d / "grey.png")
    # 16-bit greyscale whose high byte is the 8-bit image (what TF's decode_png(dtype=uint8) keeps).
    g16 = np.asarray(grey).astype(np.uint16) * 256 + 77
    Image.fromarray(g16.astype(np.uint16)).save(d / "grey16.png")
    out["16-bit"] = (d / "grey16.png", d / "grey.png")
    Image.fromarray(np.dstack([np.asarray(grey), np.full(rgb.shape[:2], 30, np.uint8)])).save(d / "la.png")
    out["LA"] = (d / "la.png", d / "grey.png")
    pal = src.quantize(64)
    pal.save(d / "p.png")
    pal.convert("RGB").save(d / "p_as_rgb.png")
    out["P"] = (d / "p.png", d / "p_as_rgb.png")
    cmyk = src.convert("CMYK")
    cmyk.save(d / "cmyk.tiff")
    cmyk.convert("RGB").save(d / "cmyk_as_rgb.png")
    out["CMYK"] = (d / "cmyk.tiff", d / "cmyk_as_rgb.png")
    big = src.resize((src.width * 4, src.height * 4))
    big.save(d / "upright.jpg", quality=100)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": stored pixels are the upright image turned 90 CCW
    big.transpose(Image.Transpose.ROTATE_90).save(d / "exif_rotated.jpg", quality=100, exif=exif)
    out["EXIF"] = (d / "exif_rotated.jpg", d / "upright.jpg")
    return out


@pytest.mark.parametrize("kind", ["rgba", "16-bit", "LA", "P", "CMYK", "EXIF"])
def test_odd_modes_are_classified_like_training_saw_them(malaria_float, odd_images, kind):
    odd, reference = odd_images[kind]
    p_odd, p_ref = malaria_float.predict([odd, reference])
    assert p_odd.ok, p_odd.error
    x_odd, x_ref = malaria_float.preprocess(odd), malaria_float.preprocess(reference)
    tol = 1.5 / 255 if kind == "EXIF" else 1e-6  # JPEG blocks fall differently once rotated
    assert np.abs(x_odd - x_ref).mean() <= tol, kind
    assert p_odd.label == p_ref.label
    assert abs(p_odd.confidence - p_ref.confidence) < (0.02 if kind == "EXIF" else 1e-6)


def test_odd_modes_match_the_tf_decoder(malaria_float, odd_images):
    """Alpha dropped, palette expanded, 16-bit by high byte: what tf.io.decode_image gives training."""
    tf = pytest.importorskip("tensorflow")
    from train.data import decode_and_resize

    for kind in ("rgba", "16-bit", "LA", "P"):
        odd, _ = odd_images[kind]
        tf_x = decode_and_resize(tf.constant(str(odd)), malaria_float.spec).numpy()
        assert np.abs(tf_x - malaria_float.preprocess(odd)).max() * 255 < 2, kind


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    good = cells(2, 200)
    (d / "empty.png").write_bytes(b"")
    (d / "notes.png").write_text("this is not an image\n")
    data = good[0].read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 2])
    corrupt = bytearray(data)
    corrupt[60:400] = os.urandom(340)
    (d / "corrupt.png").write_bytes(bytes(corrupt))
    Image.new("1", (9000, 9000)).save(d / "huge.png")  # 81 M pixels > the 64 M limit, ~10 kB on disk
    return d, good


def test_bad_images_give_error_records_and_the_batch_goes_on(malaria_int8, bad_files):
    d, good = bad_files
    inputs = [good[0], d / "empty.png", d / "notes.png", d / "truncated.png", d / "corrupt.png", d / "huge.png",
              d / "missing.png", d, good[1]]
    preds = malaria_int8.predict(inputs)
    assert [p.source for p in preds] == [str(p) for p in inputs]
    assert preds[0].ok and preds[-1].ok
    errors = {Path(p.source).name: p.error for p in preds[1:-1]}
    assert all(not p.ok and p.decision == "error" and p.label is None for p in preds[1:-1])
    assert "0 bytes" in errors["empty.png"]
    assert "not an image" in errors["notes.png"]
    assert "truncated" in errors["truncated.png"] or "corrupt" in errors["truncated.png"]
    assert errors["corrupt.png"]
    assert "too large" in errors["huge.png"] and "limit" in errors["huge.png"]
    assert "not found" in errors["missing.png"]
    assert "directory" in errors[d.name]


# ---------------------------------------------------------------- model errors


def _strip_medge_entry(src: Path, dest: Path) -> None:
    """A copy of a .tflite whose medge metadata entry is renamed (the flatbuffer string, in place), so readers
    do not find it: no schema needed, so the Pi's environment makes it too. Its content hash is renamed too
    (its entry's name and its record's marker): a file made before medge sealed files."""
    data = src.read_bytes()
    name = len(b"medge").to_bytes(4, "little") + b"medge\0"  # a flatbuffer string: length, bytes, NUL
    assert data.count(name) == 1, "expected one 'medge' entry name"
    data = data.replace(name, name.replace(b"medge", b"xedge"))
    dest.write_bytes(data.replace(b"medge-content-sha256", b"xedge-content-sha256"))


def _unsealed(data: bytes) -> bytes:
    """`data` as a file made before medge sealed files: its content hash renamed in place (no schema needed)."""
    return data.replace(b"medge-content-sha256", b"xedge-content-sha256")


def test_model_errors_are_one_clear_message(art, tmp_path):
    sealed = art / MALARIA_FILES["tflite-int8"]
    good = tmp_path / "good.tflite"  # the runtime's own refusals: a file without a content hash to check first
    good.write_bytes(_unsealed(sealed.read_bytes()))
    cases = {}
    cases["missing"] = (tmp_path / "nope.tflite", "does not exist")
    (tmp_path / "empty.tflite").write_bytes(b"")
    cases["empty"] = (tmp_path / "empty.tflite", "empty")
    (tmp_path / "cut.tflite").write_bytes(good.read_bytes()[:5000])
    cases["truncated"] = (tmp_path / "cut.tflite", "truncated or not a model")
    (tmp_path / "cut-sealed.tflite").write_bytes(sealed.read_bytes()[:5000])
    cases["truncated, sealed"] = (tmp_path / "cut-sealed.tflite", "cut-sealed.tflite has changed since it was made")
    corrupt = bytearray(good.read_bytes())
    # Over the graph's own table (found with edge_runtime.tflite_file's schema-free reader), not a fixed offset:
    # the metadata and golden-set buffers in front of it change size between medge versions.
    from edge_runtime.tflite_file import tflite_model

    graph = tflite_model(bytes(corrupt)).tables(2)[0].pos
    corrupt[graph - 200: graph + 200] = b"\xff" * 400
    (tmp_path / "corrupt.tflite").write_bytes(bytes(corrupt))
    cases["corrupt"] = (tmp_path / "corrupt.tflite", "truncated or not a model")
    (tmp_path / "text.tflite").write_text("hello")
    cases["foreign tflite"] = (tmp_path / "text.tflite", "truncated or not a model")
    shutil.copy(cells(1)[0], tmp_path / "cell.onnx")
    cases["foreign onnx"] = (tmp_path / "cell.onnx", "truncated or not a model")
    (tmp_path / "m.pb").write_bytes(b"x")
    cases["suffix"] = (tmp_path / "m.pb", "must end in")
    cases["folder"] = (tmp_path, "not a file")
    _strip_medge_entry(good, tmp_path / "bare.tflite")  # and no sidecar beside it
    cases["no metadata"] = (tmp_path / "bare.tflite", "no medge metadata")
    for _what, (path, msg) in cases.items():
        with pytest.raises((ModelError, BackendError), match=msg):
            edge_runtime.load(path)
    for what in ("missing", "truncated", "truncated, sealed", "corrupt", "foreign onnx", "no metadata"):  # as a user
        path, msg = cases[what]
        code, _, err = run_cli("info", path)
        assert code == 2 and msg in err and "Traceback" not in err, (what, err)


def test_sidecar_fallback_and_metadata_that_does_not_match(art, tmp_path):
    good = art / MALARIA_FILES["tflite-float32"]
    _strip_medge_entry(good, tmp_path / "bare.tflite")
    shutil.copy(good.with_suffix(".json"), tmp_path / "bare.json")
    m = edge_runtime.load(tmp_path / "bare.tflite")
    assert m.metadata_source == "sidecar" and m.labels == ("Parasitized", "Uninfected")
    d = json.loads(good.with_suffix(".json").read_text())
    d["preprocess"]["input_size"] = [32, 32]
    (tmp_path / "bare.json").write_text(json.dumps(d))
    with pytest.raises(ModelError, match="metadata does not match the model.*preprocessing makes"):
        edge_runtime.load(tmp_path / "bare.tflite")
    d = json.loads(good.with_suffix(".json").read_text())
    d["labels"], d["positive_label"] = ["a", "b", "c"], None
    (tmp_path / "bare.json").write_text(json.dumps(d))
    with pytest.raises(ModelError, match="one value per label"):
        edge_runtime.load(tmp_path / "bare.tflite")
    (tmp_path / "bare.json").write_text("{not json")
    code, _, err = run_cli("predict", tmp_path / "bare.tflite", cells(1)[0])
    assert code == 2 and "sidecar metadata is invalid" in err and "Traceback" not in err


# ---------------------------------------------------------------- field outputs


def _p(label, conf, uncertain=False, error=None):
    return Prediction(source="x", label=label, confidence=conf, uncertain=uncertain, error=error,
                      decision="error" if error else (UNCERTAIN if uncertain else label or ""))


def test_slide_summary_counts_and_parasitemia():
    preds = ([_p("Parasitized", 0.95)] * 3 + [_p("Uninfected", 0.9)] * 5 + [_p("Parasitized", 0.6, True)] * 2
             + [_p(None, None, error="empty file (0 bytes)")])
    s = slide_summary(preds)
    assert s == {"cells": 10, "parasitized": 3, "uninfected": 5, "uncertain": 2, "rejected": 1,
                 "parasitemia_percent": 37.5, "parasitemia_min_percent": 30.0, "parasitemia_max_percent": 50.0}
    assert slide_summary([])["parasitemia_percent"] is None


def test_oct_referral_levels():
    from edge_runtime.metadata import ArtifactMetadata

    meta = ArtifactMetadata(model="oct", task="oct", labels=OCT_LABELS, preprocess=OCT_SPEC, format="tflite-float32",
                            precision="float32", input=TensorInfo("i", (1, 64, 64, 3), "float32"),
                            output=TensorInfo("o", (1, 4), "float32"))
    assert [referral_level(meta, l, False) for l in OCT_LABELS] == ["urgent", "urgent", "routine", "observation"]
    assert referral_level(meta, "NORMAL", True) == "specialist review"
    s = oct_summary([Prediction("a", "CNV", 0.9, referral="urgent", decision="CNV"),
                     Prediction("b", error="bad")])
    assert s["scans"] == 1 and s["urgent"] == 1 and s["rejected"] == 1


# ---------------------------------------------------------------- OCT and Grad-CAM


@pytest.mark.parametrize("precision", list(OCT_FILES))
def test_oct_scans_get_referral_levels(art, precision):
    m = edge_runtime.load(art / OCT_FILES[precision], threshold=0.0)
    preds = m.predict(sorted((art / "oct_scans").glob("*.jpeg")))
    assert len(preds) == 6 and all(p.ok for p in preds)
    for p in preds:
        assert p.referral == {"CNV": "urgent", "DME": "urgent", "DRUSEN": "routine", "NORMAL": "observation"}[p.label]


@pytest.mark.parametrize("precision", list(OCT_FILES))
def test_gradcam_reads_the_features_from_the_artifact(art, precision):
    """No TensorFlow needed: the numpy head on the tapped features reproduces the artifact's own output."""
    from edge_runtime.gradcam import GradCam

    m = edge_runtime.load(art / OCT_FILES[precision])
    cam = GradCam(m)
    assert cam.tap.mode == ("extra-output" if HAS_LITERT else "preserve-all-tensors")
    for scan in sorted((art / "oct_scans").glob("*.jpeg"))[:3]:
        res = cam.explain(m.preprocess(scan))
        assert res["cam"].shape == (8, 8) and res["cam"].min() >= 0 and res["cam"].max() == pytest.approx(1.0)
        assert res["head_max_abs_diff"] < (1e-4 if precision == "float32" else 0.05)
        p = m.predict(scan)[0]
        np.testing.assert_allclose(res["probabilities"], list(p.probabilities.values()), atol=1e-6)


def test_gradcam_without_the_flatbuffer_schema_keeps_all_tensors(art, monkeypatch):
    """tflite-runtime's path (no schema to add an output): the interpreter keeps every tensor; same maps."""
    if not HAS_LITERT:
        pytest.skip("the extra-output path needs ai-edge-litert to compare with")
    from edge_runtime.backends import _tflite
    from edge_runtime.gradcam import GradCam

    m = edge_runtime.load(art / OCT_FILES["int8"])
    scan = m.preprocess(sorted((art / "oct_scans").glob("*.jpeg"))[0])
    fast = GradCam(m).explain(scan)
    monkeypatch.setattr(_tflite, "with_extra_outputs", lambda model, indices: None)
    cam = GradCam(m)
    assert cam.tap.mode == "preserve-all-tensors"
    slow = cam.explain(scan)
    np.testing.assert_allclose(slow["probabilities"], fast["probabilities"], atol=1e-6)
    np.testing.assert_allclose(slow["cam"], fast["cam"], atol=1e-5)


@pytest.mark.parametrize("precision", list(OCT_FILES))
def test_gradcam_matches_gradient_tape(art, precision):
    """Issue item 4: the closed form on the artifact's features vs tf.GradientTape on the Keras model."""
    tf = pytest.importorskip("tensorflow")
    import keras

    from edge_runtime.gradcam import GradCam

    fused = keras.saving.load_model(art / "oct_fused.keras", compile=False)
    base = next(l for l in fused.layers if l.name == "inception_v3")
    head = next(l for l in fused.layers if l.name == "head")
    m = edge_runtime.load(art / OCT_FILES[precision])
    cam = GradCam(m)
    scans = sorted((art / "oct_scans").glob("*.jpeg"))
    for scan in scans:
        x = m.preprocess(scan)
        res = cam.explain(x)
        # Reference: the training side's recipe (train/oct/gradcam.py) on the Keras model.
        feats = base(x[None], training=False)
        conv = head.get_layer("head_conv")
        post = [head.get_layer(n) for n in ("head_bn", "head_relu", "head_dropout", "head_flatten", "head_probs")]
        with tf.GradientTape() as tape:
            a = conv(feats)
            tape.watch(a)
            y = a
            for layer in post:
                y = layer(y, training=False)
            k = int(np.argmax(y[0]))
            score = y[0, k]
        g = tape.gradient(score, a)
        ref = tf.nn.relu(tf.reduce_mean(a * tf.reduce_mean(g, axis=(1, 2), keepdims=True), axis=-1))[0].numpy()
        ref = ref / ref.max() if ref.max() > 0 else ref
        assert int(res["probabilities"].argmax()) == k or precision == "int8"
        corr = np.corrcoef(ref.ravel(), res["cam"].ravel())[0, 1]
        assert corr >= GRADCAM_MIN_CORR[precision], (scan.name, corr)
        if precision == "float32":
            np.testing.assert_allclose(res["probabilities"], y[0].numpy(), atol=1e-4)
            assert res["head_max_abs_diff"] < 1e-4


def test_gradcam_export_hook_skips_what_it_cannot_explain(art, tmp_path):
    pytest.importorskip("tensorflow")
    import dataclasses

    import keras

    from convert.gradcam_export import write_for_export
    from convert.sources import Source

    fused = keras.saving.load_model(art / "oct_fused.keras", compile=False)
    src = Source(path=art / "oct_fused.keras", name="o", labels=OCT_LABELS, spec=OCT_SPEC, task="oct",
                 positive_label=None, sha256="ab" * 32)
    logs = []
    assert write_for_export(fused, dataclasses.replace(src, task="malaria"), tmp_path, log=logs.append) is None
    # Approach A's top (pooling, dense 64, dense 4): no 1x1 conv, so no device Grad-CAM, said once.
    f = keras.Input((8, 8, 2048))
    top = keras.Model(f, keras.layers.Dense(4, activation="softmax")(
        keras.layers.Dense(64, activation="relu")(keras.layers.GlobalAveragePooling2D()(f))))
    assert write_for_export(top, src, tmp_path, log=logs.append) is None
    assert len(logs) == 1 and "does not start with a Conv2D" in logs[0]
    assert not list(tmp_path.iterdir())


def test_gradcam_cli_writes_overlays_and_refuses_what_it_cannot_explain(art, tmp_path):
    scans = sorted((art / "oct_scans").glob("*.jpeg"))[:3]
    code, out, err = run_cli("predict", art / OCT_FILES["int8"], *scans, "--gradcam", tmp_path / "maps", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert [r["referral"] for r in doc["results"]] and doc["summaries"][0]["scans"] == 3
    pngs = sorted((tmp_path / "maps").glob("*.png"))
    assert len(pngs) == 3
    for png, scan in zip(pngs, scans):
        with Image.open(png) as im, Image.open(scan) as src:
            assert im.mode == "RGB" and im.size == src.size  # overlay at the scan's own size
            assert np.asarray(im).std(axis=2).mean() > 1  # coloured heat, not the grey scan
    # Not an OCT head model / no weights / an ONNX artifact: exit 2 with the reason, no traceback.
    code, _, err = run_cli("predict", art / MALARIA_FILES["tflite-float32"], cells(1)[0], "--gradcam", tmp_path / "x")
    assert code == 2 and "made for OCT head models" in err and "Traceback" not in err
    lone = tmp_path / "lone"
    lone.mkdir()
    for f in (art / OCT_FILES["float32"], (art / OCT_FILES["float32"]).with_suffix(".json")):
        shutil.copy(f, lone / f.name)  # artifact and sidecar, without the Grad-CAM weights file
    code, _, err = run_cli("predict", lone / OCT_FILES["float32"], scans[0], "--gradcam", tmp_path / "x")
    assert code == 2 and "no Grad-CAM head weights" in err and "convert/gradcam_export.py" in err

    code, _, err = run_cli("predict", art / OCT_FILES["float32"], scans[0], "--gradcam", tmp_path / "x",
                           "--head-weights", art / MALARIA_FILES["tflite-float32"].replace(".tflite", ".json"))
    assert code == 2 and "not a medge Grad-CAM weights file" in err


# ---------------------------------------------------------------- CLI


def test_cli_slide_folder_json_and_summary(art, tmp_path):
    slide = tmp_path / "C116P77"
    slide.mkdir()
    for f in SAMPLE.glob("*/C116P77*.png"):
        shutil.copy(f, slide / f.name)
    (slide / "notes.txt").write_text("not a cell")
    code, out, err = run_cli("predict", art / MALARIA_FILES["tflite-int8"], slide, "--json", "--threads", "1")
    assert code == 0, err
    doc = json.loads(out)
    assert len(doc["results"]) == 20 and all(r["error"] is None for r in doc["results"])
    s = doc["summaries"][0]
    assert s["slide"] == str(slide) and s["cells"] == 20 and s["rejected"] == 0
    assert s["parasitized"] + s["uninfected"] + s["uncertain"] == 20
    assert doc["stats"]["classified"] == 20 and doc["stats"]["first_result_ms"] > 0
    assert "skipped 1 non-image" in err


def test_cli_exit_codes_and_csv(art, bad_files):
    d, good = bad_files
    model = art / MALARIA_FILES["onnx-int8"]
    code, out, err = run_cli("predict", model, *good, "--csv", "--backend", "onnxruntime")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 2 and rows[0]["p_Parasitized"] and rows[0]["error"] == ""
    assert "slide (files)" in err  # summaries on stderr keep stdout pure CSV
    code, out, err = run_cli("predict", model, good[0], d / "notes.png", d / "empty.png")
    assert code == 1 and "REJECTED" in out and "Traceback" not in err
    assert run_cli("predict", model)[0] == 2  # no inputs
    assert run_cli("predict", model, good[0], "--backend", "tensorrt")[0] == 2
    assert run_cli("predict", model, good[0], "--threads", "0")[0] == 2
    assert run_cli("predict", model, good[0], "--backend", "litert")[0] == 2
    code, out, _ = run_cli("predict", model, d / "nothing_here")
    assert code == 1 and "0/1 classified" in out and "no image reached the model" in out and "None" not in out
    empty = d / "empty_folder"
    empty.mkdir(exist_ok=True)
    code, _, err = run_cli("predict", model, empty)
    assert code == 2 and "no images" in err
    code, out, _ = run_cli("info", model, "--json")
    info = json.loads(out)
    assert code == 0 and info["format"] == "onnx-int8" and info["backend"] == "onnxruntime"
    assert cli_main(["--help"]) == 0 and cli_main(["predict"]) == 2


def test_every_option_s_help_gives_its_default(capsys):
    """`python -m edge_runtime CMD --help`: each option that takes a value says its default (issue 27 met
    `serve --help` without the port's and `smear --help` without the threshold's)."""
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sp in subs.items():
        fmt = sp._get_formatter()
        for action in sp._actions:
            if action.option_strings and action.nargs != 0:  # flags (--json, --normalise) are off unless given
                assert "default" in fmt._expand_help(action), f"{name} {action.option_strings[0]}: {action.help!r}"
    assert cli_main(["serve", "--help"]) == 0
    assert "(default 8080; 8443 with --https)" in " ".join(capsys.readouterr().out.split())
    assert cli_main(["smear", "--help"]) == 0
    assert "(default: the model's threshold" in " ".join(capsys.readouterr().out.split())


def test_cli_in_process_threshold(art, capsys):
    model = edge_runtime.load(art / MALARIA_FILES["tflite-float32"])
    cell = min(cells(20, 20), key=lambda f: model.predict(f)[0].confidence)  # the least sure of 20
    bar = min(1.0, model.predict(cell)[0].confidence + 1e-6)
    code = cli_main(["predict", str(art / MALARIA_FILES["tflite-float32"]), str(cell), "--threshold", str(bar)])
    out = capsys.readouterr().out
    assert code == 0 and UNCERTAIN in out and "slide (files): 1 cells" in out and "1 uncertain" in out
    # the one cell is uncertain: 0% of the cells counted, never "n/a" of the confident ones
    assert "parasitemia 0.0% of the cells counted (100.0% if every uncertain cell were parasitized)" in out



# ---------------------------------------------------------------- the device checks its own files (golden sets)


@pytest.mark.parametrize("name", [*MALARIA_FILES.values(), INT8_IO_FILE])
def test_selftest_passes_on_every_malaria_format_on_this_runtime(art, name):
    """Each artifact's golden set, made on the converting machine, answers the same on this device's runtime."""
    code, out, err = run_cli("selftest", art / name, "--json")
    assert code == 0, out + err
    doc = json.loads(out)
    assert doc["ok"] and doc["inputs"] >= 2 and doc["max_abs_diff"] <= doc["atol"]


def _released_malaria() -> Path:
    from edge_runtime import registry

    if "malaria" not in {r.name for r in registry.read_registry()}:
        pytest.skip("no malaria model released yet")
    return registry.resolve("malaria")


def test_selftest_of_the_released_model_by_name():
    _released_malaria()
    code, out, err = run_cli("selftest", "malaria")
    assert code == 0 and "selftest passed" in out, out + err


def test_selftest_fails_on_a_tampered_copy_of_the_released_model(tmp_path):
    pytest.importorskip("ai_edge_litert", reason="finding the conv weights uses the flatbuffer schema")
    released = _released_malaria()
    bad = tmp_path / released.name
    # Its content hash refuses any changed byte; a copy without the record (as files made before 1.1.0) is left
    # to its golden answers. Measured on release 1.0.0: its 4 golden inputs miss 1 to 4 of the strongest
    # first-layer weights flipped (max |dprob| 0.027 < 0.03) and catch 8 (0.074). Loaded by name, any changed
    # byte also fails the registry's sha256.
    bad.write_bytes(flip_strongest_first_conv_weights(released.read_bytes(), n=1))
    code, out, err = run_cli("selftest", bad)
    assert code == 1 and "selftest FAILED" in out and "has changed since it was made" in out, out + err
    unsealed = tflite_without_metadata(released.read_bytes(), (CONTENT_HASH_KEY,))
    bad.write_bytes(flip_strongest_first_conv_weights(unsealed, n=8))
    code, out, err = run_cli("selftest", bad)
    assert code == 1 and "selftest FAILED" in out and "worst: golden input" in out, out + err
