"""Write the OCT head's weights for on-device Grad-CAM: `{model}_gradcam.npz` beside the artifacts.

    python -m convert.gradcam_export runs/oct-head --out runs/oct-head/export [--name oct-head]
    python -m convert.gradcam_export fused.keras --out export --name oct

The device (`edge_runtime.gradcam`) computes the Grad-CAM gradient in closed
form from these arrays and reads the features from the fused .tflite, so it
never needs TensorFlow. The file's schema is `edge_runtime.gradcam`'s
(`HeadWeights.save` writes it, `HeadWeights.load` reads it): plain float32
arrays and one JSON string (`np.load(..., allow_pickle=False)` reads it):

    conv_kernel (C_in, F), conv_bias (F,)      the head's 1x1 conv
    bn_scale, bn_shift (F,)                    its inference batch norm folded to s * a + t
    dense_kernel (H*W*F, classes), dense_bias  the softmax layer after flatten
    info                                       schema, labels, feature shape, source sha256

`write_for_export(model, src, out)` is the hook for `convert.export.run_export`
(after the rows: it writes `{src.name}_gradcam.npz` for an OCT run and does
nothing for other tasks); it records `src.sha256`, the hash the artifacts'
metadata carries, so the device refuses weights from another model.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from convert.sources import load_keras_model
from edge_runtime.clinical import OCT_LABELS
from edge_runtime.fileio import sha256_file
from edge_runtime.gradcam import HeadWeights
from train import runs

SKIPPED = ("Dropout", "SpatialDropout2D", "GaussianDropout", "GaussianNoise", "InputLayer")


def find_head(model: Any) -> Any:
    """The head of a fused base+head model (its nested model whose output is the class vector), or `model`."""
    subs = [l for l in model.layers if hasattr(l, "layers")]
    heads = [l for l in subs if len(l.output.shape) == 2]
    if len(heads) == 1:
        return heads[0]
    return model


def _np(w) -> np.ndarray:
    import keras  # TensorFlow: imported only when this runs

    return np.asarray(keras.ops.convert_to_numpy(w), dtype=np.float32)


def head_arrays(head: Any) -> tuple[dict[str, np.ndarray], tuple[int, int, int]]:
    """(arrays, feature shape) of a conv-BN-ReLU-(dropout)-flatten-dense-softmax head.

    Raises:
        ValueError: a head of another shape, naming what was found.
    """
    layers = [l for l in head.layers if l.__class__.__name__ not in SKIPPED]
    kinds = [l.__class__.__name__ for l in layers]
    if kinds[:1] != ["Conv2D"]:
        raise ValueError(f"head {head.name} does not start with a Conv2D (layers: {kinds}); Grad-CAM weights "
                         "are written for the 1x1 conv head (approach B) only")
    conv, rest = layers[0], layers[1:]
    if tuple(conv.kernel_size) != (1, 1) or tuple(conv.strides) != (1, 1):
        raise ValueError(f"head conv {conv.name} is {conv.kernel_size} stride {conv.strides}, not 1x1 stride 1")
    if conv.activation.__name__ != "linear":
        raise ValueError(f"head conv {conv.name} has a fused {conv.activation.__name__}; expected BN then ReLU")
    kernel = _np(conv.kernel)[0, 0]  # (C_in, F)
    f = kernel.shape[1]
    bias = _np(conv.bias) if conv.use_bias else np.zeros(f, np.float32)
    scale, shift = np.ones(f, np.float32), np.zeros(f, np.float32)
    if rest and rest[0].__class__.__name__ == "BatchNormalization":
        bn = rest.pop(0)
        gamma = _np(bn.gamma) if bn.scale else np.ones(f, np.float32)
        beta = _np(bn.beta) if bn.center else np.zeros(f, np.float32)
        scale = gamma / np.sqrt(_np(bn.moving_variance) + np.float32(bn.epsilon))
        shift = beta - _np(bn.moving_mean) * scale
    relu = rest.pop(0) if rest else None
    is_relu = relu is not None and (
        (relu.__class__.__name__ == "Activation" and relu.activation.__name__ == "relu")
        or (relu.__class__.__name__ == "ReLU" and not relu.negative_slope and relu.max_value is None
            and not relu.threshold))
    if not is_relu:
        raise ValueError(f"expected ReLU after the head's conv/BN, found {relu.__class__.__name__ if relu else None}")
    kinds = [l.__class__.__name__ for l in rest]
    if kinds != ["Flatten", "Dense"] or rest[1].activation.__name__ != "softmax":
        raise ValueError(f"expected Flatten then Dense(softmax) after the ReLU, found {kinds}")
    dense = rest[1]
    feature_shape = tuple(int(v) for v in head.input_shape[1:])
    arrays = {"conv_kernel": kernel, "conv_bias": bias, "bn_scale": scale.astype(np.float32),
              "bn_shift": shift.astype(np.float32), "dense_kernel": _np(dense.kernel), "dense_bias": _np(dense.bias)}
    return arrays, feature_shape


def export_head_weights(model: Any, path: str | os.PathLike, labels: Sequence[str], source_sha256: str = "") -> Path:
    """Write `path` (.npz) from a fused OCT model or its head; returns the path."""
    arrays, feature_shape = head_arrays(find_head(model))
    if arrays["dense_kernel"].shape[1] != len(labels):
        raise ValueError(f"{len(labels)} labels for a head with {arrays['dense_kernel'].shape[1]} outputs")
    hw = HeadWeights(feature_shape=feature_shape, labels=tuple(labels), source_sha256=source_sha256, **arrays)
    return hw.save(path)


def write_for_export(model: Any, source: Any, out: str | os.PathLike, log=print) -> Path | None:
    """The hook for `convert.export.run_export`: weights for an OCT conv head, else None (with the reason logged).

    Args:
        model: the Keras model being exported (fused base + head).
        source: its `convert.sources.Source` (task, name, labels, sha256).
        out: the artifacts' folder.
    """
    if source.task != "oct":
        return None
    try:
        path = export_head_weights(model, Path(out) / f"{source.name}_gradcam.npz", source.labels, source.sha256)
    except ValueError as e:  # e.g. the end-to-end run's pooling top: no 1x1 conv to explain on the device
        log(f"no on-device Grad-CAM weights for {source.name}: {e}")
        return None
    log(f"Grad-CAM head weights {path}")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m convert.gradcam_export", description=__doc__.split("\n")[0])
    p.add_argument("source", type=Path, help="OCT run directory (its fused model) or a fused/head .keras file")
    p.add_argument("--out", type=Path, required=True, help="the artifacts' folder")
    p.add_argument("--name", help="model name of the artifacts (default: run directory name or file stem)")
    p.add_argument("--labels", help="comma-separated class names for a bare model file")
    args = p.parse_args(argv)

    src = args.source
    try:
        if src.is_dir():
            model_path, labels, name = runs.model_file(src), list(runs.read_config(src).labels), src.name
        else:
            model_path, labels, name = src, args.labels.split(",") if args.labels else list(OCT_LABELS), src.stem
        model = load_keras_model(model_path)
        out = export_head_weights(model, args.out / f"{args.name or name}_gradcam.npz", labels, sha256_file(model_path))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
