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
the model). Writes smear.json, smear.csv (one row per field) and smear.md to --out.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

# The matcher and the annotation reader live in edge_runtime (train's field crops label cells by them too).
from edge_runtime.annotations import IOU_MATCH, load_annotations, match


def measure_field(ann: dict[str, Any], model=None, normalise: bool = False) -> dict[str, Any]:
    """One row: annotated and found cells, parasites found (and called), false positives, counts, times."""
    from edge_runtime.images import load_image
    from edge_runtime.smear import SmearError, analyse_field, segment

    row: dict[str, Any] = {"field": ann["image"].name, "annotated": len(ann["boxes"]),
                           "annotated_parasites": int(sum(ann["parasite"])), "error": None}
    t0 = time.perf_counter()
    if model is None:
        try:
            seg = segment(load_image(ann["image"]), ann["image"].name)
        except (SmearError, ValueError) as e:
            return {**row, "error": str(e)}
        cells = [{"bbox": c.bbox, "kind": c.kind, "label": None, "uncertain": False} for c in seg.cells]
        row["segment_ms"] = (time.perf_counter() - t0) * 1e3
    else:
        res, _ = analyse_field(model, ann["image"], ann["image"].name, normalise=normalise)
        if res.error:
            return {**row, "error": res.error}
        cells = [c.to_dict() for c in res.cells]
        row["segment_ms"], row["total_ms"] = res.segment_ms, (time.perf_counter() - t0) * 1e3
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
        row["flagged"] = bool(any(c["label"] == positive or c["uncertain"] for c in cells if c["kind"] == "rbc"))
        # [annotated parasite?, P(positive)] of each matched classified cell: the threshold table's input
        row["matched_cells"] = []
        for is_par, m in zip(par, matched):
            if m >= 0 and cells[m]["label"] is not None:
                conf = cells[m]["confidence"]
                row["matched_cells"].append([int(is_par), round(conf if cells[m]["label"] == positive else 1 - conf, 5)])
    return row


THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98)


def threshold_table(rows: list[dict[str, Any]], grid: Sequence[float] = THRESHOLDS) -> list[dict[str, float]]:
    """What the uncertain bar trades, per threshold, over the matched cells of these fields: uninfected cells
    called parasitized (false positives) and uncertain (of the uninfected cells found), and annotated
    parasites called parasitized or uncertain (of all annotated ones), the denominators of `summarise`. A cell is uncertain when its top probability is below
    the bar, as `EdgeModel.predict` decides."""
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
    flat = [{k: v for k, v in r.items() if k != "matched_cells"} for r in rows]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in flat for k in r)), lineterminator="\n")
    w.writeheader()
    w.writerows(flat)
    return buf.getvalue()


def summarise(rows: list[dict[str, Any]], with_model: bool) -> dict[str, Any]:
    """The headline metrics over every field that gave cells."""
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
    }
    if with_model:
        with_par = [r for r in ok if r["annotated_parasites"]]
        s.update(parasite_recall_called=tot("parasites_called") / max(tot("annotated_parasites"), 1),
                 uninfected_false_positive_rate=tot("uninfected_called_parasitized") / max(tot("uninfected_found"), 1),
                 uninfected_uncertain_rate=tot("uninfected_called_uncertain") / max(tot("uninfected_found"), 1),
                 field_sensitivity=sum(r["flagged"] for r in with_par) / max(len(with_par), 1),
                 fields_with_parasites=len(with_par),
                 total_ms_per_field=float(np.mean([r["total_ms"] for r in ok])) if ok else None)
    return s


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
    from edge_runtime.fileio import atomic_write_text, write_json

    try:
        anns = load_annotations(args.data, args.fields)
        model = None
        if args.model is not None:
            from edge_runtime.model import load

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
