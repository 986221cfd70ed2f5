"""Classification metrics for reports (scikit-learn underneath), one dict shape for every model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import edge_runtime


def classification_metrics(
    y_true: Sequence[int], probs: np.ndarray, labels: Sequence[str], positive_label: str | None = None
) -> dict[str, Any]:
    """Accuracy, per-class and averaged precision/recall/F1, confusion matrix, ROC AUC.

    Args:
        y_true: true class indices.
        probs: (n, classes) predicted probabilities.
        labels: class names, index order.
        positive_label: the class whose sensitivity/specificity is reported
            (e.g. "Parasitized"); ROC AUC is of this class against the rest.
    """
    # sklearn: slow to import, only the metrics need it
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape != (len(y_true), len(labels)):
        raise ValueError(f"probs shape {probs.shape} does not match {len(y_true)} images x {len(labels)} labels")
    y_pred = probs.argmax(axis=1)
    idx = list(range(len(labels)))
    cm = confusion_matrix(y_true, y_pred, labels=idx)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=idx, zero_division=0)
    per_class = {
        l: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, l in enumerate(labels)
    }
    out: dict[str, Any] = {
        "n_images": int(len(y_true)),
        "labels": list(labels),
        "accuracy": float((y_pred == y_true).mean()) if len(y_true) else float("nan"),
        "per_class": per_class,
    }
    for avg in ("macro", "weighted"):
        ap, ar, af, _ = precision_recall_fscore_support(y_true, y_pred, labels=idx, average=avg, zero_division=0)
        out[f"{avg}_avg"] = {"precision": float(ap), "recall": float(ar), "f1": float(af), "support": int(len(y_true))}
    out["confusion_matrix"] = cm.tolist()
    if positive_label is not None:
        k = list(labels).index(positive_label)
        out.update(binary_rates(y_true == k, y_pred == k))
        out["positive_label"] = positive_label
        has_both = 0 < int((y_true == k).sum()) < len(y_true)
        out["roc_auc"] = float(roc_auc_score(y_true == k, probs[:, k])) if has_both else None
    return out


def binary_rates(actual: np.ndarray, predicted: np.ndarray) -> dict[str, float | None]:
    """Sensitivity (recall of positives) and specificity (recall of negatives); None when undefined."""
    actual, predicted = np.asarray(actual, bool), np.asarray(predicted, bool)
    tp = int((actual & predicted).sum())
    fn = int((actual & ~predicted).sum())
    tn = int((~actual & ~predicted).sum())
    fp = int((~actual & predicted).sum())
    return {
        "sensitivity": tp / (tp + fn) if tp + fn else None,
        "specificity": tn / (tn + fp) if tn + fp else None,
    }


def markdown_report(m: dict[str, Any], title: str = "Classification report") -> str:
    """The source's classification report (precision, recall, F1, support), as Markdown."""
    lines = [f"## {title}", "", "| class | precision | recall | f1-score | support |", "|---|---:|---:|---:|---:|"]
    for l in m["labels"]:
        c = m["per_class"][l]
        lines.append(f"| {l} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |")
    lines.append(f"| **accuracy** | | | {m['accuracy']:.4f} | {m['n_images']} |")
    for avg in ("macro", "weighted"):
        a = m[f"{avg}_avg"]
        lines.append(f"| {avg} avg | {a['precision']:.4f} | {a['recall']:.4f} | {a['f1']:.4f} | {a['support']} |")
    lines.append("")
    if m.get("positive_label"):
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(
            f"Positive class `{m['positive_label']}`: sensitivity {fmt(m['sensitivity'])}, "
            f"specificity {fmt(m['specificity'])}, ROC AUC {fmt(m.get('roc_auc'))}."
        )
        lines.append("")
    lines += ["Confusion matrix (rows: true, columns: predicted):", "",
              "| true \\ predicted | " + " | ".join(m["labels"]) + " |",
              "|---|" + "---:|" * len(m["labels"])]
    for l, row in zip(m["labels"], m["confusion_matrix"]):
        lines.append(f"| {l} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def artifact_metrics(path: str | Path, images: Sequence[str], y: np.ndarray, labels: Sequence[str], positive: str
                     ) -> tuple[dict[str, Any], np.ndarray]:
    """Accuracy, sensitivity, specificity, ROC AUC and uncertain share of an artifact, through edge_runtime; and
    its probabilities (cells x labels). Used by `convert release` and `train field-cv`."""
    model = edge_runtime.load(path, threads=1)
    preds = model.predict(list(images))
    bad = [p for p in preds if p.error]
    if bad:
        raise ValueError(f"{bad[0].source}: {bad[0].error}")
    probs = np.array([[p.probabilities[l] for l in labels] for p in preds])
    m = classification_metrics(y, probs, labels, positive)
    return {"cells": int(len(y)), "accuracy": m["accuracy"], "sensitivity": m["sensitivity"],
            "specificity": m["specificity"], "roc_auc": m["roc_auc"],
            "uncertain": float(np.mean([p.uncertain for p in preds]))}, probs
