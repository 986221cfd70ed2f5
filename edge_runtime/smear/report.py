"""Files a person can check, drawn from a `SlideReport`: overlays, cells.csv/json, summary.json, contact sheet.

    report = analyse_slide(model, fields)
    written = write_report(report, "report/")   # what `python -m edge_runtime smear --out report/` writes

The field app draws the same pictures in memory (`render_overlay`, `contact_sheet`) and writes its own files.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from edge_runtime.fileio import atomic_write_bytes, atomic_write_text, write_json
from edge_runtime.smear.cells import _cv2
from edge_runtime.smear.slide import FLAGGED, CellResult, FieldResult, SlideReport

VERDICT_COLOURS = {"uninfected": (0, 200, 0), "parasitized": (230, 0, 0), "uncertain": (255, 150, 0),
                   "other": (80, 80, 80)}


def overlay_name(field: str, k: int) -> str:
    """The overlay's file name for the k-th field of a slide (`000_PA171700_overlay.png`)."""
    return f"{k:03d}_{Path(field).stem or 'field'}_overlay.png"


def png_bytes(img: Image.Image) -> bytes:
    """The PNG the report writes (fast zlib level)."""
    buf = io.BytesIO()
    # zlib level 1, not optimize=True: on a 1280x960 overlay (2 busy cores) 0.20 s and 1.34 MB against
    # 3.4 s and 1.06 MB; the field app writes one per field while a health worker waits.
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def render_overlay(field: FieldResult, positive: str) -> Image.Image | None:
    """The field with each cell outlined in its verdict's colour, flagged cells numbered (None: nothing to draw)."""
    view = field.view
    if view is None:
        return None
    cv2 = _cv2()
    canvas = np.ascontiguousarray(view.image.copy())
    thick = max(1, int(round(view.radius / 15)))
    for outline, c in zip(view.outlines, field.cells):
        verdict = c.verdict(positive)
        cv2.drawContours(canvas, list(outline.contours), -1, VERDICT_COLOURS[verdict], thick,
                         offset=(outline.x, outline.y))
        if verdict in FLAGGED:
            cv2.putText(canvas, str(c.index), (outline.x, max(12, outline.y - 3)), cv2.FONT_HERSHEY_SIMPLEX,
                        max(0.5, view.radius / 40), VERDICT_COLOURS[verdict], thick + 1, cv2.LINE_AA)
    return Image.fromarray(canvas)


CONTACT_TILE = 160  # pixels per crop on the contact sheet: large enough to judge a ring stage by eye


def _sheet_items(report: SlideReport) -> list[tuple[str, CellResult, np.ndarray]]:
    """(field, cell, crop) of every flagged cell, fields in order, cells in reading order."""
    return [(f.field, c, f.view.crops[c.index]) for f in report.fields if f.view is not None for c in f.cells
            if c.verdict(report.positive_label) in FLAGGED]


def contact_sheet(report: SlideReport) -> Image.Image | None:
    """Parasitized and uncertain crops in a grid, each captioned with field, number, verdict and confidence
    (None when no cell is flagged)."""
    items = _sheet_items(report)
    if not items:
        return None
    cols = min(6, len(items))
    rows = -(-len(items) // cols)
    cap = 30
    sheet = Image.new("RGB", (cols * CONTACT_TILE, rows * (CONTACT_TILE + cap)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (field, c, arr) in enumerate(items):
        tile = Image.fromarray(arr)
        tile.thumbnail((CONTACT_TILE - 8, CONTACT_TILE - 8), Image.Resampling.LANCZOS)
        if max(tile.size) < CONTACT_TILE - 8:  # small crops are enlarged, not left tiny
            f = (CONTACT_TILE - 8) / max(tile.size)
            tile = tile.resize((round(tile.width * f), round(tile.height * f)), Image.Resampling.BICUBIC)
        x0, y0 = (i % cols) * CONTACT_TILE, (i // cols) * (CONTACT_TILE + cap)
        sheet.paste(tile, (x0 + (CONTACT_TILE - tile.width) // 2, y0 + 4))
        what = "uncertain" if c.uncertain else c.label
        draw.text((x0 + 4, y0 + CONTACT_TILE), f"{Path(field).stem} #{c.index}", fill=(0, 0, 0))
        draw.text((x0 + 4, y0 + CONTACT_TILE + 13), f"{what} {c.confidence:.2f}", fill=(0, 0, 0))
    return sheet


CSV_FIELDS = ("field", "index", "x", "y", "w", "h", "kind", "area", "label", "confidence", "uncertain",
              "fragment")
CELL_KEYS = ("index", "bbox", "kind", "area", "label", "confidence", "uncertain", "fragment")  # a cell in cells.json


def field_entry(field: FieldResult) -> dict[str, Any]:
    """One field as cells.json (and `smear --json`) give it: counts per kind, cells without their field name."""
    return {"field": field.field, "error": field.error, "readable": field.readable,
            "unreadable_reason": field.unreadable_reason,
            "quality": field.quality.to_dict() if field.quality is not None else None,
            "counts": field.counts, "radius_px": field.radius_px, "radius_source": field.radius_source,
            "segment_ms": field.segment_ms, "classify_ms": field.classify_ms,
            "cells": [{k: c.to_dict()[k] for k in CELL_KEYS} for c in field.cells]}


def cells_csv(report: SlideReport) -> str:
    """Every region of every field, one CSV row each (CSV_FIELDS)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for f in report.fields:
        for c in f.cells:
            w.writerow([c.field, c.index, *c.bbox, c.kind, c.area, c.label or "",
                        "" if c.confidence is None else c.confidence, int(c.uncertain), int(c.fragment)])
    return buf.getvalue()


def write_report(report: SlideReport, out) -> list[str]:
    """Overlays (one per field with cells), cells.csv, cells.json, summary.json and (when any cell is flagged)
    contact_sheet.png into `out`, each written atomically; returns every path written, in that order."""
    out = Path(out)
    written = []
    for k, f in enumerate(report.fields):
        overlay = render_overlay(f, report.positive_label)
        if overlay is not None:
            atomic_write_bytes(out / overlay_name(f.field, k), png_bytes(overlay))
            written.append(str(out / overlay_name(f.field, k)))
    atomic_write_text(out / "cells.csv", cells_csv(report))
    # positive_label: which label is "parasitized" (`python -m edge_runtime review DIR` reads it back).
    write_json(out / "cells.json", {"positive_label": report.positive_label,
                                    "fields": [field_entry(f) for f in report.fields]})
    write_json(out / "summary.json", report.summary.to_dict())
    written += [str(out / n) for n in ("cells.csv", "cells.json", "summary.json")]
    sheet = contact_sheet(report)
    if sheet is not None:
        atomic_write_bytes(out / "contact_sheet.png", png_bytes(sheet))
        written.append(str(out / "contact_sheet.png"))
    return written
