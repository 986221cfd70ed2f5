"""The slide decision and its counts, as a microscopist makes them: pure functions, no image and no model.

    from edge_runtime.smear.decision import decide
    d = decide(parasitized=0, uncertain=2, red_cells=1450, readable_fields=13, fields=14)
    print(d.message)   # not enough evidence: photograph about 5 more fields (1,450 red cells counted, 2,000 needed)

A thin film is read by counting red cells until a set number has been seen
(`COUNTING_RULES`); only then may a reader call it negative, and the call is
"no parasites seen in N red cells", not "no malaria": a thin film of 2,000
cells misses a density below about 1 parasite in 2,000 cells (0.05%, ~2,500
parasites/µL at 5 x 10^6 red cells/µL), which is why a negative thin film
does not exclude malaria and WHO reads thick films for that.

Four answers, never a fifth:
- "parasites seen": cells called parasitized, and more of them than the
  model's own false calls explain (below), or at least one a person
  confirmed in review;
- "cells to review": cells called parasitized, but no more than the model
  calls on a slide without parasites; a person must look at them before the
  slide is called either way (never read as negative);
- "no parasites seen in N red cells": none seen, N >= the rule's minimum, at
  least one readable field;
- "not enough evidence: photograph about K more fields": fewer red cells than
  the minimum, or no field could be read. K is from the red cells per readable
  field of this slide (a typical 100x field when none was readable).

Why "cells to review": a field model calls some cells parasitized on every
slide, with or without parasites (white-cell pieces, lysed cells, stain
deposits; `malaria-field` 1.3.0: about 4 in 1,000 red cells on a block it
never saw). On a clean slide of 2,000 red cells that is ~8 calls, so "any
call is positive" would call every negative slide positive. With the
model's measured false-call rate (`FalseCalls`: false calls among red cells
on held-out slides), "parasites seen" needs more calls than a clean slide of
this many red cells gives 99 times in 100 at the upper 95% bound of that
rate (`FalseCalls.limit`). Fewer go to a person. A model without a measured
rate keeps the strict reading: any call is "parasites seen".

Parasite density (parasites/µL) is reported on ONE basis, named beside the
figure, with an exact Poisson 95% interval on the parasite count:
- per red cell x the patient's red cells/µL (`rbc_per_ul`), the thin film's
  own denominator; or
- per white cell counted on the same fields x white cells/µL, the patient's
  measured count when given, else WHO's assumed 8,000/µL.
When both are given the per-red-cell figure is reported and the other is
kept as `alternative`, labelled, never as a second unlabelled density.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

# Thin-film counting rules: the red cells a reader counts before calling a film negative or quoting a
# density. "who-2000" (default): the WHO/TDR methods manual "Microscopy for the detection, identification and
# quantification of malaria parasites on stained thick and thin blood films in research settings" (2015,
# ISBN 978 92 4 154921 9) counts parasites on the thin film against red cells; a single read against 2,000
# red cells lands closer to the true density than one against 1,000 (Malaria Journal 2020,
# doi:10.1186/s12936-020-03352-z, table 3, simulated at 5 x 10^6 RBC/µL). "who-1000": the shorter count the
# same sources compare, for a quick screen; its negatives are weaker. Each entry: (red cells, reference).
COUNTING_RULES: dict[str, tuple[int, str]] = {
    "who-2000": (2000, "WHO/TDR malaria microscopy methods manual (2015): thin-film count against 2,000 red "
                       "cells; Malaria J 2020, doi:10.1186/s12936-020-03352-z"),
    "who-1000": (1000, "thin-film count against 1,000 red cells, the shorter count compared with 2,000 in "
                       "Malaria J 2020, doi:10.1186/s12936-020-03352-z (a quicker screen, weaker negatives)"),
}
DEFAULT_RULE = "who-2000"
# WHO's convention when the patient's white cell count was not measured: 8,000 white cells per microlitre.
WHO_WBC_PER_UL = 8000.0
# Red cells per microlitre assumed when the patient's was not measured (an adult's typical count; the figure the
# module docstring's sensitivity uses). Anaemia, common with malaria, makes a density on it too high: the report
# names it as assumed.
ASSUMED_RBC_PER_UL = 5_000_000.0
# Red cells in one 100x field when no field of the slide could be read: the 89 shared IML-Malaria fields
# (1280x960, 100x oil) hold 10,613 annotated boxes, ~119 a field; 100 keeps the "photograph K more" honest
# for a thinner film.
TYPICAL_RBC_PER_FIELD = 100
CONFIDENCE = 0.95

DECISIONS = ("parasites seen", "cells to review", "no parasites seen", "not enough evidence")
# A clean slide reads "parasites seen" at most this often, at the upper bound of the model's false-call rate.
FALSE_CALL_ALPHA = 0.01


def min_cells_for(rule: str = DEFAULT_RULE, min_cells: int | None = None) -> int:
    """The minimum red cells before a negative call: `min_cells` when given, else the rule's.

    Raises:
        ValueError: an unknown rule (the message lists the known ones) or a minimum below 1.
    """
    if rule not in COUNTING_RULES:
        raise ValueError(f"unknown counting rule {rule!r}; known: {', '.join(COUNTING_RULES)}")
    if min_cells is not None and min_cells < 1:
        raise ValueError(f"the minimum red cells must be at least 1, got {min_cells}")
    return COUNTING_RULES[rule][0] if min_cells is None else int(min_cells)


def _poisson_cdf(k: int, mu: float) -> float:
    """P(X <= k) for X ~ Poisson(mu), summed in log space (exact for the counts a slide gives)."""
    if mu <= 0:
        return 1.0
    terms = [i * math.log(mu) - mu - math.lgamma(i + 1) for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def _solve(f, lo: float, hi: float) -> float:
    """The root of a decreasing f on [lo, hi] by bisection (80 halvings: far below any printed digit)."""
    for _ in range(80):
        mid = (lo + hi) / 2
        if f(mid) > 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def poisson_interval(k: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Exact (Garwood) two-sided interval for a Poisson mean after observing `k` events.

    Lower: the mean at which P(X >= k) = alpha/2 (0 when k = 0); upper: the mean at which P(X <= k) = alpha/2.
    For k = 0 the 95% upper bound is 3.689, for k = 1 (0.0253, 5.572), for k = 10 (4.795, 18.39).
    The same figures as chi2.ppf(alpha/2, 2k)/2 and chi2.ppf(1 - alpha/2, 2k + 2)/2, without scipy.
    """
    if k < 0 or int(k) != k:
        raise ValueError(f"a count must be a whole number >= 0, got {k}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    k = int(k)
    a = (1 - confidence) / 2
    hi = k + 10 * math.sqrt(k + 1) + 10
    upper = _solve(lambda mu: _poisson_cdf(k, mu) - a, 0.0, hi)
    # P(X >= k) grows with the mean: a - P(X >= k) falls, as _solve expects.
    lower = 0.0 if k == 0 else _solve(lambda mu: a - (1 - _poisson_cdf(k - 1, mu)), 0.0, hi)
    return lower, upper


@dataclasses.dataclass(frozen=True)
class Density:
    """Parasites per microlitre on one basis, with its exact Poisson 95% interval.

    Attributes:
        per_ul: the estimate (parasites/µL).
        low_per_ul, high_per_ul: the 95% interval on it (from the parasite count alone).
        basis: how it was computed, in words, e.g. "12 parasitized of 2,104 red cells x 5,000,000 RBC/µL (given)".
        method: "rbc" or "wbc".
    """

    per_ul: float
    low_per_ul: float
    high_per_ul: float
    basis: str
    method: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def density_from_rbc(parasitized: int, red_cells: int, rbc_per_ul: float, measured: bool = True) -> Density | None:
    """parasitized / red cells x RBC/µL; None when no red cell was counted. `measured`: the patient's own count
    (the basis says "given"), else an assumed one such as ASSUMED_RBC_PER_UL (the basis says so)."""
    if red_cells <= 0:
        return None
    lo, hi = poisson_interval(parasitized)
    f = rbc_per_ul / red_cells
    source = "given" if measured else "assumed, not measured"
    return Density(round(parasitized * f), round(lo * f), round(hi * f),
                   f"{parasitized} parasitized of {red_cells:,} red cells x {rbc_per_ul:,.0f} red cells/µL ({source})",
                   "rbc")


def density_from_wbc(parasitized: int, wbc_count: int, wbc_per_ul: float | None = None) -> Density | None:
    """parasitized / white cells counted x WBC/µL (WHO's 8,000/µL when the patient's was not measured)."""
    if wbc_count <= 0:
        return None
    measured = wbc_per_ul is not None
    per = WHO_WBC_PER_UL if wbc_per_ul is None else wbc_per_ul
    lo, hi = poisson_interval(parasitized)
    f = per / wbc_count
    source = "measured" if measured else "WHO's assumed value, not measured"
    return Density(round(parasitized * f), round(lo * f), round(hi * f),
                   f"{parasitized} parasitized per {wbc_count:,} white cells counted x {per:,.0f} white cells/µL "
                   f"({source})", "wbc")


@dataclasses.dataclass(frozen=True)
class FalseCalls:
    """How often a model calls a red cell parasitized where there is no parasite: what a clean slide shows.

    Attributes:
        calls: sure parasitized calls on cells or regions holding no parasite, counted on slides the model never
            saw (uninfected cells plus regions that are no annotated cell: `benchmarks smear`'s false calls).
        red_cells: the red cells those slides counted.
        source: where the count comes from, e.g. "malaria-field 1.3.0: leave-one-block-out, blocks A, B".
    """

    calls: int
    red_cells: int
    source: str

    def __post_init__(self) -> None:
        if self.calls < 0 or self.red_cells <= 0 or self.calls > self.red_cells:
            raise ValueError(f"false calls need 0 <= calls <= red cells and red cells > 0; got {self.calls} of "
                             f"{self.red_cells}")

    @property
    def per_1000(self) -> float:
        return 1000.0 * self.calls / self.red_cells

    @property
    def upper_per_1000(self) -> float:
        """The one-sided 95% upper bound of the rate (exact Poisson): a slide from another lab is not assumed
        to do better than the slides it was measured on."""
        return 1000.0 * poisson_interval(self.calls, 0.90)[1] / self.red_cells

    def expected(self, red_cells: int) -> float:
        """False calls a clean slide of `red_cells` gives at the rate's upper bound."""
        return self.upper_per_1000 * red_cells / 1000.0

    def limit(self, red_cells: int, alpha: float = FALSE_CALL_ALPHA) -> int:
        """The most parasitized calls a clean slide of `red_cells` gives, but for `alpha` of the time: the
        smallest q with P(X <= q) >= 1 - alpha, X ~ Poisson(expected(red_cells))."""
        mu, q = self.expected(red_cells), 0
        while _poisson_cdf(q, mu) < 1 - alpha:
            q += 1
        return q

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "per_1000": round(self.per_1000, 3),
                "upper_per_1000": round(self.upper_per_1000, 3)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FalseCalls:
        return cls(int(d["calls"]), int(d["red_cells"]), str(d["source"]))

    @classmethod
    def given(cls, per_1000: float, source: str = "given") -> FalseCalls:
        """A rate a site measured itself (per 1,000 red cells), taken as if counted among 10,000 red cells."""
        if not 0 <= per_1000 < 1000:
            raise ValueError(f"a false-call rate is between 0 and 1000 per 1,000 red cells, got {per_1000}")
        return cls(round(per_1000 * 10), 10_000, f"{source}: {per_1000:g} per 1,000 red cells")


@dataclasses.dataclass(frozen=True)
class SlideDecision:
    """What a slide report says, and on what evidence.

    Attributes:
        decision: one of DECISIONS.
        message: the sentence a health worker reads, e.g. "no parasites seen in 2,104 red cells".
        red_cells: red cells counted on the readable fields (confident and uncertain).
        parasitized: cells called parasitized (uncertain ones are not).
        uncertain: cells the model could not vouch for.
        min_cells, rule, reference: the counting rule applied and where it comes from.
        fields, readable_fields: photographed, and passed the quality gate with cells counted.
        more_fields: for "not enough evidence", about how many more fields to photograph (else 0).
        parasitemia_percent: parasitized / red cells, with `parasitemia_low/high_percent` its 95% interval.
        density: the one reported parasites/µL (None without --rbc-per-ul or --wbc-count); `alternative` the
            other basis when both were given.
        confirmed: parasitized cells a person confirmed in review (0 for the machine's own decision).
        false_calls: the model's false-call rate the decision weighed the calls against (None: not known, so
            any call is "parasites seen"); `false_call_limit` the most calls a clean slide of this size gives.
    """

    decision: str
    message: str
    red_cells: int
    parasitized: int
    uncertain: int
    min_cells: int
    rule: str
    reference: str
    fields: int
    readable_fields: int
    more_fields: int = 0
    parasitemia_percent: float | None = None
    parasitemia_low_percent: float | None = None
    parasitemia_high_percent: float | None = None
    density: Density | None = None
    alternative: Density | None = None
    confirmed: int = 0
    false_calls: FalseCalls | None = None
    false_call_limit: int | None = None

    @property
    def negative(self) -> bool:
        return self.decision == "no parasites seen"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["density"] = self.density.to_dict() if self.density else None
        d["alternative"] = self.alternative.to_dict() if self.alternative else None
        d["false_calls"] = self.false_calls.to_dict() if self.false_calls else None
        return d


def more_fields_needed(red_cells: int, readable_fields: int, min_cells: int) -> int:
    """About how many more fields reach `min_cells`, at this slide's red cells per readable field."""
    missing = max(0, min_cells - red_cells)
    if missing == 0:
        return 0
    per_field = red_cells / readable_fields if readable_fields and red_cells else TYPICAL_RBC_PER_FIELD
    return max(1, math.ceil(missing / max(per_field, 1.0)))


def decide(parasitized: int, uncertain: int, red_cells: int, readable_fields: int, fields: int,
           min_cells: int | None = None, rule: str = DEFAULT_RULE, rbc_per_ul: float | None = None,
           wbc_count: int | None = None, wbc_per_ul: float | None = None, false_calls: FalseCalls | None = None,
           confirmed: int = 0) -> SlideDecision:
    """The slide decision from its counts (see the module docstring for the rules).

    Args:
        parasitized, uncertain: cells called so on the readable fields.
        red_cells: every red cell classified on the readable fields (parasitized, uninfected and uncertain).
        readable_fields, fields: fields that passed the quality gate, and all fields photographed.
        min_cells: red cells needed before a negative call (None: the rule's).
        rule: a key of COUNTING_RULES.
        rbc_per_ul: the patient's red cells per µL, for a density per red cell.
        wbc_count: white cells counted over the same fields, for a density per white cell.
        wbc_per_ul: the patient's measured white cells per µL (None: WHO's 8,000).
        false_calls: the model's measured false-call rate (None: unknown; any call is then "parasites seen").
        confirmed: of the parasitized, cells a person confirmed in review: one is a parasite seen, whatever the
            model's false calls.

    Raises:
        ValueError: an unknown rule, negative counts, or more parasitized/uncertain cells than red cells.
    """
    need = min_cells_for(rule, min_cells)
    for name, v in (("parasitized", parasitized), ("uncertain", uncertain), ("red_cells", red_cells),
                    ("readable_fields", readable_fields), ("fields", fields)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if parasitized + uncertain > red_cells:
        raise ValueError(f"{parasitized} parasitized + {uncertain} uncertain cells exceed the {red_cells} red cells")
    if readable_fields > fields:
        raise ValueError(f"{readable_fields} readable fields of only {fields}")
    if not 0 <= confirmed <= parasitized:
        raise ValueError(f"{confirmed} confirmed parasites must be between 0 and the {parasitized} parasitized")
    more = 0
    limit = false_calls.limit(red_cells) if false_calls is not None else None
    if confirmed > 0:
        decision, message = "parasites seen", (f"parasites seen: {parasitized} parasitized of {red_cells:,} red "
                                               f"cells, {confirmed} confirmed in review")
    elif parasitized > 0 and (limit is None or parasitized > limit):
        decision, message = "parasites seen", f"parasites seen: {parasitized} parasitized of {red_cells:,} red cells"
        if limit is not None:
            message += f" (a slide without parasites gives up to {limit})"
    elif parasitized > 0:
        more = more_fields_needed(red_cells, readable_fields, need)
        decision = "cells to review"
        message = (f"cells to review: {parasitized} called parasitized of {red_cells:,} red cells, no more than "
                   f"this model calls on a slide without parasites (up to {limit}); check them before calling "
                   "the slide" + (f", and photograph about {more} more field{'s' * (more != 1)}" if more else ""))
    elif readable_fields == 0 or red_cells < need:
        more = more_fields_needed(red_cells, readable_fields, need)
        why = ("no field could be read" if readable_fields == 0 and fields
               else "no field photographed" if not fields
               else f"{red_cells:,} red cells counted, {need:,} needed")
        decision = "not enough evidence"
        message = f"not enough evidence: photograph about {more} more field{'s' * (more != 1)} ({why})"
    else:
        decision, message = "no parasites seen", f"no parasites seen in {red_cells:,} red cells"
    pct = lo_pct = hi_pct = None
    if red_cells:
        lo, hi = poisson_interval(parasitized)
        pct = round(100.0 * parasitized / red_cells, 3)
        lo_pct, hi_pct = round(100.0 * lo / red_cells, 3), round(min(100.0, 100.0 * hi / red_cells), 3)
    by_rbc = density_from_rbc(parasitized, red_cells, rbc_per_ul) if rbc_per_ul else None
    by_wbc = density_from_wbc(parasitized, wbc_count, wbc_per_ul) if wbc_count else None
    # The thin film's own denominator first: it needs no assumed white-cell density.
    reported, alternative = (by_rbc, by_wbc) if by_rbc is not None else (by_wbc, None)
    return SlideDecision(decision=decision, message=message, red_cells=red_cells, parasitized=parasitized,
                         uncertain=uncertain, min_cells=need, rule=rule if min_cells is None else "given",
                         reference=COUNTING_RULES[rule][1] if min_cells is None else
                         f"--min-cells {need} (given; the default rule {rule}: {COUNTING_RULES[rule][1]})",
                         fields=fields, readable_fields=readable_fields, more_fields=more,
                         parasitemia_percent=pct, parasitemia_low_percent=lo_pct, parasitemia_high_percent=hi_pct,
                         density=reported, alternative=alternative, confirmed=confirmed, false_calls=false_calls,
                         false_call_limit=limit)


def model_provenance(path, metadata: Any = None) -> dict[str, Any]:
    """{"name", "version", "sha256", "file"} of the model file that made a report.

    A file whose sha256 is in the package's registry (`edge_runtime.registry`) is named by its release (name and
    version); any other file by its metadata's model name and the toolchain version that exported it.
    """
    from pathlib import Path

    from edge_runtime import registry
    from edge_runtime.fileio import sha256_file

    path = Path(path)
    sha = sha256_file(path)
    try:
        release = next((r for r in registry.read_registry() if r.sha256 == sha), None)
    except registry.ReleaseError:
        release = None
    if release is not None:
        return {"name": release.name, "version": release.version, "sha256": sha, "file": path.name,
                "released": True}
    name = getattr(metadata, "model", None) or path.stem
    version = getattr(metadata, "medge_version", None) or "unreleased"
    return {"name": name, "version": f"unreleased (medge {version})" if version != "unreleased" else version,
            "sha256": sha, "file": path.name, "released": False}


def model_false_calls(path) -> FalseCalls | None:
    """The false-call rate the registry records for the release whose file this is (`metrics["false_calls"]`,
    measured on held-out slides when it was released); None for any other file or a release without one."""
    from pathlib import Path

    from edge_runtime import registry
    from edge_runtime.fileio import sha256_file

    try:
        sha = sha256_file(Path(path))
        release = next((r for r in registry.read_registry()
                        if sha in {r.sha256, *(f.sha256 for f in r.files)}), None)
    except (OSError, registry.ReleaseError):
        return None
    found = release.metrics.get("false_calls") if release is not None else None
    return FalseCalls.from_dict(found) if found else None


def decision_lines(d: SlideDecision | Mapping[str, Any]) -> list[str]:
    """The decision as a person reads it: the sentence, the counting rule, parasitemia and the one density."""
    d = d.to_dict() if isinstance(d, SlideDecision) else d
    head, _, rest = d["message"].partition(":")
    # The call in capitals unless it is a negative: what must be acted on (refer, retake) stands out.
    lines = [d["message"] if d["decision"] == "no parasites seen" else head.upper() + ":" + rest]
    lines.append(f"counting rule: at least {d['min_cells']:,} red cells before a negative call ({d['reference']})")
    lines.append(f"fields readable: {d['readable_fields']} of {d['fields']}")
    fc = d.get("false_calls")
    if fc:
        lines.append(f"model's false parasitized calls: {fc['per_1000']:.1f} per 1,000 red cells without a parasite "
                     f"(upper 95% bound {fc['upper_per_1000']:.1f}; {fc['source']})" + (
                         f"; a slide without parasites of {d['red_cells']:,} red cells gives up to "
                         f"{d['false_call_limit']}" if d["red_cells"] else ""))
    else:
        lines.append("model's false parasitized calls: not measured, so every parasitized call counts as a parasite "
                     "seen")
    if d["parasitemia_percent"] is not None:
        lines.append(f"parasitemia (reported): {d['parasitemia_percent']:.3f}% "
                     f"(95% CI {d['parasitemia_low_percent']:.3f}-{d['parasitemia_high_percent']:.3f}%) "
                     f"of {d['red_cells']:,} red cells; "
                     f"{d['uncertain']} uncertain not counted as parasitized")
    den = d.get("density")
    if den:
        lines.append(f"parasites/µL (reported): {den['per_ul']:,.0f} (95% CI {den['low_per_ul']:,.0f}-"
                     f"{den['high_per_ul']:,.0f}); basis: {den['basis']}")
        alt = d.get("alternative")
        if alt:
            lines.append(f"  not reported, for comparison only: {alt['per_ul']:,.0f}/µL; basis: {alt['basis']}")
    return lines
