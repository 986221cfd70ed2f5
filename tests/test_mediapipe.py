"""The standard TFLite Model Metadata in medge's .tflite files, and MediaPipe Tasks classifying with it.

The first tests need no MediaPipe: they read the `TFLITE_METADATA` entry back
with medge's own reader and check it says what the `medge` entry says.

The client tests run MediaPipe's `vision.ImageClassifier`, in MediaPipe's own
environment (MediaPipe 0.10.21 needs numpy < 2; medge's has numpy 2), on the
float32 and int8 malaria artifacts, the released model and the OCT stand-in,
with nothing configured but the model file, and compare its labels with
edge_runtime's on the bundled sample cells (>= 99% must agree; the figure is
printed: run with -s). They skip unless that environment is given:

    python3 -m venv /work/mp-venv && /work/mp-venv/bin/pip install "mediapipe==0.10.21" "numpy<2"
    MEDGE_MEDIAPIPE_PYTHON=/work/mp-venv/bin/python python -m pytest -s tests/test_mediapipe.py

MediaPipe resizes with its own bilinear sampler (no antialiasing), edge_runtime
with Pillow's antialiased one: a cell near its decision fence may flip, which is
why agreement is measured, not required to be exact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import edge_runtime
from edge_runtime import registry
from edge_runtime import standard_metadata as std
from edge_runtime.metadata import embed_tflite, read_tflite
from edge_runtime.spec import STANDARD_KEY
from edge_runtime.tflite_file import embed_entries as embed_tflite_entries
from edge_runtime.tflite_file import tflite_metadata_entries

from helpers import MALARIA_FILES, OCT_FILES, ROOT, SAMPLE, tflite_without_metadata

MP_ENV = "MEDGE_MEDIAPIPE_PYTHON"
CLIENT = ROOT / "tests" / "mediapipe_client.py"
MIN_AGREEMENT = 0.99
# Largest |dprob| on pixels both clients take as they are (no resize): float32 files differ by op order only;
# MediaPipe computes (pixel - mean) / std where edge_runtime computes pixel * scale + offset, which may differ in
# the last float32 bit, and an int8 file's input quantizer may round such a value one step apart (measured:
# 0.012 on a trained int8 file, 0 on others).
SAME_PIXELS_ATOL = {"float32": 1e-5, "int8": 0.03}
RELEASED = registry.RELEASED_DIR / "malaria.tflite"
CELLS = sorted(str(p) for p in SAMPLE.rglob("*.png"))


def _with_standard(path: Path) -> bytes:
    """The file's bytes as convert now writes them: the committed release predates the standard entry."""
    raw = path.read_bytes()
    entries = tflite_metadata_entries(raw)
    if STANDARD_KEY in entries:
        return raw
    extra = {k: v for k, v in entries.items() if k == "medge-golden"}
    return embed_tflite(raw, read_tflite(raw), extra)


# ---------------------------------------------------------------- the entry itself (no MediaPipe)


def test_standard_entry_says_what_the_medge_contract_says():
    data = _with_standard(RELEASED)
    meta = read_tflite(data)
    d = std.read(data)
    assert d is not None and d["name"] == meta.model and d["min_parser_version"] == "1.0.0"
    assert d["version"] == meta.version == registry.get("malaria").version  # the release's, not a source hash
    assert "Apache-2.0" in d["license"] and d["author"]
    assert "antialiasing" in image_description(d)  # the resize the schema has no field for
    unreleased = dataclasses.replace(meta, version="")  # a conversion outside a release: the source's hash
    assert std.version(unreleased) == f"sha256:{meta.source_sha256[:16]}"
    (image,), (scores,) = d["inputs"], d["outputs"]
    p = meta.preprocess
    assert image["content"] == "ImageProperties" and image["color_space"] == p.color_mode.upper()
    mean, std_ = image["normalization"]["mean"], image["normalization"]["std"]
    assert len(mean) == len(std_) == p.channels
    # (pixel - mean) / std is the contract's pixel * scale + offset, at both ends of the pixel range.
    for pixel in (0.0, 128.0, 255.0):
        np.testing.assert_allclose((pixel - np.array(mean)) / np.array(std_), pixel * p.scale + p.offset, atol=1e-6)
    assert image["stats"]["min"] == pytest.approx([p.offset] * p.channels)
    assert image["stats"]["max"] == pytest.approx([255 * p.scale + p.offset] * p.channels)
    assert scores["content"] == "FeatureProperties" and scores["stats"] == {"min": [0.0], "max": [1.0]}
    assert scores["associated_files"] == [{"name": "labels.txt", "type": "TENSOR_AXIS_LABELS",
                                           "description": scores["associated_files"][0]["description"]}]
    assert d["packed_files"] == ["labels.txt"]
    assert std.packed_files(data)["labels.txt"].decode().splitlines() == list(meta.labels)


