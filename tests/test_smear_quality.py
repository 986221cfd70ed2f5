"""The per-field quality gate: each check refuses with what to do, a good field passes (issue 23 item 4)."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_runtime.smear.quality import LIMITS, FieldMeasures, FieldQuality, gate, measure, quality_dict, unreadable

FIELDS = Path(__file__).resolve().parent / "data" / "iml_malaria_sample" / "fields"
# A sharp, well-exposed field as the shared IML fields measure (PA171700: focus 0.43, contrast 0.33, ...).
GOOD = FieldMeasures(focus=0.43, clipped=0.001, background=224.0, contrast=0.33, red_cells=160, clump_share=0.01,
                     size_cv=0.21, fragment_share=0.07)


def test_a_good_field_is_readable():
    q = gate(GOOD)
    assert q.readable and q.reasons == () and q.message == "readable"


@pytest.mark.parametrize("change, words", [
    (dict(focus=0.02), "out of focus"),
    (dict(clipped=0.5), "over-exposed"),
    (dict(background=30.0), "too dark"),
    (dict(contrast=0.03), "cells barely visible"),
    (dict(red_cells=4), "too few red cells (4)"),
    (dict(clump_share=0.8), "too crowded"),
    (dict(size_cv=1.2), "could not be separated"),
    (dict(fragment_share=0.7), "could not be separated"),
    (dict(noise=9.0), "too grainy"),
])
def test_each_failing_check_refuses_with_what_to_do(change, words):
    q = gate(dataclasses.replace(GOOD, **change))
    assert not q.readable and len(q.reasons) == 1 and words in q.reasons[0]
    assert q.message.startswith("can't read this field: retake (") and words in q.message
    assert "; " in q.reasons[0]  # every reason says what to change at the microscope after the semicolon


def test_a_faint_field_is_not_also_called_soft():
    # Focus is relative to contrast: with the cells barely visible, "turn the focus" would send the user wrong.
    q = gate(dataclasses.replace(GOOD, contrast=0.02, focus=0.01))
    assert [r.split(" (")[0] for r in q.reasons] == ["cells barely visible"]


def test_unreadable_and_dicts():
    q = unreadable("no cells found (a greyscale image, not a stained smear)")
    assert not q.readable and q.measures is None and "greyscale" in q.message
    d = quality_dict(gate(GOOD))
    assert d["readable"] and d["measures"]["red_cells"] == 160 and quality_dict(d) == d and quality_dict(None) is None
    assert isinstance(q, FieldQuality)


@pytest.fixture(scope="module")
def field() -> np.ndarray:
    return np.asarray(Image.open(FIELDS / "PA171704.JPG").convert("RGB"))


def _gate(rgb):
    from edge_runtime.smear import segment

    return gate(measure(segment(rgb, "test")))


def test_a_real_field_passes_and_its_blurred_and_darkened_copies_do_not(field):
    import cv2

    good = _gate(field)
    assert good.readable, good.message
    soft = _gate(cv2.GaussianBlur(field, (0, 0), 8))
    assert not soft.readable and any("out of focus" in r for r in soft.reasons)
    assert soft.measures.focus < good.measures.focus / 4
    dark = _gate((field * 0.2).astype(np.uint8))
    assert not dark.readable and any("too dark" in r for r in dark.reasons)


def test_a_grainy_copy_is_refused_and_the_field_itself_is_not(field):
    """Sensor noise as the domain-shift harness adds it (sigma 8 at mid-grey): refused as grainy; the JPEG field
    itself measures a fraction of a grey level."""
    from train.fieldaug import noise

    clean = _gate(field)
    assert clean.measures.noise < 1.0 and not any("grainy" in r for r in clean.reasons)
    grainy = _gate(noise(field, 8.0, seed=0))
    assert not grainy.readable and any("too grainy" in r for r in grainy.reasons), grainy.reasons
    assert grainy.measures.noise > LIMITS.max_noise


def test_focus_hardly_depends_on_magnification(field):
    import cv2

    small = cv2.resize(field, None, fx=0.6, fy=0.6, interpolation=cv2.INTER_AREA)
    a, b = _gate(field).measures.focus, _gate(small).measures.focus
    assert b == pytest.approx(a, rel=0.25) and _gate(small).readable


def test_limits_are_a_frozen_record():
    with pytest.raises(dataclasses.FrozenInstanceError):
        LIMITS.min_focus = 0.0
    assert set(LIMITS.to_dict()) >= {"min_focus", "max_clipped", "min_contrast", "max_fragment_share"}
