"""Where a run's time and memory go: wall time, CPU time and peak memory per phase.

    phases = Phases()
    with phases.phase("prepare"):
        ...                      # build steps in child processes count too, once they have ended
    phases.rows                  # [{"phase", "wall_s", "cpu_s", "cores_busy", "peak_rss_mb"}, ...]

CPU time is user + system of this process and of its children that ended
(`resource.getrusage`, RUSAGE_SELF + RUSAGE_CHILDREN; every build step and
probe is a child that is waited for). Wall time alone says little on a shared
machine; CPU time is what the run itself cost, whatever else ran beside it.
Peak memory is the largest resident set of the whole process tree (this
process and every descendant, summed), sampled from /proc twice a second:
what a laptop must hold while two build jobs run side by side. None where
there is no /proc.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:
    import resource
except ImportError:  # not on Windows
    resource = None  # type: ignore[assignment]

SAMPLE_S = 0.5


def cpu_seconds() -> float:
    """User + system seconds of this process and of its children that have ended (0.0 where unreadable)."""
    if resource is None:
        return 0.0
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _children() -> dict[int, list[int]]:
    """ppid -> pids, from /proc."""
    out: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        out.setdefault(ppid, []).append(int(d.name))
    return out


def tree_rss_mb(root: int | None = None) -> float | None:
    """Resident memory of `root` (default: this process) and all its descendants, summed, MB; None without /proc."""
    if not Path("/proc/self/status").is_file():
        return None
    kids = _children()
    todo, total = [root or os.getpid()], 0
    while todo:
        pid = todo.pop()
        todo += kids.get(pid, [])
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])  # kB
                    break
        except OSError:  # ended meanwhile
            continue
    return total / 1024


class Phases:
    """Per-phase wall time, CPU time and peak process-tree memory of one run (see the module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter, sample_s: float = SAMPLE_S,
                 rss: Callable[[], float | None] = tree_rss_mb):
        self.rows: list[dict[str, Any]] = []
        self._clock, self._sample_s, self._rss = clock, sample_s, rss

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[dict[str, Any]]:
        """Measure the body as phase `name`; yields its row, filled when the body ends (also on an exception)."""
        row: dict[str, Any] = {"phase": name}
        peak: list[float] = []
        stop = threading.Event()

        def sample() -> None:
            while True:
                mb = self._rss()
                if mb is not None:
                    peak.append(max(mb, peak.pop() if peak else 0.0))
                if stop.wait(self._sample_s):
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        w0, c0 = self._clock(), cpu_seconds()
        sampler.start()
        try:
            yield row
        finally:
            stop.set()
            sampler.join()
            wall, cpu = self._clock() - w0, cpu_seconds() - c0
            row.update(wall_s=round(wall, 2), cpu_s=round(cpu, 2),
                       cores_busy=round(cpu / wall, 2) if wall > 0 else None,
                       peak_rss_mb=round(peak[0]) if peak else None)
            self.rows.append(row)

    def total(self) -> dict[str, Any]:
        """All phases together: summed wall and CPU, the largest peak."""
        wall = sum(r["wall_s"] for r in self.rows)
        cpu = sum(r["cpu_s"] for r in self.rows)
        peaks = [r["peak_rss_mb"] for r in self.rows if r["peak_rss_mb"] is not None]
        return {"phase": "total", "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                "cores_busy": round(cpu / wall, 2) if wall > 0 else None, "peak_rss_mb": max(peaks) if peaks else None}


def line(row: dict[str, Any]) -> str:
    """One log line: `prepare: 174 s wall, 262 s CPU (1.51 cores), peak 8.3 GB`."""
    peak = row.get("peak_rss_mb")
    mem = f", peak {peak / 1024:.1f} GB (process tree)" if peak is not None else ""
    busy = f" ({row['cores_busy']:.2f} cores)" if row.get("cores_busy") is not None else ""
    return f"{row['phase']}: {row['wall_s']:.0f} s wall, {row['cpu_s']:.0f} s CPU{busy}{mem}"
