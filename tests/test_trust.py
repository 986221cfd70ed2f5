"""Conversion you can trust (issue 14): the golden set and `python -m edge_runtime selftest`, the per-layer
quantization error report, and accuracy-bounded int8.

The tiny run (conftest's `tiny_run`) is exported once to the float and int8 rows; the self-test must pass on
every file as made, report drift (exit 1) on a file with one weight byte changed, and call a truncated file,
a missing one or one without a golden set unusable (exit 2).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.golden import GoldenSet, compare, pick
from helpers import ROOT, run_cli

SELFTEST_FORMATS = ("tflite-float32", "tflite-float16", "tflite-dynamic", "tflite-int8", "onnx-float32",
                    "onnx-int8", "ort-int8")


# ---------------------------------------------------------------- the golden set alone (no TensorFlow)


def _golden(n=3, classes=2, atol=0.03) -> GoldenSet:
    rng = np.random.default_rng(0)
    out = rng.dirichlet(np.ones(classes), n).astype(np.float32)
    return GoldenSet(codes=rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8), scales=(1 / 255,) * n,
                     offsets=(0.0,) * n, outputs=out, atol=atol, sources=tuple(f"c{i}.png" for i in range(n)))


def test_golden_set_round_trips_and_decodes_inputs_like_the_preprocessing():
    g = _golden()
    back = GoldenSet.from_json(g.to_json())
    np.testing.assert_array_equal(back.codes, g.codes)
    np.testing.assert_array_equal(back.outputs, g.outputs)
    assert back.atol == g.atol and back.sources == g.sources
    # pixel = uint8 * scale + offset, in float32, as edge_runtime.images.preprocess computes it
    np.testing.assert_array_equal(back.inputs, g.codes.astype(np.float32) * np.float32(1 / 255))
    assert json.loads(g.to_json())["encoding"] == "png"  # images: lossless PNG
    bad = json.loads(g.to_json())
    bad["codes"] = bad["codes"][:-1]
    with pytest.raises(ValueError, match="golden"):
        GoldenSet.from_json(json.dumps(bad))
    bad["codes"] = [c[: len(c) // 2] for c in json.loads(g.to_json())["codes"]]
    with pytest.raises(ValueError, match="golden"):
        GoldenSet.from_json(json.dumps(bad))
    features = GoldenSet(codes=g.codes.reshape(3, 4, 12), scales=g.scales, offsets=g.offsets, outputs=g.outputs,
                         atol=g.atol)
    assert json.loads(features.to_json())["encoding"] == "zlib"
    np.testing.assert_array_equal(GoldenSet.from_json(features.to_json()).codes, features.codes)
    with pytest.raises(ValueError, match="schema"):
        GoldenSet.from_json(json.dumps({**json.loads(g.to_json()), "schema": "medge-golden/2"}))


def test_compare_names_the_worst_input_and_a_changed_class():
    g = _golden(atol=0.01)
    assert compare(g, g.outputs)["ok"]
    moved = g.outputs.copy()
    moved[1] += np.float32(0.005)
    assert compare(g, moved)["ok"]  # within tolerance
    moved[2] = moved[2][::-1]
    r = compare(g, moved)
    assert not r["ok"] and r["worst_input"] == 2 and r["worst_source"] == "c2.png" and 2 in r["top1_changed"]


def test_pick_takes_every_class_and_skips_near_ties():
    probs = np.array([[0.5, 0.5], [0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.45, 0.55], [0.05, 0.95]])
    chosen = pick(probs, 4, floor=0.2)
    assert sorted(chosen) == [1, 2, 3, 5] and 0 not in chosen and 4 not in chosen
    assert chosen[:2] == [2, 3]  # least confident of each class first: they move most when a weight changes


# ---------------------------------------------------------------- on real artifacts


@pytest.fixture(scope="module")
def trusted(tiny_run, tmp_path_factory):
    """The tiny run exported to the float and int8 rows (no QAT), kept whatever their agreement."""
    from convert.export import Options, run_export
    from convert.formats import parse_formats

    out = tmp_path_factory.mktemp("trusted")
    report = run_export(tiny_run, out, parse_formats(",".join(SELFTEST_FORMATS)),
                        Options(calib_n=48, eval_n=60, min_agreement=0.0, allow_drop=True), name="m",
                        log=lambda *a: None)
    return out, report


def _file(trusted, fmt: str) -> Path:
    out, report = trusted
    row = next(r for r in report["rows"] if r["format"] == fmt)
    assert row["status"] != "failed", row.get("error")
    return out / row["file"]


@pytest.mark.parametrize("fmt", SELFTEST_FORMATS)
def test_selftest_passes_on_every_format_as_made(trusted, fmt):
    path = _file(trusted, fmt)
    code, out, err = run_cli("selftest", path, "--json")
    assert code == 0, out + err
    doc = json.loads(out)
    assert doc["ok"] and doc["inputs"] >= 2 and doc["max_abs_diff"] <= doc["atol"]
    assert doc["format"] == fmt and doc["made_on"]["runtime"] == doc["backend"]
    row = next(r for r in trusted[1]["rows"] if r["format"] == fmt)
    assert row["selftest"]["inputs"] == doc["inputs"]
    code, out, _ = run_cli("selftest", path)
    assert code == 0 and "selftest passed" in out


def _first_conv_weights(buf: bytes) -> tuple[int, int, np.dtype]:
    """(file offset, byte length, dtype) of the first CONV_2D's weight buffer, found through the flatbuffer schema."""
    from ai_edge_litert import schema_py_generated as schema

    m = schema.Model.GetRootAs(buf, 0)
    sg = m.Subgraphs(0)
    builtin = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    for i in range(sg.OperatorsLength()):
        op = sg.Operators(i)
        code = m.OperatorCodes(op.OpcodeIndex())
        kind = builtin[max(code.BuiltinCode(), code.DeprecatedBuiltinCode())]
        if kind != "CONV_2D":
            continue
        t = sg.Tensors(op.Inputs(1))
        b = m.Buffers(t.Buffer())
        assert not b.DataIsNone(), "the conv's weights are not a constant buffer"
        start = b._tab.Vector(b._tab.Offset(4))  # where the buffer's bytes sit in the file
        dtype = {schema.TensorType.INT8: np.int8, schema.TensorType.FLOAT32: np.float32,
                 schema.TensorType.FLOAT16: np.float16}[t.Type()]
        return start, b.DataLength(), np.dtype(dtype)
    raise AssertionError("no CONV_2D with constant weights")


