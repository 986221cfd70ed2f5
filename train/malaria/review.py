"""Which labels of the data set to doubt: cleanlab on a cross-validation's out-of-fold predictions.

    python -m train review runs/cv-edge                      # -> runs/cv-edge/review/
    python -m train review runs/cv-edge --out DIR --top 96

The NIH cell set has known mislabelled cells, and a model's errors on unseen
patients mix its own mistakes with cells whose given label is wrong. Every cell
of `train cv`'s oof.csv was predicted by a model that never saw its patient, so
those probabilities are what confident learning needs (Northcutt et al., 2021,
as implemented by the `cleanlab` library): cleanlab's `find_label_issues`
flags the cells whose given label disagrees with the out-of-fold prediction
beyond each class's own confidence threshold, and `estimate_joint` estimates
how often each given label stands for each true one.

Writes into OUT:

    label_issues.csv         flagged cells, most doubtful first: rank, path, patient, fold, given, suggested,
                             p_given (the out-of-fold probability of the given label)
    summary.json, summary.md cells, out-of-fold errors, flagged cells per given label, the estimated noise
                             matrix, the patients with most flagged cells, accuracy on the unflagged cells
    issues_<label>.png       contact sheets of the flagged cells of each given label (numbered as in the CSV)
                             for a microscopist to confirm or reject

Nothing here changes a label or a training set: the output is evidence for a person to review.
"""

from __future__ import annotations

import collections
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from edge_runtime.fileio import atomic_write_bytes, atomic_write_text, write_json
from train.malaria.cv import OOF, _read_oof, _write_csv

TILE = 96  # contact-sheet cell size, pixels
COLUMNS = 8


def _read_probs(path: Path) -> tuple[list[dict[str, str]], list[str], np.ndarray]:
    """The rows, the two labels (positive first) and the (n, 2) out-of-fold probabilities."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no out-of-fold predictions here (run `python -m train cv` first)")
    rows = _read_oof(path)
    if not rows:
        raise ValueError(f"{path}: no rows")
    prob_cols = [c for c in rows[0] if c.startswith("prob_")]
    missing = {"path", "patient", "label", "predicted"} - set(rows[0])
    if len(prob_cols) != 1 or missing:
        raise ValueError(f"{path}: expected columns path, patient, label, predicted and one prob_<label> column "
                         f"(a binary cross-validation's oof.csv), got {list(rows[0])}")
    positive = prob_cols[0][len("prob_"):]
    others = sorted({r["label"] for r in rows} - {positive})
    if len(others) != 1:
        raise ValueError(f"{path}: a binary task needs exactly one label besides {positive!r}, found {others}")
    labels = [positive, others[0]]
    try:
        p = np.array([float(r[prob_cols[0]]) for r in rows])
    except ValueError as e:
        raise ValueError(f"{path}: {prob_cols[0]} is not a number everywhere ({e})") from None
    if np.any((p < 0) | (p > 1)):
        raise ValueError(f"{path}: {prob_cols[0]} outside [0, 1]")
    return rows, labels, np.stack([p, 1.0 - p], axis=1)


def find_issues(rows: list[dict[str, str]], labels: list[str], probs: np.ndarray) -> dict[str, Any]:
    """cleanlab's label issues and noise estimate for out-of-fold `probs` (columns in `labels` order)."""
    from cleanlab.count import estimate_joint
    from cleanlab.filter import find_label_issues

    given = np.array([labels.index(r["label"]) for r in rows])
    ranked = find_label_issues(given, probs, return_indices_ranked_by="self_confidence")
    joint = estimate_joint(given, probs)  # [given][true], sums to 1
    wrong = probs.argmax(axis=1) != given
    flagged = np.zeros(len(rows), dtype=bool)
    flagged[ranked] = True
    per_patient = collections.Counter(rows[i]["patient"] for i in ranked)
    return {
        "cells": len(rows),
        "patients": len({r["patient"] for r in rows}),
        "labels": labels,
        "oof_errors": int(wrong.sum()),
        "oof_accuracy": float(1.0 - wrong.mean()),
        "flagged": int(len(ranked)),
        "flagged_by_given_label": {lab: int((given[ranked] == k).sum()) for k, lab in enumerate(labels)},
        "flagged_that_are_oof_errors": int(wrong[ranked].sum()),
        "accuracy_on_unflagged": float(1.0 - wrong[~flagged].mean()) if (~flagged).any() else None,
        # Row = given label, column = true label; the off-diagonal mass is the estimated share of wrong labels.
        "estimated_joint_given_true": joint.round(5).tolist(),
        "estimated_label_noise": float(1.0 - np.trace(joint)),
        "patients_with_most_flagged": per_patient.most_common(10),
        "ranked": [int(i) for i in ranked],
    }


