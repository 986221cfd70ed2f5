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

With --shift (`all` or names from `benchmarks/shift.py`'s TRANSFORMS: blue-grey stain, white
balance, blur, defocus, 0.6-1.5x scale, JPEG, sensor noise...) every field is measured again under each
transform and smear.md/smear.json gain one row per transform (the domain-shift harness):

    python -m benchmarks smear --data ../shared/data/iml_malaria --shift all --fields PA171704 PA171790

With --model, also per slide (camera-order blocks stand in for slides; `benchmarks.slides`): the decision the
slide report would print over its fields that pass the quality gate (`edge_runtime.smear.quality`), detection
sensitivity, parasitemia within +-25% of the annotation, recall per parasite stage and refused fields, with
95% intervals over slides; slides.csv and slides.md beside the others.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.shift import all_fields, resolve, shift_markdown, shifted
from benchmarks.slides import slide_markdown, slide_rows, slide_summary
from edge_runtime.fileio import atomic_write_text, write_json
from edge_runtime.images import load_image
from edge_runtime.model import load
from edge_runtime.smear import NORMALISATIONS
from edge_runtime.smear.decision import COUNTING_RULES, DEFAULT_RULE, FalseCalls, model_false_calls

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


def shift_rows(anns: list[dict[str, Any]], transforms, model, normalise: str | None,
               plain_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One {"transform", "what", "summary", "fields"} per transform ("none" reuses the plain rows)."""
    by_t: dict[str, list[dict[str, Any]]] = {t.name: [] for t in transforms if t.name != "none"}
    for ann in anns:
        try:
            rgb = np.asarray(load_image(ann["image"]))
        except ValueError as e:
            for name in by_t:
                by_t[name].append({"field": ann["image"].name, "annotated": len(ann["boxes"]),
                                   "annotated_parasites": int(sum(ann["parasite"])), "error": str(e)})
            continue
        for t in transforms:
            if t.name == "none":
                continue
            a, img = shifted(ann, rgb, t)
            r = measure_field(a, model, normalise, image=img)
            by_t[t.name].append(r)
            print(f"{t.name} {r['field']}: " + (r["error"] or f"{r['found']}/{r['annotated']} cells, "
                                                 f"{r['parasites_found']}/{r['annotated_parasites']} parasites"),
                  file=sys.stderr)
    out = []
    for t in transforms:
        rows = plain_rows if t.name == "none" else by_t[t.name]
        summary = {**all_fields(rows), **summarise(rows, model is not None)}
        out.append({"transform": t.name, "what": t.what, "summary": summary,
                    "fields": [{k: v for k, v in r.items() if k != "matched_cells"} for r in rows]})
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks smear", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder with fields/ and annotations.json")
    p.add_argument("--model", type=Path, help="malaria artifact: also measure classification and end-to-end time")
    p.add_argument("--out", type=Path, default=Path("runs/smear-bench"), help="results folder")
    p.add_argument("--threads", type=int, help="runtime threads for --model")
    p.add_argument("--normalise", nargs="?", const="chroma", choices=NORMALISATIONS, metavar="MODE",
                   help="with --model: classify crops cut from normalised fields, as `smear --normalise MODE` "
                        "(default: off; chroma when given alone)")
    p.add_argument("--threshold", type=float,
                   help="with --model: confidence below which a cell is uncertain (default: the model's)")
    p.add_argument("--min-cells", type=int, metavar="N",
                   help="slide level: red cells needed before a negative call (default: the counting rule's)")
    p.add_argument("--counting-rule", default=DEFAULT_RULE, choices=sorted(COUNTING_RULES),
                   help="slide level: thin-film counting rule that sets the minimum (default %(default)s: "
                        + COUNTING_RULES[DEFAULT_RULE][1] + ")")
    p.add_argument("--false-call-rate", type=float, metavar="R",
                   help="slide level: the model's false parasitized calls per 1,000 red cells (default: the rate "
                        "the registry records for a released model file; none for another, and then any call is "
                        "'parasites seen')")
    p.add_argument("--fields", nargs="+", metavar="NAME",
                   help="measure only these fields (file names or stems, e.g. PA171704), e.g. one held-out block")
    p.add_argument("--shift", metavar="NAMES",
                   help="also measure every field under these transforms (comma-separated names, or all; "
                        "see benchmarks/shift.py)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    if args.min_cells is not None and args.min_cells < 1:
        print(f"error: --min-cells must be at least 1, got {args.min_cells}", file=sys.stderr)
        return 2
    try:
        transforms = []
        if args.shift:
            transforms = resolve(args.shift)
        anns = load_annotations(args.data, args.fields)
        model = None
        if args.model is not None:
            model = load(args.model, threads=args.threads, threshold=args.threshold)
        if args.false_call_rate is not None:
            FalseCalls.given(args.false_call_rate)  # a rate outside 0-1000 is an argument error, before any field
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
    written = ["smear.csv", "smear.md"]
    if model is not None:
        rate = (model_false_calls(model.path) if args.false_call_rate is None
                else FalseCalls.given(args.false_call_rate, "--false-call-rate"))
        slides = slide_rows(rows, min_cells=args.min_cells, rule=args.counting_rule, false_calls=rate)
        report["slides"], report["slide_summary"] = slides, slide_summary(slides)
        slide_md = slide_markdown(slides, report["slide_summary"])
        md += "\n## Per slide (camera-order blocks)\n\n" + slide_md
        atomic_write_text(args.out / "slides.csv", rows_csv(slides))
        atomic_write_text(args.out / "slides.md", slide_md)
        written += ["slides.csv", "slides.md"]
    if transforms:
        report["shift"] = shift_rows(anns, transforms, model, args.normalise, rows)
        md += "\n" + shift_markdown(report["shift"])
    write_json(args.out / "smear.json", report)
    atomic_write_text(args.out / "smear.csv", rows_csv(rows))
    atomic_write_text(args.out / "smear.md", md)
    print(md, end="")
    print(f"wrote {args.out / 'smear.json'}, " + ", ".join(written))
    return 0
