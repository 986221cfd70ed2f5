"""Train the OCT classifier: the source's shallow head on stored features, or end to end for comparison.

    python -m train oct head --store runs/oct-features.h5 --out runs/oct-head
    python -m train oct head --store runs/oct-features.h5 --mode end-to-end --out runs/oct-e2e
    python -m train oct fuse --head keras2_head.h5 --base-weights imagenet --out runs/oct-imported

`head` (approach B, the second article): 1x1 conv 64 without bias, batch
norm, ReLU, dropout 0.5, flatten, dense softmax on the 8x8x2048 features;
Adam 1e-3; best checkpoint by validation accuracy; learning rate halved after
5 epochs of flat validation loss, never below 5e-5. Batches are read from the
store per step, never loaded whole. `end-to-end` (approach A, the first
article): the frozen base runs on every image every epoch, topped by global
average pooling, dense 64 ReLU and dense softmax; it reads the images of the
store's manifest, so both modes see the same images.

Both write a run directory that `python -m train evaluate`, `oct gradcam`,
`oct predict` and `convert` read:

    config.json   labels, preprocessing, base (weights, sha256), model_file, head_file, synthetic, referral
    fused.keras   image (preprocessed 299x299x3) -> probabilities: base + head in one model
    head.keras    features -> probabilities (head mode; best by validation accuracy)
    history.csv/.png, eval-store-test/ (head mode: the head on the stored test split)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.clinical import OCT_LABELS, referral_map
from train import runs
from train.data import make_dataset
from train.evaluate import load_model, write_report
from train.metrics import classification_metrics
from train.oct.facts import SYNTHETIC_NOTE, referral_metrics
from train.oct.models import (
    build_base,
    build_head,
    build_top,
    describe_base,
    features_fingerprint,
    fuse,
    load_head,
    preprocess_name,
    preprocess_spec,
    weights_fingerprint,
)
from train.oct.store import make_sequence, read_column, read_info, split_indices
from train.split import Record
from train.training import RunLogger

MODES = ("head", "end-to-end")
FUSED = "fused.keras"
HEAD = "head.keras"


def _config(mode: str, labels: list[str], spec, base_weights: str, base_seed: int, base_sha: str,
            synthetic: bool, **extra: Any) -> runs.RunConfig:
    return runs.RunConfig(
        task="oct",
        mode=mode,
        model=f"oct_inceptionv3_{mode.replace('-', '_')}",
        model_file=FUSED,
        head_file=HEAD if mode != "end-to-end" else None,
        labels=tuple(labels),
        positive_label=None,
        referral=referral_map(labels),
        preprocess=spec,
        preprocess_name=preprocess_name(spec),
        base={"weights": base_weights, "seed": base_seed, "sha256": base_sha,
              "description": describe_base(base_weights, base_seed)},
        features_fingerprint=features_fingerprint(base_sha, spec),
        synthetic=synthetic,
        synthetic_note=SYNTHETIC_NOTE if synthetic else None,
        versions=runs.versions(),
        created=runs.utc_now(),
        **extra,
    )


def _check_base(info, base_weights: str | None, base_seed: int | None, preprocess: str | None):
    """Build the store's base (or the one asked for) and refuse it unless it is the store's."""
    weights = base_weights if base_weights is not None else info.base_weights
    seed = base_seed if base_seed is not None else info.base_seed
    spec = preprocess_spec(preprocess) if preprocess is not None else info.spec
    base = build_base(weights, seed)
    sha = weights_fingerprint(base)
    fp = features_fingerprint(sha, spec)
    if fp != info.fingerprint:
        raise ValueError(
            f"store {info.path} holds features of {info.describe()}, but the base asked for is "
            f"{describe_base(weights, seed)} (sha256 {sha[:12]}) with preprocessing scale {spec.scale:.6g} offset "
            f"{spec.offset:g} (fingerprint {fp}). A head trained on one base is wrong on another: "
            "drop --base-weights/--preprocess to use the store's, or extract a new store"
        )
    return base, weights, seed, sha, spec


def _callbacks(out: Path, monitor_file: str, title: str, best_so_far: float | None, extra: Sequence = ()):
    import keras  # TensorFlow: imported only when this runs

    return [
        # First, so its per-epoch `seconds` is training + validation only, not the checkpoint writes below.
        RunLogger(out, title),
        keras.callbacks.BackupAndRestore(str(out / runs.BACKUP)),
        keras.callbacks.ModelCheckpoint(str(out / monitor_file), monitor="val_accuracy", mode="max",
                                        save_best_only=True, initial_value_threshold=best_so_far),
        # The source: halve the rate when validation loss is flat for 5 epochs, floor 5e-5.
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=5, min_lr=5e-5, verbose=1),
        *extra,
    ]


def _best_so_far(out: Path, resume: bool) -> float | None:
    hist = runs.read_history(out) if resume else []
    return max(r["val_accuracy"] for r in hist) if hist and "val_accuracy" in hist[0] else None


def evaluate_head_on_store(run: Path, store: Path, split: str = "test", head=None, batch_size: int = 64) -> dict:
    """The head on stored features of one split: report.json/report.md in RUN/eval-store-<split>.

    Much faster than `python -m train evaluate` (no base pass) and gives the
    same figures when the store matches the run's base and preprocessing.
    """
    cfg = runs.read_config(run)
    info = read_info(store)
    if info.fingerprint != cfg.features_fingerprint:
        raise ValueError(f"store {store} ({info.describe()}) does not match run {run} "
                         f"(features fingerprint {cfg.features_fingerprint}): refusing to evaluate")
    if not cfg.head_file:
        raise ValueError(f"run {run} ({cfg.mode}) has no head to evaluate on stored features")
    head = head or load_model(Path(run) / cfg.head_file)
    idx = split_indices(store, split)
    if len(idx) == 0:
        raise ValueError(f"store {store} has no {split!r} images")
    probs = head.predict(make_sequence(store, split, batch_size, shuffle=False), verbose=0)
    labels = list(cfg.labels)
    y_true = read_column(store, "label", idx).astype(int)
    report = classification_metrics(y_true, probs, labels)
    if cfg.referral:
        report["referral"] = referral_metrics(y_true, probs.argmax(1), labels, cfg.referral)
    report.update({"model": str((Path(run) / cfg.head_file).resolve()), "task": "oct", "store": str(store),
                   "split": split, "patients": int(len(set(read_column(store, "patient", idx)))),
                   "synthetic": info.synthetic,
                   "evaluated": runs.utc_now()})
    out = Path(run) / f"eval-store-{split}"
    title = f"{Path(run).name} head on stored {split} features ({len(idx)} images, {report['patients']} patients)"
    write_report(out, report, title)
    report["out"] = str(out)
    return report


def train(
    store: Path,
    out: Path,
    mode: str = "head",
    epochs: int = 100,
    batch_size: int = 32,
    seed: int = 42,
    base_weights: str | None = None,
    base_seed: int | None = None,
    preprocess: str | None = None,
    resume: bool = False,
    verbose: int = 1,
    callbacks: Sequence = (),
) -> Path:
    """Train a head on a store (or end to end on the store's images) and write the run directory.

    Args:
        store: a complete store from `python -m train oct extract`.
        out: run directory; must not hold a run unless `resume`.
        mode: "head" (stored features) or "end-to-end" (images through the frozen base every epoch).
        epochs, batch_size, seed: training settings (the source: up to 100 epochs).
        base_weights, base_seed, preprocess: default to the store's; anything
            that changes the features is refused.
        resume: continue an interrupted run from its last finished epoch.
        verbose: Keras verbosity.
        callbacks: extra Keras callbacks.
    """
    import keras  # TensorFlow: imported only when this runs

    if mode not in MODES:
        raise ValueError(f"--mode {mode!r} is not one of {MODES}")
    out = Path(out)
    if resume:
        cfg = runs.read_config(out)
        store, mode, seed = Path(cfg.store), cfg.mode, cfg.seed
        epochs, batch_size = cfg.epochs, cfg.batch_size
    elif runs.is_run(out):
        raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    info = read_info(store)
    if not info.complete:
        raise ValueError(f"{store} is incomplete ({info.n_done}/{info.n} images): run the same "
                         "`oct extract` command again to finish it")
    base, weights, bseed, sha, spec = _check_base(info, base_weights, base_seed, preprocess)
    labels = info.labels
    n = {s: int(len(split_indices(store, s))) for s in ("train", "val", "test")}
    if not n["train"] or not n["val"]:
        raise ValueError(f"{store} needs images in both train ({n['train']}) and val ({n['val']}) splits; "
                         "re-split with a larger --val")
    keras.utils.set_random_seed(seed)
    title = f"OCT {mode} ({describe_base(weights, bseed)} base)" + (": SYNTHETIC data" if info.synthetic else "")

    if mode == "head":
        model = build_head(len(labels))
        train_data = make_sequence(store, "train", batch_size, shuffle=True, seed=seed)
        val_data = make_sequence(store, "val", batch_size, shuffle=False)
        ckpt = HEAD
    else:
        paths, pats, splits = (read_column(store, k) for k in ("path", "patient", "split"))
        lab = read_column(store, "label")
        recs = [Record(p, labels[l], pt, s) for p, l, pt, s in zip(paths, lab, pats, splits)]
        # Images are decoded every epoch, as the source's generator did: that cost is part of approach A.
        train_data = make_dataset([r for r in recs if r.split == "train"], labels, spec, batch_size,
                                  training=True, seed=seed, cache=False)
        val_data = make_dataset([r for r in recs if r.split == "val"], labels, spec, batch_size, cache=False)
        model = fuse(base, build_top(len(labels)), name="oct_end_to_end")
        ckpt = FUSED
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy", metrics=["accuracy"])
    if not resume:
        runs.write_config(out, _config(
            mode, labels, spec, weights, bseed, sha, info.synthetic, store=str(Path(store).resolve()),
            manifest=info.manifest, seed=seed, epochs=epochs, batch_size=batch_size, images=n,
            weights_trainable=int(sum(int(np.prod(w.shape)) for w in model.trainable_weights)),
        ))
    print(f"{mode}: train {n['train']} images, val {n['val']} images, {epochs} epochs, batch {batch_size}; "
          f"{sum(int(np.prod(w.shape)) for w in model.trainable_weights):,} trainable weights"
          + (" -- SYNTHETIC data" if info.synthetic else ""))
    t0 = time.perf_counter()
    model.fit(train_data, validation_data=val_data, epochs=epochs, verbose=verbose,
              callbacks=_callbacks(out, ckpt, title, _best_so_far(out, resume), callbacks))
    wall = time.perf_counter() - t0
    hist = runs.read_history(out)
    best = max(hist, key=lambda r: r.get("val_accuracy", 0.0))
    secs = [r["seconds"] for r in hist]
    print(f"done in {wall:.0f} s: best val accuracy {best['val_accuracy']:.4f} at epoch {int(best['epoch']) + 1}; "
          f"epoch time first {secs[0]:.2f} s, median {float(np.median(secs)):.2f} s")

    if mode == "head":
        head = load_model(out / HEAD)
        fused = fuse(base, head)
        fused.save(out / FUSED)
        print(f"head {out / HEAD} ({(out / HEAD).stat().st_size / 2**20:.1f} MiB), fused image->probabilities "
              f"model {out / FUSED} ({(out / FUSED).stat().st_size / 2**20:.1f} MiB)")
        if n["test"]:
            rep = evaluate_head_on_store(out, store, "test", head=head)
            msg = (f"head on stored test features: accuracy {rep['accuracy']:.4f} on {rep['n_images']} images "
                   f"from {rep['patients']} patients")
            if "referral" in rep:
                r = rep["referral"]
                fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
                msg += (f"; urgent referral sensitivity {fmt(r['urgent_sensitivity'])}, "
                        f"specificity {fmt(r['urgent_specificity'])}")
            print(msg + f" ({rep['out']})")
            if info.synthetic:
                print(f"note: {SYNTHETIC_NOTE}")
    else:
        print(f"fused end-to-end model {out / FUSED} ({(out / FUSED).stat().st_size / 2**20:.1f} MiB)")
    return out


def import_head(head_path: Path, out: Path, base_weights: str = "imagenet", base_seed: int = 0,
                preprocess: str = "inception", labels: Sequence[str] | None = None,
                store: Path | None = None) -> Path:
    """A run directory (config, head.keras, fused.keras) around a head trained elsewhere (e.g. Keras 2 .h5).

    With `store`, the base and preprocessing must be the store's (checked by fingerprint).
    """
    out = Path(out)
    if runs.is_run(out):
        raise ValueError(f"{out} already holds a run; choose another --out")
    labels = list(labels or OCT_LABELS)
    head = load_head(head_path, len(labels))
    if store is not None:
        base, base_weights, base_seed, sha, spec = _check_base(read_info(store), base_weights, base_seed, preprocess)
    else:
        spec = preprocess_spec(preprocess)
        base = build_base(base_weights, base_seed)
        sha = weights_fingerprint(base)
    out.mkdir(parents=True, exist_ok=True)
    head.save(out / HEAD)
    fuse(base, head).save(out / FUSED)
    runs.write_config(out, _config(
        "imported-head", labels, spec, base_weights, base_seed, sha, synthetic=False,
        imported_from=str(Path(head_path).resolve()),
    ))
    print(f"run {out}: head from {head_path} + base {describe_base(base_weights, base_seed)} -> {out / FUSED}")
    return out
