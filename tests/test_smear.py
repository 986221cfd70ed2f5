"""edge_runtime.smear: cells from real field photos, crops, slide report, CLI, and the benchmark's matcher.

Runs in the main environment and in the edge-only one (`MEDGE_EDGE_ARTIFACTS`,
see tests/test_edge_runtime.py); skips where OpenCV (the `smear` extra) is not
installed, e.g. the legacy tflite-runtime environment of .ci/run.

The recall floor (>= 80% of annotated cells at IoU >= 0.5 on the two bundled
fields) guards against regressions; it is not a tuned target.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("cv2", reason="smear needs the `smear` extra (opencv-python-headless)")

from edge_runtime.clinical import REFER_UNCERTAIN_SHARE, slide_referral, slide_summary
from edge_runtime.model import Prediction
from edge_runtime.smear import (
    SlideReport,
    SlideSummary,
    SmearError,
    analyse_slide,
    crop,
    segment,
    write_report,
)
from edge_runtime.smear.decision import FalseCalls
from train.annotations import load_annotations, match

from helpers import MALARIA_FILES, ROOT, run_cli

SMEAR_SAMPLE = ROOT / "tests" / "data" / "iml_malaria_sample"
RECALL_FLOOR = 0.80


@pytest.fixture(scope="module")
def fields() -> list[Path]:
    return sorted((SMEAR_SAMPLE / "fields").glob("*.JPG"))


@pytest.fixture(scope="module")
def model(art):
    import edge_runtime

    return edge_runtime.load(art / MALARIA_FILES["tflite-int8"], threads=2)


def test_segmentation_finds_the_annotated_cells():
    found = []
    for ann in load_annotations(SMEAR_SAMPLE):
        seg = segment(Image.open(ann["image"]), ann["image"].name)
        found += (match(ann["boxes"], [c.bbox for c in seg.cells]) >= 0).tolist()
        assert seg.counts()["rbc"] > 50 and 20 < seg.radius < 50
        c = seg.cells[0]
        x, y, w, h = c.bbox
        assert c.mask.shape == (h, w) and c.area == int(c.mask.sum())
        arr = crop(seg, c)
        assert arr.dtype == np.uint8 and (arr[0] == 0).all()  # black margin, NIH-style
    assert np.mean(found) >= RECALL_FLOOR, f"{np.mean(found):.3f} of {len(found)} annotated cells found"


def test_matcher_is_one_to_one():
    truth = [[0, 0, 10, 10], [1, 1, 10, 10]]
    assert match(truth, [[0, 0, 10, 10]]).tolist() == [0, -1]
    assert match(truth, [[1, 1, 10, 10], [0, 0, 10, 10]]).tolist() == [1, 0]
    assert match(truth, []).tolist() == [-1, -1]
    assert match(truth, [[50, 50, 10, 10]]).tolist() == [-1, -1]


def test_benchmark_summary_reports_uncertain_uninfected_apart_from_false_positives():
    from train.annotations import summarise

    row = {"error": None, "annotated": 10, "found": 9, "annotated_parasites": 1, "parasites_found": 1,
           "count_error": 2, "segment_ms": 1.0, "total_ms": 2.0, "parasites_called": 1, "uninfected_found": 8,
           "uninfected_called_parasitized": 1, "uninfected_called_uncertain": 4, "flagged": True}
    s = summarise([row], with_model=True)
    assert s["uninfected_false_positive_rate"] == 1 / 8 and s["uninfected_uncertain_rate"] == 4 / 8


def test_benchmark_summary_says_what_the_gate_refused_and_what_collapsed_past_it():
    """A refused field flags nothing in the gate-aware figure; a field under 70% recall the gate passed is counted
    as a silent collapse, one it refused is not."""
    from train.annotations import summarise

    base = {"error": None, "annotated": 10, "annotated_parasites": 1, "parasites_found": 1, "count_error": 0,
            "segment_ms": 1.0, "total_ms": 2.0, "parasites_called": 1, "uninfected_found": 8,
            "uninfected_called_parasitized": 0, "uninfected_called_uncertain": 0, "flagged": True}
    rows = [{**base, "found": 10, "readable": True}, {**base, "found": 5, "readable": True},
            {**base, "found": 4, "readable": False}, {**base, "error": "not a smear"}]
    s = summarise(rows, with_model=True)
    assert s["fields_unreadable"] == 1 and s["fields_collapsed_silent"] == 1
    assert s["parasite_recall_called"] == 1.0  # the classifier on every analysed field
    assert s["parasite_recall_called_read"] == 2 / 4  # what the reports flag: refused and rejected fields flag none


def test_benchmark_counts_parasitized_calls_on_regions_that_are_no_annotated_cell(monkeypatch):
    """A region called parasitized that overlaps no annotated box is a false call (a white-cell piece, a ghost):
    counted beside the uninfected cells called parasitized, per 1,000 red cells; a region that is a parasite's
    cell split differently (overlapping its box) or an uncertain one is not."""
    from types import SimpleNamespace

    from train import annotations

    ann = {"image": Path("f.jpg"), "boxes": [[0, 0, 10, 10], [20, 0, 10, 10]], "types": ["ring", "red blood cell"],
           "parasite": [True, False]}
    cells = [{"bbox": [0, 0, 10, 10], "kind": "rbc", "label": "Parasitized", "uncertain": False, "confidence": 0.9},
             {"bbox": [20, 0, 10, 10], "kind": "rbc", "label": "Uninfected", "uncertain": False, "confidence": 0.9},
             {"bbox": [100, 100, 10, 10], "kind": "rbc", "label": "Parasitized", "uncertain": False, "confidence": 0.9},
             {"bbox": [3, 3, 10, 10], "kind": "rbc", "label": "Parasitized", "uncertain": False, "confidence": 0.9},
             {"bbox": [200, 200, 10, 10], "kind": "rbc", "label": "Parasitized", "uncertain": True, "confidence": 0.55},
             {"bbox": [300, 300, 10, 10], "kind": "wbc", "label": None, "uncertain": False, "confidence": None}]
    result = SimpleNamespace(error=None, cells=[SimpleNamespace(to_dict=lambda c=c: c) for c in cells],
                             segment_ms=1.0, quality=None)
    model = SimpleNamespace(metadata=SimpleNamespace(positive_label="Parasitized"))
    monkeypatch.setattr(annotations, "analyse_field", lambda *a, **k: result)
    row = annotations.measure_field(ann, model)
    assert row["parasites_called"] == 1 and row["uninfected_called_parasitized"] == 0
    assert row["off_target_called_parasitized"] == 1  # [100, 100]; [3, 3] overlaps the ring's box, [200, 200] unsure
    assert json.loads(json.dumps(row)) == row  # rows are written as JSON by field-cv and benchmarks smear
    # What a slide without the ring would still show: [100, 100] only ([3, 3] lies on the ring's box).
    assert row["parasitized_cells"] == 3 and row["calls_off_parasites"] == 1
    s = annotations.summarise([row], with_model=True)
    assert s["false_calls_per_1000_red_cells"] == 1000 * 1 / row["red_cells"] and row["red_cells"] == 5


def test_slides_without_their_parasites_are_decided_on_a_rate_measured_on_the_other_slides():
    """benchmarks.slides: each slide is decided twice (as it is, and with only the calls on no annotated parasite),
    and with held_out=True on the false-call rate of the other slides' fields only."""
    from benchmarks.slides import false_calls_of, slide_markdown, slide_rows, slide_summary

    def field(name, red, par, off, ann_par, readable=True):
        return {"field": name, "error": None, "readable": readable, "red_cells": red, "parasitized_cells": par,
                "uncertain_cells": 0, "calls_off_parasites": off, "annotated": red, "annotated_parasites": ann_par,
                "stage_annotated": {}, "stage_called": {}}

    rows = ([field(f"A{i}.jpg", 200, 3, 1, 2) for i in range(10)]  # 2,000 red cells, 30 calls, 10 off parasites
            + [field(f"B{i}.jpg", 200, 1, 1, 0) for i in range(10)]  # 10 calls, all off parasites
            + [field("B10.jpg", 200, 50, 50, 0, readable=False)])  # refused: not counted, not in any rate
    blocks = {r["field"]: r["field"][0] for r in rows}
    assert false_calls_of(rows, "x") == FalseCalls(20, 4000, "x")
    strict = slide_rows(rows, blocks=blocks)
    assert [s["decision"] for s in strict] == ["parasites seen", "parasites seen"]
    assert [s["clean_decision"] for s in strict] == ["parasites seen", "parasites seen"]
    held = slide_rows(rows, blocks=blocks, held_out=True)
    a, b = held
    assert a["false_calls_source"] == "held out: slides B" and a["false_calls_per_1000"] == 5.0
    assert a["false_call_limit"] == FalseCalls(10, 2000, "").limit(2000) == 27
    assert a["decision"] == "parasites seen" and a["calls_off_parasites"] == 10 and a["clean_decision"] == \
        "cells to review"
    assert b["decision"] == b["clean_decision"] == "cells to review" and b["false_calls_per_1000"] == 5.0
    summary = slide_summary(held)
    assert summary["clean_slides"] == {"parasites seen": 0, "cells to review": 2, "no parasites seen": 0,
                                       "not enough evidence": 0}
    assert summary["review_slides"] == 1 and summary["review_slides_with_parasites"] == 0
    md = slide_markdown(held, summary)
    assert "| 5.0 (8.5) | 10 calls: cells to review |" in md and "| 0 / 2 / 0 / 0 |" in md


