"""Slide-level scoring of `benchmarks smear` (pure arithmetic over per-field rows; no model, no image)."""

import pytest

from benchmarks.slides import bootstrap_ratio, slide_markdown, slide_rows, slide_summary, wilson


def _row(field, annotated=100, parasites=0, red=100, parasitized=0, uncertain=0, readable=True, error=None,
         stages=None, called=None):
    return {"field": field, "annotated": annotated, "annotated_parasites": parasites, "red_cells": red,
            "parasitized_cells": parasitized, "uncertain_cells": uncertain, "readable": readable, "error": error,
            "stage_annotated": stages or {}, "stage_called": called or {}}


def test_wilson_and_bootstrap_intervals():
    lo, hi = wilson(7, 7)
    assert hi == 1.0 and lo == pytest.approx(0.6457, abs=1e-3)  # 7 of 7 slides: still not "certainly 100%"
    assert wilson(0, 0) == (None, None)
    r, lo, hi = bootstrap_ratio([1, 9], [10, 10])
    assert r == 0.5 and lo == pytest.approx(0.1) and hi == pytest.approx(0.9)
    assert bootstrap_ratio([0], [0]) == (None, None, None)


def test_blocks_are_slides_and_refused_fields_do_not_count():
    rows = [_row("PA171700.JPG", parasites=2, parasitized=2, stages={"ring": 2}, called={"ring": 2}),
            _row("PA171701.JPG", parasitized=5, readable=False),  # refused: its 5 "parasites" are not counted
            _row("PA171790.JPG", red=2500),
            _row("PA171791.JPG", error="no cells found")]
    slides = slide_rows(rows)
    a, b = slides
    assert (a["slide"], a["fields"], a["fields_failed"], a["parasitized"], a["red_cells"]) == \
        ("PA171700", 2, 1, 2, 100)
    assert a["decision"] == "parasites seen" and a["detected"] and not a["false_negative"]
    assert a["parasitemia_estimated_percent"] == 2.0 and a["parasitemia_annotated_percent"] == 1.0
    assert a["parasitemia_within_25"] is False  # 2% against 1%
    assert b["decision"] == "no parasites seen" and b["fields_no_cells"] == 1 and b["ring_annotated"] == 0


def test_a_missed_parasite_slide_is_a_false_negative_only_past_the_minimum():
    few = slide_rows([_row("PA1.JPG", parasites=3, red=150)])[0]
    assert few["decision"] == "not enough evidence" and not few["false_negative"] and not few["detected"]
    many = slide_rows([_row("PA1.JPG", parasites=3, red=150)], min_cells=100)[0]
    assert many["decision"] == "no parasites seen" and many["false_negative"]


def test_summary_and_markdown():
    rows = [_row("PA171700.JPG", parasites=4, parasitized=4, red=400, annotated=400,
                 stages={"ring": 3, "schizont": 1}, called={"ring": 3}),
            _row("PA171790.JPG", parasites=2, red=100, stages={"ring": 2}, called={"ring": 1}),
            _row("PA171880.JPG", red=2100)]
    slides = slide_rows(rows)
    s = slide_summary(slides)
    assert (s["slides"], s["slides_with_parasites"], s["detection_sensitivity"]) == (3, 2, 0.5)
    assert s["parasitemia_within_25"] == 0.5  # 1% against 1% yes; 0% against 2% no
    assert s["ring_recall"] == pytest.approx(4 / 5) and s["schizont_recall"] == 0.0
    assert s["gametocyte_recall"] is None and s["not_enough_evidence_slides"] == 1
    md = slide_markdown(slides, s)
    assert "| PA171700 | 1 (0) | 400 | 4 / 0 | 4 | parasites seen: 4 parasitized of 400 red cells |" in md
    assert "ring recall" in md and "50.0% (" in md


def test_the_shared_sets_seven_blocks_are_seven_slides():
    names = [f"PA{n}.JPG" for n in [*range(171960, 171975), *range(171990, 172002), *range(171700, 171711)]]
    slides = slide_rows([_row(n) for n in names])
    assert [(s["slide"], s["fields"]) for s in slides] == [("PA171700", 11), ("PA171960", 15), ("PA171990", 12)]
