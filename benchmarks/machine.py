"""What the numbers were measured on: CPU model, SIMD features that int8 kernels use, cores, library versions."""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path
from typing import Any

from edge_runtime.versions import installed_versions

# SIMD features that decide float32 and int8 speed, x86 and Arm. VNNI and the
# Arm dot-product instructions (asimddp, i8mm) are what make int8 faster than float.
SIMD_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
    "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
    "neon", "asimd", "asimdhp", "asimddp", "i8mm", "bf16", "sve", "sve2",
)
LIBRARIES = ("medge", "numpy", "pillow", "ai-edge-litert", "onnxruntime", "onnx", "tensorflow", "keras", "tf-keras",
             "tensorflow-model-optimization", "tf2onnx", "matplotlib", "scikit-learn")


def _cpuinfo() -> dict[str, str]:
    """First processor block of /proc/cpuinfo (Linux), as a dict; {} elsewhere."""
    p = Path("/proc/cpuinfo")
    if not p.is_file():
        return {}
    out: dict[str, str] = {}
    for line in p.read_text(errors="replace").splitlines():
        if not line.strip():
            if out:
                break
            continue
        k, _, v = line.partition(":")
        out.setdefault(k.strip().lower(), v.strip())
    return out


def cores() -> int:
    """CPUs this process may run on (the affinity mask, which containers narrow), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_info() -> dict[str, Any]:
    """CPU model, SIMD features, cores and OS, for the report header."""
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("features") or "").split())
    model = info.get("model name") or info.get("hardware") or info.get("cpu model") or platform.processor()
    if not model and info.get("cpu implementer"):
        model = f"Arm implementer {info['cpu implementer']} part {info.get('cpu part', '?')}"
    return {
        "cpu_model": model or platform.machine(),
        "arch": platform.machine(),
        "cores": cores(),
        "cpu_count": os.cpu_count(),
        "simd": [f for f in SIMD_FLAGS if f in flags],
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def library_versions() -> dict[str, str]:
    """Installed versions of every library the pipeline touches (missing ones left out)."""
    return installed_versions(LIBRARIES)


def thread_counts(text: str) -> list[int]:
    """`--threads`: positive integers, 'all' or 'sweep' (1..cores), comma-separated (an argparse type)."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if part == "sweep":  # every count a device could pick
            out += [n for n in range(1, cores() + 1) if n not in out]
            continue
        n = cores() if part == "all" else int(part) if part.isdigit() else 0
        if n < 1:
            raise argparse.ArgumentTypeError(
                f"--threads takes positive integers, 'all' or 'sweep' (1..cores), comma-separated; got {text!r}")
        if n not in out:
            out.append(n)
    return out


def positive(kind):
    """An argparse type: `kind(text)`, refused unless > 0."""
    def parse(text: str):
        v = kind(text)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
        return v
    return parse
