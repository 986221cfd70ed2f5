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
from benchmarks.run import KERAS, ROW_FIELDS, Settings, benchmark_model, empty_row
from convert.formats import parse_formats
from convert.timing import EnergyCounter, time_fn
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
def test_what_a_device_sees_first(bench):
    """First use, warm-up, steady state alone and end to end, CPU time, and energy or the reason it is absent."""
    _, out, rep = bench
    for r in rep["rows"]:
        print(f"{r['format']}: init {r['init_ms']:.1f} ms, first e2e {r['first_e2e_ms']} ms (inference "
              f"{r['first_infer_ms']:.2f}), warm-up {r['warmup_ms']}, e2e p50 {r['e2e_p50_ms']} ms, "
              f"CPU {r['cpu_ms_per_image']:.3f} ms/img (e2e {r['e2e_cpu_ms_per_image']}), "
              f"energy {r['energy_mj_per_image']}")
        assert r["init_ms"] > 0 and r["first_infer_ms"] > 0
        assert len(r["warmup_ms"]) == 5 and all(v > 0 for v in r["warmup_ms"])
        assert r["cpu_ms_per_image"] > 0 and r["cpu_cores_busy"] > 0
        if r["format"] == KERAS:  # the reference is not a device path: no end-to-end figures
            assert r["first_e2e_ms"] is None and r["e2e_p50_ms"] is None and r["e2e_input"] is None
            continue
        assert r["e2e_input"] == "image file (png)" and r["e2e_runs"] >= 20
        assert 0 < r["e2e_p50_ms"] <= r["e2e_p90_ms"] <= r["e2e_p99_ms"]
        assert r["latency_p50_ms"] <= r["latency_p90_ms"] <= r["latency_p99_ms"]
        # end to end contains the inference (decode and preprocess come on top)
        assert r["first_e2e_ms"] >= r["first_infer_ms"] and r["e2e_cpu_ms_per_image"] > 0
    energy = rep["energy"]
    assert set(energy) == {"available", "source", "domains", "reason"}
    for r in rep["rows"]:
        if energy["available"]:
            assert r["energy_mj_per_image"] > 0
        else:  # never a made-up figure: null in the rows, the reason in the report
            assert r["energy_mj_per_image"] is None and r["e2e_energy_mj_per_image"] is None
    md = (out / report.RESULTS_MD).read_text()
    assert "## What a device sees first" in md and "## Thread choice" in md and "e2e p50" in md
    assert ("RAPL: absent on this machine (" + energy["reason"]) in md if not energy["available"] else "Energy (RAPL)" in md
    csv_head, csv_row = (out / report.RESULTS_CSV).read_text().splitlines()[:2]
    assert "warmup_ms" in csv_head.split(",") and "[" not in csv_row  # the warm-up list is one space-separated cell


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
    # the Keras reference timed at its own thread counts (the CLI's default: the first of --threads)
    one = benchmark_model(Prepared(MODELS["malaria-paper"], error="no malaria-paper run"), parse_formats("tflite-int8"),
                          Settings(threads=(1, 2), keras_threads=(1,)), peaks=[])
    assert [(r["format"], r["threads"]) for r in one] == [(KERAS, 1), ("tflite-int8", 1), ("tflite-int8", 2)]


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


def _rapl_tree(root: Path, packages: dict[str, tuple[int, int]]) -> None:
    """A fake /sys/class/powercap: package domains (energy_uj, max_energy_range_uj), a core sub-domain, and psys."""
    for i, (name, (energy, span)) in enumerate(packages.items()):
        d = root / f"intel-rapl:{i}"
        (d / f"intel-rapl:{i}:0").mkdir(parents=True)
        for f, v in (("name", name), ("energy_uj", energy), ("max_energy_range_uj", span)):
            (d / f).write_text(f"{v}\n")
        (d / f"intel-rapl:{i}:0" / "energy_uj").write_text("5\n")
    psys = root / f"intel-rapl:{len(packages)}"
    psys.mkdir()
    (psys / "name").write_text("psys\n")
    (psys / "energy_uj").write_text("999\n")