@pytest.mark.parametrize("fmt", ["tflite-int8", "tflite-float32"])
def test_one_weight_byte_changed_is_drift(trusted, fmt, tmp_path):
    path = _file(trusted, fmt)
    buf = bytearray(path.read_bytes())
    start, length, dtype = _first_conv_weights(bytes(buf))
    w = np.frombuffer(bytes(buf[start: start + length]), dtype)
    k = int(np.abs(w.astype(np.float32)).argmax())  # the strongest weight of the first layer
    # int8: flip the sign bit (e.g. 127 -> -1); float32: a high exponent bit of the same weight.
    pos = start + k * dtype.itemsize + (dtype.itemsize - 1)
    buf[pos] ^= 0x80 if dtype == np.int8 else 0x40
    bad = tmp_path / path.name
    bad.write_bytes(bytes(buf))
    assert np.frombuffer(bytes(buf[start: start + length]), dtype)[k] != w[k]
    code, out, err = run_cli("selftest", bad)
    assert code == 1, out + err
    assert "selftest FAILED" in out and "worst: golden input" in out
    code, out, _ = run_cli("selftest", bad, "--json")
    doc = json.loads(out)
    assert code == 1 and not doc["ok"]
    assert doc["max_abs_diff"] > doc["atol"] or doc["top1_changed"]


def test_changed_onnx_weight_is_drift(trusted, tmp_path):
    import onnx
    from onnx import numpy_helper

    path = _file(trusted, "onnx-float32")
    proto = onnx.load(str(path))
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    init = next(i for i in proto.graph.initializer if i.name == conv.input[1])
    w = numpy_helper.to_array(init).copy()
    k = np.unravel_index(np.abs(w).argmax(), w.shape)
    w[k] *= -8.0
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    bad = tmp_path / path.name
    onnx.save(proto, str(bad))
    code, out, err = run_cli("selftest", bad)
    assert code == 1, out + err


