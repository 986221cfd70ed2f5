"""Keras pieces both trainers share: the module a builder builds with, the
distribution strategy, and the callback that writes a run's history."""

from __future__ import annotations

import time
from pathlib import Path
from types import ModuleType

import keras
import tensorflow as tf

from train import runs


def keras_module(module: ModuleType | None) -> ModuleType:
    """`module` (e.g. tf_keras for a QAT twin) or Keras 3 when None."""
    return keras if module is None else module


def pick_strategy() -> tf.distribute.Strategy:
    """MirroredStrategy over all GPUs when there are several, else the default (one device)."""
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


class RunLogger(keras.callbacks.Callback):
    """Writes history.csv and history.png after every epoch.

    Rows of epochs at or after the current one are replaced, so a run resumed
    from its last checkpoint never shows an epoch twice.
    """

    def __init__(self, run: Path, title: str):
        super().__init__()
        self.run, self.title = Path(run), title
        self._t0 = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        rows = [r for r in runs.read_history(self.run) if int(r["epoch"]) < epoch]
        row = {"epoch": epoch, **{k: float(v) for k, v in (logs or {}).items()}}
        row["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        row["seconds"] = round(time.perf_counter() - self._t0, 2)
        runs.write_history(self.run, rows + [row])
        runs.plot_history(self.run, self.title)
