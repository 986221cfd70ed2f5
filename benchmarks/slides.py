"""Slide-level scoring for `python -m benchmarks smear` (issue 23 item 6): what a slide report gets right.

A slide is what a health worker acts on, so the unit here is the slide, not
the cell. The shared IML-Malaria fields carry no slide ids: their camera-order
blocks (`train.annotations.field_blocks`) stand in for slides.

Per slide, from the per-field rows `measure_field` gives (with a model):
- the decision the report would print (`edge_runtime.smear.decision.decide`
  over its readable fields) and whether it is right: a slide with an
  annotated parasite must not read "no parasites seen";
- detection: "parasites seen" on a slide with an annotated parasite;
- parasitemia: parasitized / red cells counted on readable fields against
  annotated parasites / annotated cells, within +-25% (relative) as WHO's
  quantitation competence measure asks of a microscopist;
- recall per stage (ring, trophozoite, schizont, gametocyte): annotated
  parasites of the stage found and called parasitized or uncertain;
- fields refused by the quality gate (or with no cells);
- the slide without its parasites: the same fields with only the parasitized
  calls that overlap no annotated parasite (`calls_off_parasites`), decided
  again. The shared set has no slide without parasites; this is what one of
  the same lab, stain and camera would read, and whether the model's
  false-call rate keeps it from reading "parasites seen".

The false-call rate a decision weighs the calls against (`FalseCalls`) is
the model's recorded one, or with `held_out=True` each slide's is measured
on the other slides' fields (rows scored by models that never saw them,
e.g. `train field-cv` folds): a slide is never decided on a rate that
counted its own calls.

Intervals are over slides: Wilson 95% for shares of slides; for pooled
recalls, a percentile bootstrap over slides (a slide's cells are not
independent of each other, its stain and focus are shared).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from edge_runtime.smear.decision import DECISIONS, DEFAULT_RULE, FalseCalls, decide
from train.annotations import PARASITE_TYPES, field_blocks

# Camera numbers further apart than this start a new slide: `field_blocks`' default, the seven blocks the shared
# set's README names (a gap of 20 merged PA171960-974 with PA171990-2001, 16 apart).
SLIDE_GAP = 10
PARASITEMIA_TOLERANCE = 0.25  # relative: WHO's quantitation measure, an estimate within +-25% of the reference
BOOTSTRAP = 2000
SEED = 0


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float | None, float | None]:
    """Wilson score 95% interval for k of n (None, None when n = 0)."""
    if n == 0:
        return None, None
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def bootstrap_ratio(num: Sequence[float], den: Sequence[float], reps: int = BOOTSTRAP,
                    seed: int = SEED) -> tuple[float | None, float | None, float | None]:
    """Pooled sum(num) / sum(den) and its percentile 95% interval, resampling slides (the pairs) with replacement."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    keep = den > 0
    num, den = num[keep], den[keep]
    if den.size == 0:
        return None, None, None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, den.size, (reps, den.size))
    ratios = num[idx].sum(axis=1) / np.maximum(den[idx].sum(axis=1), 1e-12)
    return float(num.sum() / den.sum()), float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))


def _readable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("error") is None and r.get("readable", True)]


def false_calls_of(rows: list[dict[str, Any]], source: str) -> FalseCalls | None:
    """The false-call rate of these field rows: counted parasitized calls on no annotated parasite among the red
    cells counted, over readable fields; None without a red cell or without `calls_off_parasites` (older rows)."""
    ok = _readable(rows)
    red = sum(r.get("red_cells", 0) for r in ok)
    if not red or any("calls_off_parasites" not in r for r in ok):
        return None
    return FalseCalls(sum(r["calls_off_parasites"] for r in ok), red, source)


