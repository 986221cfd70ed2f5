"""Evaluate a trained run on a manifest split or on a class-folder tree.

    python -m train evaluate runs/malaria-edge --manifest runs/malaria.csv --split test --out runs/malaria-edge/eval
    python -m train evaluate runs/malaria-edge --data path/to/class_folders --out reports/other-lab

Writes report.json (metrics), report.md (classification report),
confusion_matrix.png and misclassified.csv (every wrong prediction with its
probabilities).
"""

from __future__ import annotations

import csv
import io
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.spec import PreprocessSpec
from train import runs
from train.metrics import classification_metrics, markdown_report
from train.oct.facts import SYNTHETIC_NOTE, any_synthetic, referral_markdown, referral_metrics
from train.split import Record, build_split, read_manifest


def load_model(path: Path):
    """Load a .keras model with Keras' safe mode on (no code from the file runs)."""
    import keras  # TensorFlow: imported only when this runs

    return keras.saving.load_model(path, compile=False, safe_mode=True)


def predict_records(model, records: list[Record], labels: list[str], spec: PreprocessSpec, batch_size: int = 64):
    """Probabilities for every record, in order."""
    from train.data import make_dataset  # loads TensorFlow: imported only when this runs

    ds = make_dataset(records, labels, spec, batch_size, cache=False)
    return model.predict(ds.map(lambda x, y: x), verbose=0)


def predict_records_flips(model, records: list[Record], labels: list[str], spec: PreprocessSpec,
                          batch_size: int = 64) -> np.ndarray:
    """Test-time augmentation: probabilities averaged over the image and its three flips (a cell has no up)."""
    import tensorflow as tf  # TensorFlow: imported only when this runs

    from train.data import make_dataset  # loads TensorFlow: imported only when this runs

    ds = make_dataset(records, labels, spec, batch_size, cache=True).map(lambda x, y: x)
    flips = (lambda x: x, tf.image.flip_left_right, tf.image.flip_up_down,
             lambda x: tf.image.flip_up_down(tf.image.flip_left_right(x)))
    return np.mean([model.predict(ds.map(f), verbose=0) for f in flips], axis=0)


def plot_confusion(cm: list[list[int]], labels: list[str], path: Path, title: str) -> None:
    import matplotlib  # optional: plots only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: plots only

    a = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(labels), 1.2 + 1.0 * len(labels)))
    ax.imshow(a, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            ax.text(j, i, str(a[i, j]), ha="center", va="center",
                    color="white" if a[i, j] > a.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate_run(
    run: Path,
    manifest: Path | None = None,
    data: Path | None = None,
    split: str = "test",
    out: Path | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Evaluate and write the report folder; return the report dict."""
    run_dir, model_path = runs.resolve_run(run)
    cfg = runs.read_config(run_dir)
    labels = list(cfg.labels)
    spec = cfg.preprocess
    if data is not None:
        res = build_split(data, progress=True)
        records = list(res.records)
        source = {"data": str(Path(data).resolve()), "bad_files": len(res.bad_files)}
        split_name = "all"
    elif manifest is not None:
        records = read_manifest(manifest, split)
        source = {"manifest": str(Path(manifest).resolve()), "split": split}
        split_name = split
    else:
        raise ValueError("evaluate needs --manifest or --data")
    if not records:
        raise ValueError(f"no images in split {split!r} of {manifest}")
    unknown = sorted({r.label for r in records} - set(labels))
    if unknown:
        raise ValueError(f"classes {unknown} are not among the model's labels {labels}")

    model = load_model(model_path)
    probs = predict_records(model, records, labels, spec, batch_size)
    y_true = np.array([labels.index(r.label) for r in records])
    report = classification_metrics(y_true, probs, labels, cfg.positive_label)
    report.update({
        "model": str(model_path.resolve()),
        "task": cfg.task,
        "source": source,
        "patients": len({r.patient for r in records}),
        "evaluated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })

    if cfg.referral:  # OCT: Kermany et al.'s urgent / routine / observation view
        report["referral"] = referral_metrics(y_true, probs.argmax(axis=1), labels, cfg.referral)
    synthetic = cfg.synthetic or any_synthetic(r.path for r in records)
    if synthetic:
        report["synthetic"] = True
        report["synthetic_note"] = SYNTHETIC_NOTE

    out = Path(out) if out is not None else run_dir / f"eval-{split_name}"
    title = f"{model_path.parent.name}: {split_name} ({report['n_images']} images, {report['patients']} patients)"
    write_report(out, report, title)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "patient", "true", "predicted", "confidence", *[f"p_{l}" for l in labels]])
    pred = probs.argmax(axis=1)
    for r, t, pr, pv in zip(records, y_true, pred, probs):
        if t != pr:
            w.writerow([r.path, r.patient, labels[t], labels[pr], f"{pv[pr]:.4f}", *[f"{v:.4f}" for v in pv]])
    runs.atomic_write_text(out / "misclassified.csv", buf.getvalue())
    report["out"] = str(out)
    return report


def report_markdown(report: dict[str, Any], title: str) -> str:
    """The classification report, plus the referral view (OCT) and the synthetic-data note when they apply."""
    text = markdown_report(report, title)
    if "referral" in report:
        text += "\n" + referral_markdown(report["referral"])
    if report.get("synthetic"):
        text = f"> {SYNTHETIC_NOTE}\n\n" + text
    return text


def write_report(out: Path, report: dict[str, Any], title: str) -> None:
    """report.json, report.md and confusion_matrix.png in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs.write_json(out / "report.json", report)
    runs.atomic_write_text(out / "report.md", report_markdown(report, title))
    plot_confusion(report["confusion_matrix"], report["labels"], out / "confusion_matrix.png", title)


def format_report(report: dict[str, Any]) -> str:
    """The Markdown report plus where the files are, for the terminal."""
    text = report_markdown(report, f"{Path(report['model']).parent.name} on {report['n_images']} images "
                                   f"from {report['patients']} patients")
    return text + f"\nreport.json, report.md, confusion_matrix.png, misclassified.csv in {report['out']}\n"
