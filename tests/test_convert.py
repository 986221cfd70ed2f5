"""convert/: every row of the format table exported from a tiny trained ResNet, reloaded and checked against Keras.

Tolerances (stated once, used below):
- float rows: max |prob - keras prob| within the row's `max_abs_diff`
  (1e-4 for float32, 2e-2 for float16) on real sample cells; a class may
  flip only where Keras' top two are within twice that;
- post-training quantized rows: max |dprob| <= 0.35 and top-1 agreement
  >= 0.8 on 60 real cells;
- tflite-qat-int8: a fine-tune (it changes the weights), judged like the
  CLI judges it, by accuracy: at most QAT_MAX_DROP_PP points below Keras'
  on the 60 proof cells (one cell is 1.7 points on the tiny model), with
  agreement >= 0.7 as a sanity check.
The tiny model (conftest's `tiny_run`: 3 epochs on 280 cells, ~60% accurate)
puts most probabilities near 0.5, where rounding flips decisions far more
often than on a trained model: on the real edge
model (1413 held-out cells) every int8 row agrees >= 0.985 and the CLI's
default threshold is 0.98.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from convert.formats import FORMATS, parse_formats
from edge_runtime.metadata import (
    ArtifactMetadata,
    MetadataNotFound,
    read_metadata,
    read_sidecar,
    sidecar_path,
)
from edge_runtime.spec import MALARIA_SPEC, TensorInfo
from edge_runtime.tflite_file import tflite_metadata_entries
from train import runs

from helpers import SAMPLE, assert_same_class_off_ties

ROOT = Path(__file__).resolve().parent.parent
QUANT_MIN_AGREEMENT = 0.8
QUANT_MAX_ABS_DIFF = 0.35
QAT_MIN_AGREEMENT = 0.7
QAT_MAX_DROP_PP = 15.0
CALIB_N, EVAL_N = 64, 60


# ---------------------------------------------------------------- fixtures


def device_probs(path: Path, x: np.ndarray) -> np.ndarray:
    """The artifact's probabilities as a device computes them (`edge_runtime.load`, one input per call)."""
    import edge_runtime

    return edge_runtime.load(path, warmup=False).run(x)


@pytest.fixture(scope="session")
def model(tiny_run):
    from convert.sources import load_keras_model

    return load_keras_model(tiny_run / "best.keras")


def _options(**kw):
    from convert.export import Options

    base = dict(calib_n=CALIB_N, eval_n=EVAL_N, qat_epochs=1, qat_learning_rate=1e-4,
                min_agreement=QAT_MIN_AGREEMENT, qat_max_drop=QAT_MAX_DROP_PP)
    base.update(kw)
    return Options(**base)


@pytest.fixture(scope="session")
def exported(tiny_run, tmp_path_factory):
    """Every row of the table exported once (~50 s, most of it the QAT process)."""
    from convert.export import run_export

    out = tmp_path_factory.mktemp("export")
    report = run_export(tiny_run, out, list(FORMATS.values()), _options(bundle=True), log=lambda *a: None).to_dict()
    return out, report


@pytest.fixture(scope="session")
def proof_images(tiny_run):
    from convert.calibration import load_sets
    from convert.sources import load_source

    _, src = load_source(tiny_run)
    _, proof, _ = load_sets(src.manifest, src.labels, src.spec, CALIB_N, EVAL_N, 0, need_calib=False)
    return proof


# ---------------------------------------------------------------- the table (no TensorFlow)


def test_format_table_is_one_keyed_table():
    assert list(FORMATS) == ["tflite-float32", "tflite-float16", "tflite-dynamic", "tflite-int8",
                             "tflite-qat-int8", "onnx-float32", "onnx-int8", "ort-int8"]
    for name, f in FORMATS.items():
        assert f.name == name
        assert f.filename("m") == f"m_{name}{f.ext}"
        assert f.runtime in ("litert", "onnxruntime")
        assert f.is_float == f.precision.startswith("float")
    assert [f.name for f in parse_formats("all")] == list(FORMATS)
    # Table order, whatever order the user typed.
    assert [f.name for f in parse_formats("onnx-int8,tflite-float32")] == ["tflite-float32", "onnx-int8"]
    with pytest.raises(ValueError, match="tflite-int8"):
        parse_formats("tflite-int4")


