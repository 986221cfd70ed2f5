"""The slide decision, its counting rule, densities and intervals (pure functions: no model, no image)."""

import math

import pytest

from edge_runtime.smear.decision import (
    COUNTING_RULES,
    DECISIONS,
    DEFAULT_RULE,
    TYPICAL_RBC_PER_FIELD,
    WHO_WBC_PER_UL,
    FalseCalls,
    decide,
    decision_lines,
    density_from_rbc,
    density_from_wbc,
    min_cells_for,
    model_provenance,
    more_fields_needed,
    poisson_interval,
)


@pytest.mark.parametrize("k, low, high", [(0, 0.0, 3.6889), (1, 0.02532, 5.5716), (2, 0.24221, 7.2247),
                                          (10, 4.7954, 18.3904), (57, 43.1712, 73.8501)])
def test_poisson_interval_matches_the_exact_garwood_values(k, low, high):
    # Reference values: chi2.ppf(0.025, 2k) / 2 and chi2.ppf(0.975, 2k + 2) / 2 (scipy 1.17).
    lo, hi = poisson_interval(k)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)


def test_poisson_interval_agrees_with_scipy_where_it_is_installed():
    stats = pytest.importorskip("scipy.stats")
    for k in (3, 25, 300):
        lo, hi = poisson_interval(k, 0.9)
        assert lo == pytest.approx(stats.chi2.ppf(0.05, 2 * k) / 2, rel=1e-9)
        assert hi == pytest.approx(stats.chi2.ppf(0.95, 2 * k + 2) / 2, rel=1e-9)


@pytest.mark.parametrize("bad", [-1, 1.5])
def test_poisson_interval_refuses_a_count_that_is_not_one(bad):
    with pytest.raises(ValueError, match="whole number"):
        poisson_interval(bad)


def test_the_default_rule_is_a_published_thin_film_count_with_its_reference():
    need, reference = COUNTING_RULES[DEFAULT_RULE]
    assert need == 2000 and "WHO" in reference and "doi:" in reference
    assert min_cells_for() == 2000 and min_cells_for("who-1000") == 1000 and min_cells_for(min_cells=300) == 300
    with pytest.raises(ValueError, match="who-2000"):
        min_cells_for("bsh-9")
    with pytest.raises(ValueError, match="at least 1"):
        min_cells_for(min_cells=0)


def test_without_a_measured_false_call_rate_any_call_is_a_parasite_seen():
    d = decide(parasitized=1, uncertain=0, red_cells=40, readable_fields=1, fields=1)
    assert d.decision == "parasites seen" and d.message.startswith("parasites seen: 1 parasitized of 40")
    assert d.false_calls is None and "not measured" in " ".join(decision_lines(d))


def test_false_call_limit_is_the_poisson_quantile_at_the_rates_upper_bound():
    """The most calls a clean slide gives 99 times in 100, at the one-sided 95% upper bound of the measured rate
    (7 false calls in 1,748 red cells: 4.0 per 1,000, bound 7.5): scipy's Poisson quantile where installed."""
    f = FalseCalls(7, 1748, "fold")
    assert f.per_1000 == pytest.approx(4.0046, abs=1e-4)
    assert f.upper_per_1000 == pytest.approx(1000 * poisson_interval(7, 0.90)[1] / 1748)
    assert f.upper_per_1000 == pytest.approx(7.5218, abs=1e-3)
    assert [f.limit(n) for n in (500, 1000, 2000)] == [9, 15, 25]
    stats = pytest.importorskip("scipy.stats")
    for n in (100, 733, 2000, 6000):
        assert f.limit(n) == int(stats.poisson.ppf(0.99, f.expected(n)))
    assert FalseCalls.from_dict(f.to_dict()) == f and f.to_dict()["upper_per_1000"] == pytest.approx(7.522)
    assert FalseCalls.given(4.0).per_1000 == 4.0 and "4 per 1,000" in FalseCalls.given(4.0).source
    for bad in ((-1, 10), (5, 0), (11, 10)):
        with pytest.raises(ValueError, match="false calls"):
            FalseCalls(*bad, "x")


