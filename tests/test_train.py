"""`tiny` trains on real cells, saves, reloads, evaluates; a killed run resumes from its checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from train import runs  # noqa: E402
from train.evaluate import evaluate_run, load_model  # noqa: E402
from train.malaria.fit import train_malaria  # noqa: E402
from train.split import read_manifest  # noqa: E402

from helpers import TINY_EPOCHS  # noqa: E402

pytestmark = pytest.mark.slow


def test_tiny_trains_saves_reloads_and_evaluates(tiny_run, sample_manifest, tmp_path):
    cfg = runs.read_config(tiny_run)
    assert cfg.labels == ("Parasitized", "Uninfected") and cfg.positive_label == "Parasitized"
    assert cfg.preprocess.input_size == (64, 64) and cfg.preset["name"] == "tiny"
    assert cfg.size["weights"] > 0 and cfg.size["macs"] > 0 and cfg.model_file == "best.keras"
    assert (tiny_run / "history.png").stat().st_size > 1000
    hist = runs.read_history(tiny_run)
    assert [r["epoch"] for r in hist] == list(range(TINY_EPOCHS)) and {"loss", "val_accuracy"} <= set(hist[0])
    assert not (tiny_run / "backup").exists(), "backup should be removed after a finished run"

    model = load_model(tiny_run / "best.keras")
    assert model.output_shape == (None, 2)

    report = evaluate_run(tiny_run, manifest=sample_manifest, split="test", out=tmp_path / "eval")
    test = read_manifest(sample_manifest, "test")
    assert report["n_images"] == len(test) == 80
    assert sum(map(sum, report["confusion_matrix"])) == 80
    saved = json.loads((tmp_path / "eval" / "report.json").read_text())
    for key in ("accuracy", "per_class", "macro_avg", "weighted_avg", "confusion_matrix", "labels",
                "sensitivity", "specificity", "roc_auc", "n_images"):
        assert key in saved
    cm = np.array(saved["confusion_matrix"])
    assert saved["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    assert (tmp_path / "eval" / "confusion_matrix.png").exists() and (tmp_path / "eval" / "report.md").exists()
    wrong = (tmp_path / "eval" / "misclassified.csv").read_text().strip().splitlines()
    assert len(wrong) - 1 == cm.sum() - np.trace(cm)


def test_evaluate_on_a_class_folder_tree(tiny_run, sample_dir, tmp_path):
    report = evaluate_run(tiny_run, data=sample_dir, out=tmp_path / "all")
    assert report["n_images"] == 400 and report["patients"] == 20


class _Kill(keras.callbacks.Callback):
    """Simulates a kill in the middle of an epoch."""

    def __init__(self, epoch: int, batch: int):
        super().__init__()
        self.epoch, self.batch, self.current = epoch, batch, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.current == self.epoch and batch == self.batch:
            raise KeyboardInterrupt("killed mid-epoch")


class _Epochs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_epoch_begin(self, epoch, logs=None):
        self.seen.append(epoch)


def test_killed_training_resumes_from_last_checkpoint(sample_manifest, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_malaria(sample_manifest, "tiny", out, epochs=3, verbose=0, callbacks=[_Kill(epoch=1, batch=3)])
    assert [r["epoch"] for r in runs.read_history(out)] == [0]
    assert (out / "backup").exists() and (out / "best.keras").exists()
    seen = _Epochs()
    train_malaria(sample_manifest, "tiny", out, resume=True, verbose=0, callbacks=[seen])
    assert seen.seen == [1, 2], "resume should start at the interrupted epoch, not from scratch"
    assert [r["epoch"] for r in runs.read_history(out)] == [0, 1, 2]
    # The linear schedule went on from where it was: LR reaches 0 at the last epoch's end.
    assert runs.read_history(out)[-1]["learning_rate"] == pytest.approx(0.0, abs=1e-7)


def test_existing_run_is_not_overwritten(tiny_run, sample_manifest):
    with pytest.raises(ValueError, match="already holds a run"):
        train_malaria(sample_manifest, "tiny", tiny_run, epochs=1, verbose=0)
