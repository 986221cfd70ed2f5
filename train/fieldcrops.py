"""`python -m train field-crops`: labelled training crops cut from annotated field photos, the runtime's way.

    python -m train field-crops --data ../shared/data/iml_malaria --out runs/field-crops [--fields PA171704 ...]

For every annotated field: `edge_runtime.smear.segment` finds the regions, the annotated boxes
are matched to the regions' boxes by `train.annotations.match` (IoU >= 0.5, greedy
one-to-one, the benchmark's rule), and every matched region the runtime would classify (kind
"rbc") is cut by `edge_runtime.smear.crop`: exactly the crop `python -m edge_runtime smear`
gives the model. A crop is Parasitized when its annotation is a parasite stage (ring,
trophozoite, schizont, gametocyte) and Uninfected when it is a "red blood cell"; "difficult"
objects, annotated cells no region matches, and matched regions of another kind (wbc, clump,
edge, ...: never classified on the device) are skipped and counted.

`--off-target` also cuts, as Uninfected, every region of kind "rbc" that overlaps no annotated object at
all (IoU below OFF_TARGET_IOU with every box, any type): a piece of a white cell, a lysed or crushed cell, a
stain deposit the cell finder took for a red cell. The device classifies those too, and a model that never
saw one as a negative calls some of them parasitized (issue 23: on unseen block PA171960 the stain-trained
recipe called 15 such regions parasitized against 15 true parasites). Their rows have `region`
"off-target" (annotated crops: empty); only the photo's own regions, not its shifted variants.

`--spanning` also cuts, as Uninfected, every unmatched region of kind "rbc" that spans annotated cells
without being one (best IoU with an annotated box from OFF_TARGET_IOU up to the match IoU: overlapping
cells merged into one region, a cell cut together with a piece of its neighbour) and covers less than
SPANNING_PARASITE_SHARE of every parasite's box. In crowded fields these are most of a model's false
parasitized calls (docs/results/2026-12-07-slide-false-calls.md: 21 of 40 on block PA171740's crowded
fields). Rows have `region` "spanning"; the photo's own regions only.

Writes OUT/crops/<block>/<field>_<index>.png, OUT/field-crops.csv (the manifest format of
`python -m train split`: path,label,patient,split, with the slide block as `patient` so grouped
splits keep a block together, split "train", and extra `field`, `variant`, `shift` and `region` columns) and
OUT/field-crops.json (counts per field and block, fields that failed). A field that cannot be read or
segmented is reported and skipped. Blocks: runs of consecutive camera numbers
(`train.annotations.field_blocks`).

`--shifted K` also cuts K shifted variants of every field (`train.fieldaug.draw_shift`: another stain,
white balance, exposure, blur, magnification, noise, JPEG, drawn at random from `--seed` and the field's
name, so a rerun cuts the same crops): the variant is segmented, matched to the annotation (boxes scaled
with it) and cut like the photo, into OUT/crops/<block>/shifted/<field>_s<k>_<index>.png, `variant` k and
the shift in `shift` (the photo's own crops: variant 0). Every parasitized crop of a variant is kept and a
seeded sample of `--shifted-uninfected` of its uninfected ones. `train field-cv` uses them only when asked
(`--shifted-per-block`); a variant of a held-out block's field never reaches its fold's training.
"""

from __future__ import annotations

import csv
import os
import random
import sys
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edge_runtime.fileio import write_json
from edge_runtime.images import load_image
from edge_runtime.smear import crop, normalised, segment
from train.annotations import (
    IOU_MATCH,
    OFF_TARGET_IOU,
    PARASITE_TYPES,
    SPANNING_PARASITE_SHARE,
    UNINFECTED_TYPE,
    field_blocks,
    load_annotations,
    match,
    off_target_mask,
    spanning_mask,
)
from train.fieldaug import FieldShift, draw_shift

POSITIVE, NEGATIVE = "Parasitized", "Uninfected"
CROPS_CSV = "field-crops.csv"
CROPS_JSON = "field-crops.json"
FIELDS = ("path", "label", "patient", "split", "field", "variant", "shift", "region")
OFF_TARGET = "off-target"
SPANNING = "spanning"


def label_of(kind: str) -> str | None:
    """The NIH label an annotation type stands for, or None (not used for training)."""
    if kind in PARASITE_TYPES:
        return POSITIVE
    if kind == UNINFECTED_TYPE:
        return NEGATIVE
    return None


