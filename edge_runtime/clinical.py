"""Clinical summaries, what a field worker reads: the OCT referral level per scan and the malaria slide summary.

Also the one definition of the OCT classes and their referral levels, which
train/ imports (edge_runtime is the bottom layer).

Referral levels follow Kermany et al. (Cell, 2018): choroidal neovascularisation
(CNV) and diabetic macular edema (DME) need urgent referral, drusen routine
referral, a normal retina observation. An uncertain answer is never turned
into a level of its own making: it goes to a specialist.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

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
    parasitized too, the worst case a clinician should see beside it, and
    `parasitemia_min_percent` every uncertain cell as uninfected: when many
    cells are uncertain, the estimate alone overstates what is known, the
    range [min, max] does not.

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
        "parasitemia_min_percent": round(100.0 * positive / len(ok), 2) if ok else None,
        "parasitemia_max_percent": round(100.0 * (positive + uncertain) / len(ok), 2) if ok else None,
    }


# A slide is referred when any parasite is seen, or when more than this share of its
# counted cells could not be classified confidently (the model cannot vouch for the slide).
REFER_UNCERTAIN_SHARE = 0.05
# WHO convention when the patient's white cell count is unknown: 8,000 WBC per microlitre.
WHO_WBC_PER_UL = 8000.0


def slide_referral(summary: dict[str, Any], rbc_per_ul: float | None = None, wbc_count: int | None = None,
                   wbc_per_ul: float = WHO_WBC_PER_UL, min_cells: int | None = None) -> dict[str, Any]:
    """`slide_summary`'s dict plus parasite density, the referral flag and whether enough cells were counted.

    Parasite density, when the user gives what it needs:
    - from the RBC density (thin smear): parasites/uL = parasitized / (parasitized + uninfected) * rbc_per_ul,
      i.e. parasitemia % / 100 * RBC/uL; the worst case uses `parasitemia_max_percent`.
    - from white cells counted on the same fields (WHO): parasites/uL = parasitized / wbc_count * wbc_per_ul
      (8,000/uL by default); the worst case adds the uncertain cells.

    Args:
        summary: what `slide_summary` returned.
        rbc_per_ul: the patient's red cells per microlitre, if known.
        wbc_count: white cells counted over the same fields.
        wbc_per_ul: the patient's white cells per microlitre (default: WHO's 8,000).
        min_cells: the fewest counted cells a reliable parasitemia needs (None: no minimum).
    """
    out = dict(summary)
    pct, pct_max = summary["parasitemia_percent"], summary["parasitemia_max_percent"]
    out["parasites_per_ul_from_rbc"] = None if rbc_per_ul is None or pct is None else round(pct / 100 * rbc_per_ul)
    out["parasites_per_ul_from_rbc_max"] = (None if rbc_per_ul is None or pct_max is None
                                            else round(pct_max / 100 * rbc_per_ul))
    by_wbc = wbc_count is not None and wbc_count > 0
    out["parasites_per_ul_from_wbc"] = round(summary["parasitized"] / wbc_count * wbc_per_ul) if by_wbc else None
    out["parasites_per_ul_from_wbc_max"] = (round((summary["parasitized"] + summary["uncertain"]) / wbc_count
                                                  * wbc_per_ul) if by_wbc else None)
    cells = summary["cells"]
    uncertain_share = summary["uncertain"] / cells if cells else 0.0
    reasons = []
    if summary["parasitized"]:
        reasons.append(f"{summary['parasitized']} parasitized cell(s) seen")
    if uncertain_share > REFER_UNCERTAIN_SHARE:
        reasons.append(f"{100 * uncertain_share:.1f}% of cells uncertain (> {100 * REFER_UNCERTAIN_SHARE:.0f}%)")
    out["refer"] = bool(reasons)
    out["refer_reasons"] = reasons
    out["min_cells"] = min_cells
    out["enough_cells"] = None if min_cells is None else cells >= min_cells
    return out


def oct_summary(predictions: Iterable[Any]) -> dict[str, Any]:
    """Counts of scans per referral level (error records count as rejected)."""
    preds = list(predictions)
    levels = [*REFERRAL_LEVELS, UNCERTAIN_REFERRAL]
    out: dict[str, Any] = {"scans": sum(p.error is None for p in preds)}
    out.update({lvl: sum(1 for p in preds if p.error is None and p.referral == lvl) for lvl in levels})
    out["rejected"] = len(preds) - out["scans"]
    return out