def image_description(d) -> str:
    return d["inputs"][0]["description"]


def test_oct_normalisation_is_mean_and_std_127_5():
    from edge_runtime.spec import OCT_INCEPTION_SPEC

    meta = dataclasses.replace(read_tflite(RELEASED.read_bytes()), preprocess=OCT_INCEPTION_SPEC)
    assert std.normalization(meta) == ([127.5] * 3, [127.5] * 3)


def test_standard_entry_is_the_same_in_two_conversions_and_stripped_for_comparison():
    raw = RELEASED.read_bytes()
    meta = read_tflite(raw)
    later = dataclasses.replace(meta, created="2099-01-01T00:00:00+00:00")  # a second conversion: another time
    a, b = embed_tflite(raw, meta), embed_tflite(raw, later)
    assert tflite_metadata_entries(a)[STANDARD_KEY] == tflite_metadata_entries(b)[STANDARD_KEY]
    assert std.packed_files(a) == std.packed_files(b)
    # The committed release (no standard entry) and a file with one compare equal when the network is the same.
    assert tflite_without_metadata(a) == tflite_without_metadata(raw)
    assert STANDARD_KEY not in tflite_metadata_entries(tflite_without_metadata(a))


def test_labels_survive_later_embeds_and_edge_runtime_reads_the_file(tmp_path):
    raw = RELEASED.read_bytes()
    meta = read_tflite(raw)
    first = embed_tflite(raw, meta)
    golden_later = embed_tflite(first, meta, {"medge-golden": b"{}"})  # what convert does after the proof
    other = embed_tflite_entries(golden_later, {"x": b"1"})  # an entry that says nothing of the files
    for data in (golden_later, other):
        assert std.read(data)["packed_files"] == ["labels.txt"]
    path = tmp_path / "m.tflite"
    path.write_bytes(other)
    model = edge_runtime.load(path, warmup=False)
    assert model.metadata == meta and model.metadata_source == "embedded"
    x = model.preprocess(CELLS[0])[None]
    np.testing.assert_array_equal(model.run(x), edge_runtime.load(RELEASED, warmup=False).run(x))


def test_a_head_gets_no_image_metadata():
    raw = RELEASED.read_bytes()
    head = dataclasses.replace(read_tflite(raw), part="head")
    data = embed_tflite(tflite_without_metadata(raw), head)  # the released file carries the entry already
    assert STANDARD_KEY not in tflite_metadata_entries(data) and std.read(data) is None
    with pytest.raises(ValueError, match="image input"):
        std.build(head)


def test_not_a_metadata_buffer_is_refused():
    with pytest.raises(ValueError, match="M001"):
        std.parse(b"\x00" * 16)


@pytest.mark.slow
def test_every_image_tflite_convert_writes_carries_it(art):
    for name in (*[f for f in MALARIA_FILES.values() if f.endswith(".tflite")], *OCT_FILES.values()):
        data = (art / name).read_bytes()
        meta = read_tflite(data)
        d = std.read(data)
        assert d is not None, name
        assert d["inputs"][0]["normalization"]["std"] == pytest.approx([1 / meta.preprocess.scale] * 3), name
        assert std.packed_files(data)["labels.txt"].decode().splitlines() == list(meta.labels), name


# ---------------------------------------------------------------- MediaPipe, in its own environment


@pytest.fixture(scope="module")
def mediapipe_python() -> str:
    exe = os.environ.get(MP_ENV)
    if not exe:
        pytest.skip(f"{MP_ENV} is not set: give the python of an environment with MediaPipe 0.10.21 "
                    f"(python3 -m venv mp && mp/bin/pip install 'mediapipe==0.10.21' 'numpy<2'; see .ci/run)")
    if not Path(exe).is_file():
        pytest.fail(f"{MP_ENV}={exe} does not exist")
    return exe