def test_unusable_files_exit_2(trusted, tmp_path):
    from edge_runtime.metadata import GOLDEN_KEY, tflite_without_metadata

    path = _file(trusted, "tflite-int8")
    data = path.read_bytes()
    cut = tmp_path / "cut.tflite"
    cut.write_bytes(data[: len(data) // 2])
    code, out, err = run_cli("selftest", cut)
    assert code == 2 and "error:" in err, out + err
    code, _, err = run_cli("selftest", tmp_path / "missing.tflite")
    assert code == 2 and "does not exist" in err
    bare = tmp_path / "bare.tflite"  # a file made before golden sets existed: medge metadata, no golden entry
    bare.write_bytes(tflite_without_metadata(data, keys=(GOLDEN_KEY,)))
    code, _, err = run_cli("selftest", bare)
    assert code == 2 and "no golden set" in err, err
    code, _, _ = run_cli("info", bare)  # still an ordinary, readable artifact
    assert code == 0


def test_selftest_imports_no_tensorflow(trusted):
    path = _file(trusted, "tflite-int8")
    code = ("import sys, edge_runtime\n"
            "from edge_runtime.golden import selftest\n"
            f"r = selftest(edge_runtime.load({str(path)!r}))\n"
            "heavy = sorted(k for k in sys.modules if k.split('.')[0] in ('tensorflow', 'keras', 'tf_keras'))\n"
            "print(r['ok'], heavy); sys.exit(0 if r['ok'] and not heavy else 1)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stdout + res.stderr


# ---------------------------------------------------------------- per-layer error report


@pytest.mark.parametrize("fmt", ["tflite-int8", "onnx-int8", "ort-int8"])
def test_int8_rows_carry_a_per_layer_report_in_graph_order(trusted, fmt):
    from PIL import Image

    from edge_runtime.metadata import read_metadata

    out, report = trusted
    row = next(r for r in report["rows"] if r["format"] == fmt)
    rep = row["layer_errors"]
    layers = rep["layers"]
    assert rep["images"] == 48 and len(layers) >= 5  # calib_n 48 < the default 64
    assert [r["index"] for r in layers] == list(range(len(layers)))
    conv = "CONV_2D" if fmt.startswith("tflite") else "Conv"
    assert sum(r["op"] == conv for r in layers) >= 3
    finite = [r["sqnr_db"] for r in layers if r["sqnr_db"] is not None]
    # Exact ops (a reshape, a pool of already-quantized values) have ~no noise: very high or no figure.
    assert len(finite) >= len(layers) // 2 and all(0 < v < 200 for v in finite)
    # The worst three are the three lowest, ranked and marked in the table.
    assert [w["sqnr_db"] for w in rep["worst"]] == sorted(finite)[:3]
    assert [r["worst_rank"] for r in sorted(layers, key=lambda r: r["worst_rank"] or 99)[:3]] == [1, 2, 3]
    # The artifact itself says which layers are worst; the PNG lies beside it.
    meta = read_metadata(out / row["file"])
    assert [w["layer"] for w in meta.quantization["worst_layers"]] == [w["layer"] for w in rep["worst"]]
    with Image.open(out / rep["png"]) as im:
        assert im.format == "PNG" and im.width > 300


def test_tflite_report_follows_the_artifacts_op_order(trusted):
    """Graph order is the interpreter's execution order of the int8 artifact's quantized ops."""
    from edge_runtime.backends import open_session

    out, report = trusted
    row = next(r for r in report["rows"] if r["format"] == "tflite-int8")
    ops = iter(o.name for o in open_session(out / row["file"], "litert").ops())
    reported = [r["op"] for r in row["layer_errors"]["layers"]]
    # Every reported op appears in the artifact, in the same order (shape-only ops are not verified: skipped).
    assert all(any(op == o for o in ops) for op in reported), reported


def test_onnx_report_accumulated_error_matches_the_artifacts(trusted, tiny_run):
    """The last layer's accumulated SQNR is what the float and int8 files give through edge_runtime."""
    import edge_runtime
    from convert.calibration import load_sets
    from convert.layer_errors import sqnr_db
    from convert.sources import load_source

    out, report = trusted
    rows = {r["format"]: r for r in report["rows"]}
    layers = rows["onnx-int8"]["layer_errors"]["layers"]
    last = next(r for r in reversed(layers) if r["accumulated_sqnr_db"] is not None)
    _, src = load_source(tiny_run)
    calib, _, _ = load_sets(src.manifest, src.labels, src.spec, 48, 4, 0)
    assert last["op"] == "Softmax"  # the model's output tensor
    f = edge_runtime.load(out / rows["onnx-float32"]["file"], warmup=False).run(calib.x)
    q = edge_runtime.load(out / rows["onnx-int8"]["file"], warmup=False).run(calib.x)
    # The report runs both graphs unoptimized (qdq_loss_debug's sessions), the device with every fusion: within 1.5 dB.
    assert sqnr_db(f, f - q) == pytest.approx(last["accumulated_sqnr_db"], abs=1.5)


def test_inspect_shows_the_report_beside_the_artifact(trusted, capsys):
    from convert.cli import main

    out, report = trusted
    row = next(r for r in report["rows"] if r["format"] == "tflite-int8")
    assert main(["inspect", str(out / row["file"])]) == 0
    text = capsys.readouterr().out
    assert "per-layer int8 error" in text and "<< worst 1" in text and row["layer_errors"]["png"] in text
    worst = row["layer_errors"]["worst"][0]["layer"]
    assert any(worst in line and "<< worst 1" in line for line in text.splitlines())


# ---------------------------------------------------------------- --max-drop


def test_max_drop_keeps_the_worst_layers_in_float_one_at_a_time(tiny_run, tmp_path, monkeypatch):
    from convert import bounded
    from convert.export import Options, run_export
    from convert.formats import parse_formats
    from edge_runtime.metadata import read_metadata

    monkeypatch.setattr(bounded, "MAX_STEPS", 2)
    opts = dict(calib_n=48, eval_n=60, min_agreement=0.0, allow_drop=True, layer_report_n=16)
    # A bound no model can meet (int8 100 points better than Keras): every step is tried, then the row fails.
    failed = run_export(tiny_run, tmp_path / "a", parse_formats("tflite-int8"), Options(max_drop=-100.0, **opts),
                        name="m", log=lambda *a: None)
    row = failed["rows"][0]
    assert row["status"] == "failed" and "no mix met it" in row["error"] and not failed["ok"]
    assert not list((tmp_path / "a").glob("*.tflite"))
    steps = row["max_drop"]["steps"]
    assert [s["step"] for s in steps] == [0, 1, 2] and row["max_drop"]["chosen_step"] is None
    assert [len(s["float_layers"]) for s in steps] == [0, 1, 2]
    assert steps[2]["float_tensors"][:1] == steps[1]["float_tensors"]  # one more layer each step, worst first
    assert steps[2]["size_bytes"] > steps[0]["size_bytes"]  # float weights are 4 bytes, int8 one
    for s in steps:
        assert s["drop_pp"] == pytest.approx(100 * (row["max_drop"]["keras_accuracy"] - s["accuracy"]), abs=1e-6)
        assert s["latency_ms_batch1_1thread"] > 0

    # A bound the second step meets: the first step within it is the artifact, and it says so.
    d0, d1 = steps[0]["drop_pp"], steps[1]["drop_pp"]
    bound, expect = (d1, 1) if d1 < d0 else (d0, 0)
    ok = run_export(tiny_run, tmp_path / "b", parse_formats("tflite-int8"), Options(max_drop=bound, **opts),
                    name="m", log=lambda *a: None)
    row = ok["rows"][0]
    assert row["status"] != "failed", row.get("error")
    chosen = row["max_drop"]["chosen_step"]
    assert chosen == expect and row["max_drop"]["steps"][chosen]["drop_pp"] <= bound
    meta = read_metadata(tmp_path / "b" / row["file"])
    assert meta.quantization["max_drop"]["float_layers"] == row["max_drop"]["steps"][chosen]["float_layers"]
    code, out, err = run_cli("selftest", tmp_path / "b" / row["file"])
    assert code == 0, out + err


# ---------------------------------------------------------------- any Keras classifier (a bare features model)

HEAD_LABELS = "CNV,DME,DRUSEN,NORMAL"


@pytest.fixture(scope="module")
def bare_head(tmp_path_factory):
    """The 2018 write-up's situation: a Keras 2 .h5 head (8x8x2048 features -> 4 classes) and nothing else,
    plus a feature store and a .npy of features for its calibration."""
    import h5py
    import keras

    from train.oct.store import STORE_FORMAT

    d = tmp_path_factory.mktemp("bare_head")
    keras.utils.set_random_seed(3)
    L = keras.layers
    f = keras.Input((8, 8, 2048))
    h = L.Flatten()(L.Activation("relu")(L.BatchNormalization()(L.Conv2D(16, 1, use_bias=False)(f))))
    model = keras.Model(f, L.Dense(4, activation="softmax")(h))
    model.save(d / "head.h5")  # the legacy Keras 2 HDF5 format
    rng = np.random.default_rng(0)
    feats = np.abs(rng.standard_normal((48, 8, 8, 2048))).astype(np.float32)
    np.save(d / "feats.npy", feats)
    np.save(d / "wrong.npy", feats[:, :4])
    with h5py.File(d / "store.h5", "w") as s:
        s.create_dataset("features", data=feats.astype(np.float16), chunks=(1, 8, 8, 2048))
        s.create_dataset("label", data=model.predict(feats, verbose=0).argmax(1).astype(np.int16))
        s.create_dataset("split", data=np.array(["train"] * 24 + ["test"] * 24, dtype=object),
                         dtype=h5py.string_dtype())
        s.attrs.update(format=STORE_FORMAT, labels=json.dumps(HEAD_LABELS.split(",")), fingerprint="f" * 16)
    return d, model


@pytest.mark.slow
def test_bare_features_head_converts_without_calibration_and_runs_on_arrays(bare_head, tmp_path, capsys):
    import edge_runtime
    from convert.cli import main
    from edge_runtime.metadata import read_metadata

    d, keras_model = bare_head
    code = main([str(d / "head.h5"), "--labels", HEAD_LABELS, "--formats", "tflite-float32,onnx-float32",
                 "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "random normal inputs (8, 8, 2048)" in out and "all rows passed" in out
    report = json.loads((tmp_path / "o" / "conversion.json").read_text())
    assert report["source"]["part"] == "head" and report["calibration"] is None
    for name in ("head_tflite-float32.tflite", "head_onnx-float32.onnx"):
        meta = read_metadata(tmp_path / "o" / name)
        assert meta.part == "head" and meta.input.shape == (-1, 8, 8, 2048) and meta.feature_extractor["base"] is None
        model = edge_runtime.load(tmp_path / "o" / name)
        x = np.abs(np.random.default_rng(5).standard_normal((3, 8, 8, 2048))).astype(np.float32)
        np.testing.assert_allclose(model.run(x), keras_model.predict(x, verbose=0), atol=1e-4)
        preds = model.predict(x)  # a batch of feature maps
        assert [p.label for p in preds] == [HEAD_LABELS.split(",")[i] for i in keras_model.predict(x, verbose=0).argmax(1)]
        assert model.predict(x[0])[0].ok  # one feature map
        bad = model.predict([x[0, :4], str(d / "head.h5")])
        assert "shape (4, 8, 2048)" in bad[0].error and "(8, 8, 2048)" in bad[0].error
        assert "takes features, not images" in bad[1].error


@pytest.mark.slow
def test_bare_head_int8_needs_calib_of_its_own_shape(bare_head, tmp_path, capsys):
    from convert.cli import main
    from edge_runtime.metadata import read_metadata

    d, _ = bare_head
    base = [str(d / "head.h5"), "--labels", HEAD_LABELS, "--formats", "tflite-int8", "--layer-report-n", "0"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 1  # the row fails, saying what it needs
    out = capsys.readouterr().out
    assert "needs calibration inputs" in out and ".npy of inputs (N, 8, 8, 2048)" in out

    assert main(base + ["--out", str(tmp_path / "b"), "--calib", str(d / "wrong.npy")]) == 2
    assert "shape (48, 4, 8, 2048)" in capsys.readouterr().err

    assert main(base + ["--out", str(tmp_path / "c"), "--calib", str(d / "feats.npy"), "--calib-n", "24",
                        "--allow-drop"]) == 0
    meta = read_metadata(tmp_path / "c" / "head_tflite-int8.tflite")
    assert meta.quantization["calibration_images"] == 24 and meta.quantization["calibration_from"].startswith("feats.npy")

    # A feature store: train split calibrates, test split proves, with labels (here Keras' own answers).
    assert main(base + ["--out", str(tmp_path / "d"), "--calib", str(d / "store.h5"), "--allow-drop"]) == 0
    report = json.loads((tmp_path / "d" / "conversion.json").read_text())
    assert report["proof"]["images"] == 24 and report["rows"][0]["keras_accuracy"] == 1.0
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "e"), "--calib", str(d / "store.h5"), "--labels", "a,b,c,d"]) == 2
    assert "differ from the model's labels" in capsys.readouterr().err


@pytest.mark.slow
def test_image_sized_bare_model_says_how_to_take_features(tmp_path, capsys):
    import keras

    from convert.cli import main

    inp = keras.Input((32, 32, 3))
    keras.Model(inp, keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(inp))).save(tmp_path / "m.h5")
    args = [str(tmp_path / "m.h5"), "--labels", "a,b", "--formats", "tflite-float32"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "does not match the preprocessing (64, 64, 3)" in err and "--part head" in err
    assert main(args + ["--out", str(tmp_path / "b"), "--part", "head"]) == 0
    vec = keras.Input((16,))  # a 1-D feature vector: a features model without being asked
    keras.Model(vec, keras.layers.Dense(3, activation="softmax")(vec)).save(tmp_path / "v.keras")
    assert main([str(tmp_path / "v.keras"), "--labels", "a,b,c", "--formats", "tflite-float32",
                 "--out", str(tmp_path / "c")]) == 0
    import edge_runtime

    model = edge_runtime.load(tmp_path / "c" / "v_tflite-float32.tflite")
    assert len(model.predict(np.ones((5, 16), np.float32))) == 5
