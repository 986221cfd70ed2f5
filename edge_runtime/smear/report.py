"""Files a person can check: per-field overlays, cells.csv/json, summary.json and the contact sheet."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from edge_runtime.smear.cells import Segmentation, _cv2

if TYPE_CHECKING:  # the results are built in slide.py, which imports this module to write them
    from edge_runtime.smear.slide import CellResult, FieldResult, SlideReport

VERDICT_COLOURS = {"uninfected": (0, 200, 0), "parasitized": (230, 0, 0), "uncertain": (255, 150, 0),
                   "other": (80, 80, 80)}


def _overlay_path(out, name: str, k: int):
    from pathlib import Path

    return Path(out) / f"{k:03d}_{Path(name).stem or 'field'}_overlay.png"


def _png_bytes(img: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    # zlib level 1, not optimize=True: on a 1280x960 overlay (2 busy cores) 0.20 s and 1.34 MB against
    # 3.4 s and 1.06 MB; the field app writes one per field while a health worker waits.
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _write_overlay(seg: Segmentation, res: FieldResult, positive: str, path) -> None:
    """The field with each cell outlined in its verdict's colour; parasitized cells numbered."""
    from edge_runtime.fileio import atomic_write_bytes

    cv2 = _cv2()
    canvas = np.ascontiguousarray(seg.image.copy())
    thick = max(1, int(round(seg.radius / 15)))
    for cell, c in zip(seg.cells, res.cells):
        x, y, _, _ = cell.box
        contours, _ = cv2.findContours(cell.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        verdict = c.verdict(positive)
        cv2.drawContours(canvas, contours, -1, VERDICT_COLOURS[verdict], thick, offset=(x, y))
        if verdict in ("parasitized", "uncertain"):
            cv2.putText(canvas, str(c.index), (x, max(12, y - 3)), cv2.FONT_HERSHEY_SIMPLEX,
                        max(0.5, seg.radius / 40), VERDICT_COLOURS[verdict], thick + 1, cv2.LINE_AA)
    atomic_write_bytes(path, _png_bytes(Image.fromarray(canvas)))


CONTACT_TILE = 160  # pixels per crop on the contact sheet: large enough to judge a ring stage by eye


def _contact_sheet(items: list[tuple[str, CellResult, np.ndarray]]) -> Image.Image:
    """Parasitized and uncertain crops in a grid, each captioned with field, number, verdict and confidence."""
    from pathlib import Path

    from PIL import ImageDraw

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


CSV_FIELDS = ("field", "index", "x", "y", "w", "h", "kind", "area", "label", "confidence", "uncertain")


def _write_outputs(report: SlideReport, out, sheet) -> list[str]:
    """cells.csv, cells.json, summary.json and (when any) contact_sheet.png; returns every path written."""
    import csv
    import io
    from pathlib import Path

    from edge_runtime.fileio import atomic_write_bytes, atomic_write_text, write_json

    out = Path(out)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for f in report.fields:
        for c in f.cells:
            w.writerow([c.field, c.index, *c.bbox, c.kind, c.area, c.label or "",
                        "" if c.confidence is None else c.confidence, int(c.uncertain)])
    atomic_write_text(out / "cells.csv", buf.getvalue())
    write_json(out / "cells.json", {"fields": [f.to_dict() for f in report.fields]})
    write_json(out / "summary.json", report.summary)
    written = [str(out / n) for n in ("cells.csv", "cells.json", "summary.json")]
    if sheet:
        atomic_write_bytes(out / "contact_sheet.png", _png_bytes(_contact_sheet(sheet)))
        written.append(str(out / "contact_sheet.png"))
    return written

