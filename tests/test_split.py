"""Splits: patients never cross splits, bad files are reported not fatal, layouts and rules."""

from __future__ import annotations

import csv
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train import split
from train.split import Record, build_split, patient_id, read_manifest, split_records, write_manifest


@pytest.mark.parametrize(
    "name, expected",
    [
        ("C100P61ThinF_IMG_20150918_144104_cell_162.png", "C100P61"),
        ("C13NThinF_IMG_20150614_131318_cell_102.png", "C13"),
        ("C1_thinF_IMG_20150604_104722_cell_9.png", "C1"),
        ("CNV-154835-1.jpeg", "154835"),
        ("DRUSEN-9837663-12.jpeg", "9837663"),
        ("holiday_photo.png", None),
    ],
)
def test_patient_rules(name, expected):
    assert patient_id(name) == expected


def test_patient_split_of_real_sample_keeps_patients_apart(sample_dir, tmp_path):
    res = build_split(sample_dir, progress=False)
    assert len(res.records) == 400 and not res.bad_files and res.unmatched_patients == 0
    splits_of = defaultdict(set)
    for r in res.records:
        splits_of[r.patient].add(r.split)
    assert all(len(s) == 1 for s in splits_of.values()), "a patient is in two splits"
    by_split = defaultdict(set)
    for r in res.records:
        by_split[r.split].add(r.patient)
    assert set(by_split) == {"train", "val", "test"}
    # 20 patients of 20 cells: about 70/10/20 by patients
    assert len(by_split["test"]) == 4 and len(by_split["val"]) == 2
    out = tmp_path / "m.csv"
    write_manifest(res.records, out)
    back = read_manifest(out)
    assert [(r.path, r.label, r.patient, r.split) for r in back] == [
        (r.path, r.label, r.patient, r.split) for r in res.records
    ]
    assert len(read_manifest(out, "test")) == 80


def test_patient_split_is_reproducible_and_seeded(sample_dir):
    a = build_split(sample_dir, seed=42, progress=False).records
    b = build_split(sample_dir, seed=42, progress=False).records
    c = build_split(sample_dir, seed=7, progress=False).records
    assert a == b
    assert {r.patient for r in a if r.split == "test"} != {r.patient for r in c if r.split == "test"}


def test_random_mode_reproduces_source_split_sizes():
    # The source's 27,558 images gave 19,842 / 2,204 / 5,512.
    recs = [Record(f"/x/{i}.png", "A" if i % 2 else "B", f"P{i % 150}") for i in range(27558)]
    out = split_records(recs, "random", val=0.1, test=0.2, seed=42, has_fixed_test=False)
    counts = {s: sum(r.split == s for r in out) for s in ("train", "val", "test")}
    assert counts == {"train": 19842, "val": 2204, "test": 5512}


def _corrupt_tree(sample_dir: Path, root: Path) -> dict[str, str]:
    """A class tree of 6 good real cells and one bad file of each kind."""
    for label in ("Parasitized", "Uninfected"):
        (root / label).mkdir(parents=True)
        for f in sorted((sample_dir / label).glob("*.png"))[:3]:
            shutil.copy(f, root / label / f.name)
    good = sorted((sample_dir / "Parasitized").glob("*.png"))[5]
    data = good.read_bytes()
    bad = {
        "C1P1ThinF_truncated.png": data[: len(data) // 2],
        "C1P1ThinF_zero.png": b"",
        "C1P1ThinF_garbage.png": bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8)),
        "notes.txt": b"not an image",
        "Thumbs.db": b"\x00" * 64,
    }
    for name, content in bad.items():
        (root / "Parasitized" / name).write_bytes(content)
    return bad


def test_bad_files_are_reported_and_left_out(sample_dir, tmp_path, capsys):
    root = tmp_path / "cells"
    bad = _corrupt_tree(sample_dir, root)
    out = tmp_path / "m.csv"
    assert split.run(root, out, mode="patient", seed=42, val=0.1, test=0.2) == 0
    rows = list(csv.DictReader(open(out.with_suffix(".bad_files.csv"))))
    assert sorted(Path(r["path"]).name for r in rows) == sorted(bad)
    reasons = {Path(r["path"]).name: r["reason"] for r in rows}
    assert "empty" in reasons["C1P1ThinF_zero.png"]
    assert "truncated" in reasons["C1P1ThinF_truncated.png"] or "corrupt" in reasons["C1P1ThinF_truncated.png"]
    assert len(read_manifest(out)) == 6
    assert "5 bad files left out" in capsys.readouterr().out


def test_oct2017_layout_keeps_its_test_folder(tmp_path):
    rng = np.random.default_rng(0)
    for part, patients in (("train", range(1, 9)), ("test", range(100, 102))):
        for cls in ("CNV", "DME", "DRUSEN", "NORMAL"):
            d = tmp_path / "OCT2017" / part / cls
            d.mkdir(parents=True)
            for p in patients:
                for n in range(2):
                    arr = rng.integers(0, 255, (40, 50), dtype=np.uint8)
                    Image.fromarray(arr, "L").save(d / f"{cls}-{p}-{n}.jpeg")
    res = build_split(tmp_path / "OCT2017", progress=False)
    assert res.labels == ["CNV", "DME", "DRUSEN", "NORMAL"]
    test = [r for r in res.records if r.split == "test"]
    assert {r.patient for r in test} == {"100", "101"} and len(test) == 16
    assert {r.split for r in res.records if r.patient not in ("100", "101")} <= {"train", "val"}
    assert any(r.split == "val" for r in res.records)


def test_unmatched_names_fall_back_to_one_patient_per_file(tmp_path, sample_dir, capsys):
    for label in ("a", "b"):
        (tmp_path / "d" / label).mkdir(parents=True)
        for i, f in enumerate(sorted((sample_dir / "Uninfected").glob("*.png"))[:10]):
            shutil.copy(f, tmp_path / "d" / label / f"img{i}.png")
    split.run(tmp_path / "d", tmp_path / "m.csv", "patient", 42, 0.1, 0.2)
    assert "matched no patient rule" in capsys.readouterr().out
    assert len({r.patient for r in read_manifest(tmp_path / "m.csv")}) == 20


def test_missing_data_dir_is_a_clear_error(tmp_path):
    from train.cli import main

    assert main(["split", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "m.csv")]) == 2


def test_exclude_patients_of_a_tree_keeps_them_out_of_every_split(sample_dir, tmp_path, capsys):
    """A release trains on every developer patient but the bundled sample's: none of them may slip in."""
    held = tmp_path / "held" / "Parasitized"
    held.mkdir(parents=True)
    first = sorted((sample_dir / "Parasitized").iterdir())[0]
    shutil.copy(first, held / first.name)  # one image names its patient: all of that patient's cells go
    pid = patient_id(first.name)
    assert split.patients_of(tmp_path / "held") == {pid}
    out = tmp_path / "release.csv"
    assert split.run(sample_dir, out, "patient", 42, 0.0, 0.0, tmp_path / "held") == 0
    back = read_manifest(out)
    assert len(back) == 380 and pid not in {r.patient for r in back}
    assert {r.split for r in back} == {"train"}
    assert "left out the 1 patients" in capsys.readouterr().out