def mediapipe_classify(exe: str, model: Path, images: list[str]) -> dict:
    """What MediaPipe's ImageClassifier and metadata reader make of `model` (tests/mediapipe_client.py)."""
    proc = subprocess.run([exe, str(CLIENT), str(model), *images], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": "", "GLOG_minloglevel": "2"})
    if proc.returncode != 0:
        pytest.fail(f"MediaPipe could not classify with {model.name} (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def resized_cells(meta, dest: Path) -> list[str]:
    """The sample cells already at the model's input size (edge_runtime's own resize), as PNGs in `dest`.

    Neither client resizes these again, so their answers must be the same to
    the last bit: what is left to differ is only how each reads the metadata.
    """
    from PIL import Image

    from edge_runtime.images import load_image, preprocess

    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for c in CELLS:
        spec = meta.preprocess
        pixels = (preprocess(load_image(c, spec.color_mode), spec) - spec.offset) / spec.scale
        p = dest / Path(c).name
        Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)).save(p)
        out.append(str(p))
    return out


def compare(exe: str, model: Path, images: list[str], what: str) -> tuple[float, np.ndarray, np.ndarray]:
    """Check MediaPipe reads `model`'s metadata as medge wrote it; returns (label agreement, edge_runtime's
    probabilities, MediaPipe's), rows per image, columns in label order.

    Prints the figures (pytest -s).
    """
    meta = read_tflite(model.read_bytes())
    mp = mediapipe_classify(exe, model, images)
    (sub,) = mp["metadata"]["subgraph_metadata"]
    units = sub["input_tensor_metadata"][0]["process_units"]
    mean, std_ = std.normalization(meta)
    assert units[0]["options"]["mean"] == pytest.approx(mean) and units[0]["options"]["std"] == pytest.approx(std_)
    assert mp["packed_files"]["labels.txt"].splitlines() == list(meta.labels)

    preds = edge_runtime.load(model, warmup=False).predict(images)
    assert not [p.error for p in preds if p.error]
    edge_labels = [p.label for p in preds]
    mp_labels = [r["categories"][0]["label"] for r in mp["images"]]
    assert set(mp_labels) <= set(meta.labels)  # labels come from the file's labels.txt
    edge_p = np.array([[p.probabilities[l] for l in meta.labels] for p in preds])
    mp_p = np.array([[next(c["score"] for c in r["categories"] if c["label"] == l) for l in meta.labels]
                     for r in mp["images"]])
    agree = float(np.mean(np.array(edge_labels) == np.array(mp_labels)))
    dprob = float(np.abs(edge_p - mp_p).max())
    print(f"\nMediaPipe {mp['mediapipe']} ImageClassifier vs edge_runtime, {what} ({model.name}): "
          f"labels agree on {agree:.2%} of {len(images)} ({sum(a != b for a, b in zip(edge_labels, mp_labels))} "
          f"differ); max |dprob| {dprob:.3g}, mean {np.abs(edge_p - mp_p).mean():.4f}")
    return agree, edge_p, mp_p


def check_both_ways(exe: str, model: Path, tmp: Path, what: str, min_agreement: float | None = MIN_AGREEMENT):
    """Same pixels in: the same answers (within rounding). The cells as photographed: agreement >= `min_agreement`."""
    from helpers import assert_same_class_off_ties

    meta = read_tflite(model.read_bytes())
    atol = SAME_PIXELS_ATOL["float32" if meta.precision == "float32" else "int8"]
    _, edge_p, mp_p = compare(exe, model, resized_cells(meta, tmp / "resized"), f"{what}, cells pre-resized")
    assert np.abs(edge_p - mp_p).max() <= atol, "the same pixels must give the same answers: the metadata is misread"
    assert_same_class_off_ties(edge_p, mp_p, margin=2 * atol)
    agree, edge_p, mp_p = compare(exe, model, CELLS, f"{what}, {len(CELLS)} sample cells")
    if min_agreement is not None:
        assert agree >= min_agreement
    return agree, edge_p, mp_p


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sample_manifest) -> Path:
    """float32 and int8 files that `python -m convert` makes from the released Keras model (trained on NIH cells)."""
    pytest.importorskip("tensorflow")
    source = ROOT / "releases" / "malaria"
    if not (source / "model.keras").is_file():
        pytest.skip("no committed release (releases/malaria/model.keras)")
    from convert.export import Options, run_export
    from convert.formats import parse_formats

    out = tmp_path_factory.mktemp("trained")
    report = run_export(source, out, parse_formats("tflite-float32,tflite-int8"),
                        Options(calib=sample_manifest, calib_n=64, eval_n=40, allow_drop=True, force=True),
                        name="malaria", log=lambda *a, **k: None).to_dict()
    assert report["ok"], [r.get("error") for r in report["rows"]]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["tflite-float32", "tflite-int8"])
def test_mediapipe_classifies_converted_malaria_files_like_edge_runtime(mediapipe_python, trained, fmt, tmp_path):
    check_both_ways(mediapipe_python, trained / MALARIA_FILES[fmt], tmp_path, f"released Keras model -> {fmt}")


