"""Classifying the red cells of a field in one `model.predict` call, and the typed field and slide results.

`analyse_slide` computes and returns a `SlideReport`; it writes nothing. Files a person can check come from
`edge_runtime.smear.report.write_report(report, out)` (what `python -m edge_runtime smear --out` calls), and the
field app renders its pictures from the same report in memory.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from edge_runtime.clinical import WHO_WBC_PER_UL, slide_referral, slide_summary
from edge_runtime.images import ImageError, load_image
from edge_runtime.smear.cells import KINDS, RADIUS_SOURCES, RBC_RADIUS_UM, Segmentation, SmearError, _cv2, segment
from edge_runtime.smear.crops import crop, normalised
from edge_runtime.smear.decision import (
    DEFAULT_RULE,
    FalseCalls,
    decide,
    min_cells_for,
    model_false_calls,
    model_provenance,
)
from edge_runtime.smear.quality import FieldQuality, gate, is_fragment, measure, unreadable
from edge_runtime.spec import known_keys

FLAGGED = ("parasitized", "uncertain")  # the verdicts a person must look at: numbered on overlays, on the contact sheet


@dataclasses.dataclass(frozen=True)
class CellResult:
    """One cell's place, kind and verdict (label/confidence None for regions that are not classified).

    `fragment`: a red-cell region under FRAGMENT_AREA of the field's typical cell (a piece of a cell, most
    often cut by the split). It is classified like any red cell; if the model is unsure of it, it is not
    counted as an uncertain cell (nor as a red cell) in the slide: a piece is no evidence either way.
    """

    field: str
    index: int
    bbox: tuple[int, int, int, int]
    kind: str
    area: int
    label: str | None = None
    confidence: float | None = None
    uncertain: bool = False
    fragment: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "bbox", tuple(int(v) for v in self.bbox))

    @property
    def counted(self) -> bool:
        """Counted in the slide's red cells: a classified red cell, unless it is a fragment called uncertain."""
        return self.kind == "rbc" and self.label is not None and not (self.fragment and self.uncertain)

    def verdict(self, positive: str) -> str:
        """"parasitized", "uninfected", "uncertain" or "other" (not a red cell): the overlay colour."""
        if self.label is None:
            return "other"
        if self.uncertain:
            return "uncertain"
        return "parasitized" if self.label == positive else "uninfected"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["bbox"] = list(self.bbox)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CellResult:
        return cls(**known_keys(cls, d, cls.__name__))


@dataclasses.dataclass(frozen=True)
class Outline:
    """One region's outline as OpenCV found it: contours relative to its box, whose corner is (x, y) (working scale)."""

    contours: tuple[np.ndarray, ...]
    x: int
    y: int


@dataclasses.dataclass(frozen=True)
class FieldView:
    """What drawing a field needs, and no more: the photo at working scale, each region's outline, the flagged crops.

    A `Segmentation` also holds an int32 label image, the core mask and every cell's mask (about 25 MB more for
    a 12 MP photo, which is segmented at 2048x1536); a report keeps only this, so a 12-photo case holds the 12
    working-scale photos (3.7 MB each at 1280x960, 9.4 MB at 2048x1536), not the segmentations.

    Attributes:
        image: RGB uint8 array the cells were found in (read-only).
        radius: typical cell radius, working pixels (line and text sizes on the overlay).
        outlines: one per region, in the order of `FieldResult.cells`.
        crops: cell index -> its NIH-style crop (`crop`), for the cells whose verdict is in FLAGGED.
    """

    image: np.ndarray
    radius: float
    outlines: tuple[Outline, ...]
    crops: Mapping[int, np.ndarray]


