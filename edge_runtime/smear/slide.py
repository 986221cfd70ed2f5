"""Classifying the red cells of a field in one `model.predict` call, and the field and slide results."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from PIL import Image

from edge_runtime.smear.cells import KINDS, Segmentation, SmearError, segment
from edge_runtime.smear.crops import crop, normalise_stain
from edge_runtime.smear.report import _overlay_path, _write_outputs, _write_overlay


@dataclasses.dataclass
class CellResult:
    """One cell's place, kind and verdict (label/confidence None for regions that are not classified)."""

    field: str
    index: int
    bbox: list[int]
    kind: str
    area: int
    label: str | None = None
    confidence: float | None = None
    uncertain: bool = False

    def verdict(self, positive: str) -> str:
        """"parasitized", "uninfected", "uncertain" or "other" (not a red cell): the overlay colour."""
        if self.label is None:
            return "other"
        if self.uncertain:
            return "uncertain"
        return "parasitized" if self.label == positive else "uninfected"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class FieldResult:
    """One field: its cells, or the reason it gave none (`error`)."""

    field: str
    cells: list[CellResult] = dataclasses.field(default_factory=list)
    error: str | None = None
    radius_px: float | None = None
    segment_ms: float | None = None
    classify_ms: float | None = None
    predictions: list[Any] = dataclasses.field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        counts = {k: sum(c.kind == k for c in self.cells) for k in KINDS}
        return {"field": self.field, "error": self.error, "counts": counts, "radius_px": self.radius_px,
                "segment_ms": self.segment_ms, "classify_ms": self.classify_ms,
                "cells": [{k: c.to_dict()[k] for k in ("index", "bbox", "kind", "label", "confidence", "uncertain")}
                          for c in self.cells]}


@dataclasses.dataclass
class SlideReport:
    """Several fields of one slide: per-field results, the slide summary and the files written."""

    fields: list[FieldResult]
    summary: dict[str, Any]
    written: list[str] = dataclasses.field(default_factory=list)

    @property
    def rejected(self) -> list[FieldResult]:
        return [f for f in self.fields if f.error is not None]

    def to_dict(self) -> dict[str, Any]:
        return {"fields": [f.to_dict() for f in self.fields], "summary": self.summary, "written": self.written}


def analyse_field(model, source, name: str | None = None,
                  normalise: bool = False) -> tuple[FieldResult, Segmentation | None]:
    """Segment one field and classify its red cells in one `model.predict` call; errors become the record's `error`.

    With `normalise`, the crops given to the model are cut from `normalise_stain`'s colours.
    """
    import time

    from edge_runtime.images import ImageError, load_image

    name = name or (str(source) if not isinstance(source, (Image.Image, np.ndarray)) else "field")
    t0 = time.perf_counter()
    try:
        img = source if isinstance(source, np.ndarray) else load_image(source, "rgb", model.max_pixels)
        seg = segment(img, name)
    except (ImageError, SmearError) as e:
        return FieldResult(field=name, error=e.reason), None
    t1 = time.perf_counter()
    rbcs = [c for c in seg.cells if c.kind == "rbc"]
    source_img = normalise_stain(seg) if normalise and rbcs else None
    preds = model.predict([crop(seg, c, source_img) for c in rbcs]) if rbcs else []
    t2 = time.perf_counter()
    by_index = {c.index: p for c, p in zip(rbcs, preds)}
    results = []
    for c in seg.cells:
        p = by_index.get(c.index)
        results.append(CellResult(field=name, index=c.index, bbox=c.bbox, kind=c.kind, area=c.area,
                                  label=p.label if p else None,
                                  confidence=round(p.confidence, 4) if p and p.confidence is not None else None,
                                  uncertain=bool(p.uncertain) if p else False))
    return FieldResult(field=name, cells=results, radius_px=round(seg.radius * seg.scale, 1),
                       segment_ms=round((t1 - t0) * 1e3, 1), classify_ms=round((t2 - t1) * 1e3, 1),
                       predictions=preds), seg


def analyse_slide(model, fields, out=None, min_cells: int | None = None, rbc_per_ul: float | None = None,
                  wbc_count: int | None = None, wbc_per_ul: float | None = None,
                  normalise: bool = False) -> SlideReport:
    """Several field photos of one slide -> one report (and, with `out`, files a person can check).

    Args:
        model: an `EdgeModel` (malaria) from `edge_runtime.load`.
        fields: image paths, PIL images or RGB arrays.
        out: folder for overlays, cells.csv/json, summary.json and the contact sheet (None: write nothing).
        min_cells, rbc_per_ul, wbc_count, wbc_per_ul: see `edge_runtime.clinical.slide_referral`.
        normalise: classify crops with the field's mean cell hue moved half-way to the NIH crops' (`normalise_stain`).

    A field that cannot be read or holds no cells gets an `error` and the others go on.
    """
    from edge_runtime.clinical import WHO_WBC_PER_UL, slide_referral, slide_summary

    positive = model.metadata.positive_label or "Parasitized"
    results, sheet, overlays = [], [], []
    for k, source in enumerate(fields):
        name = str(source) if not isinstance(source, (Image.Image, np.ndarray)) else f"field[{k}]"
        res, seg = analyse_field(model, source, name, normalise=normalise)
        results.append(res)
        if seg is not None and out is not None:
            overlays.append(_overlay_path(out, name, k))
            _write_overlay(seg, res, positive, overlays[-1])
            sheet += [(res.field, c, crop(seg, seg.cells[c.index - 1])) for c in res.cells
                      if c.verdict(positive) in ("parasitized", "uncertain")]
    preds = [p for r in results for p in r.predictions]
    summary = slide_referral(slide_summary(preds, positive), rbc_per_ul=rbc_per_ul, wbc_count=wbc_count,
                             wbc_per_ul=WHO_WBC_PER_UL if wbc_per_ul is None else wbc_per_ul, min_cells=min_cells)
    summary["fields"] = len(results)
    summary["fields_without_cells"] = sum(r.error is not None for r in results)
    summary["non_rbc"] = {k: sum(c.kind == k for r in results for c in r.cells) for k in KINDS if k != "rbc"}
    report = SlideReport(fields=results, summary=summary)
    if out is not None:
        report.written = [str(p) for p in overlays] + _write_outputs(report, out, sheet)
    return report

