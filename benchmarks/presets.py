"""What a malaria network design costs on the device, before any training: int8 against float32 per preset.

    python -m benchmarks presets                                   # every malaria preset but `paper`
    python -m benchmarks presets --presets edge,post-w32-d111-64 --threads 1 --out runs/presets

Each preset is built with random weights (seeded), converted to `tflite-float32`
and `tflite-int8` with the same converter settings `python -m convert` uses
(int8 calibrated on random images: latency does not depend on the ranges),
opened through `edge_runtime.backends` as a device opens it (batch 1) and timed
with the one timing loop. Reports weights, MACs, p50 of both, the int8
speed-up, the int8 file size, and the int8 graph's operators other than
convolutions, dense and (de)quantize: the ops a design adds that int8 kernels
do not fuse. Accuracy needs training: see `python -m train cv`.

Writes OUT/presets.json, presets.csv and presets.md; prints the table.
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from convert.converters import convert_keras, int8_config
from convert.timing import time_fn
from edge_runtime.backends import open_session
from edge_runtime.fileio import atomic_write_text
from edge_runtime.versions import installed_versions
from train.malaria.presets import MALARIA_PRESETS

# Operators a well-designed int8 graph consists of (DELEGATE: the XNNPACK partitions LiteRT adds when it
# opens the file); anything else is listed per preset.
EXPECTED_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "QUANTIZE", "DEQUANTIZE", "SOFTMAX", "MEAN",
                "AVERAGE_POOL_2D", "DELEGATE"}
COLUMNS = ("preset", "block", "head", "weights", "macs", "f32_p50_ms", "int8_p50_ms", "int8_speedup",
           "f32_kb", "int8_kb", "other_int8_ops")


def measure(name: str, threads: int, seed: int = 0, min_seconds: float = 1.0) -> dict[str, Any]:
    """One preset's row (see the module docstring)."""
    import keras  # TensorFlow: imported only when this runs

    from train.malaria.models import build_resnet, describe  # loads TensorFlow: imported only when this runs

    preset = MALARIA_PRESETS[name]
    keras.utils.set_random_seed(seed)
    model = build_resnet(preset.model, (64, 64, 3), 2, name=name.replace("-", "_"))
    calib = np.random.default_rng(seed).uniform(0, 1, (32, 64, 64, 3)).astype(np.float32)
    row: dict[str, Any] = {"preset": name, "block": preset.model.block, "head": preset.model.head, **describe(model)}
    row.pop("trainable_weights", None)
    x = calib[:1]
    with tempfile.TemporaryDirectory(prefix="medge-presets-") as tmp:
        for key, configure in (("f32", None), ("int8", int8_config(calib, False))):
            path = Path(tmp) / f"{key}.tflite"
            path.write_bytes(convert_keras(model, configure))
            session = open_session(path, "litert", threads=threads)
            row[f"{key}_kb"] = round(path.stat().st_size / 1024, 1)
            row[f"{key}_p50_ms"] = round(time_fn(lambda s=session: s.run(x), min_seconds=min_seconds)["p50_ms"], 3)
            if key == "int8":
                ops = collections.Counter(op.name for op in session.ops() if op.name not in EXPECTED_OPS)
                row["other_int8_ops"] = ", ".join(f"{n} {k}" for k, n in sorted(ops.items())) or "none"
    row["int8_speedup"] = round(row["f32_p50_ms"] / row["int8_p50_ms"], 2)
    return row


def markdown(rows: Sequence[dict[str, Any]], threads: int) -> str:
    lines = [f"LiteRT, batch 1, {threads} thread(s), random weights; p50 of the one timing loop.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(f"{r[c]:,}" if isinstance(r[c], int) else str(r[c]) for c in COLUMNS) + " |"
              for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    default = [n for n in MALARIA_PRESETS if n != "paper" and not n.startswith("tiny")]
    p = argparse.ArgumentParser(prog="python -m benchmarks presets", description=__doc__.split("\n")[0])
    p.add_argument("--presets", default=",".join(default), help=f"comma-separated (default: {','.join(default)})")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--min-seconds", type=float, default=1.0, help="timed seconds per measurement, at least")
    p.add_argument("--out", type=Path, default=Path("runs/presets"))
    args = p.parse_args(argv)
    names = [n.strip() for n in args.presets.split(",") if n.strip()]
    unknown = [n for n in names if n not in MALARIA_PRESETS]
    if unknown or not names:
        print(f"error: unknown preset(s) {unknown}; known: {', '.join(MALARIA_PRESETS)}", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    rows = []
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name}: build, convert, time ...", file=sys.stderr, flush=True)
        rows.append(measure(name, args.threads, min_seconds=args.min_seconds))
    args.out.mkdir(parents=True, exist_ok=True)

    atomic_write_text(args.out / "presets.json", json.dumps(
        {"threads": args.threads, "rows": rows, "versions": installed_versions(("ai-edge-litert", "tensorflow"))},
        indent=2) + "\n")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(args.out / "presets.csv", buf.getvalue())
    table = markdown(rows, args.threads)
    atomic_write_text(args.out / "presets.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
