"""Conversion you can trust (issue 14): the golden set and `python -m edge_runtime selftest`, the per-layer
quantization error report, and accuracy-bounded int8.

The tiny run (conftest's `tiny_run`) is exported once to the float and int8 rows; the self-test must pass on
every file as made, refuse a file with one weight byte changed (exit 1: its content hash, and for a file without
one its golden answers), and call a truncated file without a content hash, a missing one or one without a golden
set unusable (exit 2).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.golden import GoldenSet, compare, pick

from helpers import ROOT, flip_strongest_first_conv_weights, run_cli

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


def test_a_model_of_near_ties_gets_a_golden_set_held_to_the_probability_tolerance():
    """A head at chance answers every proof input with a near-tie: it still gets golden inputs (the least tied),
    and a tie flipping within the tolerance is not drift; a move beyond the tolerance still is."""
    from edge_runtime.golden import ANY_MARGIN

    probs = np.array([[0.52, 0.48], [0.49, 0.51], [0.505, 0.495]], np.float32)
    assert pick(probs, 2, floor=0.06) == []
    assert pick(probs, 2, floor=ANY_MARGIN) == [2, 1]  # every input qualifies, least tied of each class first
    g = dataclasses.replace(_golden(atol=0.03), outputs=probs)
    flipped = probs[:, ::-1].copy()  # every top class changes, each by at most 0.04
    flipped[2] = [0.495, 0.505]  # |dprob| 0.01: a legitimate flip of a tie
    r = compare(g, np.stack([probs[0], probs[1], flipped[2]]))
    assert r["ok"] and r["top1_changed"] == []
    r = compare(g, flipped)
    assert not r["ok"] and r["max_abs_diff"] > g.atol


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
                        log=lambda *a: None).to_dict()
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


@pytest.mark.parametrize("fmt", ["tflite-int8", "tflite-float32"])
def test_one_weight_byte_changed_is_drift(trusted, fmt, tmp_path):
    """The content hash refuses the changed file first; a file without one (made before medge recorded it) is
    caught by its golden answers, the second line."""
    from edge_runtime.spec import CONTENT_HASH_KEY

    from helpers import tflite_without_metadata

    path = _file(trusted, fmt)
    bad = tmp_path / path.name
    bad.write_bytes(flip_strongest_first_conv_weights(path.read_bytes()))
    code, out, err = run_cli("selftest", bad)
    assert code == 1 and "has changed since it was made" in out, out + err
    bad.write_bytes(flip_strongest_first_conv_weights(tflite_without_metadata(path.read_bytes(), (CONTENT_HASH_KEY,))))
    code, out, err = run_cli("selftest", bad)
    assert code == 1, out + err
    assert "selftest FAILED" in out and "worst: golden input" in out and "not sealed" in out
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
    assert code == 1 and "has changed since it was made" in out, out + err  # its content hash, first
    from edge_runtime.spec import CONTENT_HASH_KEY

    kept = [p for p in proto.metadata_props if p.key != CONTENT_HASH_KEY]  # a file made before medge recorded one
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    onnx.save(proto, str(bad))
    code, out, err = run_cli("selftest", bad)
    assert code == 1 and "worst: golden input" in out, out + err  # its golden answers, second


def test_unusable_files_exit_2(trusted, tmp_path):
    from edge_runtime.spec import CONTENT_HASH_KEY, GOLDEN_KEY

    from helpers import tflite_without_metadata

    path = _file(trusted, "tflite-int8")
    data = path.read_bytes()
    cut = tmp_path / "cut.tflite"
    cut.write_bytes(data[: len(data) // 2])
    code, out, err = run_cli("selftest", cut)  # its content hash record is in the first half: a changed file
    assert code == 1 and "cut.tflite has changed since it was made" in out, out + err
    cut.write_bytes(tflite_without_metadata(data, (CONTENT_HASH_KEY,))[: len(data) // 2])  # made before the hash
    code, out, err = run_cli("selftest", cut)
    assert code == 2 and "error:" in err, out + err
    code, _, err = run_cli("selftest", tmp_path / "missing.tflite")
    assert code == 2 and "does not exist" in err
    bare = tmp_path / "bare.tflite"  # a file made before golden sets existed: medge metadata, no golden entry
    bare.write_bytes(tflite_without_metadata(data, keys=(GOLDEN_KEY, CONTENT_HASH_KEY)))
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


@pytest.mark.parametrize("tensor, layer", [
    ("model_1/s1m1_3_bn_1/batchnorm/add_1;model_1/s1m1_3_conv_1/convolution", "s1m1_3_conv"),
    ("model_1/s1m1_3_bn_1/batchnorm/add_1", "s1m1_3_bn"),
    ("model_1/dense_1", "dense"),
    # The fused OCT model nests InceptionV3: its layers, not the nested model's name.
    ("oct_fused_1/inception_v3_1/activation_1/Relu;oct_fused_1/inception_v3_1/conv2d_5_1/convolution", "conv2d_5"),
    ("oct_fused_1/inception_v3_1/max_pooling2d_1/MaxPool2d", "max_pooling2d"),
])
def test_layer_names_from_converter_tensor_names(tensor, layer):
    from convert.layer_errors import short_name

    assert short_name(tensor) == layer


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


class _FakeJob:
    """Just what `bounded_search` reads of an ExportJob: options, proof labels, its max_drop records, a log."""

    class proof:
        y, origin = np.array([0, 1, 0, 1]), "fake (test split)"

        def __len__(self):
            return 4

    def __init__(self, bound):
        from types import SimpleNamespace

        self.options, self.proof = SimpleNamespace(max_drop=bound), self.proof()
        self.keras_probs = np.eye(2)[[0, 1, 0, 1]]
        self.max_drop, self.log = {}, lambda *a: None


class _FakeLadder:
    ext, eight_bit = ".x", "uint8"
    calibrations = ["minmax", "entropy"]

    @staticmethod
    def key(row):
        return [row["tensor"]]


def _fake_search(monkeypatch, bound, drops, skip_int16=False):
    """`bounded_search` over a fake ladder whose candidates have the given (drop, latency) by
    (stage, calibration, number of float layers); returns (record, error or None, the candidates asked for)."""
    from convert import bounded
    from convert.formats import FORMATS

    asked = []

    def measure(job, fmt, ladder, c, step):
        asked.append(c)
        if c.stage == "int16" and skip_int16:
            raise bounded.Skip("runtime cannot run it")
        drop, ms = drops[(c.stage, c.calibration, len(c.floats))]
        return {"path": Path(f"step{step}"), "accuracy": 0.5, "drop_pp": drop, "top1_agreement": 1.0,
                "latency_ms_batch1_1thread": ms, "latency_runs": 30, "size_bytes": 100 + len(c.floats)}

    monkeypatch.setattr(bounded, "_measure", measure)
    monkeypatch.setattr(bounded, "MAX_STEPS", 3)
    report = {"layers": [{"index": i, "layer": f"l{i}", "op": "CONV_2D", "tensor": f"t{i}", "sqnr_db": db}
                         for i, db in enumerate([30.0, 10.0, 20.0, None])]}
    job = _FakeJob(bound)
    try:
        path, record = bounded.bounded_search(job, FORMATS["onnx-int8"], _FakeLadder(), report, ("ort-int8",))
    except ValueError as e:
        return job.max_drop["onnx-int8"], str(e), asked
    assert job.max_drop["ort-int8"] is record  # the row sharing the graph shares the record
    assert path == Path(f"step{record['chosen_step']}")
    return record, None, asked


def test_max_drop_search_order_and_choice(monkeypatch):
    d = {("calibration", "minmax", 0): (2.0, 1.0), ("calibration", "entropy", 0): (1.5, 1.0),
         ("int16", "entropy", 0): (0.0, 9.0)}
    d.update({("float-fallback", "entropy", k): (drop, 1.0 + 0.1 * k) for k, drop in ((1, 1.0), (2, 0.5), (3, 0.3))})
    # A calibration within the bound ends the search at once.
    record, err, asked = _fake_search(monkeypatch, 1.5, d)
    assert err is None and record["chosen_step"] == 1 and len(asked) == 2
    # Otherwise: the best calibration (entropy) is kept for int16 and the float steps, worst layer (lowest SQNR)
    # first, until one is within; the fastest within the bound wins (the float step over the slower int16).
    record, err, asked = _fake_search(monkeypatch, 0.5, d)
    assert err is None
    assert [s["stage"] for s in record["steps"]] == ["calibration"] * 2 + ["int16"] + ["float-fallback"] * 2
    assert {c.calibration for c in asked[2:]} == {"entropy"}
    assert [s["float_nodes"] for s in record["steps"][3:]] == [["t1"], ["t1", "t2"]]
    assert record["chosen_step"] == 4 and record["steps"][2]["within_bound"]  # int16 met it too, but slower
    # int16 the only step within: it is chosen, slow as it is.
    record, err, _ = _fake_search(monkeypatch, 0.1, d)
    assert err is None and record["chosen_step"] == 2 and len(record["steps"]) == 6  # all 3 float steps tried
    # A runtime that cannot run int16: recorded as skipped, never chosen; then nothing meets 0.1 and it says so.
    record, err, _ = _fake_search(monkeypatch, 0.1, d, skip_int16=True)
    assert record["steps"][2]["skipped"] == "runtime cannot run it" and "drop_pp" not in record["steps"][2]
    assert record["chosen_step"] is None
    assert "no mix met it in 6 step(s)" in err and "best was step 5" in err and "0.30 pp" in err


def test_max_drop_tflite_steps_through_the_device_runtime(tiny_run, tmp_path, monkeypatch):
    from convert import bounded
    from convert.export import Options, run_export
    from convert.formats import parse_formats
    from edge_runtime.metadata import read_metadata

    monkeypatch.setattr(bounded, "MAX_STEPS", 2)
    opts = dict(calib_n=48, eval_n=60, min_agreement=0.0, allow_drop=True, layer_report_n=16)
    # A bound no model can meet (int8 100 points better than Keras): every step is tried, then the row fails.
    failed = run_export(tiny_run, tmp_path / "a", parse_formats("tflite-int8"), Options(max_drop=-100.0, **opts),
                        name="m", log=lambda *a: None).to_dict()
    row = failed["rows"][0]
    assert row["status"] == "failed" and "no mix met it" in row["error"] and not failed["ok"]
    assert not list((tmp_path / "a").glob("*.tflite"))
    rec = row["max_drop"]
    steps = rec["steps"]
    # calibration on all 48 images and on 16 (48 // 3; 48 // 10 is under MIN_CALIB), 16x8, then 2 float steps
    assert rec["calibrations"] == ["minmax, 48 images", "minmax, 16 images"] and rec["chosen_step"] is None
    assert [s["stage"] for s in steps] == ["calibration"] * 2 + ["int16"] + ["float-fallback"] * 2
    assert [s["calibration_images"] for s in steps[:2]] == [48, 16]
    assert "skipped" not in steps[2] and steps[2]["mode"].startswith("16x8")  # LiteRT runs 16x8 here
    assert [len(s["float_layers"]) for s in steps[3:]] == [1, 2]
    assert steps[4]["float_nodes"][:1] == steps[3]["float_nodes"]  # one more layer each step, worst first
    assert steps[4]["size_bytes"] > steps[0]["size_bytes"]  # float weights are 4 bytes, int8 one
    for s in steps:
        assert s["drop_pp"] == pytest.approx(100 * (rec["keras_accuracy"] - s["accuracy"]), abs=1e-6)
        assert s["latency_ms_batch1_1thread"] > 0 and s["within_bound"] is False

    # A bound a calibration meets: the first calibration within it is the artifact, and it says so.
    bound = min(s["drop_pp"] for s in steps[:2])
    expect = next(s["step"] for s in steps[:2] if s["drop_pp"] <= bound)
    ok = run_export(tiny_run, tmp_path / "b", parse_formats("tflite-int8"), Options(max_drop=bound, **opts),
                    name="m", log=lambda *a: None).to_dict()
    row = ok["rows"][0]
    assert row["status"] == "ok", row.get("error")  # the search and the row's criterion agree on the bound
    assert row["max_drop"]["chosen_step"] == expect and len(row["max_drop"]["steps"]) == expect + 1
    assert row["criterion"]["metric"] == "accuracy_drop_pp" and row["criterion"]["value"] <= bound
    meta = read_metadata(tmp_path / "b" / row["file"])
    chosen = row["max_drop"]["steps"][expect]
    assert meta.quantization["max_drop"]["calibration"] == chosen["calibration"]
    assert meta.quantization["calibration_images"] == chosen["calibration_images"]
    code, out, err = run_cli("selftest", tmp_path / "b" / row["file"])
    assert code == 0, out + err


def test_max_drop_onnx_excludes_nodes_and_shares_the_graph_with_ort(tiny_run, tmp_path, monkeypatch):
    from convert import bounded
    from convert.export import Options, run_export
    from convert.formats import parse_formats

    monkeypatch.setattr(bounded, "MAX_STEPS", 2)
    opts = dict(calib_n=48, eval_n=60, min_agreement=0.0, allow_drop=True, layer_report_n=16,
                onnx_activations="uint8")
    failed = run_export(tiny_run, tmp_path / "a", parse_formats("onnx-int8,ort-int8"),
                        Options(max_drop=-100.0, **opts), name="m", log=lambda *a: None).to_dict()
    rows = {r["format"]: r for r in failed["rows"]}
    assert all(r["status"] == "failed" and "no mix met it" in r["error"] for r in rows.values())
    rec = rows["onnx-int8"]["max_drop"]
    assert rows["ort-int8"]["max_drop"] == rec  # one search for the one QDQ graph
    assert [(s["stage"], s["calibration"], s["activations"]) for s in rec["steps"]] == [
        ("calibration", "minmax", "uint8"), ("calibration", "entropy", "uint8"),
        ("calibration", "percentile", "uint8"), ("int16", rec["steps"][3]["calibration"], "int16"),
        ("float-fallback", rec["steps"][3]["calibration"], "uint8"),
        ("float-fallback", rec["steps"][3]["calibration"], "uint8")]
    assert "skipped" not in rec["steps"][3]  # ONNX Runtime runs QInt16 QDQ (opset 21) here
    excluded = rec["steps"][5]["float_nodes"]
    assert rec["steps"][4]["float_nodes"] == excluded[: len(rec["steps"][4]["float_nodes"])] and excluded

    # A bound step 0 meets: both rows are made from its graph and say so.
    bound = rec["steps"][0]["drop_pp"]
    ok = run_export(tiny_run, tmp_path / "b", parse_formats("onnx-int8,ort-int8"), Options(max_drop=bound, **opts),
                    name="m", log=lambda *a: None).to_dict()
    rows = {r["format"]: r for r in ok["rows"]}
    assert all(r["status"] == "ok" for r in rows.values()), [r.get("error") for r in rows.values()]
    assert rows["onnx-int8"]["max_drop"]["chosen_step"] == 0 and rows["ort-int8"]["max_drop"]["chosen_step"] == 0
    assert rows["onnx-int8"]["quantization"]["max_drop"]["drop_pp"] <= bound


def test_onnx_excluded_nodes_stay_float(tiny_run, tmp_path):
    """`nodes_to_exclude` as the ladder passes it: the worst conv keeps float weights, the others int8."""
    import keras
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from convert.bounded import OnnxLadder
    from convert.converters import keras_to_onnx, quantize_qdq

    model = keras.models.load_model(tiny_run / "best.keras")
    f, prep = tmp_path / "f.onnx", tmp_path / "prep.onnx"
    onnx.save(keras_to_onnx(model, tuple(model.inputs[0].shape[1:])), str(f))
    quant_pre_process(str(f), str(prep))
    g = onnx.load(str(prep)).graph
    conv = next(n for n in g.node if n.op_type == "Conv")
    relu = next((n for n in g.node if n.op_type == "Relu" and n.input[0] in conv.output), None)
    ladder = OnnxLadder(None, prep, None, "uint8", "minmax")  # only its node map (no job needed)
    row = {"node": relu.name, "op": "Relu"} if relu is not None else {"node": conv.name, "op": "Conv"}
    assert conv.name in ladder.key(row)
    x = np.random.default_rng(0).random((8, *model.inputs[0].shape[1:]), dtype=np.float32)
    q = tmp_path / "q.onnx"
    quantize_qdq(prep, q, x, "uint8", "minmax", ladder.key(row))
    qg = onnx.load(str(q)).graph
    dq_outputs = {o for n in qg.node if n.op_type == "DequantizeLinear" for o in n.output}
    kept = next(n for n in qg.node if n.name == conv.name)
    assert kept.input[1] not in dq_outputs  # float weight, straight from the initializer
    others = [n for n in qg.node if n.op_type == "Conv" and n.name != conv.name]
    assert others and all(n.input[1] in dq_outputs for n in others)


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
        assert [p.label for p in preds] == [HEAD_LABELS.split(",")[i]
                                            for i in keras_model.predict(x, verbose=0).argmax(1)]
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
    assert meta.quantization["calibration_images"] == 24
    assert meta.quantization["calibration_from"].startswith("feats.npy")

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


# ---------------------------------------------------------------- each row judged by what it is


def test_qat_rows_are_judged_by_accuracy_drop_not_agreement():
    from convert.export import Options, criterion, judge
    from convert.formats import FORMATS

    qat, ptq = FORMATS["tflite-qat-int8"], FORMATS["tflite-int8"]
    # Issue 14's edge run: the QAT row agrees 0.963 with Keras while its accuracy is 0.939 against 0.938.
    proof = {"top1_agreement": 0.963, "max_abs_diff": 0.4, "keras_accuracy": 0.938, "accuracy": 0.939}
    opts = Options()
    assert judge(qat, proof, opts) is None
    c = criterion(qat, proof, opts)
    assert c["metric"] == "accuracy_drop_pp" and c["value"] == pytest.approx(-0.1) and c["bound"] == 1.0
    assert "agreement" in judge(ptq, proof, opts)  # post-training int8 is a copy: held to agreement
    lost = {**proof, "top1_agreement": 0.99, "accuracy": 0.92}  # agrees more, yet 1.8 points less accurate
    assert "--qat-max-drop 1" in judge(qat, lost, opts) and judge(ptq, lost, opts) is None
    assert judge(qat, lost, Options(qat_max_drop=2.0)) is None
    unlabelled = {**proof, "keras_accuracy": None, "accuracy": None}
    c = criterion(qat, unlabelled, opts)
    assert c["metric"] == "top1_agreement" and not c["passed"] and "no labelled" in c["why"]
    assert criterion(FORMATS["tflite-float32"], {**proof, "max_abs_diff": 2e-4}, opts)["passed"] is False


@pytest.mark.slow
def test_qat_row_records_its_criterion_through_the_cli(tiny_run, tmp_path, capsys):
    from convert.cli import main

    base = [str(tiny_run), "--formats", "tflite-qat-int8", "--qat-epochs", "1", "--qat-learning-rate", "1e-4",
            "--calib-n", "16", "--eval-n", "40", "--layer-report-n", "0", "--golden-n", "2", "--name", "m"]
    # Any disagreement would fail --min-agreement 1.0; a QAT row is held to accuracy instead.
    assert main(base + ["--out", str(tmp_path / "a"), "--min-agreement", "1.0", "--qat-max-drop", "100"]) == 0
    out = capsys.readouterr().out
    row = json.loads((tmp_path / "a" / "conversion.json").read_text())["rows"][0]
    assert row["status"] == "ok" and row["criterion"]["metric"] == "accuracy_drop_pp"
    assert row["criterion"]["value"] == pytest.approx(100 * (row["keras_accuracy"] - row["accuracy"]), abs=1e-6)
    assert "judged by" in out and row["criterion"]["text"] in out
    # A bound no fine-tune can meet (100 points better than Keras): flagged, and kept only with --allow-drop.
    assert main(base + ["--out", str(tmp_path / "b"), "--qat-max-drop", "-100", "--allow-drop"]) == 0
    report = json.loads((tmp_path / "b" / "conversion.json").read_text())
    row = report["rows"][0]
    assert row["status"] == "kept-below-threshold" and "--qat-max-drop -100" in row["error"]
    assert not row["criterion"]["passed"] and report["thresholds"]["qat_max_drop_pp"] == -100


# ---------------------------------------------------------------- runtime compatibility

FAKE_INTERPRETER = '''
"""A stand-in for the legacy tflite-runtime: LiteRT underneath, refusing op versions newer than
FAKE_TFLITE_MAX_OP_VERSIONS (JSON {op: highest version}) with the message TFLite 2.14 gives."""
import json
import os

from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter as _Interpreter

NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


class Interpreter(_Interpreter):
    def __init__(self, model_path=None, model_content=None, **kw):
        buf = model_content if model_content is not None else open(model_path, "rb").read()
        limits = json.loads(os.environ.get("FAKE_TFLITE_MAX_OP_VERSIONS", "{}"))
        m = schema.Model.GetRootAs(buf, 0)
        for i in range(m.OperatorCodesLength()):
            c = m.OperatorCodes(i)
            name = NAMES[max(c.BuiltinCode(), c.DeprecatedBuiltinCode())]
            if name in limits and c.Version() > limits[name]:
                raise ValueError(f"Didn't find op for builtin opcode '{name}' version '{c.Version()}'. An older "
                                 "version of this builtin might be supported. Are you using an old TFLite binary "
                                 "with a newer model?\\nRegistration failed.\\n")
        kw.pop("experimental_preserve_all_tensors", None)
        super().__init__(model_path=model_path, model_content=model_content, **kw)
'''


def _fake_tflite_runtime(root: Path, version: str = "2.14.0") -> Path:
    pkg = root / "tflite_runtime"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"__version__ = {version!r}\n")
    (pkg / "interpreter.py").write_text(FAKE_INTERPRETER)
    dist = root / f"tflite_runtime-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: tflite-runtime\nVersion: {version}\n")
    return root


def _edge_cli(env_extra: dict, *argv) -> tuple[int, str, str]:
    import os

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env_extra}
    res = subprocess.run([sys.executable, "-m", "edge_runtime", *map(str, argv)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    return res.returncode, res.stdout, res.stderr


def test_each_artifact_records_what_it_requires_and_where_it_ran(trusted):
    import importlib.metadata as md

    from edge_runtime.metadata import read_metadata
    from edge_runtime.tflite_file import tflite_entries, tflite_metadata_entries

    out, report = trusted
    for fmt in SELFTEST_FORMATS:
        row = next(r for r in report["rows"] if r["format"] == fmt)
        path = _file(trusted, fmt)
        assert read_metadata(path).runtimes == row["runtimes"]
        proven = row["runtimes"]["proven_on"][0]
        assert proven["ok"] and proven["runtime"] == row["runtime"]
        assert proven["version"] == md.version("ai-edge-litert" if row["runtime"] == "litert" else "onnxruntime")
        requires = row["runtimes"]["requires"]
        if path.suffix == ".tflite":
            buf = path.read_bytes()
            entry = tflite_metadata_entries(buf)["min_runtime_version"].rstrip(b"\0").decode()
            assert requires["min_runtime_version"] == entry and requires["op_versions"]["CONV_2D"] >= 1
            assert tflite_entries(buf) == tflite_metadata_entries(buf)  # the schema-free reader reads the same
        else:
            assert requires["opsets"]["ai.onnx"] == 17 and requires["ir_version"] >= 7


def test_too_old_runtime_names_what_the_file_needs(trusted, tmp_path):
    """A fake tflite-runtime 2.14 that lacks the int8 CONV_2D version the file uses: edge_runtime says which
    op and version the file needs, where it was proven, and what to install, not "truncated"."""
    fake = _fake_tflite_runtime(tmp_path / "fake")
    src = _file(trusted, "tflite-int8")
    path = tmp_path / src.name  # no sidecar: the record is read from the file without the flatbuffer schema
    path.write_bytes(src.read_bytes())
    row = next(r for r in trusted[1]["rows"] if r["format"] == "tflite-int8")
    conv = row["runtimes"]["requires"]["op_versions"]["CONV_2D"]
    litert = row["runtimes"]["proven_on"][0]["version"]
    env = {"PYTHONPATH": f"{fake}:{ROOT}"}

    code, out, err = _edge_cli(env, "info", path, "--backend", "tflite-runtime")
    assert code == 0, err  # an up-to-date "runtime": no false alarm
    code, out, err = _edge_cli({**env, "FAKE_TFLITE_MAX_OP_VERSIONS": json.dumps({"CONV_2D": conv - 1})},
                               "info", path, "--backend", "tflite-runtime")
    assert code == 2, out + err
    assert "needs a newer runtime than the installed tflite-runtime 2.14.0" in err
    assert f"CONV_2D version {conv}" in err and f"proven on litert {litert}" in err
    assert "min_runtime_version" in err and "truncated" not in err and "Traceback" not in err


def test_compat_tells_a_too_new_file_from_a_broken_one(tmp_path):
    from edge_runtime.compat import explain, too_new, version_tuple

    assert version_tuple("2.14.0") < version_tuple("2.15.0") and version_tuple("2.14.0rc1") == (2, 14, 0)
    assert too_new("Didn't find op for builtin opcode 'FULLY_CONNECTED' version '12'. An older version") == {
        "op": "FULLY_CONNECTED", "version": "12"}
    p = tmp_path / "m.tflite"
    p.write_bytes(b"\0" * 64)
    assert explain(p, "litert", "2.3.0", "Could not open 'm.tflite': the model is not a valid flatbuffer",
                   "pip") is None
    # A legacy runtime older than the version the file's metadata states: said even when its error is opaque.
    p.with_suffix(".json").write_text(json.dumps({"runtimes": {"requires": {"min_runtime_version": "2.15.0"}}}))
    msg = explain(p, "tflite-runtime", "2.14.0", "Registration failed.", "pip install x")
    assert "minimum TFLite runtime version of 2.15.0" in msg and "sidecar .json" in msg
