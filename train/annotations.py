"""Annotated field photos (IML-Malaria's layout) and the matching of found cells to annotated boxes.

Shared by `benchmarks smear` and `train field-cv` (which score the field pipeline against the
boxes: `measure_field`, `summarise`, `threshold_table`) and `train field-crops` (which labels the
runtime's own crops by them), so all count a cell as found by the same rule: a detected region's
box overlaps the annotated box with IoU >= 0.5, greedy one-to-one matching, highest IoU first.
No TensorFlow; OpenCV only through `edge_runtime.smear` when a field is measured. It lives in `train`, not in
`edge_runtime`: scoring against annotations is evaluation, never run on a device (what a Pi installs is what a
Pi runs).

A DATA folder holds `fields/*.JPG` and `annotations.json`: a list of
{"image_name", "objects": [{"type", "bbox": {"x", "y", "w", "h"}}]} (`x, y` the top-left corner).
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.images import load_image
from edge_runtime.smear import SmearError, analyse_field, segment
from edge_runtime.smear.quality import gate, measure

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


# A found region whose box overlaps every annotated box by less than this is "off target": no annotated cell
# at all (a white-cell piece, a lysed cell, a stain deposit), rather than a cell split or boxed differently.
OFF_TARGET_IOU = 0.1


def off_target_mask(truth: Sequence[Sequence[float]], found: Sequence[Sequence[float]]) -> np.ndarray:
    """For each found (x, y, w, h) box, whether it overlaps no annotated box (IoU < OFF_TARGET_IOU with every one)."""
    if not len(truth):
        return np.ones(len(found), bool)
    return iou_matrix(truth, found).max(axis=0, initial=0.0) < OFF_TARGET_IOU


# A spanning region may hold at most this share of any parasite's box: it is a negative only when it holds
# no piece of a parasite's cell worth the name.
SPANNING_PARASITE_SHARE = 0.1


def spanning_mask(truth: Sequence[Sequence[float]], parasite: Sequence[bool],
                  found: Sequence[Sequence[float]]) -> np.ndarray:
    """For each found (x, y, w, h) box, whether it spans annotated cells without being one: its best IoU with an
    annotated box is in [OFF_TARGET_IOU, IOU_MATCH) (overlapping cells merged into one region, a cell cut with a
    piece of its neighbour), and it covers less than SPANNING_PARASITE_SHARE of every parasite's box."""
    found = np.asarray(found, np.float64).reshape(-1, 4)
    if not len(truth) or not len(found):
        return np.zeros(len(found), bool)
    best = iou_matrix(truth, found).max(axis=0, initial=0.0)
    out = (best >= OFF_TARGET_IOU) & (best < IOU_MATCH)
    par = np.asarray([b for b, p in zip(truth, parasite) if p], np.float64).reshape(-1, 4)
    if len(par):
        ix = np.clip(np.minimum(par[:, None, 0] + par[:, None, 2], found[None, :, 0] + found[None, :, 2])
                     - np.maximum(par[:, None, 0], found[None, :, 0]), 0, None)
        iy = np.clip(np.minimum(par[:, None, 1] + par[:, None, 3], found[None, :, 1] + found[None, :, 3])
                     - np.maximum(par[:, None, 1], found[None, :, 1]), 0, None)
        share = ix * iy / np.maximum(par[:, 2] * par[:, 3], 1e-9)[:, None]
        out &= share.max(axis=0) < SPANNING_PARASITE_SHARE
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


