"""Float32 against quantized, timed side by side in one process, so that a busy machine slows both alike.

    python -m benchmarks.interleave FLOAT.tflite INT8.tflite --threads 1 [--image cell.png] [--rounds 15]
                                    [--min-time 0.15] [--stop-within 1]

Both files are loaded in one fresh process (thread count set before each
runtime starts) and timed in alternating rounds, A B, B A, A B, ... (the
order flipped each round, after a short warm-up of both): whatever else the
machine does during a round lands on both files of that round. Each round
gives one ratio, A's fastest call over B's (`ROUND_QUANTILE`: a call
preempted by another process is a slow one, left out); the speed-up is the
median of the per-round ratios with a 95% bootstrap interval over rounds
(numpy); a pair whose interval is already within ±1% stops early (after at
least 8 rounds, an even number: `MIN_ROUNDS`, `STOP_WITHIN`). A row whose
interval reaches further than `NOISY_HALF_WIDTH` from its median is marked
noisy. The absolute p50/p90/p99 of every call are kept
too, and are what they always were: absolute and load-sensitive.

Prints one JSON line (`interleave_pair`'s result, or {"error": ...}).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import edge_runtime
from edge_runtime.model import first_line

# Defaults of `--rounds` and `--min-time`. 15 rounds give the bootstrap enough resamples to place a 95% interval
# (with 9 or fewer its ends are single extreme rounds); 0.15 s per file per round keeps one malaria pair under
# ~5 s at two thread counts while a round of the fused InceptionV3 (a call of ~100-400 ms) still holds one call each.
ROUNDS = 15
MIN_TIME_S = 0.15
WARMUP_CALLS = 3
# Stopping early, stated: after at least MIN_ROUNDS rounds, and only after an even number (as many A-first as
# B-first rounds), a pair stops as soon as the 95% bootstrap interval of its median ratio lies within
# STOP_WITHIN (relative) of the median; otherwise it runs all `--rounds`. With 8 rounds the interval's ends are
# the 2nd and 7th ratios or so, so stopping needs even those within ±1%: a sub-millisecond pair on an idle
# machine (the 2026-12-06 idle default run: 18 of its 20 pairs within ±1% after 15 rounds). Under load the
# interval is wider and the pair runs every round. `--stop-within 0` turns it off.
MIN_ROUNDS = 8
STOP_WITHIN = 0.01
# A round's figure for each file is its fastest call (the 0th percentile), not its median. Why: on a shared
# machine a call that outlasts its time slice is preempted, and a 2 ms float32 call is caught far more often than a
# 0.8 ms int8 one, so medians measure the neighbours. Measured here with ~13-16 runnable processes on 2 cores
# (released malaria pair, 15 rounds): per-round medians gave tflite 37.7x [37.2-41.4] at 1 thread (float32 median
# 32 ms), onnx 22.4x; the 10th percentile 2.88x [2.68-3.30] and, at 2 threads, 2.96x [2.78-3.93] and onnx
# 2.35x [2.33-12.17]; the fastest call 2.77x [2.68-2.95], 2.72x [2.66-2.78] and 2.21x [1.84-2.28]: the narrowest,
# because a round goes bad only when every call of a block was preempted. A round of one call (InceptionV3) is
# that call either way.
ROUND_QUANTILE = 0
# A speed-up whose 95% interval reaches further than this (relative) from its median is marked noisy: the issue's
# bar is that a competing process moves no pair's ratio by more than 15%.
NOISY_HALF_WIDTH = 0.15
BOOTSTRAP_RESAMPLES = 2000


def timed_block(fn: Callable[[], Any], min_time: float, clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Milliseconds of each call of `fn`, repeated until `min_time` seconds have passed (at least one call)."""
    out: list[float] = []
    start = clock()
    while True:
        t0 = clock()
        fn()
        t1 = clock()
        out.append((t1 - t0) * 1e3)
        if t1 - start >= min_time:
            return out


