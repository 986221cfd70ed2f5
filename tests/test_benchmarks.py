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

from benchmarks import cli, interleave, report
from benchmarks.cache import MODELS, Prepared
from benchmarks.run import KERAS, ROW_FIELDS, Settings, add_ratios, benchmark_model, empty_row, measure_pairs
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
    # the real pair, timed interleaved in one process: a median ratio inside its own 95% interval
    assert i8["speedup_method"] == "interleaved" and f32["speedup_method"] == "reference", i8["speedup_error"]
    assert i8["speedup_ci95_low"] <= i8["speedup_vs_float32"] <= i8["speedup_ci95_high"]
    # all rounds, or fewer (an even number, MIN_ROUNDS or more) once the interval was within ±1%
    n = i8["speedup_rounds"]
    assert n == interleave.ROUNDS or (interleave.MIN_ROUNDS <= n < interleave.ROUNDS and n % 2 == 0), n
    assert isinstance(i8["speedup_noisy"], bool) and rep["settings"]["stop_within"] == interleave.STOP_WITHIN
    assert set(rep["machine_state"]) == {"before", "after"} and rep["settings"]["rounds"] == interleave.ROUNDS
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
    assert "Machine before: load " in md and "alternating rounds" in md and "[" in md.split("## All rows")[0]
    # where the time went: build, machine peak, then rows and pairs per model, and the total
    assert [p["phase"] for p in rep["phases"]] == ["build", "machine peak", "malaria-edge rows", "malaria-edge pairs",
                                                    "total"]
    assert all(p["wall_s"] > 0 and p["cpu_s"] > 0 for p in rep["phases"])  # every phase runs child processes
    assert "## Where the time went" in md and "malaria-edge pairs" in md
    # the build: one conversion of the given run, its own process's CPU time and memory
    (step,) = rep["build_steps"]
    assert step["step"] == f"convert malaria-edge {FORMATS}" and step["cpu_s"] > 0 and step["peak_rss_mb"] > 100
    assert f"convert malaria-edge {FORMATS}" in md
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
    assert (("RAPL: absent on this machine (" + energy["reason"]) in md if not energy["available"]
            else "Energy (RAPL)" in md)
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
    assert report.gates(failed, max_drop_pp=1.0, min_speedup=None) == [
        "malaria-edge tflite-int8 threads=1: not measured (boom)"]
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
    # The source's pre-activation BN stays as int8 MUL ops and its Flatten head as reshaping ops;
    # the post block's don't.
    assert "MUL" in rows["tiny"]["other_int8_ops"] and "RESHAPE" in rows["tiny"]["other_int8_ops"]
    assert rows["tiny-post"]["other_int8_ops"] == "2 ADD"  # the two residual additions
    assert (tmp_path / "presets.csv").read_text().count("\n") == 3 and "| tiny-post |" in capsys.readouterr().out


class FakeClock:
    """A clock that only moves when a fake model "runs": each call costs its base time times the round's load."""

    def __init__(self):
        self.now, self.load = 0.0, 1.0

    def __call__(self) -> float:
        return self.now

    def model(self, ms: float, log: list[str], name: str):
        def run():
            log.append(name)
            self.now += ms * self.load / 1e3
        return run


