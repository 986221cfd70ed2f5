"""`python -m benchmarks smear`: the field pipeline measured against annotated field photos.

    python -m benchmarks smear --data ../shared/data/iml_malaria --out runs/smear-bench
    python -m benchmarks smear --data ../shared/data/iml_malaria --model export/malaria-edge_tflite-int8.tflite

DATA holds `fields/*.JPG` and `annotations.json` (IML-Malaria's layout: a list
of {"image_name", "objects": [{"type", "bbox": {"x", "y", "w", "h"}}]}).
An annotated cell (every type but "difficult") is found when a detected region's
box overlaps it with IoU >= 0.5 (greedy one-to-one matching, highest IoU first).

Reported: cell recall, parasite-cell recall (detection only; with --model also
found AND called parasitized or uncertain), with --model the false-positive
rate on annotated uninfected cells (called parasitized; and the share called
uncertain, which a slide report counts toward referral), field-level
sensitivity (a field with an annotated parasite is flagged for referral), RBC
count error per field (detected "rbc" regions minus annotated cells, mean
absolute and mean signed) and time per field (segmentation; end to end with
the model); with --model also what the uncertain bar trades (`threshold_table`). Writes
smear.json, smear.csv (one row per field) and smear.md to --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from edge_runtime.fileio import atomic_write_text, write_json
from edge_runtime.model import load

# The matcher, the annotation reader and the per-field scoring live in train.annotations: train's
# field crops and field-cv count cells by the same rules.
from train.annotations import (
    IOU_MATCH,
    load_annotations,
    measure_field,
    rows_csv,
    summarise,
    threshold_markdown,
    threshold_table,
)


def table(summary: dict[str, Any]) -> str:
    """A Markdown table of the headline metrics."""
    lines = ["| metric | value |", "|---|---:|"]
    for k, v in summary.items():
        lines.append(f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks smear", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder with fields/ and annotations.json")
    p.add_argument("--model", type=Path, help="malaria artifact: also measure classification and end-to-end time")
    p.add_argument("--out", type=Path, default=Path("runs/smear-bench"), help="results folder")
    p.add_argument("--threads", type=int, help="runtime threads for --model")
    p.add_argument("--normalise", action="store_true", help="with --model: stain-normalise crops (smear --normalise)")
    p.add_argument("--threshold", type=float,
                   help="with --model: confidence below which a cell is uncertain (default: the model's)")
    p.add_argument("--fields", nargs="+", metavar="NAME",
                   help="measure only these fields (file names or stems, e.g. PA171704), e.g. one held-out block")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    try:
        anns = load_annotations(args.data, args.fields)
        model = None
        if args.model is not None:
            model = load(args.model, threads=args.threads, threshold=args.threshold)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = []
    for ann in anns:
        rows.append(measure_field(ann, model, args.normalise))
        r = rows[-1]
        print(f"{r['field']}: " + (r["error"] or f"{r['found']}/{r['annotated']} cells, "
                                   f"{r['parasites_found']}/{r['annotated_parasites']} parasites, "
                                   f"count error {r['count_error']:+d}, {r['segment_ms']:.0f} ms"), file=sys.stderr)
    summary = summarise(rows, model is not None)
    report = {"command": "python -m benchmarks smear " + " ".join(sys.argv[2:] if argv is None else argv),
              "data": str(args.data), "model": str(args.model) if args.model else None,
              "iou_match": IOU_MATCH, "summary": summary, "fields": rows}
    if model is not None:
        report["note"] = ("classification figures are only as good as the model: a tiny test artifact's numbers "
                          "mean nothing")
        report["thresholds"] = threshold_table(rows)
    md = table(summary) + "\n" + ("\n" + threshold_markdown({"model": report["thresholds"]}) if model else "")
    write_json(args.out / "smear.json", report)
    atomic_write_text(args.out / "smear.csv", rows_csv(rows))
    atomic_write_text(args.out / "smear.md", md)
    print(md, end="")
    print(f"wrote {args.out / 'smear.json'}, smear.csv, smear.md")
    return 0
