"""Classifying the red cells of a field in one `model.predict` call, and the field and slide results."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from PIL import Image

from edge_runtime.smear.cells import KINDS, Segmentation, SmearError, segment
from edge_runtime.smear.crops import crop, normalise_stain
from edge_runtime.smear.decision import DEFAULT_RULE, decide, min_cells_for, model_provenance
from edge_runtime.smear.quality import FieldQuality, gate, measure, unreadable
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
    """One field: its cells, or the reason it gave none (`error`), and whether it can be read (`quality`).

    A field the quality gate refuses (`edge_runtime.smear.quality`) keeps its cells and verdicts for a person
    to look at, but none of them is counted in the slide's summary or decision.
    """

    field: str
    cells: list[CellResult] = dataclasses.field(default_factory=list)
    error: str | None = None
    radius_px: float | None = None
    segment_ms: float | None = None
    classify_ms: float | None = None
    predictions: list[Any] = dataclasses.field(default_factory=list, repr=False)
    quality: FieldQuality | None = None

    @property
    def readable(self) -> bool:
        """Counted in the slide: cells found and every quality check passed."""
        return self.error is None and (self.quality is None or self.quality.readable)

    @property
    def unreadable_reason(self) -> str | None:
        """ "can't read this field: retake (...)" for a refused field, else None."""
        if self.readable:
            return None
        return self.quality.message if self.quality is not None else f"can't read this field: retake ({self.error})"

    def to_dict(self) -> dict[str, Any]:
        counts = {k: sum(c.kind == k for c in self.cells) for k in KINDS}
        return {"field": self.field, "error": self.error, "readable": self.readable,
                "unreadable_reason": self.unreadable_reason,
                "quality": self.quality.to_dict() if self.quality is not None else None,
                "counts": counts, "radius_px": self.radius_px,
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
        return FieldResult(field=name, error=e.reason, quality=unreadable(e.reason)), None
    # The gate before the model: ~35 ms a field (1280x960), against seconds of segmentation.
    quality = gate(measure(seg))
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
                       predictions=preds, quality=quality), seg


def analyse_slide(model, fields, out=None, min_cells: int | None = None, rbc_per_ul: float | None = None,
                  wbc_count: int | None = None, wbc_per_ul: float | None = None,
                  normalise: bool = False, rule: str = DEFAULT_RULE) -> SlideReport:
    """Several field photos of one slide -> one report (and, with `out`, files a person can check).

    Args:
        model: an `EdgeModel` (malaria) from `edge_runtime.load`.
        fields: image paths, PIL images or RGB arrays.
        out: folder for overlays, cells.csv/json, summary.json and the contact sheet (None: write nothing).
        min_cells: red cells needed before a negative call (None: the counting rule's, 2,000 by default).
        rbc_per_ul, wbc_count: the patient's red cells/µL, white cells counted over these fields: the bases of
            parasites/µL (`edge_runtime.smear.decision`).
        wbc_per_ul: the patient's measured white cells/µL (None: WHO's assumed 8,000, and the report says so).
        normalise: classify crops with the field's mean cell hue moved half-way to the NIH crops' (`normalise_stain`).
        rule: the thin-film counting rule (`edge_runtime.smear.decision.COUNTING_RULES`).

    A field that cannot be read or holds no cells gets an `error` and the others go on; a field the quality
    gate refuses is kept in the report, and left out of the counts. The summary's `decision` is one of
    "parasites seen", "no parasites seen" (in at least `min_cells` red cells) or "not enough evidence";
    `refer` is None (undecided, not "no") while the evidence is short; `model` names what made the report.
    """
    from edge_runtime.clinical import WHO_WBC_PER_UL, slide_referral, slide_summary

    need = min_cells_for(rule, min_cells)  # fails on an unknown rule before any field is read
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
    readable = [r for r in results if r.readable]
    preds = [p for r in readable for p in r.predictions]
    summary = slide_referral(slide_summary(preds, positive), rbc_per_ul=rbc_per_ul, wbc_count=wbc_count,
                             wbc_per_ul=WHO_WBC_PER_UL if wbc_per_ul is None else wbc_per_ul, min_cells=need)
    decision = decide(parasitized=summary["parasitized"], uncertain=summary["uncertain"],
                      red_cells=summary["cells"], readable_fields=len(readable), fields=len(results),
                      min_cells=min_cells, rule=rule, rbc_per_ul=rbc_per_ul, wbc_count=wbc_count,
                      wbc_per_ul=wbc_per_ul)
    summary["decision"] = decision.to_dict()
    if decision.decision == "not enough evidence" and not summary["refer"]:
        # Not "no": nothing was seen because too little was looked at.
        summary["refer"] = None
    summary["fields"] = len(results)
    summary["fields_without_cells"] = sum(r.error is not None for r in results)
    summary["fields_unreadable"] = [{"field": r.field, "reason": r.unreadable_reason}
                                    for r in results if not r.readable]
    summary["non_rbc"] = {k: sum(c.kind == k for r in readable for c in r.cells) for k in KINDS if k != "rbc"}
    path = getattr(model, "path", None)
    summary["model"] = model_provenance(path, model.metadata) if path is not None else None
    report = SlideReport(fields=results, summary=summary)
    if out is not None:
        report.written = [str(p) for p in overlays] + _write_outputs(report, out, sheet)
    return report
