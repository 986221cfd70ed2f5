"""What a health worker acts on, from a malaria case: a plain verdict, what to do, the count so far, what the
parasitemia figures mean and which fields to retake. Pure functions over the case's JSON (the slide summary
`SlideSummary.to_dict()` and the field entries `analysis.analyse_malaria` stores): no image, no model, no web
framework, so a case stored before this module existed reads the same way.

    report = malaria_report(case.result, case.analysis_ms)   # the page's verdict block (GET /api/cases/{id})
    report["verdict"]    # "Not enough evidence: photograph about 8 more fields"
    report["progress"]   # {"counted": 1210, "needed": 2000, "more_fields": 8, "text": "1,210 of 2,000 red cells..."}

The verdict follows the slide decision (`edge_runtime.smear.decision`) and never says more than it does:
- parasites seen -> "Parasites seen: treat per protocol and refer" (red);
- cells called parasitized, but no more than the model calls on a slide without parasites -> "Cells to review:
  check the N flagged cells" (amber: neither positive nor negative until a person has looked);
- no parasite seen but too many cells the model cannot vouch for -> "Cannot rule out parasites: refer" (red);
- too few red cells, or no field readable -> "Not enough evidence: photograph about K more fields" (amber);
- none seen in at least the rule's red cells -> "No parasites seen in N red cells" (green, or amber while a
  field could not be read: the slide is then negative only on the fields that were).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DISCLAIMER = "A screening aid, not a diagnosis."
REFER_MEANS = ("Refer: send the patient, with this slide and this report, to the clinic or laboratory your programme "
               "refers to, where a trained microscopist confirms the result and a clinician decides the treatment.")
# Parasitemia levels a health worker is told about, highest first: (share of red cells in %, what it means).
# WHO, Guidelines for the treatment of malaria, 3rd ed. (2015), severe falciparum malaria: hyperparasitaemia
# > 10%. Many protocols for patients without immunity already treat > 2% as severe (e.g. the WHO criteria as
# tabulated in Malaria J 2012, doi:10.1186/1475-2875-11-96, table 1). The app names both and defers to the
# local protocol.
PARASITEMIA_LEVELS = (
    (10.0, "very high: over 10% is a sign of severe malaria (WHO 2015). Refer urgently."),
    (2.0, "high: many protocols treat over 2% as severe malaria in a patient without immunity. Refer urgently "
          "and follow your protocol."),
    (0.0, "parasites are present. Treat per your protocol; a repeat count during treatment should fall."),
)


def _n(x: int) -> str:
    return f"{x:,}"


def _plural(n: int, word: str) -> str:
    return f"{_n(n)} {word}{'s' * (n != 1)}"


def _level(pct: float) -> str:
    return next(text for limit, text in PARASITEMIA_LEVELS if pct > limit or limit == 0.0)


def unread_fields(fields: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The fields whose cells were not counted, each with its index, name, photo and the reason (the quality
    gate's, or why no cell could be found)."""
    out = []
    for k, f in enumerate(fields):
        if f.get("error") is None and f.get("readable", True) is not False:
            continue
        reason = f.get("unreadable_reason") or f"can't read this field: retake ({f.get('error')})"
        out.append({"field": k, "name": f.get("name"), "photo": f.get("photo"), "reason": reason})
    return out


def progress(summary: Mapping[str, Any]) -> dict[str, Any] | None:
    """Red cells counted toward the counting rule's minimum, with the fields still to photograph; None for a case
    stored without a slide decision."""
    d = summary.get("decision") or {}
    need = d.get("min_cells")
    if not need:
        return None
    counted = int(summary.get("cells") or 0)
    more = int(d.get("more_fields") or 0)
    if counted >= need:
        text = f"{_n(counted)} red cells counted: the minimum of {_n(need)} is reached."
    elif more:
        text = f"{_n(counted)} of {_n(need)} red cells counted: about {_plural(more, 'more field')} to photograph."
    elif d.get("decision") == "parasites seen":
        text = (f"{_n(counted)} of {_n(need)} red cells counted. A parasite seen makes the slide positive at any "
                "count; more fields make the parasitemia figure surer.")
    else:
        text = f"{_n(counted)} of {_n(need)} red cells counted."
    return {"counted": counted, "needed": int(need), "more_fields": more, "fraction": min(1.0, counted / need),
            "text": text,
            "rule": f"at least {_n(need)} red cells before a negative call" + (
                " (set on this device)" if d.get("rule") == "given" else f" ({d.get('reference')})"
                if d.get("reference") else "")}


