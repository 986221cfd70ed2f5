"""Patient-grouped k-fold cross-validation of a malaria preset.

    python -m train cv --manifest runs/malaria.csv --preset edge --folds 5 --out runs/cv-edge
    python -m train cv --manifest runs/malaria.csv --preset edge --folds 5 --out runs/cv-edge --resume

Every record of the manifest is pooled, whatever its split column says (train,
val and test alike), unless `exclude_split` keeps one out (e.g. a held-out
test split). Whole patients are dealt to k folds by the split command's greedy
class-stratified assignment (`train.split._assign_groups`), so each fold gets
a similar number of cells of each class and no patient is in two folds.

Each fold trains `train_malaria` on the other folds' patients with the preset's
fixed schedule and keeps the FINAL epoch's weights (`select_best=False`): no
validation split ranks checkpoints, because a 9-patient val split (what the
NIH set's 10% gives) is too noisy to rank them (docs/training.md: the deeper net kept a
lucky epoch-3 checkpoint and lost 1.8 points), and carving one out would
also take patients from training. The held-out fold is then predicted, and
its out-of-fold probabilities are kept per cell.

Writes into OUT:

    plan.json          the fold of every patient and the settings (read back by --resume)
    fold-<i>/          manifest.csv (train = other folds, test = this fold), run/ (the run dir),
                       oof.csv and, last, fold.json (its metrics: the fold's finished marker)
    cv.json, cv.csv, cv.md, oof.csv   per-fold and pooled metrics, out-of-fold predictions

Per fold: accuracy, sensitivity and specificity of Parasitized, ROC AUC, cells,
patients, seconds; their mean and std over folds; and pooled out-of-fold
metrics with 95% intervals from a patient-level bootstrap (patients resampled
with replacement; cells of one patient are correlated, so resampling cells
would understate the spread).

Lives in train/malaria/ because it is built on `train_malaria` and its presets;
it only needs a manifest, so another task that trains from a manifest could
reuse `assign_folds` and the report.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from train import runs
from train.evaluate import load_model, predict_records, predict_records_flips
from train.malaria.presets import MALARIA_PRESETS
from train.metrics import binary_rates, classification_metrics
from train.split import Record, _assign_groups, read_manifest, write_manifest

PLAN = "plan.json"
FOLD_DONE = "fold.json"
OOF = "oof.csv"
METRICS = ("accuracy", "sensitivity", "specificity", "roc_auc")


def assign_folds(records: Sequence[Record], k: int, seed: int) -> dict[str, int]:
    """{patient: fold 1..k}: whole patients, greedy and class-stratified (as `python -m train split`)."""
    groups: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        groups[r.patient][r.label] += 1
    if k < 2:
        raise ValueError(f"--folds {k}: need at least 2 folds")
    if len(groups) < k:
        raise ValueError(f"{len(groups)} patients cannot fill {k} folds")
    names = {f"fold-{i}": i for i in range(1, k + 1)}
    assignment = _assign_groups(groups, dict.fromkeys(names, 1.0 / k), seed)
    return {p: names[f] for p, f in assignment.items()}


def _fold_records(records: Sequence[Record], folds: dict[str, int], i: int) -> list[Record]:
    """The manifest of fold i: every other fold's cells as train, fold i's as test."""
    return [dataclasses.replace(r, split="test" if folds[r.patient] == i else "train") for r in records]


def _rates(y: np.ndarray, pred: np.ndarray, prob: np.ndarray) -> dict[str, float | None]:
    """Accuracy, sensitivity, specificity and ROC AUC of the positive class
    (y, pred: is positive; prob: its probability)."""
    from sklearn.metrics import roc_auc_score  # sklearn: slow to import, only the metrics need it

    out: dict[str, float | None] = {"accuracy": float((pred == y).mean())}
    out.update(binary_rates(y, pred))
    out["roc_auc"] = float(roc_auc_score(y, prob)) if 0 < y.sum() < len(y) else None
    return out


def bootstrap_intervals(
    y: np.ndarray, pred: np.ndarray, prob: np.ndarray, patients: Sequence[str], draws: int, seed: int
) -> dict[str, list[float] | None]:
    """95% percentile intervals of `_rates` over `draws` resamples of patients with replacement."""
    if draws <= 0:
        return dict.fromkeys(METRICS)
    rng = np.random.default_rng(seed)
    ids, inverse = np.unique(np.asarray(patients), return_inverse=True)
    cells = [np.flatnonzero(inverse == j) for j in range(len(ids))]
    samples: dict[str, list[float]] = {m: [] for m in METRICS}
    for _ in range(draws):
        idx = np.concatenate([cells[j] for j in rng.integers(0, len(ids), len(ids))])
        for m, v in _rates(y[idx], pred[idx], prob[idx]).items():
            if v is not None:
                samples[m].append(v)
    return {m: ([float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v else None)
            for m, v in samples.items()}


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    runs.atomic_write_text(path, buf.getvalue())


def _read_oof(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _training_finished(run: Path, epochs: int) -> bool:
    """Every epoch is in the history and the backup is gone: resuming would start over, so don't."""
    return (runs.is_run(run) and len(runs.read_history(run)) >= epochs
            and not (run / runs.BACKUP).exists() and (run / runs.read_config(run).model_file).is_file())


