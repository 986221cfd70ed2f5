"""The one timing function, and what one call costs a battery: CPU time and, where the CPU says, energy (numpy only).

Every latency medge reports comes from `time_fn`: the benchmarks and
`convert`'s measured choice of the ONNX int8 activation type. Besides wall
time it reports the process CPU time per call, summed over all threads (a
runtime whose threads spin while waiting costs CPU it never shows in
latency), and, when given an `EnergyCounter` that the machine supports, the
energy per call from Linux powercap/RAPL.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

POWERCAP = Path("/sys/class/powercap")


def cpu_seconds() -> float:
    """CPU seconds (user + system) this process has used so far, summed over all its threads."""
    return time.process_time()


class EnergyCounter:
    """The CPU packages' energy counters of Linux powercap/RAPL, read in microjoules.

    `available` says whether there is anything to read; when not, `reason`
    says why (no powercap, no RAPL domain, counters readable by root only).
    Only top-level package domains are summed (their core/uncore/dram
    sub-domains are parts of them). RAPL counts the whole package: other
    processes on the machine add to the figure.

    Args:
        root: the powercap folder (a test points it at a fake tree).
    """

    def __init__(self, root: str | os.PathLike = POWERCAP):
        self.root = Path(root)
        self.domains: list[tuple[str, Path, int]] = []  # (name, energy_uj path, max_energy_range_uj)
        self.reason: str | None = None
        try:
            self._find()
        except OSError as e:  # e.g. a sysfs folder that vanishes or cannot be listed
            self.domains, self.reason = [], f"cannot read {self.root}: {e.strerror or e}"

    def _find(self) -> None:
        if not self.root.is_dir():
            self.reason = f"no {self.root}: not Linux, or the kernel or virtual machine does not expose powercap"
            return
        tops = sorted(d for d in self.root.iterdir()
                      if d.name.startswith("intel-rapl:") and d.name.count(":") == 1)  # AMD RAPL is named so too
        if not tops:
            self.reason = f"no RAPL domain under {self.root}: this CPU or virtual machine has no power counter"
            return
        found = []
        for d in tops:
            name = _read_text(d / "name") or d.name
            if name.startswith("psys"):  # the whole platform: it contains the packages, summing both counts twice
                continue
            found.append((name, d / "energy_uj", int(_read_text(d / "max_energy_range_uj") or 0)))
        if not found:
            self.reason = f"{self.root} has only platform (psys) domains, no CPU package counter"
            return
        try:
            for _, path, _ in found:
                int(path.read_text())
        except PermissionError:
            self.reason = (f"{found[0][1]} is readable by root only since CVE-2020-8694; run as "
                           f"root or `sudo chmod o+r {self.root}/intel-rapl:*/energy_uj`")
            return
        except (OSError, ValueError) as e:
            self.reason = f"cannot read {found[0][1]}: {e}"
            return
        self.domains = found

    @property
    def available(self) -> bool:
        return bool(self.domains)

    def read(self) -> list[int] | None:
        """Microjoules per domain now (None when unavailable or a read fails)."""
        if not self.domains:
            return None
        try:
            return [int(path.read_text()) for _, path, _ in self.domains]
        except (OSError, ValueError):
            return None

    def joules(self, before: list[int] | None, after: list[int] | None) -> float | None:
        """Energy used between two `read`s, all domains; a counter that wrapped once adds its range."""
        if before is None or after is None:
            return None
        total = 0
        for (_, _, span), a, b in zip(self.domains, before, after):
            d = b - a
            if d < 0:
                if not span:
                    return None  # wrapped and no range to unwrap with
                d += span
            total += d
        return total / 1e6

    def describe(self) -> dict[str, Any]:
        """For a report: whether energy is measured, from which domains, or why not."""
        if self.available:
            return {"available": True, "source": "linux powercap/RAPL",
                    "domains": [n for n, _, _ in self.domains], "reason": None}
        return {"available": False, "source": "linux powercap/RAPL", "domains": [], "reason": self.reason}


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, ValueError):
        return None


def time_fn(
    fn: Callable[[], Any],
    warmup: int = 5,
    min_runs: int = 20,
    max_runs: int = 1000,
    min_seconds: float = 1.0,
    max_seconds: float = 10.0,
    energy: EnergyCounter | None = None,
) -> dict[str, Any]:
    """Milliseconds per call of `fn`: `warmup` calls (each timed, reported apart), then timed calls.

    Timed calls run until both `min_runs` and `min_seconds` are reached (so a
    fast model gets enough samples for a stable p99), stopping early at
    `max_runs` or `max_seconds` (so a slow one does not stall the run).

    Args:
        energy: when given and available, the energy of the timed calls is
            read from it (`energy_mj` per call); otherwise `energy_mj` is None.

    Returns:
        p50_ms, p90_ms, p99_ms, mean_ms, min_ms, runs, warmup_runs,
        warmup_ms (each warm-up call, in order), cpu_ms (process CPU time per
        timed call, all threads), energy_mj (per timed call, or None).
    """
    warm: list[float] = []
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        warm.append((time.perf_counter() - t0) * 1e3)
    samples: list[float] = []
    e0 = energy.read() if energy is not None else None
    c0 = cpu_seconds()
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
    cpu = cpu_seconds() - c0
    joules = energy.joules(e0, energy.read()) if energy is not None else None
    a = np.asarray(samples)
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
        "min_ms": float(a.min()),
        "runs": len(samples),
        "warmup_runs": warmup,
        "warmup_ms": warm,
        "cpu_ms": cpu * 1e3 / len(samples),
        "energy_mj": None if joules is None else joules * 1e3 / len(samples),
    }
