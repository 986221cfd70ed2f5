"""Where a fold model's sure parasitized calls off parasites lie, on some fields: whole or fragment, and what
annotated box they overlap (IoU >= 0.5: an annotated uninfected cell; 0.1-0.5: a piece or a region spanning
cells; < 0.1: no annotated cell).

    PYTHONPATH=. python docs/results/2026-12-07-slide-false-calls/calls_by_region.py MODEL.tflite FIELD...
"""

import json
import sys

import numpy as np

from edge_runtime.model import load
from edge_runtime.smear.slide import analyse_field
from train.annotations import iou_matrix, load_annotations, off_target_mask


def main(model_path: str, *fields: str) -> None:
    model = load(model_path, threads=1, threshold=0.7)
    tally: dict[str, int] = {}
    for a in load_annotations("../shared/data/iml_malaria", fields):
        cells = [c.to_dict() for c in analyse_field(model, a["image"], a["image"].name).cells]
        rbc = [c for c in cells if c["kind"] == "rbc" and c["label"] is not None
               and not (c.get("fragment") and c["uncertain"])]
        boxes = [c["bbox"] for c in rbc]
        on = ~off_target_mask([b for b, p in zip(a["boxes"], a["parasite"]) if p], boxes)
        best = iou_matrix(a["boxes"], boxes).max(axis=0, initial=0) if rbc else np.zeros(0)
        for c, hit, iou in zip(rbc, on, best):
            if c["uncertain"] or c["label"] != "Parasitized":
                continue
            where = "on a parasite" if hit else ("an uninfected cell" if iou >= 0.5 else
                                                 "a piece or spanning region" if iou >= 0.1 else "no annotated cell")
            key = f"{where}, {'fragment' if c.get('fragment') else 'whole'}"
            tally[key] = tally.get(key, 0) + 1
    print(json.dumps(tally, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