def field_view(seg: Segmentation, cells: tuple[CellResult, ...], positive: str) -> FieldView:
    """The drawing record of a segmented field (outlines of every region, crops of the flagged cells)."""
    cv2 = _cv2()
    outlines = []
    for cell in seg.cells:
        contours, _ = cv2.findContours(cell.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        outlines.append(Outline(contours=tuple(contours), x=cell.box[0], y=cell.box[1]))
    crops = {c.index: crop(seg, seg.cells[c.index - 1]) for c in cells if c.verdict(positive) in FLAGGED}
    image = seg.image
    image.flags.writeable = False  # shared with the caller's Segmentation: a drawing copies it first
    return FieldView(image=image, radius=seg.radius, outlines=tuple(outlines), crops=crops)


@dataclasses.dataclass(frozen=True)
class FieldResult:
    """One field: its cells, or the reason it gave none (`error`), and whether it can be read (`quality`).

    A field the quality gate refuses (`edge_runtime.smear.quality`) keeps its cells and verdicts for a person
    to look at, but none of them is counted in the slide's summary or decision.
    `predictions` (the model's `Prediction`s of its red cells) and `view` (for drawing) live only in memory:
    `to_dict` leaves them out and `from_dict` gives them empty.
    """

    field: str
    cells: tuple[CellResult, ...] = ()
    error: str | None = None
    radius_px: float | None = None
    radius_source: str | None = None  # `Segmentation.radius_source`: "user", or how the field's estimate was made
    segment_ms: float | None = None
    classify_ms: float | None = None
    predictions: tuple[Any, ...] = dataclasses.field(default=(), repr=False, compare=False)
    view: FieldView | None = dataclasses.field(default=None, repr=False, compare=False)
    quality: FieldQuality | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "cells", tuple(self.cells))
        object.__setattr__(self, "predictions", tuple(self.predictions))
        if isinstance(self.quality, Mapping):
            object.__setattr__(self, "quality", FieldQuality.from_dict(self.quality))

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

    @property
    def counted_predictions(self) -> tuple[Any, ...]:
        """The predictions the slide counts: every red cell's but those of fragments called uncertain."""
        rbc = [c for c in self.cells if c.kind == "rbc" and c.label is not None]
        if len(rbc) != len(self.predictions):  # read back from JSON: no predictions kept
            return self.predictions
        return tuple(p for c, p in zip(rbc, self.predictions) if c.counted)

    @property
    def counts(self) -> dict[str, int]:
        """Regions per kind (every kind in KINDS, zeros included)."""
        return {k: sum(c.kind == k for c in self.cells) for k in KINDS}

    def to_dict(self) -> dict[str, Any]:
        return {"field": self.field, "cells": [c.to_dict() for c in self.cells], "error": self.error,
                "radius_px": self.radius_px, "radius_source": self.radius_source,
                "segment_ms": self.segment_ms, "classify_ms": self.classify_ms,
                "quality": self.quality.to_dict() if self.quality is not None else None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FieldResult:
        known_keys(cls, d, cls.__name__)
        if "predictions" in d or "view" in d:
            raise ValueError("FieldResult.from_dict: predictions and view are not serialised; leave them out")
        return cls(**{**d, "cells": tuple(CellResult.from_dict(c) for c in d.get("cells", ()))})


@dataclasses.dataclass(frozen=True)
class SlideSummary:
    """The slide's counts, parasitemia, parasite densities and referral (`clinical.slide_referral`'s keys, in its
    order), plus how many fields were analysed, how many gave no cells and the regions that are not red cells.

    `summary.json` is `to_dict()`, key for key.
    """

    cells: int
    parasitized: int
    uninfected: int
    uncertain: int
    rejected: int
    parasitemia_percent: float | None
    parasitemia_min_percent: float | None
    parasitemia_max_percent: float | None
    parasites_per_ul_from_rbc: int | None
    parasites_per_ul_from_rbc_max: int | None
    parasites_per_ul_from_wbc: int | None
    parasites_per_ul_from_wbc_max: int | None
    refer: bool | None  # None: undecided, while the evidence is short ("not enough evidence"), never False then
    refer_reasons: tuple[str, ...]
    min_cells: int | None
    enough_cells: bool | None
    fields: int
    fields_without_cells: int
    non_rbc: Mapping[str, int]
    # `SlideDecision.to_dict()` (edge_runtime.smear.decision): the decision, its counting rule and the one density.
    decision: Mapping[str, Any] | None = None
    fields_unreadable: tuple[Mapping[str, Any], ...] = ()  # [{"field", "reason"}] of fields not counted
    model: Mapping[str, Any] | None = None  # name, version, sha256 of the model file that made the report
    uncertain_fragments: int = 0  # fragments the model was unsure of: neither red cells nor uncertain cells
    # Where the typical cell size came from: {"source": "user" or "estimated", "um_per_px", "fields": {how: n},
    # "says"}; everything downstream (markers, kinds, crops) hangs on it.
    cell_size: Mapping[str, Any] | None = None
    normalise: str | None = None  # the crops' normalisation (`analyse_slide(normalise=...)`), None: the photo's colours

    def __post_init__(self) -> None:
        object.__setattr__(self, "refer_reasons", tuple(self.refer_reasons))
        object.__setattr__(self, "non_rbc", dict(self.non_rbc))
        object.__setattr__(self, "fields_unreadable", tuple(dict(u) for u in self.fields_unreadable))

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["refer_reasons"], d["non_rbc"] = list(self.refer_reasons), dict(self.non_rbc)
        d["fields_unreadable"] = [dict(u) for u in self.fields_unreadable]
        d["decision"] = None if self.decision is None else dict(self.decision)
        d["model"] = None if self.model is None else dict(self.model)
        d["cell_size"] = None if self.cell_size is None else dict(self.cell_size)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SlideSummary:
        return cls(**known_keys(cls, d, cls.__name__))


@dataclasses.dataclass(frozen=True)
class SlideReport:
    """Several fields of one slide: per-field results, the slide summary, and the model's positive label."""

    fields: tuple[FieldResult, ...]
    summary: SlideSummary
    positive_label: str = "Parasitized"

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", tuple(self.fields))

    @property
    def rejected(self) -> list[FieldResult]:
        return [f for f in self.fields if f.error is not None]

    def to_dict(self) -> dict[str, Any]:
        return {"fields": [f.to_dict() for f in self.fields], "summary": self.summary.to_dict(),
                "positive_label": self.positive_label}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SlideReport:
        known_keys(cls, d, cls.__name__)
        return cls(fields=tuple(FieldResult.from_dict(f) for f in d["fields"]),
                   summary=SlideSummary.from_dict(d["summary"]),
                   positive_label=d.get("positive_label", "Parasitized"))


def analyse_field(model, source, name: str | None = None, normalise: str | None = None,
                  um_per_px: float | None = None) -> FieldResult:
    """Segment one field and classify its red cells in one `model.predict` call; errors become the record's `error`.

    With `normalise` ("chroma" or "background", `crops.normalised`), the crops given to the model are cut from
    the normalised field. `um_per_px`: the photo's scale when the user knows it (`segment`), else the typical
    cell size is estimated from the field.
    The result's `view` holds what drawing the field needs (not the segmentation, which is freed on return).
    """
    name = name or (str(source) if not isinstance(source, (Image.Image, np.ndarray)) else "field")
    t0 = time.perf_counter()
    try:
        img = source if isinstance(source, np.ndarray) else load_image(source, "rgb", model.max_pixels)
        seg = segment(img, name, um_per_px)
    except (ImageError, SmearError) as e:
        return FieldResult(field=name, error=e.reason, quality=unreadable(e.reason))
    # The gate before the model: ~35 ms a field (1280x960), against seconds of segmentation.
    quality = gate(measure(seg))
    t1 = time.perf_counter()
    rbcs = [c for c in seg.cells if c.kind == "rbc"]
    source_img = normalised(seg, normalise) if rbcs else None
    preds = model.predict([crop(seg, c, source_img) for c in rbcs]) if rbcs else []
    t2 = time.perf_counter()
    by_index = {c.index: p for c, p in zip(rbcs, preds)}
    results = []
    radius = seg.radius * seg.scale  # areas are in original pixels
    for c in seg.cells:
        p = by_index.get(c.index)
        results.append(CellResult(field=name, index=c.index, bbox=c.bbox, kind=c.kind, area=c.area,
                                  label=p.label if p else None,
                                  confidence=round(p.confidence, 4) if p and p.confidence is not None else None,
                                  uncertain=bool(p.uncertain) if p else False,
                                  fragment=c.kind == "rbc" and is_fragment(c.area, radius)))
    positive = model.metadata.positive_label or "Parasitized"
    return FieldResult(field=name, cells=tuple(results), radius_px=round(seg.radius * seg.scale, 1),
                       radius_source=seg.radius_source,
                       segment_ms=round((t1 - t0) * 1e3, 1), classify_ms=round((t2 - t1) * 1e3, 1),
                       predictions=tuple(preds), view=field_view(seg, tuple(results), positive), quality=quality)


def analyse_slide(model, fields, min_cells: int | None = None, rbc_per_ul: float | None = None,
                  wbc_count: int | None = None, wbc_per_ul: float | None = None,
                  normalise: str | None = None, rule: str = DEFAULT_RULE, um_per_px: float | None = None,
                  false_calls: FalseCalls | None = None) -> SlideReport:
    """Several field photos of one slide -> one report; `report.write_report(report, out)` writes its files.

    Args:
        model: an `EdgeModel` (malaria) from `edge_runtime.load`.
        fields: image paths, PIL images or RGB arrays.
        min_cells: red cells needed before a negative call (None: the counting rule's, 2,000 by default).
        rbc_per_ul, wbc_count: the patient's red cells/µL, white cells counted over these fields: the bases of
            parasites/µL (`edge_runtime.smear.decision`).
        wbc_per_ul: the patient's measured white cells/µL (None: WHO's assumed 8,000, and the report says so).
        normalise: classify crops cut from the field normalised: "chroma" (mean cell hue moved half-way to the NIH
            crops', `normalise_stain`) or "background" (blank glass to a fixed reference, `normalise_background`).
        rule: the thin-film counting rule (`edge_runtime.smear.decision.COUNTING_RULES`).
        um_per_px: the photos' micrometres per pixel, when known (a stage micrometer, or the objective and
            camera): the typical red cell is then 3.75 um in radius instead of estimated per field (`segment`).
        false_calls: the model's false-call rate to weigh parasitized calls against (None: the registry's for a
            released model file, else unknown and every call counts; `edge_runtime.smear.decision.FalseCalls`).

    A field that cannot be read or holds no cells gets an `error` and the others go on; a field the quality
    gate refuses is kept in the report and left out of the counts. The summary's `decision` is one of
    "parasites seen", "cells to review" (no more calls than the model's false-call rate explains), "no parasites
    seen" (in at least `min_cells` red cells) or "not enough evidence";
    `refer` is None (undecided, not "no") while the evidence is short; `model` names what made the report.
    """
    need = min_cells_for(rule, min_cells)  # fails on an unknown rule before any field is read
    positive = model.metadata.positive_label or "Parasitized"
    results = []
    for k, source in enumerate(fields):
        name = str(source) if not isinstance(source, (Image.Image, np.ndarray)) else f"field[{k}]"
        results.append(analyse_field(model, source, name, normalise=normalise, um_per_px=um_per_px))
    readable = [r for r in results if r.readable]
    preds = [p for r in readable for p in r.counted_predictions]
    summary = slide_referral(slide_summary(preds, positive), rbc_per_ul=rbc_per_ul, wbc_count=wbc_count,
                             wbc_per_ul=WHO_WBC_PER_UL if wbc_per_ul is None else wbc_per_ul, min_cells=need)
    path = getattr(model, "path", None)
    if false_calls is None and path is not None:
        false_calls = model_false_calls(path)
    decision = decide(parasitized=summary["parasitized"], uncertain=summary["uncertain"],
                      red_cells=summary["cells"], readable_fields=len(readable), fields=len(results),
                      min_cells=min_cells, rule=rule, rbc_per_ul=rbc_per_ul, wbc_count=wbc_count,
                      wbc_per_ul=wbc_per_ul, false_calls=false_calls)
    if decision.decision == "not enough evidence" and not summary["refer"]:
        summary["refer"] = None  # not "no": nothing was seen because too little was looked at
    if decision.decision == "cells to review":  # referred, but on calls a person must check, not on a parasite seen
        summary["refer_reasons"] = [f"{summary['parasitized']} cell(s) called parasitized, no more than a slide "
                                    f"without parasites gives (up to {decision.false_call_limit}): review them"
                                    if r.endswith("parasitized cell(s) seen") else r for r in summary["refer_reasons"]]
    summary["fields"] = len(results)
    summary["fields_without_cells"] = sum(r.error is not None for r in results)
    summary["non_rbc"] = {k: sum(c.kind == k for r in readable for c in r.cells) for k in KINDS if k != "rbc"}
    summary["decision"] = decision.to_dict()
    summary["fields_unreadable"] = [{"field": r.field, "reason": r.unreadable_reason}
                                    for r in results if not r.readable]
    summary["uncertain_fragments"] = sum(c.kind == "rbc" and c.label is not None and not c.counted
                                         for r in readable for c in r.cells)
    summary["cell_size"] = cell_size(results, um_per_px)
    summary["model"] = model_provenance(path, model.metadata) if path is not None else None
    summary["normalise"] = normalise
    return SlideReport(fields=tuple(results), summary=SlideSummary.from_dict(summary), positive_label=positive)


def cell_size(results, um_per_px: float | None) -> dict[str, Any]:
    """Where the slide's typical cell sizes came from: the user's scale, or each field's estimate (and how)."""
    how: dict[str, int] = {}
    for r in results:
        if r.radius_source is not None:
            how[r.radius_source] = how.get(r.radius_source, 0) + 1
    if um_per_px is not None:
        says = (f"cell size from the user's scale, {um_per_px:g} um per pixel "
                f"(a {RBC_RADIUS_UM:g} um red-cell radius, {RBC_RADIUS_UM / um_per_px:.1f} px)")
    else:
        says = "cell size estimated per field: " + (", ".join(
            f"{n} field{'s' if n != 1 else ''} {RADIUS_SOURCES[k].removeprefix('estimated ')}"
            for k, n in sorted(how.items(), key=lambda t: -t[1])) or "no field gave cells")
    return {"source": "user" if um_per_px is not None else "estimated", "um_per_px": um_per_px, "fields": how,
            "says": says}