def test_benchmark_threshold_table_reproduces_the_summary_at_the_models_bar(art, tmp_path):
    """`benchmarks smear --model` on the two bundled fields: per-cell probabilities of the matched cells make a
    threshold table whose row at the model's own bar is the summary; the CSV keeps one row per field."""
    import csv

    from benchmarks.smear import main

    model = art / MALARIA_FILES["tflite-int8"]
    assert main(["--data", str(SMEAR_SAMPLE), "--model", str(model), "--out", str(tmp_path), "--threads", "1",
                 "--threshold", "0.8"]) == 0
    report = json.loads((tmp_path / "smear.json").read_text())
    s, rows = report["summary"], report["fields"]
    at_bar = next(t for t in report["thresholds"] if t["threshold"] == 0.8)
    assert at_bar["false_positive_rate"] == pytest.approx(s["uninfected_false_positive_rate"])
    assert at_bar["uncertain_rate"] == pytest.approx(s["uninfected_uncertain_rate"])
    assert at_bar["parasite_recall_called"] == pytest.approx(s["parasite_recall_called"])
    assert 0 < sum(len(r["matched_cells"]) for r in rows) <= sum(r["uninfected_found"] + r["parasites_found"]
                                                                  for r in rows)  # classified ones: red cells
    low, high = report["thresholds"][0], report["thresholds"][-1]  # a higher bar: fewer sure, more uncertain
    assert high["uncertain_rate"] >= low["uncertain_rate"] and high["false_positive_rate"] <= low["false_positive_rate"]
    table = list(csv.DictReader(open(tmp_path / "smear.csv")))
    assert len(table) == 2 and "matched_cells" not in table[0]
    assert "| 0.8 |" in (tmp_path / "smear.md").read_text()


