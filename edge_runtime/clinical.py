"""Clinical summaries, what a field worker reads: the OCT referral level per scan and the malaria slide summary.

Also the one definition of the OCT classes and their referral levels, which
train/ imports (edge_runtime is the bottom layer).

Referral levels follow Kermany et al. (Cell, 2018): choroidal neovascularisation
(CNV) and diabetic macular edema (DME) need urgent referral, drusen routine
referral, a normal retina observation. An uncertain answer is never turned
into a level of its own making: it goes to a specialist.
"""

from __future__ import annotations

from typing import Any, Iterable

from edge_runtime.metadata import ArtifactMetadata

# OCT2017's class folders, in the (alphabetical) order Keras' directory loaders give them.
OCT_LABELS = ("CNV", "DME", "DRUSEN", "NORMAL")
# Choroidal neovascularisation and diabetic macular oedema need urgent referral,
# drusen (early AMD) routine referral, a normal scan observation.
OCT_REFERRAL = {"CNV": "urgent", "DME": "urgent", "DRUSEN": "routine", "NORMAL": "observation"}
REFERRAL_LEVELS = ("urgent", "routine", "observation")
UNCERTAIN_REFERRAL = "specialist review"


def referral_map(labels: Iterable[str]) -> dict[str, str] | None:
    """class -> referral level for OCT labels (all of them must have one), else None."""
    labels = list(labels)
    return {l: OCT_REFERRAL[l] for l in labels} if set(labels) <= set(OCT_REFERRAL) else None


def is_oct(meta: ArtifactMetadata) -> bool:
    return meta.task == "oct" or set(meta.labels) == set(OCT_REFERRAL)


def is_malaria(meta: ArtifactMetadata) -> bool:
    return meta.task == "malaria" or set(meta.labels) == {"Parasitized", "Uninfected"}


def referral_level(meta: ArtifactMetadata, label: str, uncertain: bool) -> str | None:
    """OCT: "urgent" / "routine" / "observation" (or "specialist review" when uncertain); None for other tasks."""
    if not is_oct(meta):
        return None
    if uncertain:
        return UNCERTAIN_REFERRAL
    return OCT_REFERRAL.get(label, UNCERTAIN_REFERRAL)


def slide_summary(predictions: Iterable[Any], positive_label: str = "Parasitized") -> dict[str, Any]:
    """Summary of the cell crops of one slide.

    Parasitemia is the share of parasitized cells among the confidently
    classified ones; `parasitemia_max_percent` counts every uncertain cell as
    parasitized too, the worst case a clinician should see beside it.

    Args:
        predictions: `Prediction`s of one slide's cells (error records count as rejected).
        positive_label: the class that counts as parasitized.
    """
    preds = list(predictions)
    ok = [p for p in preds if p.error is None]
    uncertain = sum(p.uncertain for p in ok)
    positive = sum(1 for p in ok if not p.uncertain and p.label == positive_label)
    negative = len(ok) - uncertain - positive
    sure = positive + negative
    return {
        "cells": len(ok),
        "parasitized": positive,
        "uninfected": negative,
        "uncertain": uncertain,
        "rejected": len(preds) - len(ok),
        "parasitemia_percent": round(100.0 * positive / sure, 2) if sure else None,
        "parasitemia_max_percent": round(100.0 * (positive + uncertain) / len(ok), 2) if ok else None,
    }


def oct_summary(predictions: Iterable[Any]) -> dict[str, Any]:
    """Counts of scans per referral level (error records count as rejected)."""
    preds = list(predictions)
    levels = [*REFERRAL_LEVELS, UNCERTAIN_REFERRAL]
    out: dict[str, Any] = {"scans": sum(p.error is None for p in preds)}
    out.update({lvl: sum(1 for p in preds if p.error is None and p.referral == lvl) for lvl in levels})
    out["rejected"] = len(preds) - out["scans"]
    return out