def interleave(fn_a: Callable[[], Any], fn_b: Callable[[], Any], rounds: int = ROUNDS, min_time: float = MIN_TIME_S,
               warmup: int = WARMUP_CALLS, clock: Callable[[], float] = time.perf_counter,
               stop_within: float = STOP_WITHIN, min_rounds: int = MIN_ROUNDS) -> dict[str, Any]:
    """Time two callables in alternating rounds (A B, then B A, ...), after `warmup` calls of each.

    At most `rounds` rounds; fewer when the ratio is already tight (`stop_within`, see `MIN_ROUNDS`).

    Returns:
        a_ms, b_ms: per round, each file's fastest call (`ROUND_QUANTILE`, ms); ratios: a_ms / b_ms
        per round; a_calls, b_calls: every timed call of each (ms); order:
        which ran first in each round ("ab" or "ba"); stopped_early: the interval was within
        `stop_within` before `rounds`.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    for _ in range(warmup):  # both settle (first-call allocations, kernel selection, caches) before any round counts
        fn_a()
        fn_b()
    a_ms, b_ms, a_calls, b_calls, order = [], [], [], [], []
    for i in range(rounds):
        first_a = i % 2 == 0
        blocks = {}
        for key in ("ab" if first_a else "ba"):
            blocks[key] = timed_block(fn_a if key == "a" else fn_b, min_time, clock)
        a_ms.append(float(np.percentile(blocks["a"], ROUND_QUANTILE)))
        b_ms.append(float(np.percentile(blocks["b"], ROUND_QUANTILE)))
        a_calls += blocks["a"]
        b_calls += blocks["b"]
        order.append("ab" if first_a else "ba")
        if tight(a_ms, b_ms, rounds, stop_within, min_rounds):
            break
    ratios = [a / b for a, b in zip(a_ms, b_ms)]
    return {"a_ms": a_ms, "b_ms": b_ms, "ratios": ratios, "a_calls": a_calls, "b_calls": b_calls, "order": order,
            "stopped_early": len(ratios) < rounds}


def tight(a_ms: Sequence[float], b_ms: Sequence[float], rounds: int, stop_within: float = STOP_WITHIN,
          min_rounds: int = MIN_ROUNDS) -> bool:
    """The stopping rule: at least `min_rounds` rounds, an even number of them, fewer than `rounds`, and the 95%
    bootstrap interval of the median ratio within `stop_within` (relative) of it."""
    n = len(a_ms)
    if stop_within <= 0 or n < min_rounds or n % 2 or n >= rounds:
        return False
    med, lo, hi = bootstrap_median([a / b for a, b in zip(a_ms, b_ms)])
    return half_width(med, lo, hi) <= stop_within


def bootstrap_median(values: Sequence[float], level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = 0) -> tuple[float, float, float]:
    """(median, low, high): the median of `values` and its percentile-bootstrap interval at `level`."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        raise ValueError("no values to summarise")
    med = float(np.median(v))
    if v.size == 1:
        return med, med, med
    rng = np.random.default_rng(seed)
    meds = np.median(v[rng.integers(0, v.size, (resamples, v.size))], axis=1)
    lo, hi = np.percentile(meds, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return med, float(lo), float(hi)


def half_width(median: float, low: float, high: float) -> float:
    """How far (relative to the median) the interval reaches on its wider side."""
    return max(high / median - 1, 1 - low / median) if median > 0 else float("inf")


def is_noisy(median: float, low: float, high: float, limit: float = NOISY_HALF_WIDTH) -> bool:
    """True when the interval reaches further than `limit` (relative) from the median on either side."""
    return half_width(median, low, high) > limit


def summarise(result: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """The speed-up (median ratio, 95% interval, noisy flag) and the absolute percentiles of both files."""
    med, lo, hi = bootstrap_median(result["ratios"], seed=seed)
    out: dict[str, Any] = {"speedup": med, "speedup_ci95": [lo, hi], "rounds": len(result["ratios"]),
                           "half_width": half_width(med, lo, hi), "noisy": is_noisy(med, lo, hi)}
    for key in ("a", "b"):
        calls = np.asarray(result[f"{key}_calls"])
        p50, p90, p99 = np.percentile(calls, [50, 90, 99])
        out[key] = {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "calls": int(calls.size)}
    return out


def interleave_pair(a: str | Path, b: str | Path, threads: int | None, image: str | None = None,
                    rounds: int = ROUNDS, min_time: float = MIN_TIME_S,
                    stop_within: float = STOP_WITHIN) -> dict[str, Any]:
    """Load both files with `edge_runtime` (batch 1) and time `EdgeModel.run` on the same input, interleaved."""
    models = [edge_runtime.load(p, threads=threads, warmup=False) for p in (a, b)]
    if image:
        xs = [m.preprocess(image)[None] for m in models]
    else:  # the OCT head takes a features array
        xs = [np.zeros((1, *m.input_shape), np.float32) for m in models]
    result = interleave(lambda: models[0].run(xs[0]), lambda: models[1].run(xs[1]), rounds, min_time,
                        stop_within=stop_within)
    return summarise(result) | {"threads": threads, "min_time_s": min_time, "ratios": result["ratios"],
                                "order": result["order"], "max_rounds": rounds,
                                "stopped_early": result["stopped_early"], "stop_within": stop_within}


# ---------------------------------------------------------------- the machine around the measurement


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def cpu_frequencies_mhz() -> list[float] | None:
    """Current frequency of each CPU in MHz: cpufreq in sysfs, else /proc/cpuinfo; None when neither says."""
    base = Path("/sys/devices/system/cpu")
    freqs = []
    for f in sorted(base.glob("cpu[0-9]*/cpufreq/scaling_cur_freq")):
        try:
            freqs.append(int(f.read_text()) / 1e3)
        except (OSError, ValueError):
            pass
    if freqs:
        return freqs
    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        return None
    freqs = [float(l.split(":", 1)[1]) for l in lines if l.lower().startswith("cpu mhz") and ":" in l]
    return freqs or None


def _proc_times() -> dict[int, tuple[str, int]]:
    """pid -> (command name, user + system clock ticks) of every process readable in /proc."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        # comm is in parentheses and may hold spaces; the fields after the last ')' are fixed.
        name = stat[stat.find("(") + 1:stat.rfind(")")]
        fields = stat[stat.rfind(")") + 2:].split()
        out[int(d.name)] = (name, int(fields[11]) + int(fields[12]))
    return out


def busiest_processes(interval: float = 0.5, top: int = 3, exclude: Sequence[int] = ()) -> list[dict[str, Any]] | None:
    """The `top` other processes by CPU share over `interval` seconds (100 = one core busy), read from /proc.

    None where there is no /proc (not Linux). `exclude`: pids not to list
    (this process is always left out).
    """
    if not Path("/proc/self/stat").is_file():
        return None
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    skip = {os.getpid(), *exclude}
    before = _proc_times()
    time.sleep(interval)
    after = _proc_times()
    busy = []
    for pid, (name, t) in after.items():
        if pid in skip or pid not in before:
            continue
        share = (t - before[pid][1]) / tick / interval * 100
        if share >= 1:
            busy.append({"pid": pid, "name": name, "cpu_percent": round(share)})
    busy = sorted(busy, key=lambda p: -p["cpu_percent"])[:top]
    for p in busy:  # "python" alone names nothing: the command line says which job it is
        p["command"] = _command(p["pid"]) or p["name"]
    return busy


def _command(pid: int, width: int = 60) -> str | None:
    """The start of a process's command line (program name without its folder), or None when unreadable."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    words = [a.decode(errors="replace") for a in args if a]
    if not words:
        return None
    text = " ".join([Path(words[0]).name, *words[1:]])
    return text if len(text) <= width else text[:width - 3] + "..."


def machine_state(interval: float = 0.5) -> dict[str, Any]:
    """Load average, the busiest other processes' CPU share and the CPU frequency, now."""
    return {"load_average": load_average(), "busiest_processes": busiest_processes(interval),
            "cpu_mhz": cpu_frequencies_mhz()}


def state_line(state: dict[str, Any] | None) -> str:
    """One line for a report: load, busiest processes, frequency."""
    if not state:
        return "not recorded"
    load = state.get("load_average")
    procs = state.get("busiest_processes")
    mhz = state.get("cpu_mhz")
    parts = [f"load {' '.join(f'{x:.2f}' for x in load)}" if load else "load average not readable"]
    if procs is None:
        parts.append("other processes not readable (no /proc)")
    else:
        parts.append("busiest others: " + (", ".join(f"`{p.get('command') or p['name']}` {p['cpu_percent']}%"
                                                       for p in procs) or "none"))
    parts.append(f"CPU {min(mhz):.0f}-{max(mhz):.0f} MHz" if mhz else "CPU frequency not readable")
    return "; ".join(parts)


# ---------------------------------------------------------------- the process


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.interleave", description=__doc__.split("\n")[0])
    p.add_argument("a", help="the float32 file (the speed-up is A's time over B's)")
    p.add_argument("b", help="the quantized file")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--image", help="image both classify (default: a zero input, e.g. the OCT head's features)")
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--min-time", type=float, default=MIN_TIME_S, help="seconds per file per round, at least")
    p.add_argument("--stop-within", type=float, default=STOP_WITHIN * 100, metavar="PCT",
                   help=f"stop after {MIN_ROUNDS}+ rounds (an even number) once the 95%% interval is within PCT%% "
                        "of the median (0: always --rounds)")
    args = p.parse_args(argv)
    try:
        out = interleave_pair(args.a, args.b, args.threads, args.image, args.rounds, args.min_time,
                              args.stop_within / 100)
    except Exception as e:  # reported to the parent as the row's error
        print(json.dumps({"error": first_line(e)}))
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