def test_mediapipe_classifies_the_released_model_like_edge_runtime(mediapipe_python, tmp_path):
    raw = RELEASED.read_bytes()
    data = _with_standard(RELEASED)
    if data != raw:  # what `python -m convert release` now writes: the same network, the standard entry added
        assert tflite_without_metadata(data) == tflite_without_metadata(raw)
        print("\nthe committed release predates the standard metadata: classifying it with the entry added")
    path = tmp_path / RELEASED.name
    path.write_bytes(data)
    check_both_ways(mediapipe_python, path, tmp_path, "released malaria model")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["tflite-float32", "tflite-int8"])
def test_mediapipe_on_the_tiny_test_model(mediapipe_python, art, fmt, tmp_path):
    """The tiny 3-epoch model answers near 0.5 for most cells: resize differences flip those, and only those."""
    from helpers import assert_same_class_off_ties

    path = art / MALARIA_FILES[fmt]
    _, edge_p, mp_p = check_both_ways(mediapipe_python, path, tmp_path, f"tiny test model {fmt}", min_agreement=None)
    assert_same_class_off_ties(edge_p, mp_p, margin=0.4)


@pytest.mark.slow
def test_mediapipe_classifies_the_oct_stand_in_like_edge_runtime(mediapipe_python, art):
    scans = sorted(str(p) for p in (art / "oct_scans").glob("*.jpeg"))
    for fmt, name in OCT_FILES.items():
        agree, _, _ = compare(mediapipe_python, art / name, scans, f"OCT stand-in {fmt}, {len(scans)} synthetic scans")
        assert agree >= MIN_AGREEMENT


# ---------------------------------------------------------------- the bundle's notes


def _note_for(meta, name: str = "m_tflite-float32.tflite") -> str:
    from convert.bundle import integration_note

    data = std.build(meta)
    standard = {**std.parse(data), "packed_files": ["labels.txt"]}
    return integration_note("m", [(name, meta), ("m_onnx-float32.onnx", meta)], {name: standard})


def test_bundle_notes_take_every_number_from_the_metadata():
    from edge_runtime.spec import PreprocessSpec, TensorInfo

    base = read_tflite(RELEASED.read_bytes())
    meta = dataclasses.replace(
        base, labels=("Alpha", "Beta", "Gamma"), positive_label="Gamma", confidence_threshold=0.65,
        preprocess=PreprocessSpec(input_size=(96, 80), scale=1 / 127.5, offset=-1.0),
        input=TensorInfo("img", (-1, 96, 80, 3), "float32"), output=TensorInfo("p", (-1, 3), "float32"))
    note = _note_for(meta)
    for needle in ('setModelAssetPath("m_tflite-float32.tflite")', 'forResource: "m_tflite-float32"',
                   "setMaxResults(3)", "options.maxResults = 3",
                   "mean [127.5, 127.5, 127.5]", "std [127.5, 127.5, 127.5]",  # from the standard entry
                   "val threshold = 0.65f", "let threshold: Float = 0.65", "**0.65**",
                   'arrayOf("Alpha", "Beta", "Gamma")', "createScaledBitmap(bitmap, 80, 96, true)",
                   "longArrayOf(1, 96, 80, 3)", "c * 0.007843137255f + -1f", '"img" to tensor', "[1, 96, 80, 3]"):
        assert needle in note, needle
    assert "0.8" not in note and "Parasitized" not in note and "64" not in note  # nothing from the released file
    # An OCT file: the referral map edge_runtime applies, and its uncertain answer.
    from edge_runtime.clinical import OCT_LABELS

    oct_note = _note_for(dataclasses.replace(meta, task="oct", labels=OCT_LABELS, positive_label=None,
                                             output=TensorInfo("p", (-1, 4), "float32")))
    assert '"CNV" to "urgent"' in oct_note and '"DRUSEN": "routine"' in oct_note
    assert '"specialist review"' in oct_note


def test_bundle_notes_send_int8_input_files_to_litert():
    from edge_runtime.spec import TensorInfo

    base = read_tflite(RELEASED.read_bytes())
    io8 = dataclasses.replace(base, input=TensorInfo("x", (-1, 64, 64, 3), "int8", 0.0039, -128))
    note = _note_for(io8, "m_tflite-int8.tflite")
    assert "not for MediaPipe" in note and "`m_tflite-int8.tflite`; use LiteRT below" in note
    assert "setModelAssetPath" not in note