def field_crops(ann: dict[str, Any], image: np.ndarray | None = None, boxes: Sequence[Sequence[float]] | None = None,
                off_target: bool = False, spanning: bool = False, normalise: str | None = None
                ) -> tuple[list[tuple[np.ndarray, str, int, str]], dict[str, int]]:
    """One field's labelled crops [(crop, label, region index, region tag)] and its counts; raises on a bad field.

    `image` (RGB) and `boxes` replace the photo and its annotated boxes (a shifted variant of the field).
    `off_target`: also the rbc regions that overlap no annotated box (`train.annotations.off_target_mask`), labelled
    Uninfected, tagged OFF_TARGET, after the annotated ones (tag ""). `spanning`: also the unmatched rbc regions that
    span annotated cells without holding a parasite (`train.annotations.spanning_mask`), Uninfected, tagged
    SPANNING. `normalise`: crops cut from the field normalised as the runtime's `smear --normalise MODE` does
    (`edge_runtime.smear.normalised`), for a model that is to run that way."""
    seg = segment(load_image(ann["image"]) if image is None else image, ann["image"].name)
    src = normalised(seg, normalise)
    matched = match(ann["boxes"] if boxes is None else boxes, [c.bbox for c in seg.cells])
    out, counts = [], Counter()
    for kind, m in zip(ann["types"], matched):
        label = label_of(kind)
        if label is None:
            counts["skipped_type"] += 1
        elif m < 0:
            counts["unmatched"] += 1
        elif seg.cells[m].kind != "rbc":
            counts["not_rbc"] += 1
        else:
            out.append((crop(seg, seg.cells[m], src), label, seg.cells[m].index, ""))
            counts[label] += 1
    counts["annotated"] = len(ann["boxes"])
    truth = ann["boxes"] if boxes is None else boxes
    taken = {int(m) for m in matched if m >= 0}
    found = [c.bbox for c in seg.cells]
    extra = ([(OFF_TARGET, off_target_mask(truth, found))] if off_target else []) + \
        ([(SPANNING, spanning_mask(truth, ann["parasite"], found))] if spanning else [])
    for tag, hit in extra:
        for j, c in enumerate(seg.cells):
            if c.kind == "rbc" and j not in taken and hit[j]:
                out.append((crop(seg, c, src), NEGATIVE, c.index, tag))
                counts[tag] += 1
    return out, {k: int(counts.get(k, 0)) for k in ("annotated", POSITIVE, NEGATIVE, "unmatched", "not_rbc",
                                                     "skipped_type", OFF_TARGET, SPANNING)}


def shift_of(seed: int, field: str, k: int) -> FieldShift:
    """The k-th shifted variant's shift for this field: the same for the same seed, field and k."""
    return draw_shift(random.Random(zlib.crc32(f"{seed}:{Path(field).stem}:{k}".encode())))


def shifted_crops(ann: dict[str, Any], out: Path, block: str, shifted: int, keep_uninfected: int,
                  seed: int, normalise: str | None = None) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """Rows and counts of this field's `shifted` variants (every parasitized crop, `keep_uninfected` of the
    uninfected ones a variant); a variant the cell finder refuses is counted, not fatal."""
    rgb = np.asarray(load_image(ann["image"]))
    rows, counts = [], Counter()
    folder = out / "crops" / block / "shifted"
    for k in range(1, shifted + 1):
        sh = shift_of(seed, ann["image"].name, k)
        img = sh.apply(rgb, zlib.crc32(f"{seed}:{ann['image'].name}:{k}".encode()))
        boxes = [[v * sh.scale for v in b] for b in ann["boxes"]]
        try:
            crops, _ = field_crops(ann, img, boxes, normalise=normalise)
        except (ValueError, OSError):
            counts["refused"] += 1
            continue
        rng = random.Random(zlib.crc32(f"{seed}:{ann['image'].name}:{k}:keep".encode()))
        neg = [c for c in crops if c[1] == NEGATIVE]
        keep = [c for c in crops if c[1] == POSITIVE] + (rng.sample(neg, keep_uninfected)
                                                          if 0 < keep_uninfected < len(neg) else neg)
        folder.mkdir(parents=True, exist_ok=True)
        for crop_img, label, index, _ in keep:
            path = folder / f"{ann['image'].stem}_s{k}_{index:03d}.png"
            Image.fromarray(crop_img).save(path)
            rows.append({"path": os.path.relpath(path, out), "label": label, "patient": block, "split": "train",
                         "field": ann["image"].stem, "variant": str(k), "shift": sh.describe(), "region": ""})
            counts[f"shifted_{label}"] += 1
    return rows, {"shifted_" + POSITIVE: counts["shifted_" + POSITIVE],
                  "shifted_" + NEGATIVE: counts["shifted_" + NEGATIVE], "shifted_refused": counts["refused"]}


