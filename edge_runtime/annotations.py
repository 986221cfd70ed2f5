"""Annotated field photos (IML-Malaria's layout) and the matching of found cells to annotated boxes.

Shared by `benchmarks smear` (which scores the field pipeline against the boxes) and
`train field-crops` (which labels the runtime's own crops by them), so both count a cell as
found by the same rule: a detected region's box overlaps the annotated box with IoU >= 0.5,
greedy one-to-one matching, highest IoU first. No TensorFlow, no OpenCV.

A DATA folder holds `fields/*.JPG` and `annotations.json`: a list of
{"image_name", "objects": [{"type", "bbox": {"x", "y", "w", "h"}}]} (`x, y` the top-left corner).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

PARASITE_TYPES = ("ring", "trophozoite", "schizont", "gametocyte")
UNINFECTED_TYPE = "red blood cell"
IOU_MATCH = 0.5


def iou_matrix(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> np.ndarray:
    """IoU of every [x, y, w, h] box of `a` with every box of `b`, shape (len(a), len(b))."""
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    A = np.asarray(a, float)[:, None, :]
    B = np.asarray(b, float)[None, :, :]
    w = np.clip(np.minimum(A[..., 0] + A[..., 2], B[..., 0] + B[..., 2]) - np.maximum(A[..., 0], B[..., 0]), 0, None)
    h = np.clip(np.minimum(A[..., 1] + A[..., 3], B[..., 1] + B[..., 3]) - np.maximum(A[..., 1], B[..., 1]), 0, None)
    inter = w * h
    return inter / np.maximum(A[..., 2] * A[..., 3] + B[..., 2] * B[..., 3] - inter, 1e-9)


def match(truth: Sequence[Sequence[float]], found: Sequence[Sequence[float]], iou: float = IOU_MATCH) -> np.ndarray:
    """For each truth box the index of its matched found box, or -1; greedy one-to-one, highest IoU first."""
    m = iou_matrix(truth, found)
    out = np.full(len(truth), -1)
    if not m.size:
        return out
    used = np.zeros(m.shape[1], bool)
    for flat in np.argsort(-m, axis=None):
        t, f = divmod(int(flat), m.shape[1])
        if m[t, f] < iou:
            break
        if out[t] < 0 and not used[f]:
            out[t], used[f] = f, True
    return out


def load_annotations(data: Path, fields: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """[{"image", "boxes": [[x, y, w, h]], "types": [str], "parasite": [bool]}] for every annotated field.

    "difficult" objects are left out (they are neither scored nor used to label crops). `fields`
    keeps only the fields so named (file name or stem, e.g. "PA171704" or "PA171704.JPG"); a name
    that is not annotated is an error.
    """
    data = Path(data)
    path = data / "annotations.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; --data needs fields/ and annotations.json (IML-Malaria layout)")
    out = []
    for entry in json.loads(path.read_text()):
        img = data / "fields" / entry["image_name"]
        objs = [o for o in entry["objects"] if o["type"] != "difficult"]
        out.append({"image": img, "boxes": [[float(o["bbox"][k]) for k in "xywh"] for o in objs],
                    "types": [o["type"] for o in objs],
                    "parasite": [o["type"] in PARASITE_TYPES for o in objs]})
    if fields is not None:
        want = {Path(f).stem for f in fields}
        unknown = sorted(want - {a["image"].stem for a in out})
        if unknown:
            raise ValueError(f"fields {unknown} are not annotated in {path}")
        out = [a for a in out if a["image"].stem in want]
    return out


def camera_number(name: str) -> int | None:
    """The number in a camera file name (PA171704.JPG -> 171704), or None."""
    m = re.search(r"(\d+)(?!.*\d)", Path(name).stem)
    return int(m.group(1)) if m else None


def field_blocks(names: Sequence[str], gap: int = 20) -> dict[str, str]:
    """Field name -> block id: runs of consecutive camera numbers (no jump over `gap`), named by their first field.

    IML-Malaria's 44 fields come in 4 such runs (PA171700-710, PA171790-800, PA171880-890,
    PA171990-172001), most likely 4 slides with their own stain: the unit of leave-one-block-out
    cross-validation. A name without a number is a block of its own.
    """
    numbered = sorted((camera_number(n), Path(n).stem, n) for n in names if camera_number(n) is not None)
    out: dict[str, str] = {}
    block, last = None, None
    for num, stem, n in numbered:
        if last is None or num - last > gap:
            block = stem
        out[n], last = block, num
    for n in names:
        out.setdefault(n, Path(n).stem)
    return out
