"""Grad-CAM occlusion maps for OCT runs, on the head's 1x1 conv as the source describes.

    python -m train oct gradcam runs/oct-head scan1.jpeg scan2.jpeg --out runs/oct-head/gradcam
    python -m train oct gradcam runs/oct-head --misclassified runs/oct.csv --split test --out runs/oct-head/wrong
    python -m train oct gradcam --head keras2_head.h5 --base-weights imagenet scan.jpeg --out maps/

The gradient of the predicted class's probability with respect to the head's
1x1 conv output (8x8x64) weights each channel by its mean; the weighted
channels are averaged, the positive part kept and scaled to [0, 1], resized
to the original image, coloured with the jet map and blended 50/50 over the
image: one PNG per image, the size of the image. Heads without a conv (the
end-to-end run's pooling top) use the base's 8x8x2048 output instead.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edge_runtime.gradcam import overlay  # one overlay (jet, 50/50) for training side and device
from edge_runtime.images import preprocess
from train.oct.predict import Loaded, load_for_inference, open_source
from train.split import read_manifest


def split_head(head: Any) -> tuple[list, list]:
    """(layers up to and including the first Conv2D, layers after it) of a single-chain head.

    A head without a Conv2D gives ([], all layers): the map is then taken on its input features.
    """
    layers = [l for l in head.layers if l.__class__.__name__ != "InputLayer"]
    for i, l in enumerate(layers):
        if l.__class__.__name__ == "Conv2D":
            return layers[: i + 1], layers[i + 1:]
    return [], layers


def _apply(layers: Sequence, x):
    for l in layers:
        x = l(x, training=False)
    return x


def gradcam(model: Loaded, x: np.ndarray, class_index: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N, classes), maps (N, h, w) in [0, 1]) for preprocessed images `x`.

    Args:
        model: base and head (from `oct_predict.load_for_inference`).
        x: (N, 299, 299, 3) preprocessed images.
        class_index: class to explain per image (default the predicted one).
    """
    import tensorflow as tf  # TensorFlow: imported only when this runs

    feats = tf.convert_to_tensor(model.base.predict_on_batch(x))
    pre, post = split_head(model.head)
    with tf.GradientTape() as tape:
        a = _apply(pre, feats)
        tape.watch(a)
        probs = _apply(post, a)
        k = tf.argmax(probs, axis=1) if class_index is None else tf.constant(class_index, tf.int64)
        # Samples are independent at inference (BN uses moving stats, no dropout): one gradient call serves all.
        score = tf.reduce_sum(tf.gather(probs, k, axis=1, batch_dims=1))
    grads = tape.gradient(score, a)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_mean(a * weights, axis=-1)).numpy()
    peak = cam.max(axis=(1, 2), keepdims=True)
    cam = np.where(peak > 0, cam / np.maximum(peak, 1e-12), 0.0)
    return np.asarray(probs), cam.astype(np.float32)


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)[:80]


def write_maps(model: Loaded, images: Sequence[Image.Image], names: Sequence[str], out: Path,
               true_labels: Sequence[str | None] | None = None, batch_size: int = 8,
               only_wrong: bool = False, offset: int = 0) -> list[dict[str, Any]]:
    """Grad-CAM PNGs for images (the predicted class's map); return one row per image written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    true_labels = list(true_labels) if true_labels is not None else [None] * len(images)
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        x = np.stack([preprocess(im, model.spec) for im in chunk])
        probs, cams = gradcam(model, x)
        for j, (im, p, cam) in enumerate(zip(chunk, probs, cams)):
            n = i + j
            pred = model.labels[int(p.argmax())]
            true = true_labels[n]
            if only_wrong and true == pred:
                continue
            stem = _safe(Path(names[n].split("?")[0]).stem or f"image{n}")
            k = offset + n
            fname = f"{k:04d}_{stem}_{pred}.png" if true is None else f"{k:04d}_{stem}_{true}_as_{pred}.png"
            cap = f"{pred} {p.max():.2f}" + (f" (true {true})" if true is not None else "")
            overlay(im, cam, cap).save(out / fname)
            rows.append({"image": names[n], "true": true, "predicted": pred, "confidence": float(p.max()),
                         "png": str(out / fname)})
    return rows


def write_index(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """gradcam.csv: image, true and predicted class, confidence, PNG written."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["image", "true", "predicted", "confidence", "png"])
    w.writeheader()
    w.writerows(rows)
    Path(path).write_text(buf.getvalue())


def run(run_dir: Path | None, images: Sequence[str], out: Path, head: Path | None, base_weights: str,
        base_seed: int, preprocess_name: str, misclassified: Path | None, split: str) -> int:
    """CLI body of `python -m train oct gradcam`."""
    if not images and misclassified is None:
        raise ValueError("give images (paths or URLs) and/or --misclassified MANIFEST")
    model = load_for_inference(run_dir, head, base_weights, base_seed, preprocess_name)
    written = []
    if images:
        rows = write_maps(model, [open_source(s) for s in images], list(images), out)
        write_index(rows, Path(out) / "gradcam.csv")
        written += rows
    if misclassified is not None:
        recs = [r for r in read_manifest(misclassified, split) if r.label in model.labels]
        if not recs:
            raise ValueError(f"no images of the model's classes in split {split!r} of {misclassified}")
        wrong_dir = Path(out) / f"misclassified-{split}"
        # Images are opened per batch so a large split never sits in memory at once.
        rows = []
        for i in range(0, len(recs), 32):
            part = recs[i:i + 32]
            rows += write_maps(model, [open_source(r.path) for r in part], [r.path for r in part], wrong_dir,
                               [r.label for r in part], only_wrong=True, offset=i)
        wrong_dir.mkdir(parents=True, exist_ok=True)
        write_index(rows, wrong_dir / "gradcam.csv")
        written += rows
        print(f"{len(rows)} of {len(recs)} {split} images misclassified; maps in {wrong_dir}")
    for r in written:
        print(f"{r['image']}: {r['predicted']} ({r['confidence']:.3f}) -> {r['png']}")
    if model.synthetic:
        print("note: model trained on SYNTHETIC OCT-like images")
    return 0