def cut(anns: Sequence[dict[str, Any]], out: Path, block_of: dict[str, str], shifted: int = 0,
        shifted_uninfected: int = 15, seed: int = 0, off_target: bool = False, spanning: bool = False,
        normalise: str | None = None) -> tuple[list[dict[str, str]], dict[str, dict[str, Any]], dict[str, str]]:
    """Cut and write these fields' labelled crops into OUT/crops/<block>/; (manifest rows, counts per field,
    failed fields). `block_of` maps a field's file name to its block (the rows' `patient`). `shifted`: also
    that many shifted variants of each field (`shifted_crops`); `normalise`: every crop (shifted ones after
    their shift, as a photo meets it) cut from the normalised field."""
    rows, per_field, failed = [], {}, {}
    for i, ann in enumerate(anns, 1):
        name = ann["image"].name
        block = block_of[name]
        try:
            crops, counts = field_crops(ann, off_target=off_target, spanning=spanning, normalise=normalise)
        except (ValueError, OSError) as e:  # SmearError and ImageError are ValueErrors
            failed[name] = str(e)
            print(f"[{i}/{len(anns)}] {name}: skipped ({e})", file=sys.stderr)
            continue
        folder = out / "crops" / block
        folder.mkdir(parents=True, exist_ok=True)
        for img, label, index, tag in crops:
            path = folder / f"{ann['image'].stem}_{index:03d}.png"
            Image.fromarray(img).save(path)
            rows.append({"path": os.path.relpath(path, out), "label": label, "patient": block, "split": "train",
                         "field": ann["image"].stem, "variant": "0", "shift": "",
                         "region": tag})
        if shifted:
            more, sc = shifted_crops(ann, out, block, shifted, shifted_uninfected, seed, normalise)
            rows += more
            counts = {**counts, **sc}
        per_field[name] = {"block": block, **counts}
        print(f"[{i}/{len(anns)}] {name} (block {block}): {counts[POSITIVE]} parasitized + {counts[NEGATIVE]} "
              f"uninfected crops of {counts['annotated']} annotated; {counts['unmatched']} unmatched, "
              f"{counts['not_rbc']} matched a region that is not a red cell"
              + (f"; {counts[OFF_TARGET]} off-target regions (Uninfected)" if off_target else "")
              + (f"; {counts[SPANNING]} spanning regions (Uninfected)" if spanning else "")
              + (f"; shifted x{shifted}: {counts['shifted_' + POSITIVE]} parasitized + "
                 f"{counts['shifted_' + NEGATIVE]} uninfected, {counts['shifted_refused']} variants refused"
                 if shifted else ""), file=sys.stderr)
    return rows, per_field, failed


def write_rows(rows: Sequence[dict[str, str]], path: Path) -> None:
    """The crops manifest (FIELDS columns), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def run(data: Path, out: Path, fields: Sequence[str] | None = None, shifted: int = 0, shifted_uninfected: int = 15,
        seed: int = 0, off_target: bool = False, spanning: bool = False, normalise: str | None = None) -> int:
    """Cut, label and write every annotated field's crops (and `shifted` variants of each); 0 when at least one
    field gave crops."""
    data, out = Path(data), Path(out)
    if shifted < 0 or shifted_uninfected < 0:
        raise ValueError(f"--shifted {shifted} and --shifted-uninfected {shifted_uninfected} must be >= 0")
    anns = load_annotations(data, fields)
    blocks = field_blocks([a["image"].name for a in load_annotations(data)])  # blocks of the whole set
    t0 = time.perf_counter()
    rows, per_field, failed = cut(anns, out, blocks, shifted, shifted_uninfected, seed, off_target, spanning,
                                  normalise)
    out.mkdir(parents=True, exist_ok=True)
    write_rows(rows, out / CROPS_CSV)
    by_block: dict[str, Counter] = {}
    for f in per_field.values():
        by_block.setdefault(f["block"], Counter()).update({k: v for k, v in f.items() if k != "block"})
    write_json(out / CROPS_JSON, {
        "data": str(data.resolve()), "fields": per_field, "failed": failed,
        "blocks": {b: dict(c) for b, c in sorted(by_block.items())},
        "rule": "annotated box matched to a segmented region at IoU >= 0.5 (greedy one-to-one); only regions "
                "of kind rbc (what the runtime classifies), cut by edge_runtime.smear.crop",
        "shifted": {"variants": shifted, "uninfected_per_variant": shifted_uninfected, "seed": seed,
                    "distribution": "train.fieldaug.draw_shift"} if shifted else None,
        "off_target": {"iou_below": OFF_TARGET_IOU, "label": NEGATIVE, "variants": "the photo's own only"}
        if off_target else None,
        "spanning": {"iou_from": OFF_TARGET_IOU, "iou_below": IOU_MATCH,
                     "parasite_share_below": SPANNING_PARASITE_SHARE, "label": NEGATIVE,
                     "variants": "the photo's own only"} if spanning else None,
        "normalise": normalise,
    })
    print(f"{len(rows)} crops ({sum(r['label'] == POSITIVE for r in rows)} parasitized, "
          f"{sum(r['variant'] != '0' for r in rows)} of shifted variants) from "
          f"{len(per_field)} fields in {time.perf_counter() - t0:.0f} s; {len(failed)} failed; "
          f"wrote {out / CROPS_CSV} and {CROPS_JSON}")
    for b, c in sorted(by_block.items()):
        print(f"  block {b}: {c[POSITIVE]} parasitized, {c[NEGATIVE]} uninfected + {c[OFF_TARGET]} off-target "
              f"+ {c[SPANNING]} spanning uninfected, {c['unmatched']} unmatched")
    return 0 if rows else 1