def test_format_table_imports_nothing_heavy():
    code = ("import sys, convert, convert.formats, edge_runtime.metadata; "
            "heavy = [m for m in ('tensorflow', 'keras', 'tf2onnx', 'onnx') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr



@pytest.mark.parametrize("release", sorted(p.name for p in (ROOT / "releases").iterdir()
                                           if (p / "conversion.json").is_file()))
def test_conversion_report_reads_and_writes_the_same_json(release, tmp_path):
    """conversion.json through the typed report and back: the same bytes, rows in their order and keys."""
    from convert.report import ConversionReport, read_report, write_report

    on_disk = json.loads((ROOT / "releases" / release / "conversion.json").read_text())
    report = read_report(ROOT / "releases" / release / "conversion.json")
    assert [r.format for r in report.rows] == [r["format"] for r in on_disk["rows"]]
    assert all(r.proof is not None and r.proof.images == d["images"] for r, d in zip(report.rows, on_disk["rows"]))
    assert json.dumps(report.to_dict(), indent=2) == json.dumps(on_disk, indent=2)
    assert json.loads(write_report(tmp_path, report).read_text()) == on_disk
    failed = {"format": "onnx-int8", "file": None, "runtime": "onnxruntime", "precision": "int8",
              "status": "failed", "error": "ValueError: no", "seconds": 1.0}  # no proof: its keys stay out
    assert ConversionReport.from_dict({**on_disk, "rows": [failed]}).to_dict()["rows"] == [failed]
    with pytest.raises(ValueError, match="unknown key"):
        ConversionReport.from_dict({**on_disk, "rows": [{**failed, "speed": 1}]})
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(ValueError, match="bad.json"):
        read_report(tmp_path / "bad.json")

def test_metadata_dataclass_round_trip():
    meta = ArtifactMetadata(
        model="m", task="malaria", labels=("Parasitized", "Uninfected"), preprocess=MALARIA_SPEC,
        format="tflite-int8", precision="int8",
        input=TensorInfo("image", (-1, 64, 64, 3), "int8", 1 / 255, -128),
        output=TensorInfo("probs", (-1, 2), "float32"),
        quantization={"weights": "int8 per-channel"}, positive_label="Parasitized", source_sha256="ab" * 32,
    )
    assert ArtifactMetadata.from_json(meta.to_json()) == meta
    assert meta.input.quantized and not meta.output.quantized
    with pytest.raises(ValueError, match="unknown artifact metadata keys"):
        ArtifactMetadata.from_dict({**meta.to_dict(), "colour": "red"})
    with pytest.raises(ValueError, match="schema"):
        ArtifactMetadata.from_dict({**meta.to_dict(), "schema": "medge-artifact/2"})
    with pytest.raises(ValueError, match="positive_label"):
        ArtifactMetadata.from_dict({**meta.to_dict(), "positive_label": "Healthy"})
    # Artifacts made before calibration was named by basename carry an absolute path and no sha256: still read.
    older = {**meta.to_dict(), "quantization": {"calibration_from": "/home/build/runs/malaria.csv (train split)"}}
    assert ArtifactMetadata.from_dict(older).quantization["calibration_from"].startswith("/home/build")


# ---------------------------------------------------------------- every row


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FORMATS))
def test_row_exported_and_proven(name, exported, tiny_run, model, proof_images):
    from convert import verify
    from edge_runtime.fileio import sha256_file

    out, report = exported
    fmt = FORMATS[name]
    row = next(r for r in report["rows"] if r["format"] == name)
    assert row["status"] == "ok", row.get("error")
    path = out / row["file"]
    assert path.name == f"run_{name}{fmt.ext}" and path.is_file()

    # Reload with the device runtime and compare with Keras independently of the exporter's own check.
    keras_probs = model.predict(proof_images.x, verbose=0)
    probs = device_probs(path, proof_images.x)
    cmp = verify.compare(keras_probs, probs, proof_images.y)
    assert cmp["images"] == EVAL_N
    if fmt.is_float:
        assert cmp["max_abs_diff"] <= fmt.max_abs_diff
        # A float artifact may flip only a near-tie: where Keras' top two are within 2 x tolerance.
        assert_same_class_off_ties(keras_probs, probs, 2 * fmt.max_abs_diff)
    else:
        if fmt.needs_training_data:  # QAT fine-tunes the weights: a different model, judged by accuracy
            assert cmp["top1_agreement"] >= QAT_MIN_AGREEMENT
            assert -100 * cmp["accuracy_delta"] <= QAT_MAX_DROP_PP
            assert row["criterion"]["metric"] == "accuracy_drop_pp" and row["criterion"]["passed"]
        else:
            assert cmp["top1_agreement"] >= QUANT_MIN_AGREEMENT
            assert cmp["max_abs_diff"] <= QUANT_MAX_ABS_DIFF
    assert row["top1_agreement"] == pytest.approx(cmp["top1_agreement"])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=0.02)

    # Metadata: embedded == sidecar, and it describes this file and this run.
    meta = read_metadata(path)
    assert meta == read_sidecar(path)
    assert meta.format == name and meta.precision == fmt.precision
    assert meta.labels == ("Parasitized", "Uninfected") and meta.positive_label == "Parasitized"
    assert meta.preprocess == MALARIA_SPEC
    assert meta.task == "malaria" and meta.output_kind == "probabilities"
    assert meta.source_sha256 == sha256_file(tiny_run / "best.keras")
    assert meta.input.shape[1:] == (64, 64, 3) and meta.output.shape[-1] == 2
    assert meta.input.dtype == "float32"
    assert meta.medge_version and meta.created and meta.tools["tensorflow"]
    if not fmt.is_float:
        assert meta.quantization["weights"]
    if fmt.calibrated:
        assert meta.quantization["calibration_images"] == CALIB_N
        # Named by basename (no build-machine path in a released file), pinned by the manifest's sha256.
        manifest = Path(runs.read_config(tiny_run).manifest)
        assert meta.quantization["calibration_from"] == f"{manifest.name} (train split)"
        assert meta.quantization["calibration_sha256"] == sha256_file(manifest)