def test_calls_a_clean_slide_would_give_go_to_review_never_to_negative():
    """With the model's false-call rate, a slide is "parasites seen" only with more calls than a clean slide of
    its size gives; fewer are "cells to review" (refer, never negative); a person's confirmation is a parasite
    seen at any count."""
    f = FalseCalls(7, 1748, "fold")
    at = decide(parasitized=25, uncertain=3, red_cells=2000, readable_fields=15, fields=15, false_calls=f)
    assert at.decision == "cells to review" and at.false_call_limit == 25 and not at.negative
    assert at.message == ("cells to review: 25 called parasitized of 2,000 red cells, no more than this model calls "
                          "on a slide without parasites (up to 25); check them before calling the slide")
    over = decide(parasitized=26, uncertain=3, red_cells=2000, readable_fields=15, fields=15, false_calls=f)
    assert over.decision == "parasites seen" and over.message.endswith("(a slide without parasites gives up to 25)")
    short = decide(parasitized=2, uncertain=0, red_cells=500, readable_fields=4, fields=4, false_calls=f)
    assert short.decision == "cells to review" and short.more_fields == 12 and "about 12 more fields" in short.message
    seen = decide(parasitized=2, uncertain=0, red_cells=500, readable_fields=4, fields=4, false_calls=f, confirmed=1)
    assert seen.decision == "parasites seen" and seen.message.endswith("1 confirmed in review")
    clean = decide(parasitized=0, uncertain=0, red_cells=2000, readable_fields=15, fields=15, false_calls=f)
    assert clean.decision == "no parasites seen"
    lines = decision_lines(at)
    assert lines[0].startswith("CELLS TO REVIEW: 25 called") and any("calls: 4.0 per 1,000" in x for x in lines)
    with pytest.raises(ValueError, match="confirmed"):
        decide(parasitized=1, uncertain=0, red_cells=500, readable_fields=4, fields=4, confirmed=2)


def test_negative_only_past_the_minimum_and_says_how_many_cells():
    d = decide(parasitized=0, uncertain=3, red_cells=2104, readable_fields=18, fields=19)
    assert d.decision == "no parasites seen" and d.negative
    assert d.message == "no parasites seen in 2,104 red cells" and d.more_fields == 0
    # 0 of 2,104: the 95% upper bound is 3.689 / 2,104 = 0.175%, not 0.
    assert d.parasitemia_percent == 0 and d.parasitemia_high_percent == pytest.approx(0.175, abs=1e-3)


@pytest.mark.parametrize("cells, readable, fields, why", [
    (0, 0, 4, "no field could be read"),          # every field failed: never "no parasites"
    (0, 0, 0, "no field photographed"),
    (1999, 17, 17, "1,999 red cells counted, 2,000 needed"),
    (163, 1, 1, "163 red cells counted"),         # the green "No parasites seen in 163 red cells"
])
def test_too_little_evidence_is_never_negative(cells, readable, fields, why):
    d = decide(parasitized=0, uncertain=0, red_cells=cells, readable_fields=readable, fields=fields)
    assert d.decision == "not enough evidence" and not d.negative
    assert d.message.startswith("not enough evidence: photograph about ") and why in d.message
    assert d.more_fields >= 1


def test_more_fields_from_this_slides_cells_per_field():
    assert more_fields_needed(1000, 10, 2000) == 10      # 100 a field, 1000 missing
    assert more_fields_needed(1500, 10, 2000) == 4       # 150 a field: 500 / 150 -> 4
    assert more_fields_needed(2000, 10, 2000) == 0
    assert more_fields_needed(0, 0, 2000) == math.ceil(2000 / TYPICAL_RBC_PER_FIELD)


def test_a_given_minimum_is_named_as_given():
    d = decide(parasitized=0, uncertain=0, red_cells=600, readable_fields=5, fields=5, min_cells=500)
    assert d.decision == "no parasites seen" and d.rule == "given" and "--min-cells 500" in d.reference


def test_every_decision_is_one_of_four():
    for p, c, r in [(0, 0, 0), (0, 5000, 40), (2, 5000, 40), (0, 10, 1)]:
        assert decide(p, 0, c, r, max(r, 1)).decision in DECISIONS


