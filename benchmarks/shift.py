"""A domain-shift harness: the shared fields as another lab, microscope or camera would photograph them.

    python -m benchmarks smear --data ../shared/data/iml_malaria --shift all --out runs/smear-shift
    python -m benchmarks smear --data ../shared/data/iml_malaria --shift blue_grey,scale_0.6 --fields PA171704

The pipeline is judged on labs nobody on the team has seen: Giemsa from pink to blue-grey (buffer pH,
batch), other white balance, soft focus, another magnification, phone JPEG, a noisy sensor. Each
transform below is applied to every measured field (annotated boxes scaled with it) and the field is
scored exactly as the untransformed one (`train.annotations.measure_field`), so a transform's row
says what that shift alone costs. The transforms are deterministic (noise from a fixed seed per field),
so two runs of one commit give the same table.

What each transform stands for, and its size, is in `TRANSFORMS`: one table that the command line, the
report and the tests iterate.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

# The image operations live in train.fieldaug: the field crops' shifted variants (training) draw their sizes at
# random from the same operations this harness applies at fixed sizes.
from train.fieldaug import contrast as _contrast
from train.fieldaug import defocus as _defocus
from train.fieldaug import gains as _gains
from train.fieldaug import gaussian_blur as _gaussian_blur
from train.fieldaug import jpeg as _jpeg
from train.fieldaug import lab_chroma as _lab_chroma
from train.fieldaug import noise as _noise
from train.fieldaug import rescale as _rescale


@dataclasses.dataclass(frozen=True)
class Transform:
    """One domain shift: `apply(rgb, seed) -> rgb`; `scale` multiplies the annotated boxes (1.0: unchanged)."""

    name: str
    what: str
    apply: Callable[[np.ndarray, int], np.ndarray]
    scale: float = 1.0


# Sizes: the IML fields' red cells are pink (CIELAB hue ~ 350 deg, chroma ~ 20); a blue-grey Giemsa
# (alkaline buffer, old stain) puts them bluish grey at about half the chroma, i.e. a rotation of
# about -75 deg. Scales span 0.6-1.5x (a 40x against a 100x objective through different eyepieces and
# sensors); blur and defocus are of a soft field a person would still photograph.
TRANSFORMS: tuple[Transform, ...] = (
    Transform("none", "the shared field as it is", lambda x, s: x),
    Transform("blue_grey", "stain rotated from pink to blue-grey (CIELAB hue -75 deg, chroma x0.5)",
              lambda x, s: _lab_chroma(x, -75.0, 0.5)),
    Transform("purple_deep", "deep purple stain (hue -25 deg, chroma x1.4, darker)",
              lambda x, s: _lab_chroma(x, -25.0, 1.4, 1.3)),
    Transform("pale", "pale, washed-out stain (chroma x0.4, lightness contrast x0.6)",
              lambda x, s: _lab_chroma(x, 0.0, 0.4, 0.6)),
    Transform("grey_stain", "almost no colour (chroma x0.15)", lambda x, s: _lab_chroma(x, 0.0, 0.15)),
    Transform("warm_wb", "warm white balance / halogen lamp (gains R 1.0, G 0.85, B 0.65)",
              lambda x, s: _gains(x, 1.0, 0.85, 0.65)),
    Transform("cool_wb", "cool white balance / LED (gains R 0.75, G 0.9, B 1.0)",
              lambda x, s: _gains(x, 0.75, 0.9, 1.0)),
    Transform("dark_low_contrast", "under-exposed, low contrast (contrast x0.6, brightness -40)",
              lambda x, s: _contrast(x, 0.6, -40.0)),
    Transform("bright", "over-exposed (contrast x1.2, brightness +25, clipped)", lambda x, s: _contrast(x, 1.2, 25.0)),
    Transform("blur_2", "soft focus (Gaussian sigma 2 px)", lambda x, s: _gaussian_blur(x, 2.0)),
    Transform("defocus_5", "out of focus (disc of radius 5 px)", lambda x, s: _defocus(x, 5)),
    Transform("scale_0.6", "lower magnification (resized x0.6)", lambda x, s: _rescale(x, 0.6), 0.6),
    Transform("scale_0.8", "resized x0.8", lambda x, s: _rescale(x, 0.8), 0.8),
    Transform("scale_1.25", "resized x1.25", lambda x, s: _rescale(x, 1.25), 1.25),
    Transform("scale_1.5", "higher magnification (resized x1.5)", lambda x, s: _rescale(x, 1.5), 1.5),
    Transform("jpeg_30", "recompressed as JPEG quality 30", lambda x, s: _jpeg(x, 30)),
    Transform("noise_8", "sensor noise (sigma 8 grey levels at mid-grey, shot-noise shaped)",
              lambda x, s: _noise(x, 8.0, s)),
    Transform("blue_grey_soft_small", "blue-grey stain, blur sigma 1.5, x0.75, JPEG 50 (several at once)",
              lambda x, s: _jpeg(_rescale(_gaussian_blur(_lab_chroma(x, -75.0, 0.5), 1.5), 0.75), 50), 0.75),
)
BY_NAME = {t.name: t for t in TRANSFORMS}


def resolve(spec: str) -> list[Transform]:
    """Transforms from a comma-separated list of names, or "all"; an unknown name is an error listing the known."""
    names = [t.name for t in TRANSFORMS] if spec.strip() == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown or not names:
        raise ValueError(f"unknown --shift transform(s) {unknown or [spec]}; known: all, {', '.join(BY_NAME)}")
    return [BY_NAME[n] for n in names]


def field_seed(name: str) -> int:
    """A fixed seed per field name (the noise is the same run to run)."""
    return zlib.crc32(name.encode())


def shifted(ann: dict[str, Any], rgb: np.ndarray, t: Transform) -> tuple[dict[str, Any], np.ndarray]:
    """The annotation with its boxes scaled by the transform, and the transformed field."""
    out = t.apply(np.ascontiguousarray(rgb), field_seed(ann["image"].name))
    if t.scale == 1.0:
        return ann, out
    return {**ann, "boxes": [[v * t.scale for v in b] for b in ann["boxes"]]}, out


def all_fields(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Cell and parasite recall over every field, a rejected field counting as nothing found.

    `summarise`'s recall is over the fields that gave cells; under a shift that makes the pipeline refuse
    most fields, the few left can score high while almost nothing is found.
    """
    ann = sum(r["annotated"] for r in rows)
    par = sum(r["annotated_parasites"] for r in rows)
    return {"cell_recall_all_fields": sum(r.get("found", 0) for r in rows) / max(ann, 1),
            "parasite_recall_detection_all_fields": sum(r.get("parasites_found", 0) for r in rows) / max(par, 1)}


