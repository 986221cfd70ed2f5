"""benchmarks/shift.py: the domain-shift transforms and `benchmarks smear --shift`, on the bundled real fields."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("cv2", reason="the shift harness needs the `smear` extra (opencv-python-headless)")

from benchmarks.shift import BY_NAME, TRANSFORMS, resolve, shifted
from train.annotations import load_annotations

from helpers import ROOT

SMEAR_SAMPLE = ROOT / "tests" / "data" / "iml_malaria_sample"


@pytest.fixture(scope="module")
def field() -> tuple[dict, np.ndarray]:
    ann = load_annotations(SMEAR_SAMPLE, ["PA171704"])[0]
    return ann, np.asarray(Image.open(ann["image"]).convert("RGB"))


def test_resolve_names_all_and_refuses_unknown_names():
    assert [t.name for t in resolve("all")] == [t.name for t in TRANSFORMS]
    assert [t.name for t in resolve("blue_grey, scale_0.6")] == ["blue_grey", "scale_0.6"]
    with pytest.raises(ValueError, match="unknown --shift transform.*pinkish.*known: all, none, blue_grey"):
        resolve("blue_grey,pinkish")


def test_blue_grey_moves_the_stain_and_keeps_the_background(field):
    import cv2

    ann, rgb = field
    _, out = shifted(ann, rgb, BY_NAME["blue_grey"])
    lab0 = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(float)
    lab1 = cv2.cvtColor(out, cv2.COLOR_RGB2LAB).astype(float)
    bright = lab0[:, :, 0] >= np.percentile(lab0[:, :, 0], 90)
    cells = lab0[:, :, 0] <= np.percentile(lab0[:, :, 0], 30)
    assert np.abs(np.median(lab1[bright], 0) - np.median(lab0[bright], 0)).max() <= 3  # the lamp is unchanged
    # pink (a > background's) becomes blue (b below the background's, a no longer above it)
    bg = np.median(lab0[bright], 0)
    assert np.median(lab0[cells][:, 1]) - bg[1] > 5
    assert np.median(lab1[cells][:, 1]) - bg[1] < 2 and np.median(lab1[cells][:, 2]) - bg[2] < -3


def test_scaled_fields_scale_their_boxes_and_noise_is_fixed_per_field(field):
    ann, rgb = field
    a, out = shifted(ann, rgb, BY_NAME["scale_0.6"])
    assert out.shape[:2] == (round(rgb.shape[0] * 0.6), round(rgb.shape[1] * 0.6))
    assert a["boxes"][0] == pytest.approx([v * 0.6 for v in ann["boxes"][0]]) and ann["boxes"] is not a["boxes"]
    n1, n2 = (shifted(ann, rgb, BY_NAME["noise_8"])[1] for _ in range(2))
    assert (n1 == n2).all() and not (n1 == rgb).all()


def test_benchmark_shift_reports_one_row_per_transform(tmp_path, capsys):
    from benchmarks.smear import main

    assert main(["--data", str(SMEAR_SAMPLE), "--fields", "PA171704", "--shift", "none,jpeg_30",
                 "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "smear.json").read_text())
    assert [r["transform"] for r in report["shift"]] == ["none", "jpeg_30"]
    assert report["shift"][0]["summary"].items() >= report["summary"].items()  # "none" is the plain run
    assert 0.5 < report["shift"][1]["summary"]["cell_recall"] <= 1.0
    md = (tmp_path / "smear.md").read_text()
    assert "| jpeg_30 |" in md and "| transform | cell recall (all fields) |" in md
    assert main(["--data", str(SMEAR_SAMPLE), "--shift", "sepia", "--out", str(tmp_path)]) == 2
    assert "unknown --shift transform" in capsys.readouterr().err


def _recall(ann: dict, seg) -> float:
    from train.annotations import match

    return float(np.mean(match(ann["boxes"], [c.bbox for c in seg.cells]) >= 0))


@pytest.mark.parametrize("name", ["blue_grey", "grey_stain"])
def test_cells_are_found_whatever_the_stains_colour(field, name):
    """The release refused these as 'not stained pink or purple' (0 cells); cells are found along the stain's own OD."""
    from edge_runtime.smear import segment

    ann, rgb = field
    plain = segment(rgb, "plain")
    a, out = shifted(ann, rgb, BY_NAME[name])
    seg = segment(out, name)
    assert _recall(a, seg) >= 0.8 and _recall(a, seg) >= _recall(ann, plain) - 0.05
    assert abs(seg.counts()["rbc"] - plain.counts()["rbc"]) <= 0.1 * plain.counts()["rbc"]
    if name == "blue_grey":  # the field's white cell, whose nucleus is no longer purple (greyed: no colour tells it)
        assert seg.counts()["wbc"] >= 1


def test_burned_in_labels_and_scale_bars_are_never_cells(field):
    """Black print (the field's own "50 um" bar, a large label drawn over cells) is debris, never a red cell."""
    from PIL import ImageDraw, ImageFont

    from edge_runtime.smear import segment

    ann, rgb = field
    img = Image.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    draw.text((420, 420), "50 µm", fill=(0, 0, 0), font=ImageFont.load_default(size=48))
    draw.rectangle((420, 480, 570, 490), fill=(0, 0, 0))
    seg = segment(img, "labelled")
    print_ = np.asarray(img).max(axis=2) < 40
    for c in seg.cells:
        x, y, w, h = c.box
        if c.kind == "rbc":
            assert print_[y:y + h, x:x + w][c.mask].mean() < 0.02, f"cell {c.index} at {c.bbox} is mostly print"
    # the original photo's own scale bar (bottom right) is not a cell either
    bar = np.asarray(rgb).max(axis=2) < 40
    assert bar.sum() > 300
    for c in segment(rgb, "plain").cells:
        x, y, w, h = c.box
        if c.kind == "rbc":
            assert bar[y:y + h, x:x + w][c.mask].mean() < 0.02


def test_the_users_micrometres_per_pixel_set_the_cell_size(field):
    """With --um-per-px the typical radius is a red cell's 3.75 um, not an estimate; bad values say what to give."""
    from edge_runtime.smear import segment
    from edge_runtime.smear.cells import RBC_RADIUS_UM

    ann, rgb = field
    plain = segment(rgb, "plain")
    um = RBC_RADIUS_UM / plain.radius  # this field's scale, as a stage micrometer would give it
    a, small = shifted(ann, rgb, BY_NAME["scale_0.6"])
    seg = segment(small, "small", um_per_px=um / 0.6)
    assert seg.radius == pytest.approx(0.6 * plain.radius)
    assert _recall(a, seg) >= _recall(a, segment(small, "estimated")) - 0.02 and _recall(a, seg) >= 0.8
    with pytest.raises(ValueError, match="x: um_per_px must be a positive number.*got -1"):
        segment(rgb, "x", um_per_px=-1)