def parasitemia(summary: Mapping[str, Any]) -> list[dict[str, str]]:
    """The parasitemia figures, each with what it means and what to do: [{"label", "value", "meaning"}].

    The figure is parasitized cells over every red cell counted (the thin film's own denominator, the slide
    decision's), with uncertain cells counted as not parasitized, never over the confident cells alone: when
    most cells are uncertain, a handful of confident ones would make a small count look like a severe one.
    """
    cells, par, unc = (int(summary.get(k) or 0) for k in ("cells", "parasitized", "uncertain"))
    if not cells:
        return []
    d = summary.get("decision") or {}
    rows = []
    pct = d.get("parasitemia_percent")
    if pct is None:
        pct = round(100.0 * par / cells, 3)
    hi = summary.get("parasitemia_max_percent")
    if par:
        lo_ci, hi_ci = d.get("parasitemia_low_percent"), d.get("parasitemia_high_percent")
        ci = f" (95% CI {lo_ci:.2f}-{hi_ci:.2f}%)" if lo_ci is not None and hi_ci is not None else ""
        review = d.get("decision") == "cells to review"
        rows.append({"label": "Parasitemia" + (" if every flagged cell is a parasite" if review else ""),
                     "value": f"{pct:.2f}% of red cells{ci}",
                     "meaning": f"{_n(par)} parasitized of the {_n(cells)} red cells counted"
                                + (f" (the {_n(unc)} uncertain counted as not parasitized)" if unc else "")
                                + (": not a parasitemia until a person has confirmed them; a slide without "
                                   "parasites gives this many calls." if review else ": " + _level(pct))})
    else:
        upper = d.get("parasitemia_high_percent")
        below = f"fewer than about {upper:.2f}% of red cells are infected (95% confidence), not none" \
            if upper is not None else "few red cells are infected, not none"
        rows.append({"label": "Parasitemia", "value": f"none seen in {_n(cells)} red cells",
                     "meaning": f"No parasite in {_n(cells)} red cells means {below}: a thin film misses low "
                                "densities, so this does not rule out malaria. With fever or danger signs, follow "
                                "your protocol (a rapid test or a thick film, or refer)."})
    if unc and hi is not None:
        # The level the worst case would reach, when it is high and higher than the estimate's.
        worst = _level(hi) if hi > 2.0 and _level(hi) != _level(pct) else ""
        rows.append({"label": "If the uncertain cells are parasites", "value": f"up to {hi:.2f}%",
                     "meaning": f"The model could not vouch for {_plural(unc, 'cell')}: counted as parasites, the "
                                f"share would be {hi:.2f}%. Look at them under \u201ccells to check\u201d."
                                + (f" At {hi:.2f}% it would be {worst}" if worst else "")})
    den = d.get("density")
    if den:
        rows.append({"label": "Parasites/\u00b5L", "value": f"{den['per_ul']:,} (95% CI {den['low_per_ul']:,}-"
                                                            f"{den['high_per_ul']:,})",
                     "meaning": f"Parasites per microlitre of blood, from {den['basis']}."})
    return rows