@pytest.mark.parametrize("activations", ["uint8", "int8"])
def test_onnx_int8_answers_do_not_depend_on_the_cpu(model, proof_images, tmp_path, activations):
    """ONNX Runtime's integer kernels (all optimizations: fused QLinearConv) give the answers of the same QDQ graph
    computed in float (no optimization: DequantizeLinear -> float op -> QuantizeLinear). On x86 without VNNI,
    u8 x s8 with full-range weights saturates (CI caught a uint8 file moving a real cell's probability by 0.37);
    uint8 files get 7-bit weights for it."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from convert.converters import keras_to_onnx, quantize_qdq

    f, prep, q = tmp_path / "f.onnx", tmp_path / "prep.onnx", tmp_path / "q.onnx"
    onnx.save(keras_to_onnx(model, tuple(model.inputs[0].shape[1:])), str(f))
    quant_pre_process(str(f), str(prep))
    x = proof_images.x.astype(np.float32)
    quantize_qdq(prep, q, x[:CALIB_N], activations, "minmax")

    def run(level):
        so = ort.SessionOptions()
        so.graph_optimization_level, so.intra_op_num_threads = level, 1
        sess = ort.InferenceSession(str(q), so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return np.concatenate([sess.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])

    kernels, reference = run(ort.GraphOptimizationLevel.ORT_ENABLE_ALL), run(ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    # A few output steps (1/256) of rounding apart at most; saturation moved them by 40+ steps.
    assert np.abs(kernels - reference).max() <= 0.03, activations


@pytest.mark.slow
def test_conversion_report(exported):
    out, report = exported
    on_disk = json.loads((out / "conversion.json").read_text())
    assert on_disk["ok"] is True and [r["format"] for r in on_disk["rows"]] == list(FORMATS)
    assert on_disk["proof"]["images"] == EVAL_N and "test split" in on_disk["proof"]["from"]
    assert on_disk["calibration"]["images"] == CALIB_N
    # Sizes: int8 weights are smaller than float32 ones.
    size = {r["format"]: r["size_bytes"] for r in on_disk["rows"]}
    assert size["tflite-int8"] < size["tflite-float32"] and size["tflite-float16"] < size["tflite-float32"]
    onnx_q = next(r for r in on_disk["rows"] if r["format"] == "onnx-int8")["quantization"]
    assert onnx_q["activations"] in ("uint8", "int8") and onnx_q["activation_choice"] == "measured"
    assert set(onnx_q["latency_ms_batch1_1thread"]) == {"uint8", "int8", "float32"}
    qat = next(r for r in on_disk["rows"] if r["format"] == "tflite-qat-int8")["quantization"]
    assert qat["twin_max_abs_diff"] < 1e-4 and len(qat["qat_history"]["loss"]) == 1
    # No temp files left behind, nothing but artifacts, sidecars and the report.
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith(".")]
    pngs = [n for n in names if n.endswith("_layers.png")]  # the per-layer reports of the calibrated int8 rows
    assert pngs == sorted(f"run_{f}_layers.png" for f in ("tflite-int8", "onnx-int8", "ort-int8"))
    assert len(names) - len(pngs) == 2 * len(FORMATS) + 3  # + conversion.json, run_bundle/, run_bundle.zip
    # Ordinary permissions, not mkstemp's 0600.
    assert all(p.stat().st_mode & 0o044 for p in out.iterdir())


@pytest.mark.slow
def test_bundle(exported):
    import zipfile

    out, report = exported
    assert report["bundle"] == {"folder": "run_bundle", "zip": "run_bundle.zip"}
    folder = out / "run_bundle"
    assert (folder / "labels.txt").read_text() == "Parasitized\nUninfected\n"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [f["format"] for f in manifest["files"]] == list(FORMATS)
    assert manifest["preprocess"] == MALARIA_SPEC.to_dict()
    for f in manifest["files"]:
        assert (folder / f["file"]).read_bytes() == (out / f["file"]).read_bytes()
        assert f["proof"]["top1_agreement"] >= QAT_MIN_AGREEMENT
    note = (folder / "INTEGRATION.md").read_text()
    for needle in ("[1, 64, 64, 3]", "NHWC", "float32", "Android", "iOS", "ONNX Runtime Mobile", "labels.txt"):
        assert needle in note
    # MediaPipe Tasks on the .tflite files (their standard metadata), the decision with the files' own threshold.
    from edge_runtime.model import EdgeModel

    meta = read_metadata(out / "run_tflite-float32.tflite")
    assert 'setModelAssetPath("run_tflite-float32.tflite")' in note and "MPImage(uiImage: image)" in note
    assert f"val threshold = {EdgeModel.default_threshold(meta):g}f" in note and "std [255.0, 255.0, 255.0]" in note
    with zipfile.ZipFile(out / "run_bundle.zip") as zf:
        assert sorted(zf.namelist()) == sorted(f"run_bundle/{p.name}" for p in folder.iterdir())


@pytest.mark.slow
def test_inspect_cli_and_reader_without_tensorflow(exported, capsys):
    from convert.cli import main

    out, _ = exported
    tfl = out / "run_tflite-int8.tflite"
    assert main(["inspect", str(tfl), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "tflite-int8"
    assert main(["inspect", str(out / "run_ort-int8.ort")]) == 0
    assert "format: ort-int8" in capsys.readouterr().out
    code = ("import sys; from edge_runtime.metadata import read_metadata; "
            "ms = [read_metadata(p) for p in "
            f"{[str(p) for p in sorted(out.glob('run_*')) if p.suffix in ('.tflite', '.onnx', '.ort')]}]; "
            "assert len(ms) == 8; "
            "heavy = [m for m in ('tensorflow', 'keras') if m in sys.modules]; print(heavy); "
            "sys.exit(1 if heavy else 0)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.slow
def test_tflite_metadata_embedding_keeps_model_and_converter_entries(exported, model, proof_images, tmp_path):
    import dataclasses

    from convert.converters import convert_keras
    from edge_runtime.metadata import embed_tflite, read_tflite

    out, _ = exported
    path = out / "run_tflite-float32.tflite"
    raw = path.read_bytes()
    entries = tflite_metadata_entries(raw)
    assert "medge" in entries and "min_runtime_version" in entries
    renamed = dataclasses.replace(read_metadata(path), model="renamed")
    again = tmp_path / "again.tflite"
    again.write_bytes(embed_tflite(raw, renamed))
    assert list(tflite_metadata_entries(again.read_bytes())).count("medge") == 1
    assert read_metadata(again) == renamed
    x = proof_images.x[:4]
    np.testing.assert_array_equal(device_probs(path, x), device_probs(again, x))
    with pytest.raises(MetadataNotFound, match="sidecar"):
        read_tflite(convert_keras(model))
    with pytest.raises(ValueError, match="TFLite"):
        read_tflite(b"not a flatbuffer at all")


@pytest.mark.slow
def test_tflite_rows_share_one_saved_model_export(model, proof_images, tmp_path):
    """The TFLite rows convert from one SavedModel export (`ExportJob.saved_model`), not one per row, and the
    files are byte for byte the ones `from_keras_model` makes on its own, float32 and int8 (a release rebuilds
    to the same sha256 either way)."""
    from convert.converters import convert_keras, export_saved_model, int8_config

    saved = export_saved_model(model, tmp_path / "saved_model")
    assert saved is not None and (saved / "saved_model.pb").is_file()
    for configure in (None, int8_config(proof_images.x[:8], False)):
        a, b = convert_keras(model, configure), convert_keras(model, configure, saved)
        assert a == b


# ---------------------------------------------------------------- safety


@pytest.mark.slow
def test_interrupted_export_leaves_nothing(tiny_run, tmp_path, monkeypatch):
    import convert.tflite
    from convert.export import run_export

    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".run_tflite-float32.tmp-abc123.tflite"  # what a SIGKILL'd earlier export leaves
    stale.write_bytes(b"half")

    def interrupted(job, fmt, dest):
        Path(dest).write_bytes(b"TFL3 half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(convert.tflite, "export_float32", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_export(tiny_run, out, parse_formats("tflite-float32"), _options(), log=lambda *a: None)
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_failing_row_does_not_stop_the_others(tiny_run, tmp_path, monkeypatch, capsys):
    import convert.tflite
    from convert.cli import main

    def broken(job, fmt, dest):
        raise RuntimeError("converter exploded")

    monkeypatch.setattr(convert.tflite, "export_float16", broken)
    out = tmp_path / "out"
    args = [str(tiny_run), "--out", str(out), "--formats", "tflite-float16,tflite-float32,onnx-float32",
            "--eval-n", "20"]
    assert main(args) == 1
    text = capsys.readouterr().out
    assert "SOME ROWS FAILED" in text and "converter exploded" in text
    report = json.loads((out / "conversion.json").read_text())
    status = {r["format"]: r["status"] for r in report["rows"]}
    assert status == {"tflite-float16": "failed", "tflite-float32": "ok", "onnx-float32": "ok"}
    assert not (out / "run_tflite-float16.tflite").exists() and (out / "run_onnx-float32.onnx").is_file()

    # Existing files are not overwritten without --force (exit 2, nothing touched) ...
    before = (out / "run_tflite-float32.tflite").stat().st_mtime_ns
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "run_tflite-float32.tflite").stat().st_mtime_ns == before
    # ... and are with it.
    monkeypatch.undo()
    assert main(args + ["--force"]) == 0
    # A later export of another format of the same model needs no --force and keeps the earlier rows.
    assert main([str(tiny_run), "--out", str(out), "--formats", "tflite-dynamic", "--eval-n", "20",
                 "--min-agreement", "0"]) == 0
    rows = json.loads((out / "conversion.json").read_text())["rows"]
    assert [r["format"] for r in rows] == ["tflite-float32", "tflite-float16", "tflite-dynamic", "onnx-float32"]
    assert [bool(r.get("carried_over")) for r in rows] == [True, True, False, True]
    # Another model into the same folder would overwrite its report: refused without --force.
    assert main([str(tiny_run), "--out", str(out), "--name", "other", "--formats", "tflite-float32",
                 "--eval-n", "20"]) == 2
    assert "conversion.json" in capsys.readouterr().err


@pytest.mark.slow
def test_proof_is_the_device_loading_the_file(tiny_run, tmp_path, monkeypatch):
    """A file a device would refuse (metadata not describing its tensors) fails its row and is not published."""
    import dataclasses

    import convert.export as export
    import edge_runtime

    loaded = []
    real_load = edge_runtime.load
    monkeypatch.setattr(edge_runtime, "load",
                        lambda path, **kw: loaded.append((Path(path), kw)) or real_load(path, **kw))
    real_metadata = export.ExportJob.metadata

    def wrong_labels(self, fmt, artifact, quantization):
        meta = real_metadata(self, fmt, artifact, quantization)
        return dataclasses.replace(meta, labels=("a", "b", "c"), positive_label=None)

    report = export.run_export(tiny_run, tmp_path / "ok", parse_formats("tflite-float32,onnx-float32"),
                               _options(eval_n=8), log=lambda *a: None).to_dict()
    # Each file is opened twice: to prove it, then again after its golden set is embedded (the published bytes).
    assert report["ok"] and [p.suffix for p, _ in loaded] == [".tflite", ".tflite", ".onnx", ".onnx"]
    assert [kw["backend"] for _, kw in loaded] == ["litert", "litert", "onnxruntime", "onnxruntime"]
    assert all(p.name.startswith(".run_") for p, _ in loaded)  # the temp file: the very bytes published after
    monkeypatch.setattr(export.ExportJob, "metadata", wrong_labels)
    report = export.run_export(tiny_run, tmp_path / "bad", parse_formats("onnx-float32"), _options(eval_n=8),
                               log=lambda *a: None).to_dict()
    row = report["rows"][0]
    assert row["status"] == "failed" and "one value per label" in row["error"] and row["file"] is None
    assert not (tmp_path / "bad" / "run_onnx-float32.onnx").exists()


@pytest.mark.slow
def test_threshold_fails_row_unless_allow_drop(tiny_run, tmp_path):
    from convert.export import run_export

    fmts = parse_formats("tflite-dynamic")
    strict = run_export(tiny_run, tmp_path / "a", fmts, _options(min_agreement=1.01), log=lambda *a: None).to_dict()
    assert strict["ok"] is False and strict["rows"][0]["status"] == "failed"
    assert "agreement" in strict["rows"][0]["error"] and not (tmp_path / "a" / "run_tflite-dynamic.tflite").exists()
    kept = run_export(tiny_run, tmp_path / "b", fmts, _options(min_agreement=1.01, allow_drop=True),
                      log=lambda *a: None).to_dict()
    assert kept["ok"] is True and kept["rows"][0]["status"] == "kept-below-threshold"
    assert (tmp_path / "b" / "run_tflite-dynamic.tflite").is_file()


# ---------------------------------------------------------------- other sources


@pytest.mark.slow
def test_legacy_h5_source(tiny_run, model, tmp_path):
    """A Keras 2 (tf-keras) .h5 file converts; it needs --labels and cannot do QAT (no architecture)."""
    import tf_keras

    from convert.export import run_export
    from train.malaria.models import build_resnet
    from train.malaria.presets import MALARIA_PRESETS

    twin = build_resnet(MALARIA_PRESETS["tiny"].model, (64, 64, 3), 2, keras_module=tf_keras, name="legacy")
    twin.set_weights(model.get_weights())
    h5 = tmp_path / "legacy_2018.h5"
    twin.save(h5)
    manifest = runs.read_config(tiny_run).manifest

    with pytest.raises(ValueError, match="--labels"):
        run_export(h5, tmp_path / "x", parse_formats("tflite-float32"), _options(calib=Path(manifest)))
    report = run_export(h5, tmp_path / "out", parse_formats("tflite-float32,onnx-float32,tflite-qat-int8"),
                        _options(calib=Path(manifest)), labels=["Parasitized", "Uninfected"],
                        log=lambda *a: None).to_dict()
    status = {r["format"]: r for r in report["rows"]}
    assert status["tflite-float32"]["status"] == "ok" and status["onnx-float32"]["status"] == "ok"
    assert status["tflite-float32"]["max_abs_diff"] <= FORMATS["tflite-float32"].max_abs_diff
    assert status["tflite-qat-int8"]["status"] == "failed" and "run directory" in status["tflite-qat-int8"]["error"]
    meta = read_metadata(tmp_path / "out" / "legacy_2018_tflite-float32.tflite")
    assert meta.labels == ("Parasitized", "Uninfected") and meta.source_name == "legacy_2018.h5"
    assert meta.task == "classification"
    assert sidecar_path(tmp_path / "out" / "legacy_2018_tflite-float32.tflite").is_file()


@pytest.mark.slow
def test_saved_model_source(model, tiny_run, tmp_path):
    from convert.export import run_export

    sm = tmp_path / "exported_sm"
    model.export(str(sm), verbose=False)
    manifest = Path(runs.read_config(tiny_run).manifest)
    report = run_export(sm, tmp_path / "out", parse_formats("tflite-float32,onnx-float32"), _options(calib=manifest),
                        labels=["Parasitized", "Uninfected"], log=lambda *a: None).to_dict()
    for row in report["rows"]:
        assert row["status"] == "ok", row.get("error")
        assert row["max_abs_diff"] <= FORMATS[row["format"]].max_abs_diff
    meta = read_metadata(tmp_path / "out" / "exported_sm_onnx-float32.onnx")
    assert meta.source_name == "exported_sm" and len(meta.source_sha256) == 64


def test_bad_sources_say_what_to_do(tmp_path):
    from convert.sources import load_source

    with pytest.raises(FileNotFoundError, match="run directory"):
        load_source(tmp_path / "missing.keras")
    (tmp_path / "sm").mkdir()
    (tmp_path / "sm" / "saved_model.pb").write_bytes(b"")
    with pytest.raises(ValueError, match="SavedModel"):
        load_source(tmp_path / "sm")
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=".keras"):
        load_source(tmp_path / "model.pt")


@pytest.mark.slow
def test_int8_io_records_input_quantization(tiny_run, tmp_path, proof_images, model):
    from convert import verify
    from convert.export import run_export

    report = run_export(tiny_run, tmp_path, parse_formats("tflite-int8"), _options(int8_io=True),
                        log=lambda *a: None).to_dict()
    row = report["rows"][0]
    assert row["status"] == "ok", row.get("error")
    meta = read_metadata(tmp_path / row["file"])
    assert meta.input.dtype == "int8" and meta.input.quantized and meta.output.dtype == "int8"
    assert meta.quantization["io"] == "int8"
    # Calibration images span 0..max (x/255, black background), so the zero point sits at the bottom.
    assert 0 < meta.input.scale <= 1 / 255 * 1.01 and meta.input.zero_point == -128
    cmp = verify.compare(model.predict(proof_images.x, verbose=0), device_probs(tmp_path / row["file"], proof_images.x))
    assert cmp["top1_agreement"] >= QUANT_MIN_AGREEMENT


def test_lambda_layer_is_refused_by_name(tmp_path):
    import keras

    from convert.sources import load_source

    inp = keras.Input((64, 64, 3))
    x = keras.layers.Lambda(lambda t: t * 2.0, name="doubler")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(x))
    model.save(tmp_path / "lambda.keras")
    with pytest.raises(ValueError, match="Lambda"):
        load_source(tmp_path / "lambda.keras", labels=["a", "b"])


@pytest.mark.slow
def test_litert_quantizer_int8(tiny_run, tmp_path, proof_images, model):
    """The optional LiteRT Quantizer path of tflite-int8 (skipped where ai-edge-quantizer is not installed)."""
    pytest.importorskip("ai_edge_quantizer")
    from convert import verify
    from convert.export import run_export

    report = run_export(tiny_run, tmp_path, parse_formats("tflite-int8"),
                        _options(int8_quantizer="litert-quantizer", min_agreement=QUANT_MIN_AGREEMENT),
                        log=lambda *a: None).to_dict()
    row = report["rows"][0]
    assert row["status"] == "ok", row.get("error")
    meta = read_metadata(tmp_path / row["file"])
    assert meta.quantization["quantizer"].startswith("LiteRT Quantizer") and meta.input.dtype == "int8"
    cmp = verify.compare(model.predict(proof_images.x, verbose=0), device_probs(tmp_path / row["file"], proof_images.x))
    assert cmp["top1_agreement"] >= QUANT_MIN_AGREEMENT and cmp["max_abs_diff"] <= QUANT_MAX_ABS_DIFF


def test_litert_quantizer_missing_names_the_install(monkeypatch):
    import builtins

    from convert.tflite import litert_quantize_int8

    real_import = builtins.__import__

    def no_aeq(name, *a, **k):
        if name.startswith("ai_edge_quantizer"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_aeq)
    with pytest.raises(ImportError, match="pip install 'ai-edge-quantizer"):
        litert_quantize_int8(b"", np.zeros((1, 64, 64, 3), np.float32), Path("."))


@pytest.fixture(scope="session")
def oct_like_run(tmp_path_factory, tiny_run):
    """An OCT-shaped run without InceptionV3: a small stand-in fused model (299x299x3 -> 4), the real head
    (8x8x2048 -> 4, untrained) and a float16 feature store, laid out as `python -m train oct head` writes them."""
    import h5py
    import keras

    from edge_runtime.spec import OCT_INCEPTION_SPEC
    from train.oct.store import STORE_FORMAT

    keras.utils.set_random_seed(7)
    run = tmp_path_factory.mktemp("oct") / "oct-head"
    run.mkdir()
    L = keras.layers
    inp = keras.Input((299, 299, 3))
    fused = keras.Model(inp,
                        L.Dense(4, activation="softmax")(L.GlobalAveragePooling2D()(L.Conv2D(8, 3, strides=4)(inp))))
    fused.save(run / "fused.keras")
    from train.oct.models import build_head

    build_head(4).save(run / "head.keras")  # the real head: its QAT twin is cheap
    labels = ["CNV", "DME", "DRUSEN", "NORMAL"]
    rng = np.random.default_rng(0)
    store = run.parent / "features.h5"
    with h5py.File(store, "w") as f:
        f.create_dataset("features", data=rng.random((24, 8, 8, 2048), dtype=np.float32).astype(np.float16),
                         chunks=(1, 8, 8, 2048))
        f.create_dataset("label", data=np.arange(24, dtype=np.int16) % 4)
        f.create_dataset("split", data=np.array(["train"] * 12 + ["test"] * 12, dtype=object),
                         dtype=h5py.string_dtype())
        f.attrs.update(format=STORE_FORMAT, labels=json.dumps(labels), n_done=24,
                       preprocess=json.dumps(OCT_INCEPTION_SPEC.to_dict()), base_weights="none", base_seed=0,
                       base_sha256="0" * 64, fingerprint="f" * 16, synthetic=True, manifest="")
    manifest = runs.read_config(tiny_run).manifest
    runs.write_config(run, runs.RunConfig(
        task="oct", mode="head", model_file="fused.keras", head_file="head.keras", labels=labels,
        preprocess=OCT_INCEPTION_SPEC, store=str(store), manifest=manifest,
        base={"weights": "none", "seed": 0, "sha256": "0" * 64}, features_fingerprint="f" * 16,
    ))
    return run


@pytest.mark.slow
def test_oct_run_exports_fused_model_and_head(oct_like_run, tmp_path):
    from convert.cli import main

    fmts = "tflite-float32,onnx-float32"
    assert main([str(oct_like_run), "--out", str(tmp_path / "fused"), "--formats", fmts, "--eval-n", "8",
                 "--calib-n", "8"]) == 0
    meta = read_metadata(tmp_path / "fused" / "oct-head_tflite-float32.tflite")
    assert meta.part == "model" and meta.task == "oct" and meta.input.shape == (-1, 299, 299, 3)
    assert meta.preprocess.offset == -1.0 and meta.source_name == "fused.keras"

    assert main([str(oct_like_run), "--out", str(tmp_path / "head"), "--formats", fmts + ",tflite-qat-int8",
                 "--part", "head", "--calib-n", "12", "--bundle", "--qat-epochs", "1", "--allow-drop"]) == 0
    report = json.loads((tmp_path / "head" / "conversion.json").read_text())
    status = {r["format"]: r["status"] for r in report["rows"]}
    assert status["tflite-float32"] == "ok" and status["onnx-float32"] == "ok"
    qat = next(r for r in report["rows"] if r["format"] == "tflite-qat-int8")
    assert qat["status"] in ("ok", "kept-below-threshold"), qat.get("error")  # untrained head on random features
    assert qat["quantization"]["twin"] == "oct-head" and qat["quantization"]["qat_train_images"] == 12
    assert qat["quantization"]["twin_max_abs_diff"] < 1e-4
    assert report["proof"]["images"] == 12 and "test split features" in report["proof"]["from"]
    for name in ("oct-head-head_tflite-float32.tflite", "oct-head-head_onnx-float32.onnx"):
        meta = read_metadata(tmp_path / "head" / name)
        assert meta.part == "head" and meta.input.shape == (-1, 8, 8, 2048) and meta.labels[0] == "CNV"
        assert meta.feature_extractor["layer"] == "mixed10" and meta.source_name == "head.keras"
    note = (tmp_path / "head" / "oct-head-head_bundle" / "INTEGRATION.md").read_text()
    assert "mixed10" in note and "[1, 8, 8, 2048]" in note

    with pytest.raises(ValueError, match="OCT"):
        from convert.sources import load_source

        load_source(oct_like_run.parent / "features.h5", part="head")


@pytest.mark.slow
def test_onnx_export_without_graph_copies_is_the_same_model_and_falls_back(model, proof_images, monkeypatch):
    """keras_to_onnx runs tf2onnx without its per-pass graph copies (the memory of the fused InceptionV3): the same
    graph as tf2onnx's own way (ops, attributes, weights, outputs; only the names tf2onnx makes up for folded
    constants may come out in another order); when an optimizer pass fails, tf2onnx's own way, skipping it."""
    import onnxruntime as ort
    import tf2onnx
    from onnx import numpy_helper

    from convert.converters import keras_to_onnx

    shape = tuple(int(d) for d in model.inputs[0].shape[1:])
    ours = keras_to_onnx(model, shape)
    monkeypatch.setenv("TF2ONNX_CATCH_ERRORS", "TRUE")  # a user's own setting wins: tf2onnx's copies, as before
    theirs = keras_to_onnx(model, shape)
    monkeypatch.delenv("TF2ONNX_CATCH_ERRORS")
    assert [(n.op_type, [a.SerializeToString() for a in n.attribute]) for n in ours.graph.node] == \
        [(n.op_type, [a.SerializeToString() for a in n.attribute]) for n in theirs.graph.node]
    weights = [sorted(numpy_helper.to_array(t).tobytes() for t in m.graph.initializer) for m in (ours, theirs)]
    assert weights[0] == weights[1]
    x = proof_images.x[:8].astype(np.float32)
    outs = [ort.InferenceSession(m.SerializeToString()).run(None, {"image": x})[0] for m in (ours, theirs)]
    np.testing.assert_array_equal(outs[0], outs[1])
    calls = []

    def broken(self, graph, iteration):
        calls.append(iteration)
        raise RuntimeError("a broken optimizer pass")

    monkeypatch.setattr(tf2onnx.optimizer.IdentityOptimizer, "optimize", broken)
    proto = keras_to_onnx(model, shape)  # the first try raises; the second skips the broken pass
    assert len(calls) >= 2 and proto.graph.input[0].name == "image"