def _chain_field(spacing: float, r: int = 30) -> tuple[np.ndarray, list[list[float]]]:
    """A synthetic smear: ten isolated discs (the field's cell size) and a chain of three overlapping ones.

    Returns the photo and the chain's disc boxes; `spacing` is the chain's centre distance in radii.
    """
    import cv2

    img = np.full((480, 640, 3), (225, 232, 222), np.uint8)
    chain = [(200 + i * spacing * r, 240) for i in range(3)]
    for cx, cy in [(80 + i * 110, y) for y in (80, 400) for i in range(5)] + chain:
        cv2.circle(img, (int(round(cx)), cy), r, (190, 140, 165), -1, cv2.LINE_AA)
    img = cv2.GaussianBlur(img, (0, 0), 1.5)
    img = np.clip(img + np.random.default_rng(0).normal(0, 2, img.shape), 0, 255).astype(np.uint8)
    return img, [[cx - r, cy - r, 2 * r, 2 * r] for cx, cy in chain]


@pytest.mark.parametrize("spacing", [1.2, 1.4])
def test_a_chain_of_three_overlapping_cells_is_three_whole_cells(spacing):
    """Three overlapping discs in a row: three red cells, each boxed as its whole disc, the middle one too
    (the split alone leaves the middle cell its visible strip: IoU 0.57 at 1.2 radii); crops keep each
    cell's own part of the split, not the lens it shares with a neighbour."""
    from train.annotations import iou_matrix

    img, truth = _chain_field(spacing)
    seg = segment(img, "chain")
    chain = [c for c in seg.cells if 150 < c.bbox[1] + c.bbox[3] / 2 < 330]
    assert [c.kind for c in chain] == ["rbc"] * 3
    iou = iou_matrix(truth, [c.bbox for c in chain])
    assert (match(truth, [c.bbox for c in chain]) >= 0).all() and iou.max(axis=1).min() >= 0.75
    middle = chain[int(np.argmax(iou[1]))]
    assert (crop(seg, middle).max(axis=2) > 0).sum() < 0.8 * middle.mask.sum()


