"""Run directories: resolved config, history CSV and plot, checkpoints.

A run directory holds everything one training produced:

    config.json     resolved preset, labels, preprocessing spec, data, seed, model size
    best.keras      best checkpoint by validation accuracy
                    (or final.keras, the last epoch, for a run trained with select_best=False, e.g. a CV fold)
    history.csv     one row per finished epoch
    history.png     train/val loss and accuracy per epoch
    backup/         last finished epoch, for --resume (removed when training ends)

config.json is written and read only as a `RunConfig` (`write_config`,
`read_config`): the one contract between train and convert/benchmarks, as
`edge_runtime.metadata.ArtifactMetadata` is between convert and edge_runtime.
A key it does not know is refused, naming the file. No TensorFlow here.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import platform
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edge_runtime.fileio import atomic_write_text, write_json  # also re-exported for train/*
from edge_runtime.spec import PreprocessSpec
from edge_runtime.versions import installed_versions

CONFIG = "config.json"
BEST = "best.keras"
HISTORY_CSV = "history.csv"
HISTORY_PNG = "history.png"
BACKUP = "backup"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A run's resolved config (config.json): the one contract between train and convert/benchmarks.

    Attributes:
        task: "malaria" or "oct".
        labels: class names in output order.
        preprocess: how an image becomes the model's input.
        model: architecture name, e.g. "malaria_resnet", "oct_inceptionv3_head".
        model_file: the run's image -> probabilities model (OCT: fused.keras; malaria without
            checkpoint selection, e.g. a cross-validation fold: final.keras).
        positive_label: the class a screening flags (malaria), else None.
        seed, manifest, images: training seed, the split manifest, images per split.
        versions, created: library versions and UTC time of writing.
        preset: malaria: the resolved `MalariaPreset.to_dict()` (its "model" is the ResNet config).
        size: malaria: {"weights", "trainable_weights", "macs"}.
        replicas: malaria: devices trained on.
        mode: OCT: "head", "end-to-end" or "imported-head".
        head_file: OCT: features -> probabilities model (None for end-to-end).
        referral: OCT: class -> referral level, when every label has one.
        preprocess_name: OCT: the base's preprocessing name (e.g. "inception").
        base: OCT: {"weights", "seed", "sha256", "description"} of the InceptionV3 base.
        features_fingerprint: OCT: what stored features depend on (base, layer, preprocessing).
        synthetic, synthetic_note: trained on generated data, and what that means.
        store: OCT: the feature store trained on.
        epochs, batch_size, weights_trainable: OCT training settings and trainable size.
        imported_from: OCT: the head file an imported run was built around.
        init: malaria: the Keras model a fine-tuning run started from (`--init`), else None.
    """

    task: str
    labels: tuple[str, ...]
    preprocess: PreprocessSpec
    model: str = ""
    model_file: str = BEST
    positive_label: str | None = None
    seed: int | None = None
    manifest: str | None = None
    images: Mapping[str, int] | None = None
    versions: Mapping[str, str] | None = None
    created: str = ""
    preset: Mapping[str, Any] | None = None
    size: Mapping[str, int] | None = None
    replicas: int | None = None
    mode: str | None = None
    head_file: str | None = None
    referral: Mapping[str, str] | None = None
    preprocess_name: str | None = None
    base: Mapping[str, Any] | None = None
    features_fingerprint: str | None = None
    synthetic: bool = False
    synthetic_note: str | None = None
    store: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    weights_trainable: int | None = None
    imported_from: str | None = None
    init: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(str(l) for l in self.labels))
        if isinstance(self.preprocess, Mapping):
            object.__setattr__(self, "preprocess", PreprocessSpec.from_dict(self.preprocess))

    def to_dict(self) -> dict[str, Any]:
        """config.json's content: every field that is set (None is left out; `from_dict` restores it)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["labels"] = list(self.labels)
        d["preprocess"] = self.preprocess.to_dict()
        return {k: v for k, v in d.items() if v is not None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str | os.PathLike = "run config") -> RunConfig:
        """Raises ValueError naming `where` on keys RunConfig does not know or a missing required key."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}: unknown run config key(s) {unknown}; known: {sorted(known)}")
        missing = [k for k in ("task", "labels", "preprocess") if d.get(k) is None]
        if missing:
            raise ValueError(f"{where}: run config lacks {missing}")
        return cls(**{k: v for k, v in d.items() if v is not None})


def read_config(run: Path) -> RunConfig:
    """The RunConfig of a run directory.

    Raises:
        FileNotFoundError: no config.json in `run`.
        ValueError: config.json is not JSON or holds keys RunConfig does not know (named with the file).
    """
    p = Path(run) / CONFIG
    if not p.is_file():
        raise FileNotFoundError(f"{run} is not a medge run directory ({CONFIG} missing)")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{p} does not hold a JSON object")
    return RunConfig.from_dict(d, where=p)


def write_config(run: Path, cfg: RunConfig) -> Path:
    """Write `cfg` as RUN/config.json (atomically); returns the path."""
    p = Path(run) / CONFIG
    write_json(p, cfg.to_dict())
    return p


def is_run(path: Path) -> bool:
    """A folder holding a config.json (read it with `read_config`)."""
    return (Path(path) / CONFIG).is_file()


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def model_file(run: Path) -> Path:
    """The run's image -> probabilities model: config `model_file` (OCT: fused.keras), else best.keras."""
    run = Path(run)
    name = read_config(run).model_file
    path = run / name
    if not path.is_file():
        raise FileNotFoundError(f"{run} holds no {name}; has training finished an epoch?")
    return path


def resolve_run(path: Path) -> tuple[Path, Path]:
    """(run dir, model file) from a run directory or a .keras file inside one."""
    path = Path(path)
    if path.is_dir():
        return path, model_file(path)
    if path.suffix == ".keras" and path.is_file():
        return path.parent, path
    raise FileNotFoundError(f"{path} is neither a run directory nor a .keras file")


def versions() -> dict[str, str]:
    """Library versions worth recording next to a result."""
    return {"python": platform.python_version(), **installed_versions(("tensorflow", "keras", "numpy", "pillow"))}


def read_history(run: Path) -> list[dict[str, float]]:
    p = Path(run) / HISTORY_CSV
    if not p.is_file():
        return []
    with open(p, newline="") as fh:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()} for row in csv.DictReader(fh)]


def write_history(run: Path, rows: list[dict[str, float]]) -> None:
    if not rows:
        return
    keys = list(rows[0])
    for r in rows[1:]:
        keys += [k for k in r if k not in keys]
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(Path(run) / HISTORY_CSV, buf.getvalue())


def plot_history(run: Path, title: str = "") -> Path | None:
    """The source's plot: train/val loss and accuracy against epoch, one PNG."""
    rows = read_history(run)
    if not rows:
        return None
    import matplotlib  # optional: plots only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: plots only

    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig, ax = plt.subplots(figsize=(8, 5))
    for key, style in (("loss", "-"), ("val_loss", "-"), ("accuracy", "--"), ("val_accuracy", "--")):
        if key in rows[0]:
            ax.plot(epochs, [r[key] for r in rows], style, label=key.replace("_", " "))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss / accuracy")
    ax.set_title(title or f"training history: {Path(run).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(run) / HISTORY_PNG
    tmp = out.with_name(".tmp_" + out.name)
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, out)
    return out