def slide_rows(rows: list[dict[str, Any]], min_cells: int | None = None, rule: str = DEFAULT_RULE,
               blocks: dict[str, str] | None = None, false_calls: FalseCalls | None = None,
               held_out: bool = False) -> list[dict[str, Any]]:
    """One row per slide (camera-order block) from per-field rows measured with a model.

    A field row counts when it has no `error` and is `readable` (True when the row has no quality verdict).
    Stage counts come from `stage_annotated` / `stage_called` ({stage: n}). `false_calls`: the model's rate for
    every slide; `held_out`: instead, each slide's from the other slides' rows (see the module docstring).
    """
    blocks = blocks or field_blocks([r["field"] for r in rows], gap=SLIDE_GAP)
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(blocks[r["field"]], []).append(r)
    out = []
    for slide, fs in sorted(by.items()):
        ok = _readable(fs)
        parasitized = sum(r.get("parasitized_cells", 0) for r in ok)
        uncertain = sum(r.get("uncertain_cells", 0) for r in ok)
        red = sum(r.get("red_cells", 0) for r in ok)
        rate = false_calls
        if held_out:
            others = sorted(set(by) - {slide})
            rate = false_calls_of([r for o in others for r in by[o]], "held out: slides " + ", ".join(others))
        common = dict(uncertain=uncertain, red_cells=red, readable_fields=len(ok), fields=len(fs),
                      min_cells=min_cells, rule=rule, false_calls=rate)
        d = decide(parasitized=parasitized, **common)
        clean = None
        if all("calls_off_parasites" in r for r in ok):
            clean = decide(parasitized=sum(r["calls_off_parasites"] for r in ok), **common)
        ann_par = sum(r["annotated_parasites"] for r in fs)
        ann_cells = sum(r["annotated"] for r in fs)
        truth_pct = 100.0 * ann_par / ann_cells if ann_cells else None
        est_pct = 100.0 * parasitized / red if red else None
        within = (None if not ann_par or est_pct is None
                  else abs(est_pct - truth_pct) <= PARASITEMIA_TOLERANCE * truth_pct)
        row = {"slide": slide, "fields": len(fs), "fields_failed": len(fs) - len(ok),
               "fields_no_cells": sum(r.get("error") is not None for r in fs),
               "red_cells": red, "parasitized": parasitized, "uncertain": uncertain,
               "annotated_cells": ann_cells, "annotated_parasites": ann_par,
               "decision": d.decision, "message": d.message,
               "detected": bool(ann_par) and d.decision == "parasites seen",
               "false_negative": bool(ann_par) and d.decision == "no parasites seen",
               "parasitemia_annotated_percent": None if truth_pct is None else round(truth_pct, 3),
               "parasitemia_estimated_percent": None if est_pct is None else round(est_pct, 3),
               "parasitemia_within_25": within,
               "false_calls_per_1000": None if rate is None else round(rate.per_1000, 3),
               "false_calls_upper_per_1000": None if rate is None else round(rate.upper_per_1000, 3),
               "false_calls_source": None if rate is None else rate.source,
               "false_call_limit": d.false_call_limit,
               "calls_off_parasites": None if clean is None else clean.parasitized,
               "clean_decision": None if clean is None else clean.decision,
               "clean_message": None if clean is None else clean.message}
        for st in PARASITE_TYPES:
            row[f"{st}_annotated"] = sum(r.get("stage_annotated", {}).get(st, 0) for r in fs)
            row[f"{st}_called"] = sum(r.get("stage_called", {}).get(st, 0) for r in fs)
        out.append(row)
    return out


