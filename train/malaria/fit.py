"""Train the malaria cell ResNet.

    python -m train malaria --manifest runs/malaria.csv --preset edge --out runs/malaria-edge
    python -m train malaria --manifest runs/malaria.csv --preset edge --out runs/malaria-edge --resume
    python -m train malaria --manifest FOLD.csv --preset edge --init releases/malaria/model.keras --lr 0.005 \
        --epochs 3 --keep final --out runs/ft          # fine-tune a trained model, the preset's schedule

Reads the manifest's train and val splits, trains with the preset's optimizer
and schedule on every visible GPU (MirroredStrategy when there are several),
keeps the best checkpoint by validation accuracy (or, with `select_best=False`,
the final epoch's weights, val then optional and only logged), and can resume
a killed run from its last finished epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import keras

from edge_runtime.spec import MALARIA_SPEC
from train import runs
from train.data import make_dataset
from train.malaria.models import build_resnet, describe
from train.malaria.presets import MALARIA_PRESETS, MalariaPreset
from train.split import read_manifest
from train.training import RunLogger, pick_strategy

POSITIVE_LABEL = "Parasitized"
FINAL = "final.keras"  # the run's model when the final epoch is kept (select_best=False)


def learning_rate(p: MalariaPreset, total_steps: int) -> keras.optimizers.schedules.LearningRateSchedule:
    """The preset's schedule over `total_steps`: linear (polynomial, power 1) or cosine decay to 0."""
    if p.schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(p.learning_rate, decay_steps=max(1, total_steps), alpha=0.0)
    return keras.optimizers.schedules.PolynomialDecay(
        p.learning_rate, decay_steps=max(1, total_steps), end_learning_rate=0.0, power=1.0
    )