def test_interleave_alternates_flips_and_cancels_load(monkeypatch):
    """Load that changes from round to round moves both files of a round alike: every per-round ratio stays 2."""
    clock, calls, blocks = FakeClock(), [], []
    a, b = clock.model(2.0, calls, "a"), clock.model(1.0, calls, "b")
    loads = [1.0, 3.0, 1.5, 7.0]  # per round: what a neighbour's compile job does to both files
    real_block = interleave.timed_block

    def block(fn, min_time, clk):
        clock.load = loads[len(blocks) // 2]
        out = real_block(fn, min_time, clk)
        blocks.append((calls[-1], len(out)))
        return out

    monkeypatch.setattr(interleave, "timed_block", block)
    r = interleave.interleave(a, b, rounds=4, min_time=0.01, warmup=3, clock=clock)
    assert calls[:6] == ["a", "b"] * 3  # warm-up, both, before any round counts
    assert r["order"] == ["ab", "ba", "ab", "ba"] and [n for n, _ in blocks] == list("abbaabba")
    assert all(k >= 1 for _, k in blocks) and len(calls) == 6 + sum(k for _, k in blocks)
    assert r["ratios"] == pytest.approx([2.0] * 4, rel=1e-9)
    assert r["a_ms"] == pytest.approx([2.0 * x for x in loads])  # the absolute times moved with the load
    with pytest.raises(ValueError, match="rounds"):
        interleave.interleave(a, b, rounds=0)


def test_interleave_stops_early_only_when_tight_after_an_even_number_of_rounds():
    """The stated rule: at least MIN_ROUNDS rounds, as many A-first as B-first, and the 95% interval within ±1%."""
    import random

    clock, calls = FakeClock(), []
    a, b = clock.model(2.0, calls, "a"), clock.model(1.0, calls, "b")
    r = interleave.interleave(a, b, rounds=15, min_time=0.01, clock=clock)  # every ratio 2: tight at once
    assert len(r["ratios"]) == interleave.MIN_ROUNDS and r["stopped_early"]
    assert r["order"].count("ab") == r["order"].count("ba")
    r = interleave.interleave(a, b, rounds=15, min_time=0.01, clock=clock, stop_within=0)  # turned off
    assert len(r["ratios"]) == 15 and not r["stopped_early"]
    rng = random.Random(0)

    def jittery():  # A costs 2 ms +-10% from call to call: the interval stays wider than ±1%
        clock.now += 2.0 * rng.uniform(0.9, 1.1) / 1e3

    r = interleave.interleave(jittery, b, rounds=15, min_time=0.001, clock=clock)
    assert len(r["ratios"]) == 15 and not r["stopped_early"]
    ms = [2.0] * 9
    assert not interleave.tight(ms, [1.0] * 9, rounds=15)  # an odd number of rounds
    assert interleave.tight(ms[:8], [1.0] * 8, rounds=15) and not interleave.tight(ms[:6], [1.0] * 6, rounds=15)
    assert not interleave.tight(ms[:8], [1.0] * 8, rounds=8)  # the last round: nothing left to save


def test_bootstrap_interval_and_noisy_flag():
    med, lo, hi = interleave.bootstrap_median([2.0] * 15)
    assert (med, lo, hi) == (2.0, 2.0, 2.0) and not interleave.is_noisy(med, lo, hi)
    steady = [2.0 + 0.01 * k for k in range(-7, 8)]
    med, lo, hi = interleave.bootstrap_median(steady)
    assert lo <= med <= hi and med == pytest.approx(2.0) and not interleave.is_noisy(med, lo, hi)
    assert interleave.bootstrap_median(steady) == (med, lo, hi)  # seeded: the same interval every time
    wild = [0.8, 4.7, 1.6, 8.5, 2.5, 0.9, 5.8, 2.2, 3.9, 1.1, 6.0, 2.8, 0.7, 4.1, 1.9]
    med, lo, hi = interleave.bootstrap_median(wild)
    assert lo < med < hi and interleave.is_noisy(med, lo, hi) and interleave.half_width(med, lo, hi) > 0.15
    assert interleave.is_noisy(2.0, 1.8, 2.31) and not interleave.is_noisy(2.0, 1.8, 2.29)  # the ±15% edge
    assert interleave.bootstrap_median([3.0]) == (3.0, 3.0, 3.0)
    with pytest.raises(ValueError):
        interleave.bootstrap_median([])
    s = interleave.summarise({"ratios": wild, "a_calls": [1.0, 2.0, 3.0], "b_calls": [1.0]})
    assert s["noisy"] and s["rounds"] == 15 and s["a"]["p50_ms"] == 2.0 and s["b"]["calls"] == 1


def _pair_rows():
    rows = [empty_row("m", KERAS, 1, precision="float32", runtime=KERAS, latency_p50_ms=9.0)]
    for fmt, prec, rt, p50 in (("tflite-float32", "float32", "litert", 4.0),
                               ("tflite-float16", "float16", "litert", 4.1),
                               ("tflite-int8", "int8", "litert", 2.0), ("onnx-float32", "float32", "onnxruntime", 5.0),
                               ("onnx-int8", "int8", "onnxruntime", 2.5)):
        rows.append(empty_row("m", fmt, 1, precision=prec, runtime=rt, latency_p50_ms=p50, file=f"/x/{fmt}",
                              size_mb=1.0 if prec == "float32" else 0.3))
    return rows


def test_measure_pairs_fills_quantized_rows_and_falls_back_openly():
    """Each quantized row gets its interleaved ratio and interval; a failed pair falls back to the p50s, said so."""
    rows, seen, logged = _pair_rows(), [], []

    def fake_pair(a, b, threads, image, settings):
        seen.append((a.name, b.name, threads, image))
        if b.name == "onnx-int8":
            raise RuntimeError("session exploded")
        ratios = [2.5] * 15 if b.name == "tflite-int8" else [0.5, 1.5, 0.9, 1.2, 0.6] * 3
        return interleave.summarise({"ratios": ratios, "a_calls": [1.0], "b_calls": [1.0]})

    measure_pairs(rows, "cell.png", Settings(threads=(1,)), log=logged.append, pair_fn=fake_pair)
    add_ratios(rows)
    assert seen == [("tflite-float32", "tflite-float16", 1, "cell.png"),
                    ("tflite-float32", "tflite-int8", 1, "cell.png"),
                    ("onnx-float32", "onnx-int8", 1, "cell.png")]  # never the Keras row, never float32 with itself
    by = {r["format"]: r for r in rows}
    assert by["tflite-int8"]["speedup_vs_float32"] == 2.5 and by["tflite-int8"]["speedup_method"] == "interleaved"
    assert by["tflite-int8"]["speedup_noisy"] is False and by["tflite-float16"]["speedup_noisy"] is True
    assert by["tflite-float32"]["speedup_vs_float32"] == 1.0 and by["tflite-float32"]["speedup_method"] == "reference"
    onnx = by["onnx-int8"]
    assert onnx["speedup_method"] == "separate-p50" and onnx["speedup_vs_float32"] == 2.0
    assert "session exploded" in onnx["speedup_error"] and any("falls back" in l for l in logged)
    assert by[KERAS]["speedup_vs_float32"] is None
    table = report.side_by_side(rows)
    assert "2.50x [2.50-2.50]" in table and "noisy" in table and "2.00x (apart)" in table and "q ms abs" in table
    notes = report.speedup_notes({"rows": rows, "settings": {"rounds": 15, "min_time_s": 0.15},
                                  "machine_state": {"before": {
                                      "load_average": [1.0, 0.5, 0.2],
                                      "busiest_processes": [{"name": "cc1", "cpu_percent": 97}],
                                      "cpu_mhz": [2400.0, 2600.0]}}})
    assert "1 of 3 speed-ups are noisy" in " ".join(notes) and "--rounds 30" in " ".join(notes)
    assert "load 1.00 0.50 0.20; busiest others: `cc1` 97%; CPU 2400-2600 MHz" in notes[1]
    assert "Machine after: not recorded" in notes[2] and "(apart)" in notes[-1]


def test_machine_state_sees_a_busy_neighbour():
    """/proc says which other process takes the CPU (a busy child here), with the load average beside it."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c",
                              "import time\nend = time.time() + 20\nwhile time.time() < end: pass"])
    try:
        busy = interleave.busiest_processes(interval=0.5, top=100)
    finally:
        child.kill()
        child.wait()
    assert busy is not None and child.pid in {p["pid"] for p in busy}
    assert next(p["command"] for p in busy if p["pid"] == child.pid).startswith("python -c import time")
    assert all(p["cpu_percent"] >= 1 for p in busy)
    state = interleave.machine_state(interval=0.05)
    assert set(state) == {"load_average", "busiest_processes", "cpu_mhz"} and len(state["load_average"]) == 3
    assert interleave.state_line(state).startswith("load ") and interleave.state_line(None) == "not recorded"


def test_stability_passes_start_and_stop_the_hog_and_compare():
    """The loaded pass runs with the hog started before and stopped after it; a move past 15% says NO."""
    from benchmarks import stability

    events = []

    def measure(a, b, t):
        events.append(("measure", b.name, t))
        hogged = "hog" in [e[0] for e in events] and "stop" not in [e[0] for e in events]
        ratios = [2.0] * 15 if not hogged else ([2.1] * 15 if t == 1 else [1.5] * 15)
        return interleave.summarise({"ratios": ratios, "a_calls": [1.0], "b_calls": [1.0]})

    pairs = [("tflite-float32", "tflite-int8", Path("f32"), Path("i8"))]
    res = stability.run_passes(pairs, [1, 2], measure, hog=lambda: events.append(("hog",)) or "proc",
                               stop=lambda proc: events.append(("stop", proc)), log=lambda s: None)
    assert [e[0] for e in events] == ["measure", "measure", "hog", "measure", "measure", "stop"]
    assert events[-1] == ("stop", "proc") and set(res["state"]) == {"idle", "loaded"}
    text = stability.table(res)
    lines = text.splitlines()[2:]
    assert "2.00x [2.00-2.00]" in lines[0] and "2.10x" in lines[0] and "+5.0%" in lines[0]
    assert lines[0].endswith("yes |")
    assert "-25.0%" in lines[1] and lines[1].endswith("NO |")


def test_stability_hog_is_cpu_bound_and_bounded():
    from benchmarks import stability

    proc = stability.start_hog(0.5)
    assert proc.wait(timeout=30) == 0  # ends itself after its time, even when nobody stops it
    proc = stability.start_hog(60)
    stability.stop_hog(proc)
    assert proc.returncode is not None


def test_expected_seconds_counts_builds_only_when_not_cached(tmp_path):
    """The first lines' estimate: builds drop out once the cache holds conversions; pairs and rows scale with effort."""
    from benchmarks.cache import expected_seconds, formats_for, parse_models

    models = parse_models("malaria-edge,oct-fused,oct-head")
    fmts = {m.name: formats_for(m, "default") for m in models}
    build, timing = expected_seconds(models, fmts, [1, 2], tmp_path, rounds=15, min_time=0.15)
    assert build > 0 and timing > 0
    for key in ("malaria-edge-release", "malaria-edge", "oct-fused", "oct-head"):
        (tmp_path / key / "export").mkdir(parents=True)
        (tmp_path / key / "export" / "conversion.json").write_text("{}")
    cached, same = expected_seconds(models, fmts, [1, 2], tmp_path, rounds=15, min_time=0.15)
    assert cached == 0 and same == timing
    # pairs stop early on an idle machine: more --rounds only count when early stopping is off
    assert expected_seconds(models, fmts, [1, 2], tmp_path, rounds=30, min_time=0.15)[1] == timing
    fixed = expected_seconds(models, fmts, [1, 2], tmp_path, rounds=15, min_time=0.15, stop_within=0)[1]
    assert fixed > timing
    assert expected_seconds(models, fmts, [1, 2], tmp_path, rounds=30, min_time=0.15, stop_within=0)[1] > fixed
    assert expected_seconds(models, fmts, [1], tmp_path, rounds=15, min_time=0.15)[1] < timing
    # rows are timed for --min-seconds per measurement: the default's half second counts less than the 1 s measured
    half = expected_seconds(models, fmts, [1, 2], tmp_path, rounds=15, min_time=0.15, min_seconds=0.5)[1]
    assert half < timing
    assert expected_seconds(models, fmts, [1, 2], tmp_path, rounds=15, min_time=0.15, min_seconds=2.0)[1] > timing


def test_phases_count_children_cpu_and_tree_memory():
    """A child that holds ~200 MB and burns 0.3 s of CPU shows in its phase's CPU time and peak tree memory."""
    import subprocess
    import sys

    from benchmarks.phases import Phases, line

    child = ("import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); t = time.process_time()\n"
             "while time.process_time() - t < 0.3: pass\ntime.sleep(1.5)")
    phases = Phases(sample_s=0.1)
    with phases.phase("child") as row:
        subprocess.run([sys.executable, "-c", child], check=True)
    with phases.phase("nothing") as alone:
        pass
    assert row["cpu_s"] >= 0.3 and row["wall_s"] >= row["cpu_s"] - 0.1
    assert row["peak_rss_mb"] >= alone["peak_rss_mb"] + 150, (row, alone)  # the child's 200 MB, beside this process
    total = phases.total()
    assert total["cpu_s"] >= 0.3 and total["peak_rss_mb"] == row["peak_rss_mb"]
    assert line(row).startswith("child: ") and "GB (process tree)" in line(row)


def test_split_conversion_runs_a_process_per_runtime_when_memory_allows(tiny_run, tmp_path, monkeypatch):
    """A model marked split_convert converts its LiteRT and ONNX formats in two processes side by side, each into
    its own export folder, which the cache merges; with too little memory, one process, said so."""
    import dataclasses

    from benchmarks import cache

    m = dataclasses.replace(MODELS["malaria-edge"], split_convert=True)
    logged: list[str] = []
    b = cache.Builder(tmp_path, runs={"malaria-edge": tiny_run}, log=logged.append)
    monkeypatch.setattr(cache, "mem_available_mb", lambda: cache.SPLIT_MIN_AVAILABLE_MB - 1)
    assert b.convert_groups(m, ["tflite-float32", "onnx-float32"]) == [["tflite-float32", "onnx-float32"]]
    assert "one conversion process" in logged[-1] and "GB available" in logged[-1]
    monkeypatch.setattr(cache, "mem_available_mb", lambda: cache.SPLIT_MIN_AVAILABLE_MB + 1)
    assert b.convert_groups(MODELS["malaria-edge"], ["tflite-float32", "onnx-float32"]) == [
        ["tflite-float32", "onnx-float32"]]  # not marked: one process
    p = b.prepare(m, parse_formats("tflite-float32,onnx-float32"))
    assert p.error is None and not p.errors, p.errors
    assert set(p.artifacts) == {"tflite-float32", "onnx-float32"}
    assert len({a.parent for a in p.artifacts.values()}) == 2  # export/ and export-2/
    assert sorted(s["step"] for s in b.steps) == ["convert malaria-edge onnx-float32",
                                                   "convert malaria-edge tflite-float32"]
    again = cache.Builder(tmp_path, runs={"malaria-edge": tiny_run}, log=logged.append)
    assert again.prepare(m, parse_formats("tflite-float32,onnx-float32")).artifacts == p.artifacts
    assert again.steps == []  # both found in the cache: nothing converted again