def test_energy_counter_reads_rapl_packages_and_unwraps(tmp_path):
    _rapl_tree(tmp_path, {"package-0": (1_000, 10_000), "package-1": (9_500, 10_000)})
    e = EnergyCounter(tmp_path)
    assert e.available and e.describe() == {"available": True, "source": "linux powercap/RAPL",
                                            "domains": ["package-0", "package-1"], "reason": None}
    before = e.read()
    assert before == [1_000, 9_500]  # the packages only: not their core sub-domains, not psys
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("3000\n")
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("500\n")  # wrapped past its range of 10,000 uJ
    assert e.joules(before, e.read()) == pytest.approx((2_000 + 1_000) / 1e6)
    assert e.joules(None, before) is None


def test_energy_counter_says_why_it_is_absent(tmp_path, monkeypatch):
    assert not EnergyCounter(tmp_path / "none").available
    assert "no " in EnergyCounter(tmp_path / "none").reason and "powercap" in EnergyCounter(tmp_path / "none").reason
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no RAPL domain" in EnergyCounter(empty).describe()["reason"]
    locked = tmp_path / "locked"
    _rapl_tree(locked, {"package-0": (1, 10)})
    real_read = Path.read_text

    def read_text(self, *a, **kw):  # root can read a chmod 000 file; a monkeypatch refuses for everyone
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self, *a, **kw)

    monkeypatch.setattr(Path, "read_text", read_text)
    e = EnergyCounter(locked)
    d = e.describe()
    assert not e.available and d["available"] is False and d["domains"] == [] and e.read() is None
    assert "root only" in d["reason"] and "chmod" in d["reason"]
    report_text = report.energy_line({"energy": d})
    assert report_text.startswith("RAPL: absent on this machine (") and "root only" in report_text


def test_time_fn_reports_warmup_cpu_and_energy(tmp_path):
    calls = []
    stats = time_fn(lambda: calls.append(sum(range(20_000))), warmup=3, min_runs=5, min_seconds=0.0)
    assert len(stats["warmup_ms"]) == 3 and stats["runs"] == len(calls) - 3 >= 5
    assert stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"] and stats["cpu_ms"] > 0
    assert stats["energy_mj"] is None  # no counter given
    _rapl_tree(tmp_path, {"package-0": (1_000, 10_000)})
    stats = time_fn(lambda: None, warmup=0, min_runs=4, min_seconds=0.0, energy=EnergyCounter(tmp_path))
    assert stats["energy_mj"] == 0.0  # the fake counter never moved: zero, not a guess


