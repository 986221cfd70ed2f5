"""`python -m benchmarks`: float32 against int8, side by side, on this machine.

    python -m benchmarks                                   # build what is missing (cached), benchmark the default set
    python -m benchmarks --formats all                     # every format of every model (the full matrix, slower)
    python -m benchmarks --models malaria-edge --formats tflite-float32,tflite-int8 --threads 1
    python -m benchmarks --threads 1,all                   # two thread counts instead of every one (many cores)
    python -m benchmarks --run malaria-edge=runs/malaria-edge --data runs/malaria.csv --n-images 1000
    python -m benchmarks --compare runs/benchmarks/old.json --max-drop 1.0 --min-speedup 1.5
    python -m benchmarks smear --data ../shared/data/iml_malaria [--model MODEL] [--out DIR]   # field photos
    python -m benchmarks presets [--presets edge,post-w32-d111-64] [--out DIR]   # int8 cost of a network design
    python -m benchmarks serve --models M O --field FIELD.jpg --scan SCAN.jpeg [--clients 16]   # the field app, loaded
    python -m benchmarks stability [--threads 1,2] [--rounds 15]   # the malaria pairs idle and beside a CPU hog

With no arguments it benchmarks the released malaria model (releases/malaria,
the Keras model whose int8 file ships with edge_runtime) on the bundled sample
of unseen patients, and builds the OCT models from synthetic scans with quick
settings, showing each step; `--from-scratch` trains the malaria model on the
bundled sample instead. Built models and artifacts are cached and reused. Results go
to `--out`: benchmark.json, benchmark.csv, benchmark.md, latency_vs_size.png,
accuracy_vs_latency.png.

Formats (`--formats default`): every row of convert's format table for the
malaria models; for the OCT models (oct-fused is InceptionV3 at 299x299, where
each format costs minutes to convert, calibrate, fine-tune or report per
layer; oct-head its head alone) the float32 and int8 pair of each runtime:
tflite-float32, tflite-int8, onnx-float32, onnx-int8. `--formats all` converts
and measures every format of every model (the full matrix); the header and
the report list what ran. The Keras reference row is timed at the first
thread count (`--keras-threads`).

Per artifact and thread count (1..cores by default) it reports what a device
sees first: load, the first image end to end, the warm-up calls, then the
steady state (p50/p90/p99) of inference alone and end to end (decode +
preprocess + inference), with the CPU time per image summed over all threads
(the battery's cost) and, where Linux powercap/RAPL is readable, the energy
per image (the report says when it is not, and why).

Exit codes: 0 done (failed formats are rows with their error), 1 a gate
(--max-drop, --min-speedup) failed, 2 bad arguments or inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.cache import (
    DEFAULT_FORMATS,
    DEFAULT_MODELS,
    MODELS,
    expected_seconds,
    formats_for,
    parse_models,
    prepare_all,
    scope_lines,
)
from benchmarks.interleave import MIN_ROUNDS, MIN_TIME_S, ROUNDS, STOP_WITHIN, machine_state
from benchmarks.machine import library_versions, machine_info, positive, thread_counts
from benchmarks.peak import measure_peaks
from benchmarks.phases import Phases
from benchmarks.phases import line as phase_line
from benchmarks.presets import main as presets_main
from benchmarks.report import compare, gates, rows_csv, terminal, write_all
from benchmarks.run import MIN_SECONDS, Settings, add_ratios, benchmark_model
from benchmarks.serve import main as serve_main
from benchmarks.smear import main as smear_main
from benchmarks.stability import main as stability_main
from convert.formats import FORMATS
from convert.timing import EnergyCounter


def _run_arg(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or name not in MODELS:
        raise argparse.ArgumentTypeError(f"--run takes NAME=RUN_DIR with NAME one of {', '.join(MODELS)}; got {text!r}")
    return name, Path(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"models: {', '.join(MODELS)}\nformats: {', '.join(FORMATS)}")
    w = p.add_argument_group("what to benchmark")
    w.add_argument("--models", help=f"'all' or comma-separated (default: {', '.join(DEFAULT_MODELS)}; "
                                    "malaria-paper only when a run of it is cached or given with --run)")
    w.add_argument("--formats", default=DEFAULT_FORMATS,
                   help="'default' (every format for malaria; for the OCT models only tflite-float32, tflite-int8, "
                        "onnx-float32 and onnx-int8), 'all' (every format of every model: the full matrix) or "
                        "comma-separated rows of convert's format table")
    w.add_argument("--threads", type=thread_counts, default="sweep",
                   help="thread counts: 'sweep' (every count from 1 to the cores, the default), or e.g. 1,all "
                        "or 1,2,4 (fewer probes on a many-core machine)")
    w.add_argument("--keras-threads", type=thread_counts, metavar="THREADS",
                   help="thread counts the Keras reference row is timed at, like --threads (default: the first of "
                        "--threads; its accuracy is every row's reference either way; 'sweep' times it at every count)")
    w.add_argument("--from-scratch", action="store_true",
                   help="malaria-edge: train `edge` for a few epochs on the bundled sample instead of benchmarking "
                        "the released model (releases/malaria)")
    w.add_argument("--run", type=_run_arg, action="append", default=[], metavar="NAME=RUN_DIR",
                   help="benchmark this run directory as model NAME (read only; exported into the cache)")
    d = p.add_argument_group("data")
    d.add_argument("--data", type=Path, help="malaria evaluation images: a manifest CSV (its test split) or class "
                                             "folders (default: the run's manifest test split)")
    d.add_argument("--n-images", type=positive(int), default=300, help="evaluation images per model")
    m = p.add_argument_group("measurement")
    m.add_argument("--batch", type=positive(int), default=16, help="batch for the throughput figure")
    m.add_argument("--min-seconds", type=positive(float), default=MIN_SECONDS,
                   help="timed seconds per absolute measurement of a row, at least (default: %(default)s)")
    m.add_argument("--max-seconds", type=positive(float), default=10.0,
                   help="timed seconds per absolute measurement of a row, at most (default: %(default)s)")
    m.add_argument("--no-peak", action="store_true", help="skip the machine-peak matrix products")
    m.add_argument("--rounds", type=positive(int), default=ROUNDS,
                   help="interleaved rounds per float/quantized pair and thread count (more: a narrower interval "
                        "on a busy machine)")
    m.add_argument("--min-time", type=positive(float), default=MIN_TIME_S, metavar="S",
                   help="seconds per file per interleaved round, at least")
    m.add_argument("--stop-within", type=float, default=STOP_WITHIN * 100, metavar="PCT",
                   help=f"a pair stops before --rounds, after at least {MIN_ROUNDS} rounds (an even number), once its "
                        "95%% interval is within PCT%% of its median (0: always --rounds)")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, default=Path("runs/benchmarks"), help="results folder")
    o.add_argument("--cache", type=Path, help="built models and artifacts (default: OUT/cache)")
    o.add_argument("--rebuild", action="store_true", help="empty the cache first")
    o.add_argument("--format", choices=("table", "json", "csv"), default="table", help="what to print at the end")
    o.add_argument("--compare", type=Path, metavar="OLD.json", help="print what changed against an earlier run")
    g = p.add_argument_group("gates (exit 1 when an int8 row fails one)")
    g.add_argument("--max-drop", type=float, metavar="PP", help="largest accuracy drop vs Keras, percentage points")
    g.add_argument("--min-speedup", type=float, metavar="X", help="smallest speed-up vs float32 of the same runtime")
    args = p.parse_args(argv)
    if isinstance(args.threads, str):
        args.threads = thread_counts(args.threads)
    return args


def main(argv: list[str] | None = None) -> int:
    argv_list = sys.argv[1:] if argv is None else list(argv)
    # Benchmarks with verbs of their own: field photos (benchmarks/smear.py), network designs (benchmarks/presets.py).
    if argv_list[:1] == ["smear"]:
        return smear_main(argv_list[1:])
    if argv_list[:1] == ["presets"]:
        return presets_main(argv_list[1:])
    if argv_list[:1] == ["stability"]:
        return stability_main(argv_list[1:])
    if argv_list[:1] == ["serve"]:
        return serve_main(argv_list[1:])
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    t0 = time.perf_counter()
    quiet = args.format != "table"
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if quiet else (lambda s: print(s, flush=True))
    try:
        runs = dict(args.run)
        for name, path in runs.items():
            if not path.is_dir():
                raise FileNotFoundError(f"--run {name}={path}: no such run directory")
        cache = args.cache or args.out / "cache"
        if args.models:
            models = parse_models(args.models)
        else:
            models = [m for m in parse_models(DEFAULT_MODELS)
                      if m.builds or m.name in runs or (cache / m.name / "run" / "best.keras").is_file()]
        formats = {m.name: formats_for(m, args.formats) for m in models}
        if args.compare and not args.compare.is_file():
            raise FileNotFoundError(f"--compare {args.compare}: no such file; give an earlier benchmark.json")
        if args.data is not None and not args.data.exists():
            raise FileNotFoundError(f"--data {args.data} does not exist; give a manifest CSV or class folders")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.rebuild and cache.exists():
        shutil.rmtree(cache)
    keras_threads = tuple(args.keras_threads) if args.keras_threads else tuple(args.threads[:1])
    settings = Settings(threads=tuple(args.threads), keras_threads=keras_threads, n_images=args.n_images,
                        batch=args.batch, min_seconds=args.min_seconds, max_seconds=args.max_seconds, data=args.data,
                        rounds=args.rounds, min_time=args.min_time, stop_within=max(0.0, args.stop_within) / 100)
    # Other processes move every timing: the run records what else ran, before and after.
    state_before = machine_state()
    stamp = lambda: f"[{time.perf_counter() - t0:5.0f} s]"  # noqa: E731
    scope = scope_lines(models, formats, args.formats)
    scope.append(f"keras (the float reference every row's accuracy is compared with): timed at "
                 f"{', '.join(map(str, keras_threads))} thread(s)"
                 + ("" if set(keras_threads) >= set(settings.threads)
                    else " (`--keras-threads sweep` for every count)"))
    build_s, timing_s = expected_seconds(models, formats, settings.threads, cache, settings.rounds,
                                         settings.min_time, peaks=not args.no_peak, stop_within=settings.stop_within,
                                         min_seconds=settings.min_seconds)
    log(f"{stamp()} expected: about {(build_s + timing_s) / 60:.0f} min on an idle 2-core machine (building "
        f"{build_s / 60:.1f} min, timing {timing_s / 60:.1f} min); longer on a busy or slower one")
    log(f"{stamp()} models: {', '.join(m.name for m in models)}; threads: {', '.join(map(str, settings.threads))}; "
        f"cache {cache}; what runs (--formats {args.formats}):")
    for line in scope:
        log(f"          {line}")
    both = len({m.task for m in models}) > 1
    log(f"{stamp()} == prepare {', '.join(m.name for m in models)}"
        + (" (malaria and OCT builds side by side)" if both else ""))
    # Where the time and memory go: wall, CPU (this process and its children) and peak memory per phase.
    phases = Phases()

    @contextlib.contextmanager
    def phase(name: str):
        with phases.phase(name) as row:
            yield row
        log(f"{stamp()} {phase_line(row)}")

    steps: list[dict] = []
    with phase("build"):
        prepared = prepare_all(models, formats, cache, runs=runs, log=log, from_scratch=args.from_scratch,
                               steps=steps)
    peaks = []
    if not args.no_peak:
        log(f"{stamp()} == machine peak")
        used = {f.name for fs in formats.values() for f in fs}
        runtimes = tuple(dict.fromkeys(f.runtime for f in FORMATS.values() if f.name in used))  # table order
        with phase("machine peak"):
            peaks = measure_peaks(cache / "peak", list(settings.threads), runtimes, log=log)
    rows = []
    for p in prepared:
        log(f"{stamp()} == benchmark {p.model.name}")
        rows += benchmark_model(p, formats[p.model.name], settings, peaks, log=log,
                                phase=lambda part, name=p.model.name: phase(f"{name} {part}"))
    add_ratios(rows)
    state_after = machine_state()
    report = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks" + ("" if not argv and argv is not None else " " + shlex.join(
            sys.argv[1:] if argv is None else argv)).rstrip(),
        "seconds": time.perf_counter() - t0,
        # Other processes on the machine move the timings: load, busiest others and frequency, before and after.
        "machine": machine_info(),
        "machine_state": {"before": state_before, "after": state_after},
        "versions": library_versions(),
        "settings": {"threads": list(settings.threads), "keras_threads": list(keras_threads),
                     "n_images": settings.n_images, "batch": settings.batch,
                     "min_seconds": settings.min_seconds, "max_seconds": settings.max_seconds,
                     "rounds": settings.rounds, "min_time_s": settings.min_time,
                     "stop_within": settings.stop_within, "min_rounds": MIN_ROUNDS,
                     "data": str(settings.data) if settings.data else None, "cache": str(cache),
                     "formats": [f for f in FORMATS if any(f in {x.name for x in fs} for fs in formats.values())],
                     "formats_spec": args.formats,
                     "formats_per_model": {name: [f.name for f in fs] for name, fs in formats.items()}},
        "scope": scope,
        # Wall time, CPU time (user + system, children included) and peak process-tree memory per phase.
        "phases": phases.rows + [phases.total()],
        "build_steps": steps,
        "expected_s": {"build": round(build_s), "timing": round(timing_s)},
        "models": [{"name": p.model.name, "run": str(p.run) if p.run else None,
                    "reference": str(p.reference) if p.reference else None, "synthetic_data": p.synthetic,
                    "error": p.error} for p in prepared],
        "peaks": peaks,
        # Energy per image needs a power counter; where there is none the report says so (never a made-up figure).
        "energy": EnergyCounter().describe(),
        "rows": rows,
    }
    problems = gates(rows, args.max_drop, args.min_speedup)
    report["gates"] = {"max_drop_pp": args.max_drop, "min_speedup": args.min_speedup, "failures": problems}
    written = write_all(report, args.out)
    if args.format == "json":
        print(json.dumps(report, indent=2))
    elif args.format == "csv":
        print(rows_csv(rows), end="")
    else:
        print()
        print(terminal(report))
        print(f"\n{len(rows)} rows in {report['seconds']:.0f} s; wrote {', '.join(str(p) for p in written)}")
    if args.compare:
        log("\n" + compare(json.loads(args.compare.read_text()), report))
    for msg in problems:
        print(f"gate failed: {msg}", file=sys.stderr)
    return 1 if problems else 0
