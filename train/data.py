"""tf.data input pipelines built from a manifest and a `PreprocessSpec`.

Decoding and resizing follow the spec exactly as `edge_runtime.preprocess`
does with Pillow (RGB, antialiased bilinear resize, `x * scale + offset`);
`tests/test_preprocess.py` measures that both give the same tensors and the
same predictions on real images.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from edge_runtime.spec import PreprocessSpec
from train.split import Record

AUTOTUNE = tf.data.AUTOTUNE


def decode_and_resize(path: tf.Tensor, spec: PreprocessSpec, antialias: bool = True) -> tf.Tensor:
    """File path -> float32 HxWxC tensor per the spec (PNG, JPEG, BMP, GIF).

    `antialias=False` samples the spec's method without antialiasing (a shrunk image's pixels are not averaged
    over the area they cover): how most app pipelines resize, for `make_dataset`'s `resize_mix`.
    """
    raw = tf.io.read_file(path)
    img = tf.io.decode_image(raw, channels=spec.channels, dtype=tf.uint8, expand_animations=False)
    img = tf.image.resize(img, spec.input_size, method=spec.resize_method, antialias=antialias)
    return tf.cast(img, tf.float32) * spec.scale + spec.offset


def augmentation(
    seed: int | None = None,
    hue: float = 0.0,
    saturation: float = 0.0,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> keras.Sequential:
    """The source's augmentation: rotation 20 degrees, zoom 0.05, shifts 0.05, shear 0.05, horizontal flip.

    Nearest fill, as the source's ImageDataGenerator used. Training split only.

    Optional stain jitter (Giemsa staining differs from slide to slide): `hue`
    rotates the hue by up to +-hue/2 of the colour circle (Keras RandomHue's
    factor), `saturation` draws Keras RandomSaturation's factor from
    0.5 +- saturation (0.5 leaves it unchanged). Both keep black black, so the
    crops' black background stays what the device sees. `value_range` is the
    range of the preprocessed pixels they run on.
    """
    L = keras.layers
    layers = [
        L.RandomRotation(20 / 360, fill_mode="nearest", seed=seed),
        L.RandomZoom(0.05, 0.05, fill_mode="nearest", seed=seed),
        L.RandomTranslation(0.05, 0.05, fill_mode="nearest", seed=seed),
        L.RandomShear(0.05, 0.05, fill_mode="nearest", seed=seed),
        L.RandomFlip("horizontal", seed=seed),
    ]
    if hue:
        layers.append(L.RandomHue(hue, value_range=value_range, seed=seed))
    if saturation:
        layers.append(L.RandomSaturation((0.5 - saturation, 0.5 + saturation), value_range=value_range, seed=seed))
    return keras.Sequential(layers, name="augmentation")


def make_dataset(
    records: Sequence[Record],
    labels: Sequence[str],
    spec: PreprocessSpec,
    batch_size: int,
    training: bool = False,
    augment: bool = False,
    seed: int = 42,
    cache: bool = True,
    hue: float = 0.0,
    saturation: float = 0.0,
    resize_mix: float = 0.0,
) -> tf.data.Dataset:
    """(image, one-hot label) batches; shuffled and augmented only when `training`.

    Decoded images are cached in memory (64x64x3 float32 is 48 KiB a cell, so
    the whole NIH set is about 1.3 GB), then augmented per epoch (`hue` and
    `saturation`: the stain jitter of `augmentation`). With `training` and
    `resize_mix` > 0, each image is cached resized both ways (twice the memory)
    and, per epoch, that share of them is given the plain bilinear resize
    instead of the antialiased one (`decode_and_resize`), so the model answers
    alike whichever way an app shrinks a cell to its input.
    """
    if not records:
        raise ValueError("no images to build a dataset from (empty split?)")
    index = {l: i for i, l in enumerate(labels)}
    unknown = sorted({r.label for r in records} - set(index))
    if unknown:
        raise ValueError(f"labels {unknown} in the manifest are not among the model's labels {list(labels)}")
    paths = [r.path for r in records]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) of the manifest are gone, e.g. {missing[0]}; "
            "re-run `python -m train split` on the current data"
        )
    y = np.array([index[r.label] for r in records], dtype=np.int32)
    ds = tf.data.Dataset.from_tensor_slices((paths, y))
    if not 0.0 <= resize_mix <= 1.0:
        raise ValueError(f"resize_mix {resize_mix} must be in [0, 1]")
    mix = training and resize_mix > 0

    def decode(p: tf.Tensor, t: tf.Tensor):
        x = decode_and_resize(p, spec)
        if mix:  # both resizes cached; one is drawn per epoch below
            x = (x, decode_and_resize(p, spec, antialias=False))
        return x, tf.one_hot(t, len(labels))

    ds = ds.map(decode, num_parallel_calls=AUTOTUNE, deterministic=True)
    if cache:
        ds = ds.cache()
    if training:
        ds = ds.shuffle(min(len(records), 20_000), seed=seed, reshuffle_each_iteration=True)
    if mix:
        draws = tf.data.Dataset.random(seed=seed + 1, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip((ds, draws)).map(
            lambda xt, r: (tf.where(tf.cast(r % 10_000, tf.float32) < resize_mix * 10_000, xt[0][1], xt[0][0]),
                           xt[1]),
            num_parallel_calls=AUTOTUNE,
            deterministic=True,
        )
    ds = ds.batch(batch_size)
    if training and augment:
        aug = augmentation(seed, hue, saturation, (spec.offset, 255.0 * spec.scale + spec.offset))
        ds = ds.map(lambda x, t: (aug(x, training=True), t), num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE)
