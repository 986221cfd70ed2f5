"""Why annotated cells are not found (IoU >= 0.5) by the cell finder, over the 89 shared fields (segmentation only).

    python docs/results/2026-12-07-cell-misses/miss.py   # repo root; prints the table, writes /tmp/miss/rows.json

Each annotated cell that `train.annotations.match` leaves unmatched gets one cause from the region that overlaps
it most: nothing overlaps; a red-cell region at IoU 0.3-0.5 bigger than the box (>= 1.6x its area), about its size
(a misfit) or smaller; a region below IoU 0.3 that is bigger (merged) or smaller (split); a region typed other than
`rbc`; "edge:" when the box touches the photo's border.
"""

import collections
import json
import sys
from pathlib import Path

import numpy as np

from edge_runtime.images import load_image
from edge_runtime.smear.cells import segment
from train.annotations import field_blocks, iou_matrix, load_annotations, match

DATA = Path("../shared/data/iml_malaria")


def cause_of(box, found, kinds, ious, size):
    x, y, w, h = box
    edge = x <= 2 or y <= 2 or x + w >= size[0] - 2 or y + h >= size[1] - 2
    best = int(np.argmax(ious)) if len(ious) else -1
    iou = float(ious[best]) if best >= 0 else 0.0
    if iou == 0:
        c = "nothing overlaps"
    elif kinds[best] != "rbc":
        c = f"best is {kinds[best]}"
    else:
        area = found[best][2] * found[best][3]
        if iou >= 0.3:
            c = ("rbc 0.3-0.5 region bigger" if area >= 1.6 * w * h
                 else "rbc 0.3-0.5 (box misfit)" if area > 0.6 * w * h else "rbc 0.3-0.5 region smaller")
        else:
            c = "merged into a bigger rbc region" if area > 1.6 * w * h else "split: best rbc region smaller"
    return ("edge: " if edge else "") + c, iou


def main():
    anns = load_annotations(DATA)
    blocks = field_blocks([a["image"].name for a in anns])
    causes, per_block, rows = collections.Counter(), collections.defaultdict(lambda: [0, 0]), []
    for i, a in enumerate(anns):
        img = load_image(a["image"])
        seg = segment(img, a["image"].name)
        found, kinds = [c.bbox for c in seg.cells], [c.kind for c in seg.cells]
        matched = match(a["boxes"], found)
        ious = iou_matrix(a["boxes"], found) if found else np.zeros((len(a["boxes"]), 0))
        tally = per_block[blocks[a["image"].name]]
        tally[0] += len(matched)
        tally[1] += int((matched >= 0).sum())
        for j, box in enumerate(a["boxes"]):
            if matched[j] < 0:
                c, iou = cause_of(box, found, kinds, ious[j], img.size)
                causes[c] += 1
                rows.append({"field": a["image"].name, "box": box, "type": a["types"][j], "iou": round(iou, 2),
                             "cause": c})
        print(f"[{i + 1}/{len(anns)}] {a['image'].name} {int((matched >= 0).sum())}/{len(matched)}",
              file=sys.stderr, flush=True)
    total, found_n = (sum(v[k] for v in per_block.values()) for k in (0, 1))
    print(f"cell recall {found_n}/{total} = {found_n / total:.4f}")
    for b, (n, f) in sorted(per_block.items()):
        print(b, f"{f}/{n} = {f / n:.4f}")
    for c, n in causes.most_common():
        print(f"{n:5d} {c}")
    Path("/tmp/miss").mkdir(exist_ok=True)
    Path("/tmp/miss/rows.json").write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
