"""Run directories: resolved config, history CSV and plot, checkpoints.

A run directory holds everything one training produced:

    config.json     resolved preset, labels, preprocessing spec, data, seed, model size
    best.keras      best checkpoint by validation accuracy
    history.csv     one row per finished epoch
    history.png     train/val loss and accuracy per epoch
    backup/         last finished epoch, for --resume (removed when training ends)
"""

from __future__ import annotations

import csv
import json
import os
import platform
from pathlib import Path
from typing import Any, Mapping

from edge_runtime.fileio import atomic_write_text, write_json  # noqa: F401  (re-exported for train/*)
from edge_runtime.versions import installed_versions

CONFIG = "config.json"
BEST = "best.keras"
HISTORY_CSV = "history.csv"
HISTORY_PNG = "history.png"
BACKUP = "backup"


def read_config(run: Path) -> dict[str, Any]:
    p = Path(run) / CONFIG
    if not p.is_file():
        raise FileNotFoundError(f"{run} is not a medge run directory ({CONFIG} missing)")
    return json.loads(p.read_text())


def model_file(run: Path) -> Path:
    """The run's image -> probabilities model: config `model_file` (OCT: fused.keras), else best.keras."""
    run = Path(run)
    name = read_config(run).get("model_file") or BEST
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