def train_malaria(
    manifest: Path,
    preset: str | MalariaPreset,
    out: Path,
    epochs: int | None = None,
    batch_size: int | None = None,
    resume: bool = False,
    seed: int = 42,
    verbose: int = 1,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    select_best: bool = True,
    init: Path | None = None,
    lr: float | None = None,
    hue: float | None = None,
    saturation: float | None = None,
    resize_mix: float | None = None,
) -> Path:
    """Train and return the run directory.

    Args:
        manifest: CSV from `python -m train split` (train and val splits are used).
        preset: a name in `MALARIA_PRESETS` or a `MalariaPreset`.
        out: run directory; must not hold a run unless `resume`.
        epochs, batch_size: override the preset.
        resume: continue from the last finished epoch of the run in `out`.
        seed: seeds Python, numpy and TensorFlow, and the shuffles.
        verbose: Keras verbosity (1 progress bar, 2 one line per epoch).
        callbacks: extra Keras callbacks (tests use one to interrupt training).
        select_best: keep the best epoch by val accuracy as best.keras (needs a val
            split); False keeps the final epoch's weights as final.keras (the run's
            `model_file`), and a val split, if any, is only logged. A resumed run
            keeps the choice it was started with.
        init: start from this trained Keras model (a `.keras` file or a run directory) instead of
            fresh weights: fine-tuning. Its input must be the malaria preprocessing's and its outputs
            the manifest's labels (same order). The preset still gives the optimizer, schedule,
            augmentation and batch size (pass the preset the init was trained with: the config
            records the preset's network, and `init` names the file that actually started it).
        lr: override the preset's peak learning rate (fine-tuning wants a smaller one).
        hue, saturation: override the preset's stain jitter (`train.data.augmentation`).
        resize_mix: override the preset's share of plain-bilinear resizes (`train.data.make_dataset`).
    """
    out = Path(out)
    if resume:
        cfg = runs.read_config(out)
        p = MalariaPreset.from_dict(cfg.preset)
        seed = cfg.seed
        manifest = Path(cfg.manifest)
        select_best = cfg.model_file != FINAL
        init = Path(cfg.init) if cfg.init else None
        print(f"resuming {out} (preset {p.name}, {p.epochs} epochs)")
    else:
        if runs.is_run(out):
            raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        p = MALARIA_PRESETS[preset] if isinstance(preset, str) else preset
        if isinstance(preset, str) and preset not in MALARIA_PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {sorted(MALARIA_PRESETS)}")
        overrides = {k: v for k, v in (("epochs", epochs), ("batch_size", batch_size),
                                       ("learning_rate", lr), ("hue", hue), ("saturation", saturation),
                                       ("resize_mix", resize_mix))
                     if v is not None}
        if overrides:
            import dataclasses

            p = dataclasses.replace(p, **overrides)
    keras.utils.set_random_seed(seed)

    records = read_manifest(manifest)
    labels = sorted({r.label for r in records})
    train_rec = [r for r in records if r.split == "train"]
    val_rec = [r for r in records if r.split == "val"]
    if not train_rec or (select_best and not val_rec):
        raise ValueError(f"{manifest} needs images in both train ({len(train_rec)}) and val ({len(val_rec)}) splits")
    spec = MALARIA_SPEC

    strategy = pick_strategy()
    replicas = strategy.num_replicas_in_sync
    train_ds = make_dataset(train_rec, labels, spec, p.batch_size, training=True, augment=p.augment, seed=seed,
                            hue=p.hue, saturation=p.saturation, resize_mix=p.resize_mix)
    val_ds = make_dataset(val_rec, labels, spec, p.batch_size) if val_rec else None
    steps = math.ceil(len(train_rec) / p.batch_size)

    if init is not None:
        init = Path(init)
        if init.is_dir():
            init = runs.resolve_run(init)[1]
        if not init.is_file():
            raise FileNotFoundError(f"--init {init}: no such Keras model")
    with strategy.scope():
        if init is None:
            model = build_resnet(p.model, spec.input_shape, len(labels), name=f"malaria_{p.name}")
        else:
            model = keras.models.load_model(init, compile=False)
            if tuple(model.input_shape[1:]) != tuple(spec.input_shape) or model.output_shape[-1] != len(labels):
                raise ValueError(f"--init {init}: input {model.input_shape[1:]} -> {model.output_shape[-1]} classes "
                                 f"does not fit {tuple(spec.input_shape)} -> {len(labels)} labels {labels}")
            print(f"fine-tuning {init} (peak learning rate {p.learning_rate})")
        model.compile(
            optimizer=keras.optimizers.SGD(learning_rate(p, p.epochs * steps), momentum=p.momentum,
                                           nesterov=p.nesterov),
            loss=keras.losses.CategoricalCrossentropy(label_smoothing=p.label_smoothing),
            metrics=["accuracy"],
        )
    size = describe(model)
    print(
        f"model {model.name}: {size['weights']:,} weights ({size['trainable_weights']:,} trainable), "
        f"{size['macs'] / 1e6:,.1f} M MACs per {spec.input_size[0]}x{spec.input_size[1]} image; "
        f"{replicas} replica(s), global batch {p.batch_size}"
    )
    print(f"train {len(train_rec)} images, val {len(val_rec)} images, {steps} steps per epoch, {p.epochs} epochs")

    best_so_far = None
    if resume:
        hist = runs.read_history(out)
        if hist and "val_accuracy" in hist[0]:
            best_so_far = max(r["val_accuracy"] for r in hist)
    else:
        runs.write_config(out, runs.RunConfig(
            task="malaria",
            model="malaria_resnet",
            labels=tuple(labels),
            model_file=runs.BEST if select_best else FINAL,
            positive_label=POSITIVE_LABEL if POSITIVE_LABEL in labels else labels[-1],
            preprocess=spec,
            preset=p.to_dict(),
            seed=seed,
            manifest=str(Path(manifest).resolve()),
            images={"train": len(train_rec), "val": len(val_rec)},
            size=size,
            replicas=replicas,
            init=str(init.resolve()) if init is not None else None,
            versions=runs.versions(),
            created=runs.utc_now(),
        ))

    cbs = [
        # Restores weights, optimizer state (so the LR schedule too) and the epoch counter.
        keras.callbacks.BackupAndRestore(str(out / runs.BACKUP)),
        keras.callbacks.ModelCheckpoint(
            str(out / runs.BEST), monitor="val_accuracy", mode="max", save_best_only=True,
            initial_value_threshold=best_so_far,
        ) if select_best else keras.callbacks.ModelCheckpoint(str(out / FINAL)),
        RunLogger(out, f"malaria ResNet ({p.name}): loss and accuracy"),
        *callbacks,
    ]
    t0 = time.perf_counter()
    model.fit(train_ds, validation_data=val_ds, epochs=p.epochs, callbacks=cbs, verbose=verbose,
              shuffle=False)  # the dataset shuffles itself
    wall = time.perf_counter() - t0
    hist = runs.read_history(out)
    if select_best:
        best = max(hist, key=lambda r: r.get("val_accuracy", 0.0))
        kept = f"best val accuracy {best['val_accuracy']:.4f} at epoch {int(best['epoch']) + 1}"
    else:
        kept = f"final epoch {len(hist)} kept"
    print(f"done in {wall:.0f} s: {kept}; model {out / (runs.BEST if select_best else FINAL)}, "
          f"history {out / runs.HISTORY_CSV}, plot {out / runs.HISTORY_PNG}")
    return out