def field_blocks(names: Sequence[str], gap: int = 10) -> dict[str, str]:
    """Field name -> block id: runs of consecutive camera numbers (no jump over `gap`), named by their first field.

    The 89 shared IML-Malaria fields come in the 7 such runs their README names (PA171700-710, PA171740-754,
    PA171790-800, PA171830-844, PA171880-890, PA171960-974, PA171990-172001), most likely a few slides each
    with their own stain: the unit of leave-one-block-out cross-validation. The gap was 20 while only the first
    44 fields were shared; it merged PA171960-974 with PA171990-172001 (16 apart). A name without a number is a
    block of its own.
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


def measure_field(ann: dict[str, Any], model=None, normalise: str | None = None,
                  image: np.ndarray | None = None) -> dict[str, Any]:
    """One row: annotated and found cells, parasites found (and called), false positives, counts, times.

    `image` (an RGB array) is measured instead of the file `ann["image"]` names: the domain-shift harness
    (`benchmarks/shift.py`) passes transformed fields with their boxes transformed alike.
    """
    row: dict[str, Any] = {"field": ann["image"].name, "annotated": len(ann["boxes"]),
                           "annotated_parasites": int(sum(ann["parasite"])), "error": None}
    t0 = time.perf_counter()
    if model is None:
        try:
            seg = segment(load_image(ann["image"]) if image is None else image, ann["image"].name)
        except (SmearError, ValueError) as e:
            return {**row, "error": str(e)}
        cells = [{"bbox": c.bbox, "kind": c.kind, "label": None, "uncertain": False} for c in seg.cells]
        row["segment_ms"] = (time.perf_counter() - t0) * 1e3
        quality = gate(measure(seg))
    else:
        res = analyse_field(model, ann["image"] if image is None else image, ann["image"].name, normalise=normalise)
        if res.error:
            return {**row, "error": res.error}
        cells = [c.to_dict() for c in res.cells]
        row["segment_ms"], row["total_ms"] = res.segment_ms, (time.perf_counter() - t0) * 1e3
        quality = res.quality
    # The quality gate's verdict: a refused field's cells are not counted toward its slide's decision.
    row["readable"] = quality is None or quality.readable
    row["quality"] = "" if quality is None else "; ".join(quality.reasons)
    matched = match(ann["boxes"], [c["bbox"] for c in cells])
    par = np.asarray(ann["parasite"], bool)
    found = matched >= 0
    row.update(found=int(found.sum()), parasites_found=int(found[par].sum()),
               detected_rbc=sum(c["kind"] == "rbc" for c in cells), detected_regions=len(cells))
    row["count_error"] = row["detected_rbc"] - row["annotated"]
    if model is not None:
        positive = model.metadata.positive_label or "Parasitized"
        called = np.array([m >= 0 and (cells[m]["uncertain"] or cells[m]["label"] == positive) for m in matched], bool)
        sure_pos = np.array([m >= 0 and not cells[m]["uncertain"] and cells[m]["label"] == positive
                             for m in matched], bool)
        row["parasites_called"] = int(called[par].sum())
        row["uninfected_found"] = int(found[~par].sum())
        row["uninfected_called_parasitized"] = int(sure_pos[~par].sum())
        unsure = np.array([m >= 0 and bool(cells[m]["uncertain"]) for m in matched], bool)
        row["uninfected_called_uncertain"] = int(unsure[~par].sum())
        # Sure parasitized calls on red-cell regions that are no annotated cell at all: on a slide without
        # parasites they are what reads "parasites seen", as the uninfected ones called parasitized are.
        taken = {int(m) for m in matched if m >= 0}
        off = off_target_mask(ann["boxes"], [c["bbox"] for c in cells])
        row["off_target_called_parasitized"] = int(sum(
            c["kind"] == "rbc" and not c["uncertain"] and c["label"] == positive and j not in taken and bool(off[j])
            for j, c in enumerate(cells)))
        row["flagged"] = bool(any(c["label"] == positive or c["uncertain"] for c in cells if c["kind"] == "rbc"))
        # What the slide decision counts (benchmarks.slides): red cells classified, and how they were called.
        rbc = [c for c in cells if c["kind"] == "rbc" and c["label"] is not None
               and not (c.get("fragment") and c["uncertain"])]  # an uncertain fragment is not counted
        row["red_cells"] = len(rbc)
        row["uncertain_cells"] = sum(bool(c["uncertain"]) for c in rbc)
        row["parasitized_cells"] = sum(not c["uncertain"] and c["label"] == positive for c in rbc)
        # Of those, the calls a slide without these parasites would still show: every counted parasitized region
        # that overlaps no annotated parasite (uninfected cells, pieces of them, regions that are no cell). The
        # slide decision's false-call rate (`edge_runtime.smear.decision.FalseCalls`) is measured on this.
        on_parasite = ~off_target_mask([b for b, p in zip(ann["boxes"], par) if p], [c["bbox"] for c in rbc])
        row["calls_off_parasites"] = int(sum(not c["uncertain"] and c["label"] == positive and not bool(hit)
                                             for c, hit in zip(rbc, on_parasite)))
        types = np.asarray(ann["types"])
        row["stage_annotated"] = {st: int((types == st).sum()) for st in PARASITE_TYPES}
        row["stage_called"] = {st: int(called[types == st].sum()) for st in PARASITE_TYPES}
        # [annotated parasite?, P(positive)] of each matched classified cell: the threshold table's input
        row["matched_cells"] = []
        for is_par, m in zip(par, matched):
            if m >= 0 and cells[m]["label"] is not None:
                conf = cells[m]["confidence"]
                row["matched_cells"].append([int(is_par),
                                             round(conf if cells[m]["label"] == positive else 1 - conf, 5)])
    return row


THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98)


def threshold_table(rows: list[dict[str, Any]], grid: Sequence[float] = THRESHOLDS) -> list[dict[str, float]]:
    """What the uncertain bar trades, per threshold, over the matched cells of these fields: uninfected cells
    called parasitized (false positives) and uncertain (of the uninfected cells found), and annotated
    parasites called parasitized or uncertain (of all annotated ones), the denominators of `summarise`.
    A cell is uncertain when its top probability is below the bar, as `EdgeModel.predict` decides."""
    ok = [r for r in rows if r["error"] is None and "matched_cells" in r]
    cells = np.array([c for r in ok for c in r["matched_cells"]], float).reshape(-1, 2)
    par, p = cells[:, 0].astype(bool), cells[:, 1]
    conf, pos = np.maximum(p, 1 - p), p >= 0.5
    n_par = max(sum(r["annotated_parasites"] for r in ok), 1)
    n_neg = max(sum(r["uninfected_found"] for r in ok), 1)  # as `summarise`: matched regions of any kind
    out = []
    for t in grid:
        unsure = conf < t
        out.append({"threshold": t, "false_positive_rate": float((pos & ~unsure)[~par].sum() / n_neg),
                    "uncertain_rate": float(unsure[~par].sum() / n_neg),
                    "parasite_recall_called": float((pos | unsure)[par].sum() / n_par)})
    return out


def threshold_markdown(tables: dict[str, list[dict[str, float]]]) -> str:
    """One Markdown table: a row per threshold, false positives / uncertain / parasites called per model."""
    names = list(tables)
    lines = ["| threshold | " + " | ".join(f"{n}: false positives | uncertain | parasites called" for n in names)
             + " |", "|---:|" + "---:|" * (3 * len(names))]
    for i, t in enumerate(tables[names[0]]):
        cols = [f"{100 * tables[n][i][k]:.1f}%" for n in names
                for k in ("false_positive_rate", "uncertain_rate", "parasite_recall_called")]
        lines.append(f"| {t['threshold']:g} | " + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n"


def rows_csv(rows: list[dict[str, Any]]) -> str:
    """The per-field rows as CSV (the per-cell lists stay in the JSON)."""
    flat = []
    for r in rows:  # per-stage dicts become a column per stage
        f = {k: v for k, v in r.items() if k != "matched_cells" and not isinstance(v, dict)}
        f.update({f"{k}_{st}": n for k, v in r.items() if isinstance(v, dict) for st, n in v.items()})
        flat.append(f)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in flat for k in r)), lineterminator="\n")
    w.writeheader()
    w.writerows(flat)
    return buf.getvalue()


# A field where fewer than this share of the annotated cells were found has collapsed (issue 23's measure).
COLLAPSED_RECALL = 0.7


def summarise(rows: list[dict[str, Any]], with_model: bool) -> dict[str, Any]:
    """The headline metrics over every field that gave cells, and what the quality gate made of them."""
    ok = [r for r in rows if r["error"] is None]
    tot = lambda k: sum(r[k] for r in ok)  # noqa: E731
    s: dict[str, Any] = {
        "fields": len(rows), "fields_failed": len(rows) - len(ok),
        "annotated_cells": tot("annotated"), "cell_recall": tot("found") / max(tot("annotated"), 1),
        "annotated_parasites": tot("annotated_parasites"),
        "parasite_recall_detection": tot("parasites_found") / max(tot("annotated_parasites"), 1),
        "count_error_mean_abs": float(np.mean([abs(r["count_error"]) for r in ok])) if ok else None,
        "count_error_mean_signed": float(np.mean([r["count_error"] for r in ok])) if ok else None,
        "segment_ms_per_field": float(np.mean([r["segment_ms"] for r in ok])) if ok else None,
        # The quality gate's side: fields it refused (the report asks for a retake), and fields it let through
        # although under COLLAPSED_RECALL of their annotated cells were found (a silent failure, issue 23).
        "fields_unreadable": sum(not r.get("readable", True) for r in ok),
        "fields_collapsed_silent": sum(r.get("readable", True) and r["annotated"] > 0
                                       and r["found"] < COLLAPSED_RECALL * r["annotated"] for r in ok),
    }
    if with_model:
        with_par = [r for r in ok if r["annotated_parasites"]]
        read = [r for r in ok if r.get("readable", True)]
        s.update(parasite_recall_called=tot("parasites_called") / max(tot("annotated_parasites"), 1),
                 # what the report flags: a field the gate refused flags nothing (it asks for a retake instead)
                 parasite_recall_called_read=sum(r["parasites_called"] for r in read)
                 / max(sum(r["annotated_parasites"] for r in rows), 1),
                 uninfected_false_positive_rate=tot("uninfected_called_parasitized") / max(tot("uninfected_found"), 1),
                 uninfected_uncertain_rate=tot("uninfected_called_uncertain") / max(tot("uninfected_found"), 1),
                 # every sure parasitized call that is no annotated parasite (an uninfected cell, or a region that
                 # is no annotated cell), per 1,000 red cells counted: a negative slide's expected calls
                 false_calls_per_1000_red_cells=1000 * sum(r["uninfected_called_parasitized"]
                                                           + r.get("off_target_called_parasitized", 0) for r in ok)
                 / max(sum(r.get("red_cells", 0) for r in ok), 1),
                 # the slide decision's false-call rate: counted parasitized calls on no annotated parasite,
                 # over the red cells counted on readable fields (what `FalseCalls` takes)
                 calls_off_parasites=sum(r.get("calls_off_parasites", 0) for r in read),
                 red_cells_read=sum(r.get("red_cells", 0) for r in read),
                 field_sensitivity=sum(r["flagged"] for r in with_par) / max(len(with_par), 1),
                 fields_with_parasites=len(with_par),
                 total_ms_per_field=float(np.mean([r["total_ms"] for r in ok])) if ok else None)
    return s
