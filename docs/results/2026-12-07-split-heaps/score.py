"""Cell finding on the shared fields, by block: what a change to splitting touching cells must move (segmentation only).

    python docs/results/2026-12-07-split-heaps/score.py --blocks PA171740,PA171790 --out rows.json   # repo root

Per field, from `segment` alone (no model): annotated cells found (a region at IoU >= 0.5, `train.annotations.match`,
any kind), parasite boxes found as a red cell (the matched region typed `rbc`, so it is classified), red-cell regions
counted, red-cell regions that overlap no annotated box at IoU >= 0.3 (a fragment or a cell the annotators did not
box: what over-splitting makes), and the time `segment` took. Prints one row per block and the pooled row.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from edge_runtime.images import load_image
from edge_runtime.smear.cells import segment
from train.annotations import PARASITE_TYPES, field_blocks, iou_matrix, load_annotations, match

DATA = Path("../shared/data/iml_malaria")
KEYS = ("cells", "found", "parasites", "parasites_rbc", "rbc", "rbc_unmatched", "seconds")


def score_field(ann):
    img = load_image(ann["image"])
    t0 = time.perf_counter()
    seg = segment(img, ann["image"].name)
    seconds = time.perf_counter() - t0
    found, kinds = [c.bbox for c in seg.cells], [c.kind for c in seg.cells]
    matched = match(ann["boxes"], found)
    para = np.array([t in PARASITE_TYPES for t in ann["types"]], bool)
    rbc = np.array([k == "rbc" for k in kinds], bool)
    ious = iou_matrix(found, ann["boxes"])
    best = ious.max(axis=1) if ious.size else np.zeros(len(found))
    return {"field": ann["image"].name, "cells": len(matched), "found": int((matched >= 0).sum()),
            "parasites": int(para.sum()),
            "parasites_rbc": int(sum(1 for j in np.nonzero(para)[0] if matched[j] >= 0 and rbc[matched[j]])),
            "rbc": int(rbc.sum()), "rbc_unmatched": int((rbc & (best < 0.3)).sum()), "seconds": round(seconds, 4)}


def table(rows, blocks):
    by = {}
    for r in rows:
        by.setdefault(blocks[r["field"]], []).append(r)
    lines = ["| block | fields | cell recall | parasites found as a red cell | red-cell regions | of them on no "
             "annotated cell | s per field |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, rs in sorted(by.items()) + [("pooled", rows)]:
        s = {k: sum(r[k] for r in rs) for k in KEYS}
        lines.append(f"| {name} | {len(rs)} | {s['found']:,} of {s['cells']:,} ({100 * s['found'] / s['cells']:.2f}%) "
                     f"| {s['parasites_rbc']} of {s['parasites']} | {s['rbc']:,} | {s['rbc_unmatched']} "
                     f"({100 * s['rbc_unmatched'] / max(s['rbc'], 1):.2f}%) | {s['seconds'] / len(rs):.3f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", help="comma-separated camera-order blocks (default: all)")
    ap.add_argument("--out", type=Path, help="write the per-field rows here (JSON)")
    args = ap.parse_args()
    anns = load_annotations(DATA)
    blocks = field_blocks([a["image"].name for a in anns])
    if args.blocks:
        keep = set(args.blocks.split(","))
        unknown = keep - set(blocks.values())
        if unknown:
            sys.exit(f"unknown block(s) {sorted(unknown)}; the blocks are {sorted(set(blocks.values()))}")
        anns = [a for a in anns if blocks[a["image"].name] in keep]
    rows = []
    for i, a in enumerate(anns):
        rows.append(score_field(a))
        print(f"[{i + 1}/{len(anns)}] {a['image'].name} {rows[-1]['found']}/{rows[-1]['cells']}", file=sys.stderr,
              flush=True)
    print(table(rows, blocks))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
