"""The one timing function: warm-up runs, then timed runs (numpy only).

Every latency medge reports comes from `time_fn`: the benchmarks and
`convert`'s measured choice of the ONNX int8 activation type.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np


def time_fn(
    fn: Callable[[], Any],
    warmup: int = 5,
    min_runs: int = 20,
    max_runs: int = 1000,
    min_seconds: float = 1.0,
    max_seconds: float = 10.0,
) -> dict[str, float]:
    """Milliseconds per call of `fn`: `warmup` untimed calls, then timed calls.

    Timed calls run until both `min_runs` and `min_seconds` are reached (so a
    fast model gets enough samples for a stable p99), stopping early at
    `max_runs` or `max_seconds` (so a slow one does not stall the run).

    Returns:
        p50_ms, p90_ms, p99_ms, mean_ms, min_ms, runs, warmup_runs.
    """
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        samples.append((t1 - t0) * 1e3)
        elapsed = t1 - start
        if len(samples) >= max_runs or elapsed >= max_seconds:
            break
        if len(samples) >= min_runs and elapsed >= min_seconds:
            break
    a = np.asarray(samples)
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
        "min_ms": float(a.min()),
        "runs": len(samples),
        "warmup_runs": warmup,
    }
