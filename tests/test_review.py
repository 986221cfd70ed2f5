"""`python -m train review`: cleanlab flags the cells whose given label the out-of-fold predictions contradict."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from tests.helpers import SAMPLE, run_python

pytest.importorskip("cleanlab")

FLIPPED = 4  # cells written with the wrong label and a confident contrary out-of-fold prediction


def _write_oof(cv_dir, rng):
    """An oof.csv over the bundled cells (real files): graded, mostly right predictions, FLIPPED labels wrong."""
    rows = []
    for label in ("Parasitized", "Uninfected"):
        for path in sorted((SAMPLE / label).glob("*.png"))[:60]:
            p_true = rng.uniform(0.6, 0.99)  # the model agrees with the (right) label, more or less surely
            rows.append({"path": str(path), "patient": path.name.split("_")[0], "label": label, "p_true": p_true})
    for k, row in enumerate(rows[:: len(rows) // FLIPPED][:FLIPPED]):
        row["label"] = "Uninfected" if row["label"] == "Parasitized" else "Parasitized"
        row["p_true"] = 0.02 + 0.01 * k  # ... and is sure the given label is wrong
    with (cv_dir / "oof.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["fold", "path", "patient", "label", "prob_Parasitized", "predicted"])
        for i, row in enumerate(rows):
            p_par = row["p_true"] if row["label"] == "Parasitized" else 1.0 - row["p_true"]
            w.writerow([1 + i % 2, row["path"], row["patient"], row["label"], f"{p_par:.6f}",
                        "Parasitized" if p_par >= 0.5 else "Uninfected"])
    return rows[:: len(rows) // FLIPPED][:FLIPPED]


def test_review_flags_the_wrong_labels_most_doubtful_first_and_writes_sheets(tmp_path):
    flipped = _write_oof(tmp_path, np.random.default_rng(0))
    res = run_python(["-m", "train", "review", tmp_path, "--top", "8"])
    assert res.returncode == 0, res.stderr
    assert "likely mislabelled" in res.stdout

    with (tmp_path / "review" / "label_issues.csv").open(newline="") as f:
        issues = list(csv.DictReader(f))
    # Every flipped cell is flagged, ahead of any other, most doubtful (lowest p_given) first.
    assert [r["path"] for r in issues[:FLIPPED]] == [r["path"] for r in flipped]
    assert all(r["given"] != r["suggested"] for r in issues)
    p_given = [float(r["p_given"]) for r in issues]
    assert p_given == sorted(p_given)

    summary = json.loads((tmp_path / "review" / "summary.json").read_text())
    assert summary["cells"] == 120 and summary["flagged"] == len(issues) >= FLIPPED
    assert summary["oof_errors"] == FLIPPED
    assert 0 < summary["estimated_label_noise"] < 0.2
    for label in ("Parasitized", "Uninfected"):
        with Image.open(tmp_path / "review" / f"issues_{label}.png") as im:
            assert im.width > 0 and im.height > 0


def test_review_names_the_missing_or_malformed_file(tmp_path):
    res = run_python(["-m", "train", "review", tmp_path])
    assert res.returncode == 2 and "oof.csv" in res.stderr and "train cv" in res.stderr

    (tmp_path / "oof.csv").write_text("path,label\nx.png,Parasitized\n")
    res = run_python(["-m", "train", "review", tmp_path])
    assert res.returncode == 2 and "prob_<label>" in res.stderr