@pytest.mark.slow
def test_onnx_int8_candidates_share_one_calibration(exported, proof_images, tmp_path):
    """The uint8 and int8 candidates of `--onnx-activations auto` calibrate once: the second reads onnxruntime's
    calibration cache (so it is not fed the images again) and is the same file as calibrating afresh."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from convert.converters import quantize_qdq

    out, _ = exported
    prep = tmp_path / "prep.onnx"
    quant_pre_process(str(out / "run_onnx-float32.onnx"), str(prep))
    x, cache = proof_images.x[:16], tmp_path / "calibration.json"
    quantize_qdq(prep, tmp_path / "uint8.onnx", x, "uint8", "minmax", cache=cache)
    assert cache.is_file()
    quantize_qdq(prep, tmp_path / "int8-cached.onnx", x[:1], "int8", "minmax", cache=cache)  # one image: not used
    quantize_qdq(prep, tmp_path / "int8.onnx", x, "int8", "minmax")
    quantize_qdq(prep, tmp_path / "int8-one.onnx", x[:1], "int8", "minmax")
    assert (tmp_path / "int8-cached.onnx").read_bytes() == (tmp_path / "int8.onnx").read_bytes()
    assert (tmp_path / "int8-one.onnx").read_bytes() != (tmp_path / "int8.onnx").read_bytes()  # the images count


@pytest.mark.slow
def test_op_outside_litert_builtins_is_named():
    """A layer whose TensorFlow op LiteRT has no builtin kernel for: one error naming the op, not the MLIR dump."""
    import keras
    import tensorflow as tf

    from convert.converters import convert_keras

    class Det(keras.layers.Layer):  # built in the test, never loaded from a file (safe mode refuses code)
        def call(self, x):
            return tf.linalg.det(x)[:, None]

    inp = keras.Input((4, 4))
    with pytest.raises(ValueError, match=r"op\(s\) MatrixDeterminant are not in LiteRT's builtin op set") as e:
        convert_keras(keras.Model(inp, Det()(inp)))
    assert len(str(e.value)) < 300


def test_qat_twin_refuses_weights_of_another_architecture():
    """The QAT child copies weights layer by layer into a twin built from the architecture code; a model of any
    other architecture is refused naming what differs (module-agnostic, so checked here with Keras 3 models)."""
    import keras

    from convert.qat.twin import copy_weights, flat_weights
    from train.oct.models import build_head, build_top

    head = build_head(4)
    copy_weights(build_head(4), *flat_weights(head))  # same architecture: accepted
    with pytest.raises(ValueError, match="architecture mismatch"):
        copy_weights(build_head(4), *flat_weights(build_top(4)))
    with pytest.raises(ValueError, match="head_probs"):
        copy_weights(build_head(4), *flat_weights(build_head(3)))
    inp = keras.Input((8, 8, 2048))
    nested = keras.Model(inp, head(inp))  # a model inside a model (the OCT fused model) is flattened
    assert flat_weights(nested)[1] == ["head_conv", "head_bn", "head_probs"]


def test_qat_job_round_trips_and_rejects_unknown_keys(tmp_path):
    """The parent -> child job and the child -> parent result are typed and strict: a key one side does not
    know is an error, not a silently dropped field."""
    from convert.qat.job import Architecture, QatJob, QatResult

    job = QatJob(architecture=Architecture("resnet", resnet={"filters": [8, 16]}), input_shape=(64, 64, 3),
                 labels=("Parasitized", "Uninfected"), name="m", preprocess=MALARIA_SPEC.to_dict(),
                 train=(("a.png", 0), ("b.png", 1)), store=None, epochs=2, learning_rate=1e-3, batch_size=32,
                 seed=0, int8_io=False, weights="w.npz", layer_names=("conv",), data="d.npz", out="o.tflite")
    assert QatJob.read(job.write(tmp_path / "job.json")) == job
    with pytest.raises(ValueError, match=r"unknown QatJob keys \['colour'\]"):
        QatJob.from_dict({**job.to_dict(), "colour": "red"})
    with pytest.raises(ValueError, match=r"missing keys \['epochs'\]"):
        QatJob.from_dict({k: v for k, v in job.to_dict().items() if k != "epochs"})
    with pytest.raises(ValueError, match="unknown Architecture keys"):
        QatJob.from_dict({**job.to_dict(), "architecture": {"kind": "resnet", "depth": 3}})
    with pytest.raises(ValueError, match="no tf-keras twin"):
        Architecture("vgg")

    result = QatResult(twin_max_abs_diff=1e-6, history={"loss": [0.5]}, ranges_initialized=12, batchnorm_frozen=3,
                       train_examples=10, trainable_weights=100, start_max_abs_diff=0.03,
                       seconds={"twin": 1.0, "annotate": 2.0, "fine_tune": 3.0, "convert": 4.0})
    assert QatResult.from_line(result.line()) == result
    with pytest.raises(ValueError, match="unknown QatResult keys"):
        QatResult.from_dict({**json.loads(result.to_json()), "extra": 1})


def test_qat_package_imports_nothing_heavy():
    """The parent side (and the package, which `python -m convert.qat.child` imports first) imports no
    TensorFlow/Keras: the child must be able to set up tf-keras before TensorFlow is first imported."""
    code = ("import sys, convert.qat, convert.qat.job, convert.qat.parent, convert.qat.twin; "
            "heavy = [m for m in ('tensorflow', 'keras', 'tf_keras', 'tensorflow_model_optimization') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.slow
def test_qat_tfmot_fixes_check_the_pinned_version():
    """tfmot_fixes (run as the child runs: tf-keras) pins the tfmot range pyproject pins, refuses another
    version, and its copy of tfmot's transform list matches the installed tfmot's minus the Concat ones."""
    code = """
