"""Field crops (the runtime's segmentation and crop, labelled by the annotations), `--init` fine-tuning,
and the pieces of the leave-one-block-out driver (`python -m train field-cv`)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("cv2", reason="field crops need the `smear` extra (opencv-python-headless)")

from train.annotations import field_blocks, load_annotations, match

from helpers import ROOT, SAMPLE

SMEAR_SAMPLE = ROOT / "tests" / "data" / "iml_malaria_sample"


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> Path:
    from train import fieldcrops

    out = tmp_path_factory.mktemp("field-crops")
    assert fieldcrops.run(SMEAR_SAMPLE, out, shifted=2, shifted_uninfected=10, seed=3, off_target=True,
                          spanning=True) == 0
    return out


def test_field_blocks_are_runs_of_camera_numbers():
    runs = ((171700, 171710), (171740, 171754), (171790, 171800), (171830, 171844), (171880, 171890),
            (171960, 171974), (171990, 172001))  # the shared set's seven camera-order blocks, as its README names them
    names = [f"PA{n}.JPG" for a, b in runs for n in range(a, b + 1)]
    blocks = field_blocks(names)
    assert sorted(set(blocks.values())) == [f"PA{a}" for a, _ in runs]
    assert blocks["PA171974.JPG"] == "PA171960" and blocks["PA171990.JPG"] == "PA171990"  # 16 apart: two blocks
    assert blocks["PA171710.JPG"] == "PA171700" and blocks["PA172001.JPG"] == "PA171990"
    assert field_blocks(["a.jpg"]) == {"a.jpg": "a"}
    # the 89 shared fields: the seven blocks their README names (a gap of 20 merged the last two, 16 apart)
    runs = ((171700, 171710), (171740, 171754), (171790, 171800), (171830, 171844), (171880, 171890),
            (171960, 171974), (171990, 172001))
    shared = field_blocks([f"PA{n}.JPG" for a, b in runs for n in range(a, b + 1) if n != 171993])
    assert len(shared) == 89 and sorted(set(shared.values())) == [f"PA{a}" for a, _ in runs]
    assert shared["PA171974.JPG"] == "PA171960" and shared["PA171990.JPG"] == "PA171990"


def test_annotations_can_be_restricted_to_named_fields():
    assert [a["image"].name for a in load_annotations(SMEAR_SAMPLE, ["PA171886"])] == ["PA171886.JPG"]
    assert len(load_annotations(SMEAR_SAMPLE, ["PA171704.JPG", "PA171886"])) == 2
    with pytest.raises(ValueError, match="not annotated"):
        load_annotations(SMEAR_SAMPLE, ["PA999999"])


def test_field_crops_are_the_runtime_crops_labelled_by_the_annotations(crops):
    from edge_runtime.images import load_image
    from edge_runtime.smear import crop, segment
    from train.split import read_manifest

    rows = list(csv.DictReader(open(crops / "field-crops.csv")))
    assert set(rows[0]) == {"path", "label", "patient", "split", "field", "variant", "shift", "region"}
    records = read_manifest(crops / "field-crops.csv")  # the project's manifest reader takes it as it is
    assert len(records) == len(rows) > 200 and {r.split for r in records} == {"train"}
    rows = [r for r in rows if r["variant"] == "0" and not r["region"]]  # the photos' annotated crops
    assert {r.patient for r in records} == {"PA171704", "PA171886"}  # the block (here each field is its own)
    summary = json.loads((crops / "field-crops.json").read_text())
    anns = {a["image"].name: a for a in load_annotations(SMEAR_SAMPLE)}
    for name, counts in summary["fields"].items():
        ann = anns[name]
        assert (counts["Parasitized"] + counts["Uninfected"] + counts["unmatched"] + counts["not_rbc"]
                == len(ann["boxes"]))
        assert counts["Parasitized"] <= sum(ann["parasite"])
    assert summary["fields"]["PA171704.JPG"]["Parasitized"] >= 4  # 5 annotated parasites, most found
    # A crop is byte for byte what the runtime gives the model for the region its annotation matched.
    ann = anns["PA171704.JPG"]
    seg = segment(load_image(ann["image"]), ann["image"].name)
    matched = match(ann["boxes"], [c.bbox for c in seg.cells])
    k = next(i for i, (p, m) in enumerate(zip(ann["parasite"], matched)) if p and m >= 0 and seg.cells[m].kind == "rbc")
    cell = seg.cells[matched[k]]
    row = next(r for r in rows if r["path"].endswith(f"PA171704_{cell.index:03d}.png"))
    assert row["label"] == "Parasitized"
    assert np.array_equal(np.asarray(Image.open(crops / row["path"]).convert("RGB")), crop(seg, cell))


def test_shifted_variants_are_cut_from_the_shifted_field_and_drawn_again_the_same(crops):
    from edge_runtime.images import load_image
    from edge_runtime.smear import crop, segment
    from train.fieldcrops import shift_of

    rows = [r for r in csv.DictReader(open(crops / "field-crops.csv")) if r["variant"] != "0"]
    summary = json.loads((crops / "field-crops.json").read_text())
    assert summary["shifted"] == {"variants": 2, "uninfected_per_variant": 10, "seed": 3,
                                  "distribution": "train.fieldaug.draw_shift"}
    for name, counts in summary["fields"].items():
        stem = name.split(".")[0]
        mine = [r for r in rows if r["field"] == stem]
        assert {r["variant"] for r in mine} == {"1", "2"} and counts["shifted_refused"] == 0
        for k in ("1", "2"):
            v = [r for r in mine if r["variant"] == k]
            assert sum(r["label"] == "Uninfected" for r in v) == 10  # the sample; every parasitized crop kept
            assert {r["shift"] for r in v} == {shift_of(3, name, int(k)).describe()}  # seeded by field and k
        assert counts["shifted_Parasitized"] == sum(r["label"] == "Parasitized" for r in mine)
    assert shift_of(3, "PA171704.JPG", 1) != shift_of(3, "PA171704.JPG", 2) != shift_of(4, "PA171704.JPG", 2)
    # A shifted crop is the runtime's crop of the shifted photo, its label from the scaled annotation.
    ann = load_annotations(SMEAR_SAMPLE, ["PA171704"])[0]
    sh = shift_of(3, "PA171704.JPG", 1)
    import zlib

    img = sh.apply(np.asarray(load_image(ann["image"])), zlib.crc32(b"3:PA171704.JPG:1"))
    seg = segment(img, "PA171704.JPG")
    matched = match([[v * sh.scale for v in b] for b in ann["boxes"]], [c.bbox for c in seg.cells])
    row = next(r for r in rows if r["field"] == "PA171704" and r["variant"] == "1" and r["label"] == "Parasitized")
    index = int(row["path"].rsplit("_", 1)[1][:3])
    cell = next(c for c in seg.cells if c.index == index)
    k = list(matched).index(seg.cells.index(cell))
    assert ann["parasite"][k] and cell.kind == "rbc"
    assert np.array_equal(np.asarray(Image.open(crops / row["path"]).convert("RGB")), crop(seg, cell))


def test_field_shifts_are_drawn_from_the_documented_ranges():
    import random

    from train import fieldaug as fa

    rng = random.Random(0)
    shifts = [fa.draw_shift(rng) for _ in range(400)]
    assert fa.draw_shift(random.Random(5)) == fa.draw_shift(random.Random(5))
    grey = [s for s in shifts if s.chroma <= 0.3 and not fa.HUE_RANGE[0] <= s.hue_deg <= fa.HUE_RANGE[1]]
    assert 0.05 < len(grey) / len(shifts) < 0.25  # GREY_SHARE 0.15 (some grey draws fall inside the hue range)
    coloured = [s for s in shifts if s.chroma > 0.3]
    assert all(fa.HUE_RANGE[0] <= s.hue_deg <= fa.HUE_RANGE[1] for s in coloured)
    assert all(fa.SCALE_RANGE[0] <= s.scale <= fa.SCALE_RANGE[1] for s in shifts)
    assert 0.35 < np.mean([s.scale != 1.0 for s in shifts]) < 0.65  # SCALE_SHARE 0.5
    assert not any(s.blur_sigma and s.defocus_px for s in shifts)  # one of the two optics at a time
    rgb = np.asarray(Image.open(SMEAR_SAMPLE / "fields" / "PA171704.JPG").convert("RGB"))[:240, :320]
    assert fa.FieldShift().apply(rgb, 0) is not None and np.array_equal(fa.FieldShift().apply(rgb, 0), rgb)
    s = fa.FieldShift(hue_deg=-75, chroma=0.5, scale=0.6, jpeg_quality=40, noise_sigma=4)
    out = s.apply(rgb, 1)
    assert out.shape == (144, 192, 3) and np.array_equal(out, s.apply(rgb, 1))
    assert not np.array_equal(out, s.apply(rgb, 2))  # the noise's seed
    assert s.describe() == "hue_deg -75, chroma 0.5, scale 0.6, noise_sigma 4, jpeg_quality 40"


def test_a_bad_field_is_reported_and_skipped(tmp_path):
    from train import fieldcrops

    data = tmp_path / "data"
    shutil.copytree(SMEAR_SAMPLE, data)
    (data / "fields" / "PA171705.JPG").write_bytes(b"not a jpeg")
    anns = json.loads((data / "annotations.json").read_text())
    anns.append({**anns[0], "image_name": "PA171705.JPG"})
    (data / "annotations.json").write_text(json.dumps(anns))
    assert fieldcrops.run(data, tmp_path / "out", ["PA171705", "PA171886"]) == 0
    summary = json.loads((tmp_path / "out" / "field-crops.json").read_text())
    assert list(summary["failed"]) == ["PA171705.JPG"] and list(summary["fields"]) == ["PA171886.JPG"]


def test_fold_manifest_leaves_the_held_out_block_out_and_oversamples_parasites(crops):
    from train.malaria.fieldcv import fold_manifest, sample_records
    from train.split import Record

    rows = list(csv.DictReader(open(crops / "field-crops.csv")))
    nih = [Record("/nih/a.png", "Parasitized", "C1", "train"), Record("/nih/b.png", "Uninfected", "C2", "train")]
    sample = sample_records(SAMPLE)
    assert len(sample) == 400 and {r.split for r in sample} == {"test"}
    recs, counts = fold_manifest(rows, crops, nih, sample, "PA171886", repeat=3, per_block=50, seed=0)
    train = [r for r in recs if r.split == "train"]
    assert not any("PA171886" in r.path for r in train)  # never trained on the held-out block
    assert not any("/shifted/" in r.path for r in train)  # shifted variants only when asked
    pos = [r for r in rows if r["patient"] == "PA171704" and r["label"] == "Parasitized" and r["variant"] == "0"]
    assert sum(r.label == "Parasitized" and r.patient == "PA171704" for r in train) == 3 * len(pos)
    assert sum(r.label == "Uninfected" and r.patient == "PA171704" for r in train) == 50
    assert counts == {"nih": 2, "field_uninfected": 50, "field_parasitized_rows": 3 * len(pos),
                      "field_parasitized_crops": len(pos), "shifted_uninfected": 0, "shifted_parasitized_rows": 0,
                      "test_sample": 400}
    assert [r for r in recs if r.split == "test"] == sample
    # With shifted crops: the other block's variants (a sample of uninfected, every parasitized x2), never the
    # held-out block's; the photos' own crops are the same draw as without.
    recs2, counts2 = fold_manifest(rows, crops, nih, sample, "PA171886", repeat=3, per_block=50, seed=0,
                                   shifted_per_block=7, shifted_repeat=2)
    train2 = [r for r in recs2 if r.split == "train"]
    moved = [r for r in train2 if "/shifted/" in r.path]
    assert moved and all("PA171704" in r.path for r in moved)
    spos = [r for r in rows if r["patient"] == "PA171704" and r["label"] == "Parasitized" and r["variant"] != "0"]
    assert counts2["shifted_uninfected"] == 7 and counts2["shifted_parasitized_rows"] == 2 * len(spos) > 0
    assert [r for r in train2 if "/shifted/" not in r.path] == train


def test_off_target_regions_are_uninfected_crops_of_no_annotated_cell_and_come_in_only_when_asked(crops):
    """`--off-target`: every rbc region of a photo that overlaps no annotated box becomes an Uninfected crop (the
    runtime's crop of that region); a fold takes them only with off_target_per_block, from its training blocks."""
    from edge_runtime.images import load_image
    from edge_runtime.smear import crop, segment
    from train.annotations import OFF_TARGET_IOU, iou_matrix
    from train.malaria.fieldcv import fold_manifest

    rows = list(csv.DictReader(open(crops / "field-crops.csv")))
    off = [r for r in rows if r["region"] == "off-target"]
    assert off and {r["label"] for r in off} == {"Uninfected"} and {r["variant"] for r in off} == {"0"}
    summary = json.loads((crops / "field-crops.json").read_text())
    assert sum(f["off-target"] for f in summary["fields"].values()) == len(off)
    ann = {a["image"].name: a for a in load_annotations(SMEAR_SAMPLE)}["PA171704.JPG"]
    seg = segment(load_image(ann["image"]), ann["image"].name)
    by_index = {c.index: c for c in seg.cells}
    mine = [r for r in off if r["field"] == "PA171704"]
    assert mine
    for r in mine:
        cell = by_index[int(r["path"].rsplit("_", 1)[1][:3])]
        assert cell.kind == "rbc" and iou_matrix([cell.bbox], ann["boxes"]).max() < OFF_TARGET_IOU
        assert np.array_equal(np.asarray(Image.open(crops / r["path"]).convert("RGB")), crop(seg, cell))
    recs, counts = fold_manifest(rows, crops, [], [], "PA171886", repeat=1, per_block=50, seed=0)
    assert "off_target_uninfected" not in counts and not {str((crops / r["path"]).resolve()) for r in off} & \
        {x.path for x in recs}
    recs, counts = fold_manifest(rows, crops, [], [], "PA171886", repeat=1, per_block=50, seed=0,
                                 off_target_per_block=3)
    chosen = {str((crops / r["path"]).resolve()) for r in off} & {x.path for x in recs}
    assert counts["off_target_uninfected"] == len(chosen) == min(3, len(mine)) and counts["field_uninfected"] == 50
    assert all("PA171704" in p for p in chosen)  # never the held-out block's


def test_normalised_crops_are_cut_from_the_normalised_field_shifted_ones_after_their_shift(crops, tmp_path):
    """`--normalise background`: the same crops (same regions, labels and names) as without, each cut from the field
    as `smear --normalise background` normalises it; a shifted variant is normalised after its shift."""
    from edge_runtime.images import load_image
    from edge_runtime.smear import crop, normalise_background, segment
    from train import fieldcrops

    out = tmp_path / "bg"
    assert fieldcrops.run(SMEAR_SAMPLE, out, ["PA171704"], shifted=2, shifted_uninfected=10, seed=3,
                          normalise="background") == 0
    assert json.loads((out / "field-crops.json").read_text())["normalise"] == "background"
    rows = list(csv.DictReader(open(out / "field-crops.csv")))
    plain = [r for r in csv.DictReader(open(crops / "field-crops.csv"))
             if r["field"] == "PA171704" and r["region"] == ""]
    assert [(r["path"], r["label"]) for r in rows] == [(r["path"], r["label"]) for r in plain]
    ann = load_annotations(SMEAR_SAMPLE, ["PA171704"])[0]
    seg = segment(load_image(ann["image"]), ann["image"].name)
    by_index = {c.index: c for c in seg.cells}
    bg = normalise_background(seg)
    own = [r for r in rows if r["variant"] == "0"]
    for r in own:
        cell = by_index[int(r["path"].rsplit("_", 1)[1][:3])]
        got = np.asarray(Image.open(out / r["path"]).convert("RGB"))
        assert np.array_equal(got, crop(seg, cell, bg))
    assert any(not np.array_equal(np.asarray(Image.open(out / r["path"]).convert("RGB")),
                                  np.asarray(Image.open(crops / r["path"]).convert("RGB"))) for r in own)
    shifted = [r for r in rows if r["variant"] != "0"]
    assert shifted and all((out / r["path"]).exists() for r in shifted)


def test_spanning_mask_takes_regions_that_merge_or_cut_cells_and_hold_no_parasite():
    from train.annotations import spanning_mask

    truth = [[0, 0, 10, 10], [10, 0, 10, 10], [100, 100, 10, 10]]
    parasite = [False, False, True]
    found = [[0, 0, 20, 10],      # two cells merged: IoU 0.5 with each, at the match bar: not spanning
             [0, 0, 14, 10],      # a cell with a piece of its neighbour: IoU 0.71 -> a match
             [5, 0, 10, 10],      # half of each: IoU 0.33 -> spanning
             [100, 100, 25, 25],  # holds the parasite's whole box: IoU 0.16, but never a negative
             [200, 200, 10, 10],  # overlaps nothing: off-target, not spanning
             [90, 100, 15, 10]]   # IoU 0.25 with the parasite, half its box: not a negative
    assert spanning_mask(truth, parasite, found).tolist() == [False, False, True, False, False, False]
    assert spanning_mask([], [], found).tolist() == [False] * 6


def test_spanning_regions_are_uninfected_crops_and_come_in_only_when_asked(crops):
    """`--spanning`: unmatched rbc regions spanning annotated cells without a parasite become Uninfected crops of the
    photo's own regions; a fold takes them only with spanning_per_block, from its training blocks."""
    from edge_runtime.images import load_image
    from edge_runtime.smear import segment
    from train.annotations import spanning_mask
    from train.malaria.fieldcv import fold_manifest

    rows = list(csv.DictReader(open(crops / "field-crops.csv")))
    span = [r for r in rows if r["region"] == "spanning"]
    assert span and {r["label"] for r in span} == {"Uninfected"} and {r["variant"] for r in span} == {"0"}
    summary = json.loads((crops / "field-crops.json").read_text())
    assert sum(f["spanning"] for f in summary["fields"].values()) == len(span)
    assert summary["spanning"]["parasite_share_below"] == 0.1
    for ann in load_annotations(SMEAR_SAMPLE):
        seg = segment(load_image(ann["image"]), ann["image"].name)
        by_index = {c.index: j for j, c in enumerate(seg.cells)}
        hit = spanning_mask(ann["boxes"], ann["parasite"], [c.bbox for c in seg.cells])
        for r in (r for r in span if r["field"] == ann["image"].stem):
            assert hit[by_index[int(r["path"].rsplit("_", 1)[1][:3])]]
    recs, counts = fold_manifest(rows, crops, [], [], "PA171886", repeat=1, per_block=50, seed=0)
    assert "spanning_uninfected" not in counts
    assert not {str((crops / r["path"]).resolve()) for r in span} & {x.path for x in recs}
    recs, counts = fold_manifest(rows, crops, [], [], "PA171886", repeat=1, per_block=50, seed=0,
                                 spanning_per_block=2)
    chosen = {str((crops / r["path"]).resolve()) for r in span} & {x.path for x in recs}
    mine = [r for r in span if r["patient"] != "PA171886"]
    assert counts["spanning_uninfected"] == len(chosen) == min(2, len(mine)) and counts["field_uninfected"] == 50
    assert not any("PA171886" in p for p in chosen)


def test_nih_mix_keeps_a_seeded_share():
    from train.malaria.fieldcv import nih_mix
    from train.split import Record

    nih = [Record(f"/nih/{i}.png", "Uninfected", f"C{i}", "train") for i in range(10)]
    assert nih_mix(nih, 1.0, 0) is nih and nih_mix(nih, 0.5, 3) == nih_mix(nih, 0.5, 3)
    assert len(nih_mix(nih, 0.3, 0)) == 3 and set(nih_mix(nih, 0.3, 0)) <= set(nih)
    with pytest.raises(ValueError, match="--nih-share 0"):
        nih_mix(nih, 0, 0)


def test_harness_rows_are_pooled_per_transform_over_the_folds():
    from train.malaria.fieldcv import markdown, pool_shift

    def row(field, found, par, called, fp, unsure, error=None):
        r = {"field": field, "annotated": 10, "annotated_parasites": par, "error": error}
        if error:
            return r
        return {**r, "found": found, "parasites_found": called, "parasites_called": called, "uninfected_found": 8,
                "uninfected_called_parasitized": fp, "uninfected_called_uncertain": unsure, "flagged": called > 0,
                "count_error": 0, "segment_ms": 1.0, "total_ms": 2.0}

    folds = [{"block": "A", "shift": [{"transform": "none", "what": "as it is", "fields": [row("a1", 9, 2, 2, 0, 1)]},
                                      {"transform": "grey", "what": "grey", "fields": [row("a1", 8, 2, 1, 1, 0)]}]},
             {"block": "B", "shift": [{"transform": "none", "what": "as it is", "fields": [row("b1", 10, 2, 1, 0, 0)]},
                                      {"transform": "grey", "what": "grey",
                                       "fields": [row("b1", 0, 2, 0, 0, 0, error="no cells found")]}]}]
    pooled = pool_shift(folds)
    assert [t["transform"] for t in pooled] == ["none", "grey"] and pooled[0]["blocks"] == ["A", "B"]
    none, grey = pooled[0]["summary"], pooled[1]["summary"]
    assert none["parasite_recall_called_all_fields"] == 0.75 and none["cell_recall_all_fields"] == 0.95
    # a refused field finds nothing: flagged 1 of 4 over all fields, though 1 of 2 over the fields analysed
    assert grey["parasite_recall_called_all_fields"] == 0.25 and grey["parasite_recall_called"] == 0.5
    assert grey["fields_failed"] == 1 and pooled[1]["per_block"]["A"]["uninfected_false_positive_rate"] == 0.125
    s = {"fields": 2, "annotated_cells": 10, "annotated_parasites": 1, "cell_recall": 0.9,
         "parasite_recall_called": 1.0, "uninfected_false_positive_rate": 0.1, "uninfected_uncertain_rate": 0.5,
         "field_sensitivity": 1.0}
    md = markdown({"pooled": {"release": s, "fine_tuned": s}, "per_block": {}, "folds": [], "shift": pooled})
    assert "the held-out blocks A, B pooled" in md
    assert "| grey | 40.0% | 25.0% | 12.5% | 0.0% | 1 of 2 |" in md


def test_pooled_report_table():
    from train.malaria.fieldcv import markdown

    s = {"fields": 2, "annotated_cells": 10, "annotated_parasites": 1, "cell_recall": 0.9,
         "parasite_recall_called": 1.0, "uninfected_false_positive_rate": 0.1, "uninfected_uncertain_rate": 0.5,
         "field_sensitivity": 1.0, "count_error_mean_signed": 2.0, "count_error_mean_abs": 2.0,
         "total_ms_per_field": 400.0}
    q = {"accuracy": 0.9, "sensitivity": 0.8, "specificity": 1.0, "roc_auc": 0.95}
    md = markdown({"pooled": {"release": s, "fine_tuned": {**s, "uninfected_false_positive_rate": 0.02}},
                   "per_block": {"B": {"release": s, "fine_tuned": s}}, "release_nih_sample_int8": q,
                   "folds": [{"block": "B", "nih_sample_float32": q, "nih_sample_int8": q, "epochs": 1,
                              "train_seconds": 60}]})
    assert "| uninfected cells called parasitized (false positives) | 10.0% | 2.0% |" in md
    assert "| B | 2 | 1 |" in md and "| fold B held out | 90.00% |" in md


@pytest.mark.slow
def test_init_fine_tunes_the_given_model(tiny_run, sample_manifest, tmp_path):
    """--init starts from the given weights (a ~zero learning rate leaves the convolutions as they were)."""
    keras = pytest.importorskip("keras")
    from train import runs
    from train.malaria.fit import FINAL, train_malaria

    init = tiny_run / "best.keras"
    out = train_malaria(sample_manifest, "tiny", tmp_path / "ft", epochs=1, verbose=0, select_best=False,
                        init=init, lr=1e-12)
    cfg = runs.read_config(out)
    assert cfg.init == str(init.resolve()) and cfg.preset["learning_rate"] == 1e-12 and cfg.model_file == FINAL
    a, b = keras.models.load_model(init), keras.models.load_model(out / FINAL)
    conv = [i for i, l in enumerate(a.layers) if isinstance(l, keras.layers.Conv2D)]
    for i in conv:
        np.testing.assert_allclose(a.layers[i].kernel.numpy(), b.layers[i].kernel.numpy(), atol=1e-6)
    with pytest.raises(FileNotFoundError):
        train_malaria(sample_manifest, "tiny", tmp_path / "none", epochs=1, verbose=0, init=tmp_path / "x.keras")


@pytest.mark.slow
def test_field_cv_final_run_is_released_with_its_held_out_figures(crops, tiny_run, sample_manifest, tmp_path):
    """`field-cv --final` fine-tunes on every block; `convert release --field-cv` ships that run with the folds'
    figures and its field calibration crops copied beside the card (that the committed field release is made
    again from such copies, byte for byte, is test_release's)."""
    pytest.importorskip("tensorflow")
    from convert.release import release, reproduce_command
    from edge_runtime import registry
    from train import runs
    from train.cli import main
    from train.split import read_manifest

    unseen = tmp_path / "unseen"  # NIH cells of patients the tiny run never saw
    for r in read_manifest(sample_manifest, "test"):
        (unseen / r.label).mkdir(parents=True, exist_ok=True)
        shutil.copy(r.path, unseen / r.label / Path(r.path).name)
    out = tmp_path / "fcv"
    argv = ["field-cv", "--crops", str(crops), "--nih", str(sample_manifest), "--init",
            str(tiny_run / "best.keras"), "--data", str(SMEAR_SAMPLE), "--out", str(out), "--preset", "tiny",
            "--epochs", "1", "--uninfected-per-block", "20", "--parasite-repeat", "2", "--sample", str(unseen),
            "--blocks", "PA171886", "--final", "--hue", "0.2", "--resize-mix", "0.5", "--shifted-per-block", "5",
            "--shift", "none,grey_stain"]
    assert main(argv) == 0  # its training, export and evaluation run as subprocesses, as on the command line
    report = json.loads((out / "field-cv.json").read_text())
    assert [f["block"] for f in report["folds"]] == ["PA171886"]
    final = report["final"]
    assert final["counts"]["field_uninfected"] == 40  # both blocks, 20 each: nothing held out
    preset = runs.read_config(Path(final["run"])).preset
    assert preset["hue"] == 0.2 and preset["resize_mix"] == 0.5  # the overrides reached training
    assert final["counts"]["shifted_uninfected"] == 10 and final["counts"]["shifted_parasitized_rows"] > 0
    assert [t["transform"] for t in report["shift"]] == ["none", "grey_stain"]  # the harness on the held-out block
    assert report["shift"][0]["blocks"] == ["PA171886"] and report["shift"][1]["summary"]["fields"] == 1
    assert "| grey_stain |" in (out / "field-cv.md").read_text()
    assert {r.patient for r in read_manifest(out / "final" / "manifest.csv", "train")} >= {"PA171704", "PA171886"}

    dest, pkg = tmp_path / "rel", tmp_path / "pkg"
    with pytest.raises(ValueError, match="not"):  # the folds describe the final run, not another one
        release(tiny_run, "tinyfield", "0.0.1", unseen, dest=dest, package=pkg, field_cv=out, log=lambda *a: None)
    assert not dest.exists()
    # A one-epoch tiny model sits near 0.5 on many cells, so its int8 agreement varies run to run (0.975 seen):
    # the bound is given, as a release may, and must then be recorded for the rebuild.
    entry = release(Path(final["run"]), "tinyfield", "0.0.1", unseen, dest=dest, package=pkg, calib_n=80,
                    field_cv=out, copy_calib=crops, min_agreement=0.8, log=lambda *a, **k: None)
    assert "--min-agreement" in reproduce_command(dest) and entry.trained["min_agreement"] == 0.8
    calib = read_manifest(dest / "calibration.csv", "train")
    copied = [r for r in calib if "/calibration/" in r.path]
    assert copied and all(Path(r.path).is_relative_to((dest / "calibration").resolve()) for r in copied)
    assert not any(Path(r.path).is_relative_to(crops.resolve()) for r in calib)  # nothing points at the run's crops
    fc = entry.metrics["field_cv"]
    assert list(fc["per_block"]) == ["PA171886"] and fc["pooled"]["fine_tuned"]["fields"] == 1
    card = (dest / "MODEL_CARD.md").read_text()
    assert "leave-one-block-out" in card and "| PA171886 |" in card and "python -m train field-crops" in card
    calls = fc["pooled"]["fine_tuned"]["false_calls_per_1000_red_cells"]  # what a negative slide would show
    assert calls is not None and "| false parasitized calls per 1,000 red cells" in card and f"| {calls:.1f} |" in card
    assert registry.read_registry(pkg)[0].metrics["field_cv"] == fc and entry.inputs == "fields"
    # The folds' calls off parasites are the release's false-call rate, which the slide decision reads.
    ft, rate = fc["pooled"]["fine_tuned"], entry.metrics["false_calls"]
    assert (rate["calls"], rate["red_cells"], rate["blocks"]) == (ft["calls_off_parasites"], ft["red_cells_read"],
                                                                 ["PA171886"]) and rate["red_cells"] > 0
    assert "**False parasitized calls**" in card and "(`train field-cv`): the held-out blocks PA171886" in card
    # Rerun with --normalise: the trained fold is reused, its held-out fields and harness measured again that way.
    before = json.loads((out / "fold-PA171886" / "result.json").read_text())
    assert before["normalise"] is None
    assert main(argv + ["--normalise", "background"]) == 0
    after = json.loads((out / "fold-PA171886" / "result.json").read_text())
    assert after["normalise"] == "background" and after["artifact"] == before["artifact"]
    assert after["shift_spec"].endswith("normalise background")
    assert [r["field"] for r in after["rows"]] == [r["field"] for r in before["rows"]]