def verdict(summary: Mapping[str, Any], unread: int = 0) -> dict[str, str]:
    """{"state": "refer" | "ok" | "amber", "text": the one line, "evidence": on what, "action": what to do}."""
    d = summary.get("decision") or {}
    cells, par, unc = (int(summary.get(k) or 0) for k in ("cells", "parasitized", "uncertain"))
    retake = (f" Retake the {_plural(unread, 'field')} that could not be read (below)." if unread else "")
    if d.get("decision") == "cells to review":
        return {"state": "amber", "text": f"Cells to review: check the {_plural(par, 'flagged cell')}",
                "evidence": f"{_n(par)} called parasitized of {_n(cells)} red cells counted: no more than this model "
                            f"calls on a slide without parasites (up to {_n(d.get('false_call_limit') or 0)} in "
                            f"{_n(cells)} red cells), so they are not yet a parasite seen.",
                "action": "Look at the flagged cells below and call each one (Review). A cell you confirm as a "
                          "parasite makes the slide positive; if you cannot review them, refer. Until then this "
                          "slide is neither positive nor negative. " + REFER_MEANS + retake}
    if par:
        return {"state": "refer", "text": "Parasites seen: treat per protocol and refer",
                "evidence": f"{_n(par)} parasitized of {_n(cells)} red cells counted.",
                "action": "Treat per your malaria treatment protocol and refer. " + REFER_MEANS}
    if summary.get("refer"):
        return {"state": "refer", "text": "Cannot rule out parasites: refer",
                "evidence": f"No cell was called parasitized, but the model could not vouch for {_n(unc)} of "
                            f"{_n(cells)} red cells ({'; '.join(summary.get('refer_reasons') or [])}).",
                "action": "Check the uncertain cells below, and refer. " + REFER_MEANS}
    if d.get("decision") == "not enough evidence" or not cells or not d:
        more = int(d.get("more_fields") or 0)
        need = d.get("min_cells")
        text = (f"Not enough evidence: photograph about {_plural(more, 'more field')}" if more
                else "Not enough evidence")
        evidence = (f"{_n(cells)} of {_n(need)} red cells counted, none parasitized." if need and cells
                    else "No field could be read." if not cells else f"{_n(cells)} red cells counted.")
        return {"state": "amber", "text": text, "evidence": evidence,
                "action": "Photograph more fields of the same slide, each a different area of the thin part of the "
                          "film, and add them. Until then this slide is not negative: nothing was seen because "
                          "too little was looked at." + retake}
    return {"state": "amber" if unread else "ok", "text": f"No parasites seen in {_n(cells)} red cells",
            "evidence": f"{_n(cells)} red cells counted (at least {_n(d.get('min_cells') or cells)} needed), none "
                        "parasitized" + (f", {_n(unc)} uncertain." if unc else "."),
            "action": "A negative thin film does not rule out malaria. With fever or danger signs, follow your "
                      "protocol (a rapid test or a thick film, or refer)." + retake}


def duplicate_lines(duplicates: list[Mapping[str, Any]]) -> list[str]:
    """"photo B is the same as photo A: counted once" for each upload dropped as a copy of an earlier one."""
    return [f"Photo \u201c{d['name']}\u201d is the same as photo \u201c{d['same_as']}\u201d: counted once."
            for d in duplicates]


def malaria_report(result: Mapping[str, Any], analysis_ms: float | None = None) -> dict[str, Any]:
    """Everything the page's verdict block shows, from a malaria case's `result` (and its analysis time)."""
    summary = result.get("summary") or {}
    unread = unread_fields(list(result.get("fields") or []))
    v = verdict(summary, len(unread))
    return {**v, "verdict": v["text"], "disclaimer": DISCLAIMER, "refer_means": REFER_MEANS,
            "progress": progress(summary), "parasitemia": parasitemia(summary), "unread_fields": unread,
            "duplicates": duplicate_lines(list(result.get("duplicates") or [])),
            "retake_of": result.get("retake_of"),
            "time": None if analysis_ms is None else f"Analysed in {analysis_ms / 1000:.1f} s on the device."}


def headline(summary: Mapping[str, Any], unread: int = 0) -> str:
    """The case's one stored line (case list, CSV): the verdict and its evidence."""
    v = verdict(summary, unread)
    return f"{v['text']}. {v['evidence']}"
