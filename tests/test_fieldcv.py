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
    assert fieldcrops.run(SMEAR_SAMPLE, out) == 0
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
    assert set(rows[0]) == {"path", "label", "patient", "split", "field"}
    records = read_manifest(crops / "field-crops.csv")  # the project's manifest reader takes it as it is
    assert len(records) == len(rows) > 200 and {r.split for r in records} == {"train"}
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
    pos = [r for r in rows if r["patient"] == "PA171704" and r["label"] == "Parasitized"]
    assert sum(r.label == "Parasitized" and r.patient == "PA171704" for r in train) == 3 * len(pos)
    assert sum(r.label == "Uninfected" and r.patient == "PA171704" for r in train) == 50
    assert counts == {"nih": 2, "field_uninfected": 50, "field_parasitized_rows": 3 * len(pos),
                      "field_parasitized_crops": len(pos), "test_sample": 400}
    assert [r for r in recs if r.split == "test"] == sample


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
            "--blocks", "PA171886", "--final", "--hue", "0.2"]
    assert main(argv) == 0  # its training, export and evaluation run as subprocesses, as on the command line
    report = json.loads((out / "field-cv.json").read_text())
    assert [f["block"] for f in report["folds"]] == ["PA171886"]
    final = report["final"]
    assert final["counts"]["field_uninfected"] == 40  # both blocks, 20 each: nothing held out
    assert runs.read_config(Path(final["run"])).preset["hue"] == 0.2  # the stain-jitter override reached training
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
    assert registry.read_registry(pkg)[0].metrics["field_cv"] == fc and entry.inputs == "fields"
