"""Compare an artifact's outputs with the Keras model's (numpy only).

The artifact's outputs come from `edge_runtime.load(path).run(x)`, the
device's own path (see `convert.export.prove`): its backend, batch 1 per
runtime call, float input quantized with the input tensor's own scale and
zero point when the model takes integers.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def compare(reference: np.ndarray, candidate: np.ndarray, y: np.ndarray | None = None) -> dict[str, Any]:
    """Top-1 agreement, max and mean |Δprob|, and accuracy of both (when labels are known)."""
    if reference.shape != candidate.shape:
        raise ValueError(f"output shapes differ: keras {reference.shape}, artifact {candidate.shape}")
    diff = np.abs(reference - candidate)
    r, c = reference.argmax(1), candidate.argmax(1)
    out: dict[str, Any] = {
        "images": int(len(reference)),
        "top1_agreement": float((r == c).mean()),
        "disagreements": int((r != c).sum()),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "keras_accuracy": None,
        "accuracy": None,
        "accuracy_delta": None,
    }
    if y is not None and (y >= 0).any():
        known = y >= 0
        out["keras_accuracy"] = float((r[known] == y[known]).mean())
        out["accuracy"] = float((c[known] == y[known]).mean())
        out["accuracy_delta"] = out["accuracy"] - out["keras_accuracy"]
    return out
