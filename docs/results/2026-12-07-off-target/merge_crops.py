"""How runs/field-crops-ot was made (issue 23): one crops manifest of two `train field-crops` folders.

    python docs/results/2026-12-07-off-target/merge_crops.py RUNS

RUNS/field-crops: the L-full crops (`--shifted 6`); RUNS/field-crops-ot-photos: `python -m train field-crops
--data ../shared/data/iml_malaria --out RUNS/field-crops-ot-photos --off-target` (the photos only). It checks
that both hold the same annotated photo crops, byte for byte (the same cell finder), then writes
RUNS/field-crops-ot/field-crops.csv: every L-full row and the off-target rows, paths relative to that folder.
"""

import csv
import filecmp
import os
import sys
from collections import Counter
from pathlib import Path


def main(runs: Path) -> None:
    old = list(csv.DictReader(open(runs / "field-crops" / "field-crops.csv")))
    new = list(csv.DictReader(open(runs / "field-crops-ot-photos" / "field-crops.csv")))
    ann_new = {r["path"]: r for r in new if not r["region"]}
    ann_old = {r["path"]: r for r in old if r["variant"] == "0"}
    if set(ann_new) != set(ann_old) or any(ann_new[p]["label"] != ann_old[p]["label"] for p in ann_new):
        raise SystemExit("the two folders' annotated photo crops differ: cut both with the same code")
    same = sum(filecmp.cmp(runs / "field-crops" / p, runs / "field-crops-ot-photos" / p, shallow=False)
               for p in ann_new)
    print(f"annotated photo crops: {len(ann_new)} in both, {same} byte-identical")
    out = runs / "field-crops-ot"
    out.mkdir(parents=True, exist_ok=True)
    rows = [{**r, "path": os.path.join("..", "field-crops", r["path"]), "region": ""} for r in old]
    rows += [{**r, "path": os.path.join("..", "field-crops-ot-photos", r["path"])} for r in new
             if r["region"] == "off-target"]
    with open(out / "field-crops.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(new[0].keys()), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    print(len(rows), "rows; off-target per block:", dict(Counter(r["patient"] for r in rows if r["region"])))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