def _plan(manifest: Path, preset: str, k: int, seed: int, epochs: int | None, batch_size: int | None,
          exclude_split: str | None, out: Path, resume: bool) -> dict[str, Any]:
    """A new plan (written to OUT/plan.json), or with `resume` the one already there, checked against the request."""
    if preset not in MALARIA_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(MALARIA_PRESETS)}")
    request = {"manifest": str(Path(manifest).resolve()), "preset": preset, "folds": k, "seed": seed,
               "epochs": epochs, "batch_size": batch_size, "exclude_split": exclude_split}
    path = out / PLAN
    if path.is_file():
        if not resume:
            raise ValueError(f"{out} already holds a cross-validation; pass --resume to continue it or choose "
                             "another --out")
        plan = json.loads(path.read_text())
        differ = {key: (plan[key], v) for key, v in request.items() if plan[key] != v}
        if differ:
            raise ValueError(f"--resume with other settings than {path}: "
                             + ", ".join(f"{key} {a!r} there, {b!r} asked" for key, (a, b) in differ.items()))
        return plan
    if resume:
        raise FileNotFoundError(f"nothing to resume: {path} not found")
    records = [r for r in read_manifest(manifest) if exclude_split is None or r.split != exclude_split]
    if not records:
        raise ValueError(f"no records left in {manifest} after excluding split {exclude_split!r}")
    plan = {**request, "patients": assign_folds(records, k, seed), "created": runs.utc_now()}
    runs.write_json(path, plan)
    return plan