def test_plot_labels_stay_apart_with_twenty_crowded_points(tmp_path):
    """20 points, two models' formats on top of each other: every label clear of the others, numbers in a key."""
    pts = [(100 + 3 * (i % 5), 200 + 2 * (i // 5)) for i in range(20)]  # a 15 x 8 px huddle
    texts = [str(i + 1) for i in range(20)]
    offs = report.label_offsets(pts, texts, (0, 0, 800, 600))
    boxes = []
    for (x, y), t, (dx, dy) in zip(pts, texts, offs):
        w = report.LABEL_CHAR_W * len(t)
        boxes.append((x + dx - w / 2, y + dy - report.LABEL_H / 2, x + dx + w / 2, y + dy + report.LABEL_H / 2))
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)
    rows = []
    for model in ("malaria-edge", "oct-head"):
        for k, fmt in enumerate(("keras", "tflite-float32", "tflite-float16", "tflite-dynamic", "tflite-int8",
                                 "tflite-qat-int8", "onnx-float32", "onnx-int8", "ort-int8", "tflite-int8x")):
            rows.append(empty_row(model, fmt, 2, precision="int8" if "int8" in fmt else "float32",
                                  size_mb=0.1 + 0.001 * k, latency_p50_ms=0.09 + 0.001 * k, accuracy=0.95))
    written = report.plots(rows, tmp_path)
    assert [p.name for p in written] == [report.PLOT_SIZE, report.PLOT_ACCURACY]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)


def test_thread_choice_weighs_latency_against_cpu():
    """Two threads halve the latency and cost more CPU per image: the table says both."""
    rows = [empty_row("m", "tflite-int8", 1, latency_p50_ms=2.0, cpu_ms_per_image=2.0, cpu_cores_busy=1.0),
            empty_row("m", "tflite-int8", 2, latency_p50_ms=1.0, cpu_ms_per_image=2.5, cpu_cores_busy=2.5),
            empty_row("m", "onnx-int8", 1, latency_p50_ms=1.0, cpu_ms_per_image=1.0),
            empty_row("m", "onnx-int8", 2, latency_p50_ms=0.9, cpu_ms_per_image=1.0 - 1e-9),
            empty_row("m", "tflite-float32", 1, status="failed", error="boom")]
    text = report.thread_choice(rows)
    lines = {l.split()[1]: l.split() for l in text.splitlines()[2:]}
    assert lines["tflite-int8"][2] == "2" and lines["tflite-int8"][5] == "1" and "+25%" in lines["tflite-int8"]
    assert lines["onnx-int8"][-1] == "same"
    assert "tflite-float32" not in text and "tflite-float32" not in report.steady_table(rows)
    assert report.thread_choice(rows[:1]).startswith("(one thread count")


def test_default_formats_pair_float_and_int8_for_inceptionv3_and_say_how_to_get_all():
    from benchmarks.cache import DEFAULT_MODELS, formats_for, parse_models, scope_lines
    from convert.formats import FORMATS

    assert cli.parse_args([]).formats == "default" and cli.parse_args([]).keras_threads is None
    assert cli.parse_args(["--keras-threads", "sweep"]).keras_threads == cli.parse_args([]).threads
    models = parse_models(DEFAULT_MODELS)
    chosen = {m.name: [f.name for f in formats_for(m, "default")] for m in models}
    assert chosen["oct-fused"] == chosen["oct-head"] == ["tflite-float32", "tflite-int8", "onnx-float32", "onnx-int8"]
    assert chosen["malaria-edge"] == chosen["malaria-paper"] == list(FORMATS)
    assert all([f.name for f in formats_for(m, "all")] == list(FORMATS) for m in models)
    assert [f.name for f in formats_for(MODELS["oct-fused"], "tflite-int8")] == ["tflite-int8"]
    lines = scope_lines(models, {m.name: formats_for(m, "default") for m in models}, "default")
    oct_line = next(l for l in lines if l.startswith("oct-fused"))
    assert "--formats all" in oct_line and "no per-layer int8 report" in oct_line
    assert "--formats all" not in next(l for l in lines if l.startswith("malaria-edge"))
    lines = scope_lines(models, {m.name: formats_for(m, "all") for m in models}, "all")
    assert not any("--formats all" in l for l in lines)
    rep = {"scope": lines, "settings": {"formats_spec": "all"}}
    assert report.scope_section(rep)[0] == "What ran (`--formats all`):" and report.scope_section({}) == []


def test_cli_rejects_bad_arguments(capsys, tmp_path):
    assert cli.main(["--formats", "tflite-nope", "--out", str(tmp_path)]) == 2
    assert "tflite-float32" in capsys.readouterr().err  # the message lists the valid names
    assert cli.main(["--models", "resnet9000", "--out", str(tmp_path)]) == 2
    assert cli.main(["--run", "malaria-edge=/no/such/run", "--out", str(tmp_path)]) == 2
    with pytest.raises(SystemExit):
        cli.parse_args(["--threads", "0"])
    assert cli.parse_args(["--threads", "1,1,2"]).threads == [1, 2]
    from benchmarks.machine import cores

    assert cli.parse_args([]).threads == cli.parse_args(["--threads", "sweep"]).threads == list(range(1, cores() + 1))


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