def _contact_sheet(items: list[tuple[int, dict[str, str], float]], title: str) -> Image.Image:
    n_rows = max(1, -(-len(items) // COLUMNS))
    header, caption = 22, 14
    sheet = Image.new("RGB", (COLUMNS * (TILE + 4), header + n_rows * (TILE + caption + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), title, fill="black")
    for k, (rank, row, p_given) in enumerate(items):
        x, y = (k % COLUMNS) * (TILE + 4), header + (k // COLUMNS) * (TILE + caption + 4)
        try:
            with Image.open(row["path"]) as im:
                sheet.paste(im.convert("RGB").resize((TILE, TILE), Image.Resampling.BILINEAR), (x, y))
        except OSError as e:  # a moved or unreadable file: say so on its tile, keep the sheet
            draw.text((x + 2, y + TILE // 2), f"unreadable: {type(e).__name__}", fill="red")
        draw.text((x + 2, y + TILE + 1), f"#{rank} {row['patient']} p={p_given:.2f}", fill="black")
    return sheet


def summary_markdown(s: dict[str, Any], source: Path) -> str:
    labels = s["labels"]
    lines = [
        f"# Label review of {source}",
        "",
        f"{s['cells']} cells of {s['patients']} patients, each predicted by a fold model that never saw its patient.",
        "",
        f"- out-of-fold accuracy: {s['oof_accuracy']:.2%} ({s['oof_errors']} errors)",
        f"- cells cleanlab flags as likely mislabelled: {s['flagged']} ("
        + ", ".join(f"{n} given {lab}" for lab, n in s["flagged_by_given_label"].items())
        + f"); {s['flagged_that_are_oof_errors']} of them are out-of-fold errors",
        f"- out-of-fold accuracy on the unflagged cells: {s['accuracy_on_unflagged']:.2%}"
        if s["accuracy_on_unflagged"] is not None else "- no unflagged cells",
        f"- estimated share of wrong labels (off-diagonal of the joint): {s['estimated_label_noise']:.2%}",
        "",
        "Estimated joint distribution (row: given label, column: true label):",
        "",
        "| given \\ true | " + " | ".join(labels) + " |",
        "|---|" + "---:|" * len(labels),
    ]
    for lab, row in zip(labels, s["estimated_joint_given_true"]):
        lines.append(f"| {lab} | " + " | ".join(f"{v:.4f}" for v in row) + " |")
    lines += ["", "Patients with the most flagged cells: "
              + ", ".join(f"{p} ({n})" for p, n in s["patients_with_most_flagged"]), ""]
    return "\n".join(lines)


def review(cv_dir: Path, out: Path | None = None, top: int = 48) -> dict[str, Any]:
    """Write label_issues.csv, summary.json/.md and one contact sheet per given label; return the summary."""
    cv_dir = Path(cv_dir)
    out = Path(out) if out is not None else cv_dir / "review"
    rows, labels, probs = _read_probs(cv_dir / OOF)
    s = find_issues(rows, labels, probs)
    out.mkdir(parents=True, exist_ok=True)

    table = []
    by_label: dict[str, list[tuple[int, dict[str, str], float]]] = {lab: [] for lab in labels}
    for rank, i in enumerate(s["ranked"], start=1):
        row, k = rows[i], labels.index(rows[i]["label"])
        p_given = float(probs[i, k])
        table.append([rank, row["path"], row["patient"], row.get("fold", ""), row["label"], labels[1 - k],
                      f"{p_given:.6f}"])
        by_label[row["label"]].append((rank, row, p_given))
    _write_csv(out / "label_issues.csv", ["rank", "path", "patient", "fold", "given", "suggested", "p_given"], table)

    s = {k: v for k, v in s.items() if k != "ranked"} | {"source": str(cv_dir / OOF)}
    for lab, items in by_label.items():
        sheet = _contact_sheet(items[:top], f"given {lab}, flagged {len(items)} (first {min(top, len(items))}, "
                                            f"most doubtful first)")
        png = io.BytesIO()
        sheet.save(png, format="PNG")
        atomic_write_bytes(out / f"issues_{lab}.png", png.getvalue())
    write_json(out / "summary.json", s)
    atomic_write_text(out / "summary.md", summary_markdown(s, cv_dir / OOF))
    s["out"] = str(out)
    return s


def run(cv_dir: Path, out: Path | None, top: int) -> int:
    s = review(cv_dir, out, top)
    print(summary_markdown(s, Path(cv_dir) / OOF))
    print(f"label_issues.csv, summary.json, summary.md and issues_<label>.png in {s['out']}")
    return 0