def _landscape(w: int = 640, h: int = 480) -> Image.Image:
    """A drawn landscape: sky, sun, green hills, a red house and round dark-green trees (cell-sized blobs)."""
    from PIL import ImageDraw

    rng = np.random.default_rng(0)
    sky = np.linspace([90, 150, 230], [200, 225, 250], h // 2).astype(np.uint8)
    img = Image.new("RGB", (w, h))
    img.paste(Image.fromarray(np.repeat(sky[:, None, :], w, 1)), (0, 0))
    d = ImageDraw.Draw(img)
    d.ellipse((w - 140, 30, w - 70, 100), fill=(255, 220, 80))
    d.polygon([(0, h // 2), (w // 3, h // 3), (2 * w // 3, h // 2), (w, h // 3), (w, h), (0, h)], fill=(60, 140, 60))
    d.rectangle((w // 5, h // 2, w // 5 + 90, h // 2 + 70), fill=(180, 60, 50))
    for _ in range(12):
        x, y = int(rng.integers(0, w)), int(rng.integers(h // 2, h - 40))
        d.ellipse((x - 18, y - 30, x + 18, y + 10), fill=(30, 90, 35))
    return img


def _oct_like(w: int = 640, h: int = 480) -> np.ndarray:
    """A greyscale OCT-like B-scan: speckled bright retinal layers on black."""
    rng = np.random.default_rng(1)
    y = np.arange(h)[:, None] - (h / 2 + 40 * np.sin(np.arange(w)[None, :] / 90))
    layers = sum(a * np.exp(-((y - o) / s) ** 2) for a, o, s in [(200, -60, 12), (120, -20, 25), (230, 30, 8)])
    return np.clip(layers * rng.gamma(2.0, 0.5, (h, w)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kind", ["blank", "black", "noise", "gradient", "oct", "oct_scan", "landscape", "tiny"])
def test_no_cells_is_an_error_not_a_crash(kind):
    rng = np.random.default_rng(0)
    arr = {"blank": np.full((480, 640, 3), 230, np.uint8), "black": np.zeros((480, 640, 3), np.uint8),
           "noise": rng.integers(0, 256, (480, 640, 3), dtype=np.uint8),
           "gradient": np.repeat(np.linspace(0, 255, 640, dtype=np.uint8)[None, :, None], 480, 0).repeat(3, 2),
           "oct": np.asarray(Image.open(sorted((ROOT / "tests" / "data" / "malaria_sample").glob("*/*.png"))[0])
                             .convert("L").resize((640, 480)).convert("RGB")),
           "oct_scan": _oct_like(), "landscape": np.asarray(_landscape()),
           "tiny": np.full((3, 5, 3), 200, np.uint8)}[kind]
    with pytest.raises(SmearError, match="no cells found"):
        segment(arr, kind)


def test_array_inputs_of_every_kind_segment_alike(fields):
    """RGBA, 16-bit and float arrays of a field give the cells of its 8-bit RGB photo; bad shapes are errors."""
    rgb = np.asarray(Image.open(fields[1]).convert("RGB"))
    ref = [c.bbox for c in segment(rgb).cells]
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    for arr in (rgba, rgb.astype(np.uint16) * 257, rgb.astype(np.float32) / 255.0):
        assert [c.bbox for c in segment(arr).cells] == ref
    with pytest.raises(SmearError, match="not an image array"):
        segment(np.zeros((4, 4, 4, 3), np.uint8), "odd")


def test_large_photo_is_segmented_downscaled_in_its_own_pixels(fields):
    """A phone-sized photo (the field at 2x) is found on a MAX_SIDE copy; boxes come back in its pixels."""
    img = Image.open(fields[1]).convert("RGB")
    small = segment(img)
    big = segment(img.resize((img.width * 2, img.height * 2), Image.Resampling.BICUBIC))
    assert big.scale > 1 and max(big.image.shape) <= 2048
    assert abs(big.counts()["rbc"] - small.counts()["rbc"]) <= 0.1 * small.counts()["rbc"]
    matched = match([c.bbox for c in small.cells if c.kind == "rbc"],
                    [[v / 2 for v in c.bbox] for c in big.cells])
    assert np.mean(matched >= 0) >= 0.8


def _p(label, conf, uncertain=False):
    return Prediction(source="c", label=label, confidence=conf, uncertain=uncertain,
                      decision="uncertain" if uncertain else label)


def test_slide_report_arithmetic():
    preds = [_p("Parasitized", 0.95)] * 2 + [_p("Uninfected", 0.9)] * 196 + [_p("Parasitized", 0.6, True)] * 2
    s = slide_referral(slide_summary(preds), rbc_per_ul=5_000_000, wbc_count=50, wbc_per_ul=8000, min_cells=500)
    assert s["cells"] == 200 and s["parasitemia_percent"] == round(100 * 2 / 198, 2)
    assert s["parasitemia_max_percent"] == 2.0
    assert s["parasites_per_ul_from_rbc"] == round(s["parasitemia_percent"] / 100 * 5_000_000)
    assert s["parasites_per_ul_from_rbc_max"] == 100_000
    assert s["parasites_per_ul_from_wbc"] == 2 / 50 * 8000 and s["parasites_per_ul_from_wbc_max"] == 640
    assert s["refer"] and s["enough_cells"] is False and s["min_cells"] == 500
    clean = slide_referral(slide_summary([_p("Uninfected", 0.9)] * 100), min_cells=100)
    assert not clean["refer"] and clean["enough_cells"] is True and clean["parasites_per_ul_from_rbc"] is None
    unsure = int(100 * REFER_UNCERTAIN_SHARE) + 1
    doubt = slide_referral(slide_summary([_p("Uninfected", 0.9)] * (100 - unsure)
                                         + [_p("Uninfected", 0.6, True)] * unsure))
    assert doubt["refer"] and "uncertain" in doubt["refer_reasons"][0] and doubt["enough_cells"] is None


def test_analyse_slide_writes_what_a_person_checks(model, fields, tmp_path):
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    report = analyse_slide(model, [fields[0], bad, fields[1]], min_cells=10)
    assert not (tmp_path / "out").exists()  # computing writes nothing
    written = write_report(report, tmp_path / "out")
    assert [f.error is None for f in report.fields] == [True, False, True]
    assert report.fields[1].field.endswith("corrupt.jpg") and report.fields[1].cells == ()
    s = report.summary.to_dict()
    assert s["fields"] == 3 and s["fields_without_cells"] == 1 and s["cells"] > 150 and s["enough_cells"]
    out = tmp_path / "out"
    cells = json.loads((out / "cells.json").read_text())["fields"]
    assert len(cells) == 3 and cells[0]["cells"][0].keys() >= {"bbox", "kind", "label", "confidence", "uncertain"}
    assert json.loads((out / "summary.json").read_text())["cells"] == s["cells"]
    lines = (out / "cells.csv").read_text().splitlines()
    assert lines[0].startswith("field,index,x,y,w,h,kind")
    assert len(lines) == 1 + sum(len(f.cells) for f in report.fields)
    overlays = sorted(out.glob("*_overlay.png"))
    assert len(overlays) == 2 and Image.open(overlays[0]).size == (1280, 960)
    if s["parasitized"] + s["uncertain"]:
        assert Image.open(out / "contact_sheet.png").width >= 160
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temp files
    assert sorted(written) == sorted(str(p) for p in out.iterdir())
    # The typed record round-trips through its dict (the drawing view and the predictions stay in memory only).
    again = SlideReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again == report and again.fields[0].view is None and report.fields[0].view is not None
    with pytest.raises(ValueError, match="unknown SlideSummary keys"):
        SlideSummary.from_dict({**s, "parasites": 1})


def test_bad_fields_never_lose_the_others(art, fields, tmp_path):
    """Corrupt, huge, 16-bit, RGBA, EXIF-rotated, landscape: each field gets a verdict or its own error."""
    import edge_runtime

    d = tmp_path / "bad"
    d.mkdir()
    good = Image.open(fields[1]).convert("RGB")
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    good.convert("RGBA").save(d / "rgba.png")
    Image.fromarray(np.asarray(good.convert("L")).astype(np.uint16) * 257).save(d / "grey16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned 90 CCW, shown upright
    good.transpose(Image.Transpose.ROTATE_90).save(d / "exif.jpg", quality=95, exif=exif)
    good.resize((1600, 1200)).save(d / "huge.jpg", quality=90)
    _landscape().save(d / "landscape.png")
    names = ["corrupt.jpg", "rgba.png", "grey16.png", "exif.jpg", "huge.jpg", "landscape.png"]
    model = edge_runtime.load(art / MALARIA_FILES["tflite-int8"], threads=1, max_pixels=1_500_000)
    report = analyse_slide(model, [d / n for n in names] + [fields[1]])
    write_report(report, tmp_path / "o")
    err = {Path(f.field).name: f.error for f in report.fields}
    assert err["corrupt.jpg"] and "too large" in err["huge.jpg"]
    assert "greyscale" in err["grey16.png"] and "no cells found" in err["landscape.png"]
    assert err["rgba.png"] is None and err["exif.jpg"] is None and err[fields[1].name] is None
    n_ref = len(report.fields[-1].cells)
    for k in (1, 3):  # RGBA and the EXIF-rotated copy: about the cells of the photo itself
        assert abs(len(report.fields[k].cells) - n_ref) <= 0.1 * n_ref
    xs = [c.bbox[0] + c.bbox[2] for c in report.fields[3].cells]
    assert max(xs) <= 1280 and max(c.bbox[1] + c.bbox[3] for c in report.fields[3].cells) <= 960  # upright
    assert report.summary.fields == 7 and report.summary.fields_without_cells == 4
    assert len(list((tmp_path / "o").glob("*_overlay.png"))) == 3


def test_normalise_stain_moves_the_cells_hue_half_way_to_the_nih_colours(fields):
    import cv2

    from edge_runtime.smear import CHROMA_SHIFT, NIH_LAB_MEAN, normalise_stain

    seg = segment(Image.open(fields[1]))
    out = normalise_stain(seg)
    assert out.shape == seg.image.shape and out.dtype == np.uint8
    rbc = np.isin(seg.labels, [c.index for c in seg.cells if c.kind == "rbc"]) & seg.core  # what crops keep
    lab = cv2.cvtColor(out, cv2.COLOR_RGB2LAB).astype(float)[rbc]
    before = cv2.cvtColor(seg.image, cv2.COLOR_RGB2LAB).astype(float)[rbc]
    want = before.mean(0)[1:] + CHROMA_SHIFT * (np.asarray(NIH_LAB_MEAN[1:]) - before.mean(0)[1:])
    assert np.abs(lab.mean(0)[1:] - want).max() < 1.5  # rounding through 8-bit RGB
    assert np.abs(before.mean(0)[1:] - want).max() > 2.0  # the sample field's hue does move
    assert abs(lab.mean(0)[0] - before.mean(0)[0]) < 2.0  # lightness kept


def test_normalise_background_takes_out_the_lamp_exposure_and_white_balance(fields):
    """`--normalise background`: the field's blank glass goes to BACKGROUND_REF, so the same field photographed
    with another exposure and white balance (a gain per channel) gives nearly the same image, and the same crops."""
    from edge_runtime.smear import BACKGROUND_REF, crop, normalise_background, normalised

    rgb = np.asarray(Image.open(fields[1]).convert("RGB"))
    seg = segment(rgb)
    out = normalise_background(seg)
    assert out.shape == seg.image.shape and out.dtype == np.uint8
    assert np.abs(np.median(out[seg.labels == 0], axis=0) - BACKGROUND_REF).max() <= 1.0
    other = np.clip(rgb * np.asarray([0.8, 0.92, 1.08]) + 0.5, 0, 255).astype(np.uint8)  # warmer lamp, darker
    seg2 = segment(other)
    out2 = normalise_background(seg2)
    assert np.abs(seg.image.astype(float) - seg2.image).mean() > 10  # the photos differ
    assert np.abs(out.astype(float) - out2).mean() < 1.5  # normalised, they nearly agree (0.5 here)
    cell = max((c for c in seg.cells if c.kind == "rbc"), key=lambda c: c.area)
    assert np.abs(crop(seg, cell, out).astype(float) - crop(seg, cell, normalised(seg, "background"))).max() == 0
    assert normalised(seg, None) is None
    with pytest.raises(ValueError, match="unknown normalisation 'od'"):
        normalised(seg, "od")


def test_crop_is_cut_at_the_membrane_not_the_threshold(fields):
    """The crop keeps the cell inside its edge's half-way level (pale centre filled), not the bright rim."""
    seg = segment(Image.open(fields[0]))
    rbcs = [c for c in seg.cells if c.kind == "rbc"]

    def own(c):  # the cell's part of the split (a cell completed over overlapping neighbours is cut to it)
        x, y, w, h = c.box
        return (seg.labels[y:y + h, x:x + w] == c.index) & c.mask

    kept = [int((crop(seg, c).max(axis=2) > 0).sum()) / own(c).sum() for c in rbcs]
    assert all(0.5 <= k <= 1.0 for k in kept) and np.median(kept) < 0.97
    c = next(c for c in rbcs if own(c).sum() == c.mask.sum())  # not completed: the crop is laid out on its box
    x, y, w, h = c.box
    m = max(2, int(round(0.08 * seg.radius)))
    inner = crop(seg, c)[m:m + h, m:m + w].max(axis=2) > 0
    assert not (inner & ~c.mask).any()  # never outside the region


def test_nih_colour_constants_are_those_of_the_bundled_sample():
    """NIH_LAB_MEAN/STD are recomputed from tests/data/malaria_sample (every non-black pixel of the 400 crops)."""
    import cv2

    from edge_runtime.smear import NIH_LAB_MEAN, NIH_LAB_STD

    px = []
    for f in sorted((ROOT / "tests" / "data" / "malaria_sample").glob("*/*.png")):
        a = np.asarray(Image.open(f).convert("RGB"))
        px.append(a[a.max(axis=2) > 0])
    lab = cv2.cvtColor(np.concatenate(px)[None], cv2.COLOR_RGB2LAB)[0].astype(float)
    assert np.allclose(lab.mean(0), NIH_LAB_MEAN, atol=0.01) and np.allclose(lab.std(0), NIH_LAB_STD, atol=0.01)


def test_cli_json_exit_codes_and_no_cells(art, fields, tmp_path):
    m = art / MALARIA_FILES["tflite-int8"]
    code, out, err = run_cli("smear", m, fields[1], "--json", "--rbc-per-ul", "5e6", "--threads", "1",
                             "--min-cells", "50")
    assert code == 0, err  # one readable field past a minimum of 50 red cells: a decision either way
    doc = json.loads(out)
    assert len(doc["fields"]) == 1 and doc["fields"][0]["error"] is None
    cell = doc["fields"][0]["cells"][0]
    assert set(cell) == {"index", "bbox", "kind", "area", "label", "confidence", "uncertain", "fragment"}
    assert len(cell["bbox"]) == 4
    assert {"cells", "parasitized", "uncertain", "parasitemia_percent", "parasitemia_max_percent", "refer",
            "enough_cells", "parasites_per_ul_from_rbc", "decision", "model"} <= set(doc["summary"])
    assert doc["summary"]["decision"]["decision"] in ("parasites seen", "no parasites seen")
    assert doc["summary"]["decision"]["density"]["method"] == "rbc" and len(doc["summary"]["model"]["sha256"]) == 64
    assert doc["fields"][0]["readable"] is True and doc["fields"][0]["quality"]["measures"]["red_cells"] > 50
    folder = tmp_path / "slide"
    folder.mkdir()
    shutil.copy(fields[1], folder / "f1.jpg")
    Image.new("RGB", (640, 480), (235, 235, 235)).save(folder / "blank.png")
    code, out, err = run_cli("smear", m, folder, "--out", tmp_path / "o", "--min-cells", "100000")
    assert "no cells found" in out and "Traceback" not in err
    # Too few cells: "not enough evidence" (3) unless the tiny model called a cell parasitized (a decision, but a
    # field was refused: 1). Never "refer: no".
    assert (code, "NOT ENOUGH EVIDENCE: photograph about" in out) in ((3, True), (1, False)), out
    assert "refer: no" not in out.replace("refer: no parasites", "")
    assert run_cli("smear", tmp_path / "missing.tflite", fields[0])[0] == 2
    # A missing file is a rejected field; with no field read the slide is "not enough evidence" (3), not negative.
    code, out, _ = run_cli("smear", m, tmp_path / "nothing_here_dir_empty")
    assert code == 3 and "no field could be read" in out and "refer: undecided" in out
    assert run_cli("smear", m, fields[0], "--wbc-count", "0")[0] == 2
    # --normalise background: the same cells found, classified from the normalised field; an unknown mode is usage
    code, out, err = run_cli("smear", m, fields[1], "--json", "--threads", "1", "--min-cells", "50",
                             "--normalise", "background")
    assert code == 0, err
    normed = json.loads(out)
    assert [c["bbox"] for c in normed["fields"][0]["cells"]] == [c["bbox"] for c in doc["fields"][0]["cells"]]
    assert normed["summary"]["normalise"] == "background" and doc["summary"]["normalise"] is None  # said, not hidden
    code, out, _ = run_cli("smear", m, fields[1], "--threads", "1", "--min-cells", "50", "--normalise", "background")
    assert code == 0 and "crops cut from background-normalised fields" in out
    assert run_cli("smear", m, fields[1], "--normalise", "od")[0] == 2


def test_calls_within_the_models_false_calls_exit_4_to_review_never_negative(fields):
    """The released field model on the two bundled fields calls cells parasitized. Given a site's false-call
    rate high enough to explain them (20 per 1,000 red cells), the report says "cells to review", exits 4 and
    still refers; given a low one, they are "parasites seen" (exit 0)."""
    code, out, err = run_cli("smear", "malaria-field", *fields, "--false-call-rate", "20", "--threads", "2")
    assert code == 4 and "CELLS TO REVIEW: " in out and "Traceback" not in err, out + err
    assert "--false-call-rate: 20 per 1,000 red cells" in out and "review them" in out
    assert "refer: no" not in out.replace("refer: no parasites", "") and "NO PARASITES" not in out
    code, out, _ = run_cli("smear", "malaria-field", *fields, "--false-call-rate", "0.1", "--threads", "2")
    assert code == 0 and "PARASITES SEEN: " in out and "(a slide without parasites gives up to" in out
    # One parasitemia is reported; the slide line gives the same share and what the uncertain cells could make of it
    reported = re.findall(r"^parasitemia \(reported\): ([0-9.]+)%", out, re.M)
    slide_share = re.findall(r"^slide: .*; parasitized ([0-9.]+)% of the cells counted \(the reported parasitemia", out,
                             re.M)
    assert len(reported) == 1 and len(slide_share) == 1, out
    assert abs(float(reported[0]) - float(slide_share[0])) < 0.006
    assert "confidently classified" not in out
    assert run_cli("smear", "malaria-field", *fields, "--false-call-rate", "-1")[0] == 2


def test_the_users_scale_sets_the_cell_size(model, art, fields):
    """`--um-per-px` (a stage micrometer's scale) replaces the per-field estimate of the typical red cell: 3.75 um
    in radius, so 37.5 px at 0.1 um/px; nonsense is refused before any model is loaded."""
    from edge_runtime.smear import analyse_slide
    from edge_runtime.smear.cells import RBC_RADIUS_UM

    estimated = analyse_slide(model, [fields[0]], min_cells=1).fields[0]
    given = analyse_slide(model, [fields[0]], min_cells=1, um_per_px=0.08).fields[0]
    assert estimated.error is None and given.error is None
    assert abs(given.radius_px - RBC_RADIUS_UM / 0.08) <= 0.5, given.radius_px
    assert abs(estimated.radius_px - given.radius_px) > 1  # the option changed what was segmented
    for bad in ("0", "-0.1", "nan", "inf", "x"):
        code, _, err = run_cli("smear", art / MALARIA_FILES["tflite-int8"], fields[0], "--um-per-px", bad)
        assert code == 2 and "--um-per-px" in err, (bad, err)


def test_the_report_says_where_the_cell_size_came_from(model, art, fields):
    """Every field names its size source (the user's scale, or how its estimate was made) and the slide says it
    in one line, which the command prints."""
    from edge_runtime.smear import analyse_slide
    from edge_runtime.smear.cells import RADIUS_SOURCES

    est = analyse_slide(model, fields, min_cells=1)
    assert [f.radius_source for f in est.fields] == ["isolated cells", "isolated cells"]  # ~100 cells, most apart
    assert est.summary.cell_size == {"source": "estimated", "um_per_px": None, "fields": {"isolated cells": 2},
                                     "says": "cell size estimated per field: 2 fields from the field's isolated cells"}
    user = analyse_slide(model, fields[:1], min_cells=1, um_per_px=0.1)
    assert user.fields[0].radius_source == "user" and user.summary.cell_size["source"] == "user"
    assert user.summary.cell_size["says"] == ("cell size from the user's scale, 0.1 um per pixel (a 3.75 um "
                                              "red-cell radius, 37.5 px)")
    assert set(RADIUS_SOURCES) >= {f.radius_source for f in est.fields + user.fields}
    code, out, _ = run_cli("smear", art / MALARIA_FILES["tflite-int8"], fields[0], "--um-per-px", "0.1",
                           "--min-cells", "1")
    assert "cell size from the user's scale, 0.1 um per pixel" in out
    assert SlideReport.from_dict(json.loads(json.dumps(est.to_dict()))) == est  # round-trips


def test_uncertain_fragments_are_not_counted_as_uncertain_cells(art, fields):
    """A red-cell region under half a typical cell is a fragment; one the model is unsure of counts neither as a
    red cell nor as an uncertain cell (a piece is no evidence), while a whole uncertain cell still does."""
    import math

    import edge_runtime
    from edge_runtime.smear import analyse_slide
    from edge_runtime.smear.quality import FRAGMENT_AREA

    unsure = edge_runtime.load(art / MALARIA_FILES["tflite-int8"], threads=1, threshold=0.999)  # all uncertain
    report = analyse_slide(unsure, fields, min_cells=1)
    cells = [c for f in report.fields for c in f.cells if c.kind == "rbc"]
    assert all(c.uncertain for c in cells)
    for f in report.fields:
        typical = math.pi * f.radius_px ** 2
        assert all(c.fragment == (c.area < FRAGMENT_AREA * typical) for c in f.cells if c.kind == "rbc")
        assert not any(c.fragment for c in f.cells if c.kind != "rbc")
    pieces = sum(c.fragment for c in cells)
    assert pieces > 0, "the bundled fields hold split pieces of cells"
    s = report.summary
    assert s.uncertain_fragments == pieces and s.uncertain == s.cells == len(cells) - pieces
    # The benchmark's slide counts agree with the report's.
    from train.annotations import measure_field

    rows = [measure_field(a, unsure) for a in load_annotations(SMEAR_SAMPLE)]
    assert sum(r["red_cells"] for r in rows) == s.cells and sum(r["uncertain_cells"] for r in rows) == s.uncertain
    # A confident verdict on a fragment still counts: a parasite seen in a piece is a parasite seen.
    sure = edge_runtime.load(art / MALARIA_FILES["tflite-int8"], threads=1, threshold=0.5)
    s2 = analyse_slide(sure, fields, min_cells=1).summary
    assert s2.uncertain_fragments == 0 and s2.cells == len(cells)


def test_smear_imports_no_tensorflow(art, fields):
    code = ("import sys, edge_runtime\nfrom edge_runtime.smear import analyse_slide\n"
            f"m = edge_runtime.load({str(art / MALARIA_FILES['tflite-int8'])!r})\n"
            f"analyse_slide(m, [{str(fields[0])!r}])\n"
            "heavy = sorted(k for k in sys.modules if k.split('.')[0] in ('tensorflow', 'keras', 'tf_keras'))\n"
            "print(heavy); sys.exit(1 if heavy else 0)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
