"""benchmarks/: a tiny benchmark end to end (one tiny model, two formats, a few real cells).

Checked: every row has the report's fields with units in their names, float
and int8 sit side by side, the files (JSON, CSV, Markdown, PNG) hold the
machine and library versions, a broken artifact becomes a failed row with its
error (the run goes on), gates and --compare work. Timings are printed, never
asserted (the machine is shared).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import cli, report
from benchmarks.cache import MODELS, Prepared
from benchmarks.run import KERAS, ROW_FIELDS, Settings, benchmark_model
from convert.formats import parse_formats
from train import runs

FORMATS = "tflite-float32,tflite-int8"


@pytest.fixture(scope="module")
def bench(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = cli.main(["--run", f"malaria-edge={tiny_run}", "--models", "malaria-edge", "--formats", FORMATS,
                     "--threads", "1", "--n-images", "24", "--batch", "4", "--min-seconds", "0.1",
                     "--max-seconds", "1", "--out", str(out)])
    return code, out, json.loads((out / report.RESULTS_JSON).read_text())


@pytest.mark.slow
def test_end_to_end_rows_and_files(bench):
    code, out, rep = bench
    assert code == 0
    rows = rep["rows"]
    assert [(r["model"], r["format"], r["threads"]) for r in rows] == [
        ("malaria-edge", KERAS, 1), ("malaria-edge", "tflite-float32", 1), ("malaria-edge", "tflite-int8", 1)]
    for r in rows:
        assert set(ROW_FIELDS) <= set(r), set(ROW_FIELDS) - set(r)
        assert r["status"] == "ok", r["error"]
        print(f"{r['format']}: p50 {r['latency_p50_ms']:.2f} ms, p99 {r['latency_p99_ms']:.2f} ms, "
              f"{r['throughput_ips']:.0f} img/s, {r['size_mb']:.3f} MB, RSS {r['peak_rss_mb']:.0f} MB, "
              f"cold {r['cold_start_s']:.2f} s, acc {r['accuracy']:.3f}")
        assert r["latency_p50_ms"] > 0 and r["latency_p50_ms"] <= r["latency_p99_ms"]
        assert r["size_mb"] > 0 and r["peak_rss_mb"] > 0 and r["cold_start_s"] > 0
        assert r["n_images"] == 24 and 0 <= r["accuracy"] <= 1 and 0 <= r["top1_agreement"] <= 1
        assert r["weights"] == 6486 and r["macs"] > 0  # the `tiny` preset
        assert r["throughput_batch"] == 4 and r["throughput_mode"] in ("batched", "looped")
        assert r["sensitivity"] is not None and r["specificity"] is not None
    keras_row, f32, i8 = rows
    assert keras_row["accuracy_drop_pp"] == 0 and keras_row["top1_agreement"] == 1
    assert f32["top1_agreement"] == 1.0 and f32["max_abs_dprob"] < 1e-4  # same model, float32
    assert f32["backend"] == i8["backend"] == "litert"
    # int8 weights; both files carry the same ~26 KB golden set, a large share of this tiny model's file
    assert i8["size_ratio_vs_float32"] > 1.1
    assert i8["speedup_vs_float32"] > 0 and f32["speedup_vs_float32"] == 1.0
    assert i8["peak_fraction"] is not None and i8["peak_gmacs_per_s"] > 0
    # the machine and libraries travel with the numbers
    assert rep["machine"]["cores"] >= 1 and rep["machine"]["cpu_model"]
    assert isinstance(rep["machine"]["simd"], list)
    assert {"numpy", "ai-edge-litert"} <= set(rep["versions"])
    assert {(p["runtime"], p["precision"]) for p in rep["peaks"]} == {("litert", "float32"), ("litert", "int8")}
    # files
    csv_lines = (out / report.RESULTS_CSV).read_text().splitlines()
    assert csv_lines[0].split(",") == list(ROW_FIELDS) and len(csv_lines) == 4
    md = (out / report.RESULTS_MD).read_text()
    assert rep["machine"]["cpu_model"] in md and "ai-edge-litert" in md and "tflite-int8" in md
    for png in (report.PLOT_SIZE, report.PLOT_ACCURACY):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    side = report.side_by_side(rows)
    assert "tflite-float32" in side and "tflite-int8" in side and "x" in side


@pytest.mark.slow
def test_failing_format_is_a_row(bench, tiny_run, tmp_path):
    _, out, rep = bench
    good = Path(next(r["file"] for r in rep["rows"] if r["format"] == "tflite-float32"))
    broken = tmp_path / "malaria-edge_tflite-int8.tflite"
    broken.write_bytes(good.read_bytes()[:200])  # truncated: the runtime cannot load it
    p = Prepared(MODELS["malaria-edge"], run=tiny_run, reference=tiny_run / "best.keras",
                 manifest=Path(runs.read_config(tiny_run).manifest),
                 artifacts={"tflite-float32": good, "tflite-int8": broken},
                 errors={"onnx-float32": "conversion failed: something broke"})
    rows = benchmark_model(p, parse_formats("tflite-float32,tflite-int8,onnx-float32"),
                           Settings(threads=(1,), n_images=8, batch=2, min_seconds=0.05, max_seconds=0.5), peaks=[])
    by = {r["format"]: r for r in rows}
    assert by[KERAS]["status"] == "ok" and by["tflite-float32"]["status"] == "ok"
    assert by["tflite-int8"]["status"] == "failed" and "truncated" in by["tflite-int8"]["error"]
    assert by["onnx-float32"]["status"] == "failed" and by["onnx-float32"]["error"].startswith("conversion failed")
    assert report.rows_table(rows).count("FAILED") == 2
    # a model that could not be prepared at all: every row fails with the reason
    missing = benchmark_model(Prepared(MODELS["malaria-paper"], error="no malaria-paper run"),
                              parse_formats("tflite-int8"), Settings(threads=(1, 2)), peaks=[])
    assert len(missing) == 4 and all(r["status"] == "failed" and r["error"] == "no malaria-paper run" for r in missing)


@pytest.mark.slow
def test_gates_and_compare(bench):
    _, _, rep = bench
    rows = rep["rows"]
    assert report.gates(rows, max_drop_pp=None, min_speedup=None) == []
    assert report.gates(rows, max_drop_pp=100.0, min_speedup=0.001) == []
    assert any("--min-speedup" in g for g in report.gates(rows, None, min_speedup=1e6))
    assert any("--max-drop" in g for g in report.gates(rows, max_drop_pp=-101.0, min_speedup=None))
    failed = [dict(rows[2], status="failed", error="boom")]
    assert report.gates(failed, max_drop_pp=1.0, min_speedup=None) == ["malaria-edge tflite-int8 threads=1: not measured (boom)"]
    older = json.loads(json.dumps(rep))
    older["rows"][1]["latency_p50_ms"] *= 2
    del older["rows"][2]
    text = report.compare(older, rep)
    assert "tflite-float32" in text and "-50%" in text and "new (ok)" in text


@pytest.mark.slow
def test_cli_gate_exit_code_and_compare(bench, tiny_run, tmp_path, capsys):
    """A second run reuses the cached artifacts; an impossible --min-speedup makes it exit 1."""
    _, out, _ = bench
    code = cli.main(["--run", f"malaria-edge={tiny_run}", "--models", "malaria-edge", "--formats", FORMATS,
                     "--threads", "1", "--n-images", "8", "--batch", "2", "--min-seconds", "0.05",
                     "--max-seconds", "0.5", "--no-peak", "--cache", str(out / "cache"), "--out", str(tmp_path),
                     "--compare", str(out / report.RESULTS_JSON), "--min-speedup", "1000"])
    captured = capsys.readouterr()
    assert code == 1
    assert "== convert" not in captured.out  # cached: nothing rebuilt
    assert "compared with the run of" in captured.out
    assert "gate failed: malaria-edge tflite-int8 threads=1: speed-up" in captured.err
    rep = json.loads((tmp_path / report.RESULTS_JSON).read_text())
    assert rep["gates"]["failures"] and rep["peaks"] == []


def test_cli_rejects_bad_arguments(capsys, tmp_path):
    assert cli.main(["--formats", "tflite-nope", "--out", str(tmp_path)]) == 2
    assert "tflite-float32" in capsys.readouterr().err  # the message lists the valid names
    assert cli.main(["--models", "resnet9000", "--out", str(tmp_path)]) == 2
    assert cli.main(["--run", "malaria-edge=/no/such/run", "--out", str(tmp_path)]) == 2
    with pytest.raises(SystemExit):
        cli.parse_args(["--threads", "0"])
    assert cli.parse_args(["--threads", "1,1,2"]).threads == [1, 2]


@pytest.mark.slow
def test_presets_benchmark_reports_int8_against_float32(tmp_path, capsys):
    from benchmarks.cli import main

    assert main(["presets", "--presets", "nope"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["presets", "--presets", "tiny,tiny-post", "--min-seconds", "0.05", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "presets.json").read_text())
    rows = {r["preset"]: r for r in report["rows"]}
    assert rows["tiny-post"]["weights"] == 2_634 and rows["tiny-post"]["int8_p50_ms"] > 0
    # The source's pre-activation BN stays as int8 MUL ops and its Flatten head as reshaping ops; the post block's don't.
    assert "MUL" in rows["tiny"]["other_int8_ops"] and "RESHAPE" in rows["tiny"]["other_int8_ops"]
    assert rows["tiny-post"]["other_int8_ops"] == "2 ADD"  # the two residual additions
    assert (tmp_path / "presets.csv").read_text().count("\n") == 3 and "| tiny-post |" in capsys.readouterr().out