SHIFT_METRICS = ("cell_recall_all_fields", "parasite_recall_detection_all_fields", "cell_recall",
                 "parasite_recall_detection", "parasite_recall_called", "parasite_recall_called_read",
                 "uninfected_false_positive_rate", "false_calls_per_1000_red_cells", "uninfected_uncertain_rate",
                 "fields_failed",
                 "fields_unreadable", "fields_collapsed_silent", "segment_ms_per_field")


def shift_markdown(rows: list[dict[str, Any]]) -> str:
    """One Markdown table: a row per transform, the headline metrics of `summarise` as columns."""
    cols = [m for m in SHIFT_METRICS if any(m in r["summary"] for r in rows)]
    head = {"cell_recall_all_fields": "cell recall (all fields)",
            "parasite_recall_detection_all_fields": "parasites found as a cell (all fields)",
            "cell_recall": "cell recall (fields analysed)", "parasite_recall_detection": "parasites found as a cell",
            "parasite_recall_called": "parasites flagged", "uninfected_false_positive_rate":
            "uninfected called parasitized", "uninfected_uncertain_rate": "uninfected uncertain",
            "parasite_recall_called_read": "parasites flagged, refused fields as none",
            "false_calls_per_1000_red_cells": "false parasitized calls per 1,000 red cells (off-target included)",
            "fields_failed": "fields rejected", "fields_unreadable": "fields refused by the gate",
            "fields_collapsed_silent": "fields < 70% recall passed by the gate",
            "segment_ms_per_field": "segment ms/field"}
    counts = ("fields_failed", "fields_unreadable", "fields_collapsed_silent", "segment_ms_per_field")
    lines = ["| transform | " + " | ".join(head[c] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for r in rows:
        s = r["summary"]
        vals = []
        for c in cols:
            v = s.get(c)
            vals.append("-" if v is None else f"{v:.0f}" if c in counts
                        else f"{v:.1f}" if c == "false_calls_per_1000_red_cells" else f"{100 * v:.1f}%")
        lines.append(f"| {r['transform']} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"
