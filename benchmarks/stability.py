"""Proof that the interleaved speed-ups hold on a busy machine: the malaria pairs idle, then beside a CPU hog.

    python -m benchmarks stability
    python -m benchmarks stability --threads 1,2 --rounds 15 --min-time 0.15 --out runs/stability

Measures each float32/quantized pair of the released malaria model (default:
tflite-float32 -> tflite-int8 and onnx-float32 -> onnx-int8) with
`benchmarks.interleave`, at each thread count, twice: first as the machine
is, then with one CPU-bound process of this command's own running beside it
(started before the second pass, stopped after it, and in any case ended by
itself after `--hog-seconds`). Reports both speed-ups with their 95%
intervals, how far the loaded one moved from the idle one, and whether that
stays within the issue's ±15%. The machine's state (load average, busiest
other processes, CPU frequency) is recorded before each pass: "idle" means
"without our hog", and the table says what else ran.

Artifacts come from the benchmark cache (`--cache`, shared with
`python -m benchmarks`), converted there when missing.
Writes OUT/stability.json and OUT/stability.md; prints the tables.
Exit codes: 0 measured, 2 bad arguments or no artifacts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.cache import MODELS, Builder
from benchmarks.interleave import MIN_TIME_S, NOISY_HALF_WIDTH, ROUNDS, STOP_WITHIN, machine_state, state_line
from benchmarks.machine import library_versions, machine_info, positive, thread_counts
from benchmarks.run import Settings, _image_items, pair_probe
from convert.formats import parse_formats
from edge_runtime.fileio import atomic_write_text

PAIRS = ("tflite-float32", "tflite-int8", "onnx-float32", "onnx-int8")
# The hog ends itself after this many seconds even if this command dies before stopping it: bounded in time.
HOG_SECONDS = 600.0
HOG_CODE = "import time\nend = time.monotonic() + {s}\nx = 0\nwhile time.monotonic() < end:\n    x += 1\n"


def start_hog(seconds: float) -> subprocess.Popen:
    """One CPU-bound Python process (a busy loop) that ends itself after `seconds`."""
    return subprocess.Popen([sys.executable, "-c", HOG_CODE.format(s=float(seconds))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_hog(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def compare_passes(idle: dict[str, Any], loaded: dict[str, Any], limit: float = NOISY_HALF_WIDTH) -> dict[str, Any]:
    """How far the loaded speed-up moved from the idle one (relative), and whether within `limit`."""
    change = loaded["speedup"] / idle["speedup"] - 1
    return {"change": change, "within": abs(change) <= limit}


def run_passes(pairs: list[tuple[str, str, Path, Path]], threads: list[int], measure: Callable[..., dict[str, Any]],
               hog: Callable[[], Any] | None, stop: Callable[[Any], None], log: Callable[[str], None] = print
               ) -> dict[str, Any]:
    """Both passes: `measure(a, b, threads)` for every pair and thread count, idle then with `hog()` running."""
    out: dict[str, Any] = {"passes": {}, "state": {}}
    for name in ("idle", "loaded"):
        proc = hog() if name == "loaded" and hog is not None else None
        try:
            if proc is not None:
                time.sleep(1.0)  # let the hog reach full speed (and show in the state) before timing starts
            out["state"][name] = machine_state()
            log(f"== {name}: {state_line(out['state'][name])}")
            res = []
            for fa, fb, a, b in pairs:
                for t in threads:
                    try:
                        r = measure(a, b, t)
                        res.append({"float32": fa, "quantized": fb, "threads": t, **r})
                        lo, hi = r["speedup_ci95"]
                        log(f"   {fa} -> {fb} threads={t}: {r['speedup']:.2f}x [{lo:.2f}-{hi:.2f}]"
                            + (" noisy" if r["noisy"] else ""))
                    except Exception as e:  # a failed pair is a row with its error, the rest still runs
                        res.append({"float32": fa, "quantized": fb, "threads": t, "error": str(e)})
                        log(f"   {fa} -> {fb} threads={t}: failed ({e})")
            out["passes"][name] = res
        finally:
            if proc is not None:
                stop(proc)
    return out


def table(result: dict[str, Any], markdown: bool = True) -> str:
    """One line per pair and thread count: idle and loaded speed-ups with intervals, the change, within ±15%."""
    head = ["pair", "thr", "idle speed-up [95%]", "loaded speed-up [95%]", "change", f"within ±{NOISY_HALF_WIDTH:.0%}"]
    lines = []

    def cell(r):
        if "error" in r:
            return "FAILED"
        lo, hi = r["speedup_ci95"]
        return f"{r['speedup']:.2f}x [{lo:.2f}-{hi:.2f}]" + (" noisy" if r["noisy"] else "")

    for i, l in zip(result["passes"]["idle"], result["passes"]["loaded"]):
        ok = "error" not in i and "error" not in l
        c = compare_passes(i, l) if ok else None
        lines.append([f"{i['float32']} -> {i['quantized']}", str(i["threads"]), cell(i), cell(l),
                      f"{c['change']:+.1%}" if c else "-", ("yes" if c["within"] else "NO") if c else "-"])
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(x) + " |" for x in lines])
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *lines])


def main(argv: list[str] | None = None) -> int:

    p = argparse.ArgumentParser(prog="python -m benchmarks stability", description=__doc__.split("\n")[0])
    p.add_argument("--formats", default=",".join(PAIRS),
                   help="malaria formats; each non-float32 one is paired with its runtime's float32 file")
    p.add_argument("--threads", type=thread_counts, default="sweep",
                   help="thread counts, as for `python -m benchmarks`")
    p.add_argument("--rounds", type=positive(int), default=ROUNDS)
    p.add_argument("--min-time", type=positive(float), default=MIN_TIME_S, metavar="S")
    p.add_argument("--stop-within", type=float, default=STOP_WITHIN * 100, metavar="PCT",
                   help="a pair stops early once its 95%% interval is within PCT%% (as `python -m benchmarks`; "
                        "0: always --rounds)")
    p.add_argument("--hog-seconds", type=positive(float), default=HOG_SECONDS,
                   help="the competing process ends itself after this long at the latest")
    p.add_argument("--cache", type=Path, default=Path("runs/benchmarks/cache"), help="the benchmark cache")
    p.add_argument("--out", type=Path, default=Path("runs/stability"))
    args = p.parse_args(argv)
    if isinstance(args.threads, str):
        args.threads = thread_counts(args.threads)


    try:
        formats = parse_formats(args.formats)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    prep = Builder(args.cache, log=lambda s: print(s, file=sys.stderr, flush=True)).prepare(MODELS["malaria-edge"],
                                                                                            formats)
    floats = {f.runtime: f.name for f in formats if f.precision == "float32"}
    pairs = [(floats[f.runtime], f.name, prep.artifacts.get(floats[f.runtime]), prep.artifacts.get(f.name))
             for f in formats if f.precision != "float32" and f.runtime in floats]
    missing = [n for fa, fb, a, b in pairs for n, path in ((fa, a), (fb, b)) if path is None]
    if prep.error or not pairs or missing:
        why = prep.error or (f"no artifact for {', '.join(sorted(set(missing)))}: "
                             + "; ".join(f"{n}: {prep.errors.get(n, '?')}" for n in sorted(set(missing)))
                             if missing else f"no float32/quantized pair in --formats {args.formats}")
        print(f"error: {why}", file=sys.stderr)
        return 2
    items, _ = _image_items(prep, None)
    image = sorted(items)[0][0] if items else None
    settings = Settings(rounds=args.rounds, min_time=args.min_time, stop_within=max(0.0, args.stop_within) / 100)
    print(f"stability: {len(pairs)} pair(s) x {len(args.threads)} thread count(s) x 2 passes, up to {args.rounds} "
          "rounds of "
          f"{args.min_time} s per file each: "
          f"about {len(pairs) * len(args.threads) * 2 * (2 * args.rounds * args.min_time + 3):.0f} s",
          flush=True)
    result = run_passes(pairs, list(args.threads), lambda a, b, t: pair_probe(a, b, t, image, settings),
                        hog=lambda: start_hog(args.hog_seconds), stop=stop_hog)
    result.update(created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  command="python -m benchmarks stability" + (" " + " ".join(argv) if argv else ""),
                  seconds=time.perf_counter() - t0, image=image, rounds=args.rounds, min_time_s=args.min_time,
                  stop_within=settings.stop_within,
                  hog="one CPU-bound Python process (busy loop), started and stopped by this command")

    result.update(machine=machine_info(), versions=library_versions())
    md = "\n".join([
        f"# Interleaved speed-ups idle and beside a CPU hog, {result['created']}", "",
        f"Command: `{result['command']}` ({result['seconds']:.0f} s). Machine: {result['machine']['cpu_model']}, "
        f"{result['machine']['cores']} cores.", "",
        f"Idle pass, machine before: {state_line(result['state']['idle'])}.", "",
        f"Loaded pass ({result['hog']}), machine before: {state_line(result['state']['loaded'])}.", "",
        table(result), ""])
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "stability.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(args.out / "stability.md", md)
    print()
    print(md)
    print(f"wrote {args.out / 'stability.json'}, {args.out / 'stability.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