@pytest.mark.parametrize("kwargs, match", [
    (dict(parasitized=-1), "parasitized must be >= 0"),
    (dict(parasitized=5, uncertain=6, red_cells=10), "exceed the 10 red cells"),
    (dict(readable_fields=3, fields=2), "3 readable fields of only 2"),
])
def test_impossible_counts_are_refused(kwargs, match):
    args = dict(parasitized=0, uncertain=0, red_cells=10, readable_fields=1, fields=1) | kwargs
    with pytest.raises(ValueError, match=match):
        decide(**args)


def test_density_per_red_cell_with_its_basis_and_interval():
    d = density_from_rbc(parasitized=10, red_cells=2000, rbc_per_ul=5e6)
    assert d.method == "rbc" and d.per_ul == 25000
    assert (d.low_per_ul, d.high_per_ul) == (round(4.7954 * 2500), round(18.3904 * 2500))
    assert "10 parasitized of 2,000 red cells x 5,000,000 red cells/µL" in d.basis
    assert density_from_rbc(0, 0, 5e6) is None


def test_density_per_white_cell_says_whether_the_count_was_measured():
    assumed = density_from_wbc(parasitized=20, wbc_count=200)
    assert assumed.per_ul == 20 / 200 * WHO_WBC_PER_UL and "WHO's assumed" in assumed.basis
    measured = density_from_wbc(parasitized=20, wbc_count=200, wbc_per_ul=5000)
    assert measured.per_ul == 500 and "(measured)" in measured.basis


def test_one_density_is_reported_and_the_other_is_labelled():
    both = decide(3, 0, 2450, 13, 14, rbc_per_ul=5e6, wbc_count=20)
    assert both.density.method == "rbc" and both.alternative.method == "wbc"
    text = "\n".join(decision_lines(both))
    assert "parasites/µL (reported): 6,122" in text and "not reported, for comparison only: 1,200/µL" in text
    wbc_only = decide(3, 0, 2450, 13, 14, wbc_count=20)
    assert wbc_only.density.method == "wbc" and wbc_only.alternative is None
    assert decide(3, 0, 2450, 13, 14).density is None


def test_decision_lines_shout_only_what_is_not_a_negative():
    lines = decision_lines(decide(0, 0, 30, 1, 2))
    assert lines[0].startswith("NOT ENOUGH EVIDENCE: photograph about") and "fields readable: 1 of 2" in lines
    assert decision_lines(decide(0, 0, 3000, 20, 20).to_dict())[0] == "no parasites seen in 3,000 red cells"


def test_model_provenance_names_a_released_file_by_its_release(tmp_path):
    from edge_runtime import registry

    release = registry.read_registry()[0]
    p = model_provenance(release.path)
    assert (p["name"], p["version"], p["sha256"], p["released"]) == (release.name, release.version,
                                                                      release.sha256, True)
    other = tmp_path / "mine.tflite"
    other.write_bytes(b"not released")
    q = model_provenance(other)
    assert q["released"] is False and q["name"] == "mine" and len(q["sha256"]) == 64


def test_the_field_app_never_shows_a_green_negative_on_short_evidence():
    from edge_runtime.serve.analysis import malaria_headline, malaria_state

    def summary(parasitized, uncertain, cells, readable, fields, refer, unreadable=()):
        d = decide(parasitized, uncertain, cells, readable, fields).to_dict()
        return {"cells": cells, "parasitized": parasitized, "uncertain": uncertain, "refer": refer, "decision": d,
                "fields_unreadable": list(unreadable)}

    short = summary(0, 0, 163, 1, 1, None)  # the green "No parasites seen in 163 red cells"
    assert malaria_headline(short).startswith("Not enough evidence: photograph about")
    assert malaria_state(short) == "amber"
    none_read = summary(0, 0, 0, 0, 2, None)
    assert "No field could be read" in malaria_headline(none_read) and malaria_state(none_read) == "amber"
    enough = summary(0, 0, 2400, 20, 20, False)
    assert malaria_headline(enough) == ("No parasites seen in 2,400 red cells. 2,400 red cells counted (at least "
                                        "2,000 needed), none parasitized.") and malaria_state(enough) == "ok"
    refused = summary(0, 0, 2400, 20, 21, False, [{"field": "f.jpg", "reason": "can't read this field: retake"}])
    assert malaria_state(refused) == "amber"
    review = {**summary(2, 0, 300, 3, 3, True), "decision": decide(2, 0, 300, 3, 3, false_calls=FalseCalls(
        7, 1748, "fold")).to_dict()}
    assert malaria_headline(review).startswith("Cells to review: check the 2 flagged cells. 2 called parasitized "
                                               "of 300 red cells") and malaria_state(review) == "amber"
    seen = summary(2, 0, 300, 3, 3, True)
    assert malaria_headline(seen) == "Parasites seen: treat per protocol and refer. 2 parasitized of 300 red cells " \
                                     "counted." and malaria_state(seen) == "refer"