import re, sys
from pathlib import Path
from convert.qat import tfmot_fixes as f
pin = re.search(r'"tensorflow-model-optimization([^"]+)"', Path("pyproject.toml").read_text()).group(1)
assert pin == f.TFMOT_PIN, (pin, f.TFMOT_PIN)
for bad in ("0.7.5", "0.9.0", "1.0"):
    try:
        f.check_tfmot_version(bad)
    except RuntimeError as e:
        assert "pip install 'tensorflow-model-optimization>=0.8.1,<0.9'" in str(e), e
    else:
        sys.exit(f"{bad} accepted")
assert f.check_tfmot_version("0.8.1") == "0.8.1"
f.check_kept_transforms()
up = f.upstream_transforms()
assert len(up) == len(f.KEPT_TRANSFORMS) + 5 and sum(t.startswith("Concat") for t in up) == 5, up
"""
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]


@pytest.mark.slow
def test_sigterm_mid_qat_export_leaves_nothing(tiny_run, tmp_path):
    """A real `python -m convert` process, terminated while the QAT child fine-tunes: exit 130, the child gone,
    no file left in --out nor in the work folder.

    No timing race: SIGTERM is sent only once the parent has printed the child's "fine-tuning ..." progress line
    (the last line before `fit`), and with 10,000 epochs the fine-tune cannot end before the signal lands.
    """
    import signal
    import threading

    out, tmp = tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    err_path = tmp_path / "stderr.txt"
    env = dict(os.environ, PYTHONUNBUFFERED="1", TMPDIR=str(tmp))  # lines as printed; the work folder in tmp
    with err_path.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "convert", str(tiny_run), "--out", str(out), "--formats", "tflite-qat-int8",
             "--calib-n", "16", "--eval-n", "8", "--qat-epochs", "10000"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True, env=env,
        )
        watchdog = threading.Timer(600, proc.kill)  # only if the export hangs before fine-tuning
        watchdog.start()
        try:
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if line.startswith("[tflite-qat-int8]") and "fine-tuning" in line and "epoch(s)" in line:
                    break
            assert proc.poll() is None, "".join(lines) + err_path.read_text()[-2000:]
            children = {int(pid) for task in Path(f"/proc/{proc.pid}/task").iterdir()
                        for pid in (task / "children").read_text().split()}
            assert len(children) == 1, children  # the QAT child, fine-tuning
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=120)
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
    err = err_path.read_text()
    assert proc.returncode == 130, err[-2000:]
    assert "no partial artifact" in err
    assert list(out.iterdir()) == []
    assert list(tmp.glob("medge-convert-*")) == []  # the work folder (job, weights, data for the child) too
    (child,) = children
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # killed and reaped by the parent before it exited


@pytest.mark.slow
def test_calibration_from_an_image_folder(tiny_run, tmp_path):
    """A bare .keras file calibrated on a class-folder tree: disjoint calibration and proof images,
    labels from folders."""
    from convert.export import run_export

    report = run_export(tiny_run / "best.keras", tmp_path, parse_formats("tflite-int8"),
                        _options(calib=SAMPLE, calib_n=40, eval_n=40, min_agreement=0.0), name="cells",
                        log=lambda *a: None).to_dict()
    assert report["calibration"]["images"] == 40 and "folder" in report["calibration"]["from"]
    assert str(SAMPLE) not in report["calibration"]["from"] and len(report["calibration"]["sha256"]) == 64
    assert report["proof"]["images"] == 40
    row = report["rows"][0]
    assert row["status"] == "ok" and row["file"] == "cells_tflite-int8.tflite"
    assert row["accuracy"] is not None  # class folders name the labels


@pytest.mark.slow
@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_onnx_int8_other_calibrations_and_fixed_activation_type(tiny_run, tmp_path, method):
    from convert.export import run_export

    report = run_export(tiny_run, tmp_path, parse_formats("onnx-int8"),
                        _options(calib_method=method, onnx_activations="int8",
                                 min_agreement=QUANT_MIN_AGREEMENT), log=lambda *a: None).to_dict()
    row = report["rows"][0]
    assert row["status"] == "ok", row.get("error")
    q = read_metadata(tmp_path / row["file"]).quantization
    assert q["calibration"] == method and q["activations"] == "int8" and q["activation_choice"] == "given"
    assert "latency_ms_batch1_1thread" not in q
