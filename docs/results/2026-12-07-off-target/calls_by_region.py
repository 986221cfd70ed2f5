"""Every sure parasitized call on some fields, split by what it is in the annotation (repo root; issue 23).

    python docs/results/2026-12-07-off-target/calls_by_region.py MODEL BAR FIELD [FIELD ...]

BAR: the uncertain bar ("-": the model's own). Prints one JSON line: calls on annotated parasites ("par"), on
annotated uninfected cells ("uninf"), on regions overlapping an annotated box by IoU 0.1-0.5 ("partial": a cell
split or boxed differently) and on regions overlapping none ("none": no annotated cell at all), with the red
cells counted. `benchmarks smear` now reports "none" as `off_target_called_parasitized`.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "iml_malaria"


def main(model_ref: str, bar: str, stems: list[str]) -> None:
    import edge_runtime
    from edge_runtime.smear import analyse_field
    from train.annotations import OFF_TARGET_IOU, iou_matrix, load_annotations, match

    model = edge_runtime.load(model_ref, threads=1, threshold=None if bar == "-" else float(bar))
    anns = {a["image"].stem: a for a in load_annotations(DATA)}
    tot = dict(par=0, uninf=0, partial=0, none=0, rbc=0, annotated_par=0)
    for stem in stems:
        a = anns[stem]
        cells = [c.to_dict() for c in analyse_field(model, a["image"], a["image"].name).cells]
        m = match(a["boxes"], [c["bbox"] for c in cells])
        matched = {int(j): i for i, j in enumerate(m) if j >= 0}
        tot["rbc"] += sum(c["kind"] == "rbc" for c in cells)
        tot["annotated_par"] += int(sum(a["parasite"]))
        for j, c in enumerate(cells):
            if c["kind"] != "rbc" or c["label"] != "Parasitized" or c["uncertain"]:
                continue
            if j in matched:
                tot["par" if a["parasite"][matched[j]] else "uninf"] += 1
            elif float(iou_matrix([c["bbox"]], a["boxes"]).max(initial=0.0)) >= OFF_TARGET_IOU:
                tot["partial"] += 1
            else:
                tot["none"] += 1
    print(json.dumps({"model": model_ref, "threshold": model.threshold, "fields": len(stems), **tot}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
