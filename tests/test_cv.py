"""`python -m train cv`: patient-grouped folds, out-of-fold report, resume, CLI errors."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter

import pytest

from train.cli import main
from train.split import read_manifest

FOLDS = 2


def _cli(*args: str) -> int:
    return main(["cv", *args])


@pytest.fixture(scope="module")
def cv_dir(tmp_path_factory, sample_manifest):
    """`tiny`, 2 folds, 1 epoch over the 400 bundled cells (all splits pooled)."""
    pytest.importorskip("keras")
    out = tmp_path_factory.mktemp("cv") / "tiny"
    assert _cli("--manifest", str(sample_manifest), "--preset", "tiny", "--folds", str(FOLDS), "--epochs", "1",
                "--bootstrap", "200", "--out", str(out)) == 0
    return out


def test_folds_are_patient_disjoint_stratified_and_cover_everyone(sample_manifest):
    from train.malaria.cv import assign_folds

    records = read_manifest(sample_manifest)
    folds = assign_folds(records, 4, seed=42)
    assert set(folds) == {r.patient for r in records} and set(folds.values()) == {1, 2, 3, 4}
    cells = Counter((folds[r.patient], r.label) for r in records)
    for label in ("Parasitized", "Uninfected"):
        per_fold = [cells[(f, label)] for f in (1, 2, 3, 4)]
        assert min(per_fold) > 0 and max(per_fold) - min(per_fold) <= 30, per_fold
    assert assign_folds(records, 4, seed=42) == folds  # seeded


@pytest.mark.slow
def test_cv_writes_report_and_every_cell_once(cv_dir, sample_manifest):
    records = read_manifest(sample_manifest)
    plan = json.loads((cv_dir / "plan.json").read_text())
    assert set(plan["patients"]) == {r.patient for r in records}  # train, val and test pooled
    report = json.loads((cv_dir / "cv.json").read_text())
    assert report["command"][:4] == ["python", "-m", "train", "cv"] and report["preset"]["name"] == "tiny"
    assert report["seed"] == 42 and "tensorflow" in report["versions"]
    rows = report["per_fold"]
    assert [r["fold"] for r in rows] == [1, 2]
    assert sum(r["cells"] for r in rows) == len(records) == 400
    assert sum(r["patients"] for r in rows) == 20
    for r in rows:
        for m in ("accuracy", "sensitivity", "specificity", "roc_auc"):
            assert 0.0 <= r[m] <= 1.0 and 0.0 <= r[f"tta_{m}"] <= 1.0
    # Each fold's model never saw its held-out patients: its run trained on the other fold only.
    for i in (1, 2):
        fold = read_manifest(cv_dir / f"fold-{i}" / "manifest.csv")
        train_p = {r.patient for r in fold if r.split == "train"}
        test_p = {r.patient for r in fold if r.split == "test"}
        assert train_p and test_p and not train_p & test_p and train_p | test_p == set(plan["patients"])
        assert test_p == {p for p, f in plan["patients"].items() if f == i}
        assert (cv_dir / f"fold-{i}" / "run" / "final.keras").is_file()
        assert not (cv_dir / f"fold-{i}" / "run" / "best.keras").exists()

    with open(cv_dir / "oof.csv", newline="") as fh:
        oof = list(csv.DictReader(fh))
    assert sorted(r["path"] for r in oof) == sorted(r.path for r in records)  # every cell exactly once
    assert all(0.0 <= float(r["prob_Parasitized"]) <= 1.0 for r in oof)
    assert all(plan["patients"][r["patient"]] == int(r["fold"]) for r in oof)

    pooled, ci = report["pooled"], report["bootstrap"]["intervals"]
    assert pooled["cells"] == 400 and pooled["patients"] == 20
    for m in ("accuracy", "sensitivity", "specificity", "roc_auc"):
        lo, hi = ci[m]
        assert 0.0 <= lo <= pooled[m] <= hi <= 1.0, (m, lo, pooled[m], hi)
    table = (cv_dir / "cv.csv").read_text().splitlines()
    assert table[0].startswith("fold,accuracy") and [r.split(",")[0] for r in table[1:]] == ["1", "2", "mean", "std"]
    assert "| mean |" in (cv_dir / "cv.md").read_text() and "Test-time flip averaging" in (cv_dir / "cv.md").read_text()
    assert set(report["summary"]) >= {"accuracy", "tta_accuracy", "seconds"}


@pytest.mark.slow
def test_resume_skips_finished_folds(cv_dir, tmp_path, capsys):
    """Fold 2 killed before training, fold 1 after training but before its report: only fold 2 trains."""
    out = tmp_path / "cv"
    shutil.copytree(cv_dir, out)
    shutil.rmtree(out / "fold-2")
    (out / "fold-1" / "fold.json").unlink()
    (out / "cv.json").unlink()
    fold1_model = out / "fold-1" / "run" / "final.keras"
    mtime = fold1_model.stat().st_mtime_ns
    plan = json.loads((out / "plan.json").read_text())
    args = ("--manifest", plan["manifest"], "--preset", "tiny", "--folds", str(FOLDS), "--epochs", "1",
            "--bootstrap", "50", "--out", str(out), "--resume")
    capsys.readouterr()
    assert _cli(*args) == 0
    printed = capsys.readouterr().out
    assert printed.count("model malaria_tiny:") == 1 and "fold 2/2: train" in printed
    assert fold1_model.stat().st_mtime_ns == mtime, "fold 1 had finished training; it must not train again"
    assert json.loads((out / "cv.json").read_text())["pooled"]["cells"] == 400
    assert _cli(*args) == 0
    printed = capsys.readouterr().out
    assert "fold 1/2: finished earlier, skipped" in printed and "fold 2/2: finished earlier, skipped" in printed
    assert "model malaria_tiny:" not in printed


def test_cli_errors(sample_manifest, tmp_path, capsys):
    pytest.importorskip("keras")
    with pytest.raises(SystemExit) as e:
        _cli("--manifest", str(sample_manifest), "--preset", "nope", "--out", str(tmp_path / "x"))
    assert e.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
    assert _cli("--manifest", str(sample_manifest), "--preset", "tiny", "--out", str(tmp_path / "x"), "--resume") == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert _cli("--manifest", str(sample_manifest), "--preset", "tiny", "--folds", "1", "--out",
                str(tmp_path / "y")) == 2
    assert "at least 2 folds" in capsys.readouterr().err
    assert _cli("--manifest", str(tmp_path / "missing.csv"), "--preset", "tiny", "--out", str(tmp_path / "z")) == 2
    assert "not found" in capsys.readouterr().err


def test_exclude_split_keeps_held_out_patients_out(sample_manifest, tmp_path):
    from train.malaria.cv import _plan

    plan = _plan(sample_manifest, "tiny", 2, 42, None, None, "test", tmp_path, resume=False)
    records = read_manifest(sample_manifest)
    assert set(plan["patients"]) == {r.patient for r in records if r.split != "test"}
    with pytest.raises(ValueError, match="already holds"):
        _plan(sample_manifest, "tiny", 2, 42, None, None, "test", tmp_path, resume=False)
    with pytest.raises(ValueError, match="folds 2 there, 3 asked"):
        _plan(sample_manifest, "tiny", 3, 42, None, None, "test", tmp_path, resume=True)