def test_the_field_app_report_says_what_to_do_and_what_the_figures_mean():
    from edge_runtime.serve.verdict import malaria_report

    def result(parasitized, uncertain, cells, fields=None, duplicates=()):
        sure = cells - uncertain
        summary = {"cells": cells, "parasitized": parasitized, "uncertain": uncertain,
                   "parasitemia_percent": round(100 * parasitized / sure, 2),
                   "parasitemia_min_percent": round(100 * parasitized / cells, 2),
                   "parasitemia_max_percent": round(100 * (parasitized + uncertain) / cells, 2),
                   "refer": bool(parasitized) or uncertain / cells > 0.05 or None,
                   "refer_reasons": [], "decision": decide(parasitized, uncertain, cells, 10, 10).to_dict()}
        return {"summary": summary, "fields": list(fields or []), "duplicates": list(duplicates)}

    high = malaria_report(result(60, 0, 2400), 2345.0)
    assert high["verdict"] == "Parasites seen: treat per protocol and refer" and high["state"] == "refer"
    assert high["parasitemia"][0]["value"].startswith("2.50% of red cells (95% CI 1.9")
    assert "high: " in high["parasitemia"][0]["meaning"]
    assert high["time"] == "Analysed in 2.3 s on the device." and "Refer: send the patient" in high["action"]
    severe = malaria_report(result(300, 0, 2400))["parasitemia"][0]["meaning"]
    assert "very high: over 10% is a sign of severe malaria (WHO 2015)" in severe
    # No parasite called, but 10% of the cells uncertain: red, never a negative, with the range they span.
    unsure = malaria_report(result(0, 240, 2400))
    assert unsure["verdict"] == "Cannot rule out parasites: refer" and unsure["state"] == "refer"
    assert unsure["parasitemia"][1]["value"] == "up to 10.00%"
    # Most cells uncertain: the figure is over every red cell counted, not over the few confident ones.
    few_sure = malaria_report(result(2, 156, 162))["parasitemia"]
    assert few_sure[0]["value"].startswith("1.24% of red cells (95% CI 0.15-4.46%)")
    assert "very high" not in few_sure[0]["meaning"]
    assert few_sure[1]["value"] == "up to 97.53%" and "very high" in few_sure[1]["meaning"]
    assert "At 10.00% it would be high" in unsure["parasitemia"][1]["meaning"]
    # A field the gate refused: its reason and index for the retake, and the negative turns amber.
    refused = {"name": "b.jpg", "photo": "field_01.jpg", "error": None, "readable": False,
               "unreadable_reason": "can't read this field: retake (out of focus)"}
    neg = malaria_report(result(0, 0, 2400, [{"name": "a.jpg", "error": None, "readable": True}, refused],
                                [{"name": "c.jpg", "same_as": "a.jpg"}]))
    assert neg["verdict"] == "No parasites seen in 2,400 red cells" and neg["state"] == "amber"
    assert neg["unread_fields"] == [{"field": 1, "name": "b.jpg", "photo": "field_01.jpg",
                                     "reason": "can't read this field: retake (out of focus)"}]
    assert neg["duplicates"] == ["Photo “c.jpg” is the same as photo “a.jpg”: counted once."]
    assert neg["progress"]["text"] == "2,400 red cells counted: the minimum of 2,000 is reached."