def run_cv(
    manifest: Path,
    preset: str,
    out: Path,
    folds: int = 5,
    seed: int = 42,
    epochs: int | None = None,
    batch_size: int | None = None,
    resume: bool = False,
    bootstrap: int = 2000,
    exclude_split: str | None = None,
    verbose: int = 2,
    command: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run (or with `resume` continue) the cross-validation; write the report files and return cv.json's content."""
    from train.malaria.fit import train_malaria  # loads TensorFlow: imported only when this runs

    out = Path(out)
    plan = _plan(manifest, preset, folds, seed, epochs, batch_size, exclude_split, out, resume)
    patients: dict[str, int] = plan["patients"]
    records = [r for r in read_manifest(manifest) if r.patient in patients]
    missing = set(patients) - {r.patient for r in records}
    if missing:
        raise ValueError(f"{manifest} no longer holds patients {sorted(missing)[:5]} of {out / PLAN}")
    labels = sorted({r.label for r in records})

    fold_rows = []
    for i in range(1, folds + 1):
        fdir = out / f"fold-{i}"
        held = [r for r in records if patients[r.patient] == i]
        done = fdir / FOLD_DONE
        if done.is_file():
            fold_rows.append(json.loads(done.read_text()))
            print(f"fold {i}/{folds}: finished earlier, skipped ({len(held)} cells)")
            continue
        fdir.mkdir(parents=True, exist_ok=True)
        run_dir = fdir / "run"
        fold_manifest = fdir / "manifest.csv"
        n_train = len(records) - len(held)
        print(f"fold {i}/{folds}: train {n_train} cells of {len(patients) - len({r.patient for r in held})} "
              f"patients, predict {len(held)} cells of {len({r.patient for r in held})} patients", flush=True)
        t0 = time.perf_counter()
        if runs.is_run(run_dir):
            total = MALARIA_PRESETS[preset].epochs if epochs is None else epochs
            if not _training_finished(run_dir, total):
                train_malaria(fold_manifest, preset, run_dir, resume=True, verbose=verbose)
        else:
            write_manifest(_fold_records(records, patients, i), fold_manifest)
            train_malaria(fold_manifest, preset, run_dir, epochs=epochs, batch_size=batch_size, seed=seed,
                          verbose=verbose, select_best=False)
        cfg = runs.read_config(run_dir)
        positive = cfg.positive_label
        model = load_model(runs.model_file(run_dir))
        probs = predict_records(model, held, list(cfg.labels), cfg.preprocess)
        k = list(cfg.labels).index(positive)
        y = np.array([list(cfg.labels).index(r.label) for r in held])
        m = classification_metrics(y, probs, list(cfg.labels), positive)
        # Measured beside, never chosen silently: flip averaging costs the device 4 inferences a cell.
        m_tta = classification_metrics(y, predict_records_flips(model, held, list(cfg.labels), cfg.preprocess),
                                       list(cfg.labels), positive)
        _write_csv(fdir / OOF, ("fold", "path", "patient", "label", f"prob_{positive}", "predicted"),
                   [(i, r.path, r.patient, r.label, f"{p[k]:.6f}", cfg.labels[int(p.argmax())])
                    for r, p in zip(held, probs)])
        row = {"fold": i, **{key: m[key] for key in METRICS}, **{f"tta_{key}": m_tta[key] for key in METRICS},
               "cells": len(held),
               "patients": len({r.patient for r in held}), "seconds": round(time.perf_counter() - t0, 1),
               "confusion_matrix": m["confusion_matrix"]}
        runs.write_json(done, row)  # last: the fold's finished marker
        fold_rows.append(row)
        print(f"fold {i}/{folds}: " + ", ".join(f"{key} {_fmt(row[key])}" for key in METRICS), flush=True)

    report = _report(plan, out, fold_rows, labels, bootstrap, command)
    print(markdown(report))
    return report


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _mean_std(rows: Sequence[dict[str, Any]], key: str) -> tuple[float | None, float | None]:
    v = [r[key] for r in rows if r[key] is not None]
    return (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0) if v else (None, None)


def _report(plan: dict[str, Any], out: Path, fold_rows: list[dict[str, Any]], labels: list[str], draws: int,
            command: Sequence[str] | None) -> dict[str, Any]:
    """Pool the folds' oof parts into OUT/oof.csv and write cv.json, cv.csv and cv.md."""
    from train.malaria.fit import POSITIVE_LABEL  # loads TensorFlow: imported only when this runs

    positive = POSITIVE_LABEL if POSITIVE_LABEL in labels else labels[-1]
    oof = [row for i in range(1, plan["folds"] + 1) for row in _read_oof(out / f"fold-{i}" / OOF)]
    header = list(oof[0])
    _write_csv(out / OOF, header, [[row[h] for h in header] for row in oof])
    y = np.array([row["label"] == positive for row in oof])
    pred = np.array([row["predicted"] == positive for row in oof])
    prob = np.array([float(row[f"prob_{positive}"]) for row in oof])
    pooled = _rates(y, pred, prob)
    ci = bootstrap_intervals(y, pred, prob, [row["patient"] for row in oof], draws, plan["seed"])
    keys = (*METRICS, *(f"tta_{m}" for m in METRICS if all(f"tta_{m}" in r for r in fold_rows)), "seconds")
    summary = {key: dict(zip(("mean", "std"), _mean_std(fold_rows, key))) for key in keys}
    preset = MALARIA_PRESETS[plan["preset"]]
    report = {
        "command": list(command) if command is not None else None,
        "manifest": plan["manifest"],
        "preset": preset.to_dict(),
        "epochs": plan["epochs"] or preset.epochs,
        "batch_size": plan["batch_size"] or preset.batch_size,
        "folds": plan["folds"],
        "seed": plan["seed"],
        "exclude_split": plan["exclude_split"],
        "positive_label": positive,
        "selection": "final epoch of the preset's fixed schedule (no checkpoint selection)",
        "per_fold": fold_rows,
        "summary": summary,
        "pooled": {"cells": len(oof), "patients": len({row["patient"] for row in oof}), **pooled},
        "bootstrap": {"draws": draws, "unit": "patient", "level": 0.95, "intervals": ci},
        "versions": runs.versions(),
        "created": runs.utc_now(),
    }
    runs.write_json(out / "cv.json", report)
    cols = ("fold", *METRICS, "cells", "patients", "seconds")
    rows = [[r[c] for c in cols] for r in fold_rows]
    rows += [[stat, *[summary[c][stat] if c in summary else "" for c in cols[1:]]] for stat in ("mean", "std")]
    _write_csv(out / "cv.csv", cols, rows)
    runs.atomic_write_text(out / "cv.md", markdown(report))
    return report


def markdown(report: dict[str, Any]) -> str:
    """The per-fold table, mean and std, and the pooled out-of-fold line with bootstrap intervals."""
    pos = report["positive_label"]
    lines = [
        f"## {report['folds']}-fold patient-grouped cross-validation: `{report['preset']['name']}`",
        "",
        f"{report['epochs']} epochs, batch {report['batch_size']}, seed {report['seed']}, final-epoch weights; "
        f"sensitivity and specificity of `{pos}`.",
        "",
        "| fold | accuracy | sensitivity | specificity | ROC AUC | cells | patients | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["per_fold"]:
        lines.append(f"| {r['fold']} | " + " | ".join(_fmt(r[m]) for m in METRICS)
                     + f" | {r['cells']} | {r['patients']} | {r['seconds']:.0f} |")
    s = report["summary"]
    for stat in ("mean", "std"):
        lines.append(f"| {stat} | " + " | ".join(_fmt(s[m][stat]) for m in METRICS)
                     + f" | | | {s['seconds'][stat]:.0f} |")
    if "tta_accuracy" in s:
        lines += ["", "Test-time flip averaging (the image and its 3 flips; 4 inferences a cell on the device), "
                      "mean +- std over folds: " + ", ".join(
                          f"{m.replace('_', ' ')} {_fmt(s[f'tta_{m}']['mean'])} +- {_fmt(s[f'tta_{m}']['std'])}"
                          for m in METRICS)]
    p, ci = report["pooled"], report["bootstrap"]["intervals"]
    lines += ["", f"Pooled out-of-fold ({p['cells']} cells, {p['patients']} patients), 95% interval from "
                  f"{report['bootstrap']['draws']} patient-level bootstrap draws:", ""]
    for m in METRICS:
        interval = "" if ci[m] is None else f" [{ci[m][0]:.4f}, {ci[m][1]:.4f}]"
        lines.append(f"- {m.replace('_', ' ')}: {_fmt(p[m])}{interval}")
    return "\n".join(lines) + "\n"


def run(args, argv: Sequence[str]) -> int:
    """CLI body of `python -m train cv` (`argv`: its arguments, recorded in cv.json)."""
    run_cv(args.manifest, args.preset, args.out, folds=args.folds, seed=args.seed, epochs=args.epochs,
           batch_size=args.batch_size, resume=args.resume, bootstrap=args.bootstrap,
           exclude_split=args.exclude_split, command=["python", "-m", "train", *argv])
    return 0
