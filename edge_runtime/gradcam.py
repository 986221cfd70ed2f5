"""Grad-CAM for the OCT head on the device: numpy only, no TensorFlow, no autodiff.

    python -m edge_runtime predict export/oct_tflite-float32.tflite scan.jpeg --gradcam maps/

The source's map is taken on the head's 1x1 conv output `a` (8x8x64). After
that conv the head is batch norm (per-channel affine at inference), ReLU,
dropout (identity at inference), flatten and a dense softmax, so the gradient
of the predicted probability p_k with respect to `a` has a closed form:

    z = s * a + t                      (BN folded: s = gamma / sqrt(var + eps), t = beta - mean * s)
    r = relu(z);  logits = W r + b;    p = softmax(logits)
    dp_k/dlogits_j = p_k (delta_kj - p_j)
    dp_k/da        = s * [z > 0] * reshape(W^T dp_k/dlogits)

Channel weights are the spatial mean of that gradient; the map is the
positive part of the channel-mean of weight * activation, scaled to [0, 1],
resized to the image, jet-coloured and blended 50/50 over it — the same
steps as `train/oct/gradcam.py` (a test holds the two to correlation >= 0.99).

The head's weights reach the device as `{model}_gradcam.npz`, written by
`convert/gradcam_export.py` next to the artifacts through `HeadWeights.save`
(the file's schema — `SCHEMA`, `ARRAYS`, `INFO` — is defined here once and
read by `HeadWeights.load`). The 8x8x2048 features the head reads are taken
from the fused .tflite artifact itself: the input of the head's 1x1 conv is
found in the graph the runtime reports (`Session.ops`) and opened as an
extra output of a second session (`open_session(..., extra_outputs=...)`;
float or int8, dequantized with the tensor's own scale and zero point). The
numpy head's probabilities are checked against the artifact's so a wrong
tensor or foreign weights are refused rather than drawn.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from edge_runtime.backends import open_session
from edge_runtime.clinical import is_oct
from edge_runtime.fileio import atomic_write_bytes
from edge_runtime.images import load_image, preprocess
from edge_runtime.model import dequantize, quantize

# The `{model}_gradcam.npz` file: plain float32 arrays `ARRAYS` and one JSON string under `INFO`
# ({"schema": SCHEMA, "labels", "feature_shape", "source_sha256", "folded"}); `np.load(allow_pickle=False)` reads it.
SCHEMA = "medge-gradcam/1"
ARRAYS = ("conv_kernel", "conv_bias", "bn_scale", "bn_shift", "dense_kernel", "dense_bias")
INFO = "info"
# Largest allowed |p_numpy - p_artifact| before the features/weights pairing is refused.
# Float artifacts agree to ~1e-5; int8 ones differ by their quantization error.
MAX_HEAD_DIFF = {"float32": 1e-3, "float16": 2e-2}
MAX_HEAD_DIFF_QUANTIZED = 0.25

# matplotlib's "jet" segment data (x, value) per channel, so overlays match the training side's.
_JET = {
    "r": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "g": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "b": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}


class GradCamError(ValueError):
    """This model cannot be explained here (not an OCT head model, no head weights, or they do not match)."""


def gradcam_path(artifact: str | Path, model_name: str) -> Path:
    """Default location of the head weights: `{model}_gradcam.npz` beside the artifact."""
    return Path(artifact).parent / f"{model_name}_gradcam.npz"


@dataclasses.dataclass(frozen=True)
class HeadWeights:
    """The head after the features: 1x1 conv, BN, ReLU, (dropout), flatten, dense softmax.

    Attributes:
        conv_kernel: (C_in, F); conv_bias: (F,) (zeros for the source's bias-free conv).
        bn_scale, bn_shift: (F,) the inference BN folded to `s * a + t`.
        dense_kernel: (H * W * F, classes); dense_bias: (classes,).
        feature_shape: (H, W, C_in) of the head input.
        labels: class names; source_sha256: hash of the Keras model they came from.
    """

    conv_kernel: np.ndarray
    conv_bias: np.ndarray
    bn_scale: np.ndarray
    bn_shift: np.ndarray
    dense_kernel: np.ndarray
    dense_bias: np.ndarray
    feature_shape: tuple[int, int, int]
    labels: tuple[str, ...]
    source_sha256: str = ""

    @classmethod
    def load(cls, path: str | Path) -> HeadWeights:
        path = Path(path)
        if not path.is_file():
            raise GradCamError(f"no Grad-CAM head weights at {path}; write them with convert/gradcam_export.py "
                               "(`python -m convert.gradcam_export RUN --out EXPORT_DIR`) or pass --head-weights")
        try:
            with np.load(path, allow_pickle=False) as z:
                info = json.loads(str(z[INFO]))
                arrays = {k: np.asarray(z[k], np.float32) for k in ARRAYS}
        except (OSError, KeyError, ValueError) as e:
            raise GradCamError(f"{path} is not a medge Grad-CAM weights file ({type(e).__name__}: {e})") from None
        if info.get("schema") != SCHEMA:
            raise GradCamError(f"{path}: schema {info.get('schema')!r} is not {SCHEMA!r}")
        hw = cls(feature_shape=tuple(int(v) for v in info["feature_shape"]), labels=tuple(info["labels"]),
                 source_sha256=info.get("source_sha256", ""), **arrays)
        hw.check()
        return hw

    def save(self, path: str | os.PathLike) -> Path:
        """Write the weights file `path` (.npz, atomically through `edge_runtime.fileio`); returns the path."""
        self.check()
        info = {"schema": SCHEMA, "labels": list(self.labels), "feature_shape": list(self.feature_shape),
                "source_sha256": self.source_sha256,
                "folded": "bn_scale = gamma / sqrt(var + eps); bn_shift = beta - mean * scale"}
        buf = io.BytesIO()
        np.savez(buf, **{INFO: np.array(json.dumps(info))},
                 **{k: np.asarray(getattr(self, k), np.float32) for k in ARRAYS})
        path = Path(path)
        atomic_write_bytes(path, buf.getvalue())
        return path

    def check(self) -> None:
        h, w, c = self.feature_shape
        f = self.conv_kernel.shape[1]
        ok = (self.conv_kernel.shape == (c, f) and self.conv_bias.shape == (f,) and self.bn_scale.shape == (f,)
              and self.bn_shift.shape == (f,) and self.dense_kernel.shape == (h * w * f, len(self.labels))
              and self.dense_bias.shape == (len(self.labels),))
        if not ok:
            raise GradCamError(f"inconsistent head weight shapes for features {self.feature_shape}")

    @property
    def filters(self) -> int:
        return int(self.conv_kernel.shape[1])


def head_forward(feats: np.ndarray, hw: HeadWeights) -> dict[str, np.ndarray]:
    """Run the head in numpy on (N, H, W, C_in) features: conv activations `a`, BN output `z`, probabilities."""
    a = feats.astype(np.float32) @ hw.conv_kernel + hw.conv_bias
    z = a * hw.bn_scale + hw.bn_shift
    r = np.maximum(z, 0.0)
    logits = r.reshape(len(r), -1) @ hw.dense_kernel + hw.dense_bias
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    return {"a": a, "z": z, "probs": p}


def gradcam_maps(feats: np.ndarray, hw: HeadWeights,
                 class_index: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N, classes), maps (N, H, W) in [0, 1]) from head-input features (N, H, W, C_in).

    Args:
        feats: what the head's 1x1 conv reads (InceptionV3's mixed10 output).
        hw: the head's weights.
        class_index: class to explain per image (default: the predicted one).
    """
    fw = head_forward(feats, hw)
    a, z, p = fw["a"], fw["z"], fw["probs"]
    n = len(p)
    k = p.argmax(axis=1) if class_index is None else np.asarray(class_index, dtype=np.int64)
    pk = p[np.arange(n), k]
    d_logits = -pk[:, None] * p                       # p_k (delta_kj - p_j)
    d_logits[np.arange(n), k] += pk
    d_r = (d_logits @ hw.dense_kernel.T).reshape(a.shape)
    d_a = d_r * (z > 0) * hw.bn_scale
    weights = d_a.mean(axis=(1, 2), keepdims=True)
    cam = np.maximum((a * weights).mean(axis=-1), 0.0)
    peak = cam.max(axis=(1, 2), keepdims=True)
    cam = np.where(peak > 0, cam / np.maximum(peak, 1e-12), 0.0)
    return p, cam.astype(np.float32)


def jet(x: np.ndarray) -> np.ndarray:
    """matplotlib's jet colormap for values in [0, 1] -> (..., 3) floats in [0, 1]."""
    x = np.clip(x, 0.0, 1.0)
    return np.stack([np.interp(x, *zip(*_JET[c])) for c in "rgb"], axis=-1)


def overlay(image: Image.Image, cam: np.ndarray, caption: str | None = None, alpha: float = 0.5) -> Image.Image:
    """The map resized to the image, jet-coloured and blended (`alpha` heat) over it."""
    rgb = image.convert("RGB")
    heat = Image.fromarray(cam.astype(np.float32), mode="F").resize(rgb.size, Image.Resampling.BILINEAR)
    colours = (jet(np.asarray(heat)) * 255).astype(np.float32)
    out = (1 - alpha) * np.asarray(rgb, np.float32) + alpha * colours
    img = Image.fromarray(np.clip(out, 0, 255).round().astype(np.uint8), mode="RGB")
    if caption:
        d = ImageDraw.Draw(img)
        d.rectangle((0, 0, 8 + 6 * len(caption), 14), fill=(0, 0, 0))
        d.text((4, 2), caption, fill=(255, 255, 255))
    return img


# ---------------------------------------------------------------- features from the artifact


def _is_head_conv(in_shape: Sequence[int], kernel_shape: Sequence[int], hw: HeadWeights) -> bool:
    """A CONV_2D/FULLY_CONNECTED reading (N, H, W, C_in) features with F output channels: the head's 1x1 conv."""
    return (tuple(in_shape[1:]) == tuple(hw.feature_shape) and len(kernel_shape) >= 2
            and kernel_shape[0] == hw.filters and kernel_shape[-1] == hw.feature_shape[-1])


def find_head_input(session, hw: HeadWeights, name: str) -> int:
    """Index of the tensor the head's 1x1 conv reads (the last head-like conv), from the runtime's op list."""
    tensors = session.tensors()
    found = None
    for op in session.ops():
        if op.name not in ("CONV_2D", "FULLY_CONNECTED") or len(op.inputs) < 2 or min(op.inputs[:2]) < 0:
            continue
        src, kern = tensors.get(op.inputs[0]), tensors.get(op.inputs[1])
        if src is not None and kern is not None and _is_head_conv(src.shape, kern.shape, hw):
            found = op.inputs[0]
    if found is None:
        raise GradCamError(f"{name} has no 1x1 conv from {tuple(hw.feature_shape)} features to {hw.filters} "
                           "filters; is it the fused OCT model these head weights belong to?")
    return found


class FeatureTap:
    """Reads the head's input features out of a fused .tflite artifact while it runs.

    A second session on the same file returns the feature tensor beside the
    probabilities (`Session.run_with`). With ai-edge-litert it is an extra
    output of an in-memory copy of the model (the file is untouched), so a
    map costs one normal inference; with tflite-runtime (no flatbuffer
    schema) the interpreter keeps every intermediate tensor instead: slower
    (no delegate) and more memory. `mode` says which.
    """

    def __init__(self, model, hw: HeadWeights):
        if model.path.suffix.lower() != ".tflite":
            raise GradCamError(
                f"Grad-CAM reads the head's input from a .tflite artifact; {model.path.name} is "
                f"{model.path.suffix} (onnxruntime cannot expose inner tensors): use the .tflite artifact")
        self.model, self.hw = model, hw
        self.index = find_head_input(model.session, hw, model.path.name)
        self.session = open_session(model.path, model.backend, model.threads, extra_outputs=(self.index,))
        self.mode = self.session.extra_mode

    def features(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(artifact probabilities (classes,), features (H, W, C_in) float32) for one preprocessed input."""
        inp, out, feat = self.session.input, self.session.output, self.session.extra_outputs[0]
        xi = x[None].astype(np.float32)
        xi = quantize(xi, inp) if inp.quantized else xi.astype(inp.dtype)
        y, (f,) = self.session.run_with(xi)
        y = dequantize(y, out) if out.quantized else y.astype(np.float32)
        f = dequantize(f, feat) if feat.quantized else f.astype(np.float32)
        return y.reshape(-1), f.reshape(self.hw.feature_shape)


class GradCam:
    """Grad-CAM overlays for a loaded OCT `EdgeModel`.

    Raises (on construction) `GradCamError` when the model cannot be explained:
    no head weights, weights of another model, or an artifact without the head.
    """

    def __init__(self, model, weights: str | Path | None = None):
        if not is_oct(model.metadata):
            raise GradCamError(f"Grad-CAM maps are made for OCT head models; {model.path.name} is a "
                               f"{model.metadata.task!r} model with labels {list(model.labels)}")
        path = Path(weights) if weights is not None else gradcam_path(model.path, model.metadata.model)
        self.hw = HeadWeights.load(path)
        if tuple(self.hw.labels) != tuple(model.labels):
            raise GradCamError(f"{path} is for labels {list(self.hw.labels)}, the model has {list(model.labels)}")
        src = model.metadata.source_sha256
        if self.hw.source_sha256 and src and self.hw.source_sha256 != src:
            raise GradCamError(f"{path} comes from another Keras model (sha256 {self.hw.source_sha256[:12]}...) "
                               f"than {model.path.name} ({src[:12]}...)")
        self.model, self.path = model, path
        self.tap = FeatureTap(model, self.hw)
        prec = model.metadata.precision
        self.tolerance = MAX_HEAD_DIFF.get(prec, MAX_HEAD_DIFF_QUANTIZED)

    def explain(self, x: np.ndarray) -> dict[str, Any]:
        """Map for one preprocessed input: probabilities (artifact's), map (H, W), and the head self-check."""
        probs, feats = self.tap.features(x)
        p_np, cam = gradcam_maps(feats[None], self.hw, class_index=[int(probs.argmax())])
        diff = float(np.abs(p_np[0] - probs).max())
        if diff > self.tolerance:
            raise GradCamError(
                f"the numpy head disagrees with {self.model.path.name} by {diff:.3g} (> {self.tolerance}); "
                f"{self.path.name} does not belong to this artifact")
        return {"probabilities": probs, "cam": cam[0], "head_max_abs_diff": diff}

    def write_overlays(self, predictions: Sequence[Any], out: str | Path) -> list[Path]:
        """One `{index:04d}_{stem}_{label}.png` per classified file input; returns the paths written."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for i, p in enumerate(predictions):
            if not p.ok or not Path(p.source).is_file():
                continue
            image = load_image(p.source, "rgb", self.model.max_pixels)
            res = self.explain(preprocess(image, self.model.spec))
            label = self.model.labels[int(res["probabilities"].argmax())]
            stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(p.source).stem)[:80]
            path = out / f"{i:04d}_{stem}_{label}.png"
            overlay(image, res["cam"], f"{p.decision} {p.confidence:.2f}").save(path)
            written.append(path)
        return written