def slide_summary(slides: list[dict[str, Any]]) -> dict[str, Any]:
    """Headline slide-level figures with their 95% intervals over slides."""
    pos = [s for s in slides if s["annotated_parasites"]]
    det = sum(s["detected"] for s in pos)
    quant = [s for s in pos if s["parasitemia_within_25"] is not None]
    within = sum(bool(s["parasitemia_within_25"]) for s in quant)
    s: dict[str, Any] = {"slides": len(slides), "slides_with_parasites": len(pos),
                         "detection_sensitivity": det / len(pos) if pos else None,
                         "detection_sensitivity_ci": wilson(det, len(pos)),
                         "false_negative_slides": sum(x["false_negative"] for x in slides),
                         "not_enough_evidence_slides": sum(x["decision"] == "not enough evidence" for x in slides),
                         "review_slides": sum(x["decision"] == "cells to review" for x in slides),
                         "review_slides_with_parasites": sum(x["decision"] == "cells to review" for x in pos),
                         # the slides without their parasites (see the module docstring): what each one read
                         "clean_slides": {d: sum(x.get("clean_decision") == d for x in slides) for d in DECISIONS},
                         "parasitemia_within_25": within / len(quant) if quant else None,
                         "parasitemia_within_25_ci": wilson(within, len(quant)),
                         "fields": sum(x["fields"] for x in slides),
                         "fields_failed": sum(x["fields_failed"] for x in slides)}
    for st in PARASITE_TYPES:
        r, lo, hi = bootstrap_ratio([x[f"{st}_called"] for x in slides], [x[f"{st}_annotated"] for x in slides])
        s[f"{st}_annotated"] = sum(x[f"{st}_annotated"] for x in slides)
        s[f"{st}_recall"], s[f"{st}_recall_ci"] = r, (lo, hi)
    return s


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _ci(ci) -> str:
    lo, hi = ci
    return "" if lo is None else f" ({100 * lo:.0f}-{100 * hi:.0f}%)"


def slide_markdown(slides: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """The per-slide table and the headline figures with intervals, in Markdown."""
    lines = ["| slide | fields (failed) | red cells | parasitized / uncertain | annotated parasites | decision | "
             "parasitemia est. / annotated | within 25% | false calls per 1,000 (upper) | without its parasites |",
             "|---|---:|---:|---:|---:|---|---:|---|---:|---|"]
    for s in slides:
        est, ann = s["parasitemia_estimated_percent"], s["parasitemia_annotated_percent"]
        within = {None: "-", True: "yes", False: "no"}[s["parasitemia_within_25"]]
        rate = ("not measured" if s.get("false_calls_per_1000") is None
                else f"{s['false_calls_per_1000']:.1f} ({s['false_calls_upper_per_1000']:.1f})")
        clean = ("-" if s.get("clean_decision") is None
                 else f"{s['calls_off_parasites']} calls: {s['clean_decision']}")
        lines.append(f"| {s['slide']} | {s['fields']} ({s['fields_failed']}) | {s['red_cells']} | "
                     f"{s['parasitized']} / {s['uncertain']} | {s['annotated_parasites']} | {s['message']} | "
                     f"{'-' if est is None else f'{est:.2f}%'} / {'-' if ann is None else f'{ann:.2f}%'} | "
                     f"{within} | {rate} | {clean} |")
    clean = summary.get("clean_slides") or {}
    lines += ["", "| slide-level measure | value (95% CI over slides) |", "|---|---:|",
              f"| slides with a parasite read \"parasites seen\" | {_pct(summary['detection_sensitivity'])}"
              f"{_ci(summary['detection_sensitivity_ci'])} of {summary['slides_with_parasites']} |",
              f"| slides with a parasite read \"cells to review\" | {summary.get('review_slides_with_parasites', 0)} |",
              "| the slides without their parasites: read \"parasites seen\" / \"cells to review\" / \"no parasites "
              f"seen\" / \"not enough evidence\" | {clean.get('parasites seen', 0)} / {clean.get('cells to review', 0)}"
              f" / {clean.get('no parasites seen', 0)} / {clean.get('not enough evidence', 0)} |",
              f"| slides with a parasite read \"no parasites seen\" | {summary['false_negative_slides']} |",
              f"| slides \"not enough evidence\" | {summary['not_enough_evidence_slides']} of {summary['slides']} |",
              f"| parasitemia within +-25% of the annotation | {_pct(summary['parasitemia_within_25'])}"
              f"{_ci(summary['parasitemia_within_25_ci'])} |",
              f"| fields refused or without cells | {summary['fields_failed']} of {summary['fields']} |"]
    for st in PARASITE_TYPES:
        lines.append(f"| {st} recall (found and called parasitized or uncertain; {summary[f'{st}_annotated']} "
                     f"annotated) | {_pct(summary[f'{st}_recall'])}{_ci(summary[f'{st}_recall_ci'])} |")
    return "\n".join(lines) + "\n"
