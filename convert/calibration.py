"""Real images for calibration and for the proof batch, with exactly the training preprocessing.

Calibration takes a seeded sample of the *training* split (never random
noise: int8 ranges fitted to noise clip real cells). The proof batch comes from
the test split (or val, if there is no test split), so the comparison with
Keras runs on images neither calibration nor training saw.

`--calib` may be a manifest CSV (its splits are used as above) or a folder of
images (class folders give labels for the accuracy column); a folder is split
into disjoint calibration and proof images.

What an image set came from is recorded by name (the manifest's or folder's
basename, never the build machine's absolute path, since artifact metadata
carries it) plus a sha256: of the manifest file, of the folder's sorted image
listing, or of a feature store's fingerprint and records.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edge_runtime.fileio import sha256_file, sha256_text
from edge_runtime.images import is_image_file
from edge_runtime.spec import PreprocessSpec
from train.split import read_manifest

MIN_CALIB_WARN = 100


@dataclasses.dataclass
class ImageSet:
    """Preprocessed images with their labels (index into the model's labels, -1 if unknown).

    Attributes:
        origin: what they were drawn from, by basename, e.g. "malaria.csv (train split)".
        sha256: of that manifest file, folder listing or feature store (see the module docstring).
    """

    x: np.ndarray
    y: np.ndarray
    paths: list[str]
    origin: str
    sha256: str = ""

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self) -> dict:
        return {"images": len(self), "from": self.origin, "sha256": self.sha256}


def preprocess_paths(paths: Sequence[str], spec: PreprocessSpec, batch: int = 64) -> np.ndarray:
    """Decode and resize with `train.data.decode_and_resize`, the function training used."""
    import tensorflow as tf  # TensorFlow: imported only when this runs

    from train.data import decode_and_resize  # loads TensorFlow: imported only when this runs

    ds = tf.data.Dataset.from_tensor_slices(list(paths)).map(
        lambda p: decode_and_resize(p, spec), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    ).batch(batch)
    out = [b.numpy() for b in ds]
    if not out:
        return np.zeros((0, *spec.input_shape), np.float32)
    return np.concatenate(out).astype(np.float32)


def _sample(items: list, n: int, seed: int, base: Path | None = None) -> list:
    """A seeded sample of (path, label) items. The order it starts from is the paths' sorted order relative to
    `base` (a manifest's folder), so the sample, and the calibration it feeds, are the same wherever the checkout
    lies: sorting absolute paths put a release's own crops before or after the shared data depending on where the
    two folders happened to be (a release rebuilt byte for byte in one checkout differed in another)."""
    key = (lambda item: (os.path.relpath(item[0], base), item[1])) if base is not None else None
    items = sorted(items, key=key)
    random.Random(seed).shuffle(items)
    return items if n <= 0 else items[:n]


def _labels_of(paths_labels: list[tuple[str, str]], labels: Sequence[str]) -> np.ndarray:
    idx = {l: i for i, l in enumerate(labels)}
    return np.array([idx.get(l, -1) for _, l in paths_labels], dtype=np.int64)


def _folder_items(folder: Path) -> tuple[list[tuple[str, str]], str]:
    """((path, class folder name) of every image below `folder` ("" for images directly in it), listing sha256)."""
    items, listing = [], []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and is_image_file(p) and not p.name.startswith("."):
            rel = p.relative_to(folder).parts
            items.append((str(p.resolve()), rel[0] if len(rel) > 1 else ""))
            listing.append("/".join(rel) + "\n")
    return items, sha256_text("".join(listing))


def load_sets(
    calib: Path | None,
    labels: Sequence[str],
    spec: PreprocessSpec,
    calib_n: int = 300,
    eval_n: int = 1000,
    seed: int = 0,
    need_calib: bool = True,
) -> tuple[ImageSet | None, ImageSet, list[tuple[str, str]]]:
    """(calibration set or None, proof set, training items (path, label) for QAT).

    Raises:
        FileNotFoundError: `calib` does not exist.
        ValueError: no usable images.
    """
    if calib is None:
        raise ValueError(
            "no images to calibrate and prove against: pass --calib MANIFEST|DIR "
            "(a run directory normally names its manifest in config.json)"
        )
    calib = Path(calib)
    if not calib.exists():
        raise FileNotFoundError(f"--calib {calib} does not exist; give a manifest CSV or a folder of images")
    if calib.is_file():
        records = read_manifest(calib)
        train = [(r.path, r.label) for r in records if r.split == "train"]
        held = [(r.path, r.label) for r in records if r.split == "test"]
        held_name = "test"
        if not held:
            held = [(r.path, r.label) for r in records if r.split == "val"]
            held_name = "val"
        if not train or not held:
            raise ValueError(f"manifest {calib} needs a train split and a test (or val) split")
        base = calib.parent.resolve()  # read_manifest's paths are absolute, resolved from here
        calib_items = _sample(train, calib_n, seed, base)
        eval_items = _sample(held, eval_n, seed + 1, base)
        calib_origin, eval_origin = f"{calib.name} (train split)", f"{calib.name} ({held_name} split)"
        digest = sha256_file(calib)
        train_items = train
    else:
        items, digest = _folder_items(calib)
        if len(items) < 2:
            raise ValueError(f"--calib folder {calib} holds {len(items)} images; need at least 2")
        items = _sample(items, 0, seed)
        k = min(calib_n, len(items) // 2) if need_calib else 0
        calib_items, eval_items = items[:k], items[k:][: eval_n if eval_n > 0 else None]
        calib_origin = eval_origin = f"{calib.resolve().name}/ (folder; disjoint calibration and proof images)"
        train_items = calib_items
    if need_calib and len(calib_items) < MIN_CALIB_WARN:
        warnings.warn(
            f"only {len(calib_items)} calibration images (fewer than {MIN_CALIB_WARN}); int8 ranges may be poor",
            stacklevel=2,
        )
    calib_set = None
    if need_calib:
        calib_set = ImageSet(preprocess_paths([p for p, _ in calib_items], spec),
                             _labels_of(calib_items, labels), [p for p, _ in calib_items], calib_origin, digest)
    eval_set = ImageSet(preprocess_paths([p for p, _ in eval_items], spec),
                        _labels_of(eval_items, labels), [p for p, _ in eval_items], eval_origin, digest)
    return calib_set, eval_set, train_items


def load_store_sets(
    store: Path, labels: Sequence[str], calib_n: int = 300, eval_n: int = 1000, seed: int = 0,
    input_shape: Sequence[int] | None = None,
) -> tuple[ImageSet, ImageSet]:
    """(calibration, proof) feature sets for an OCT head from its feature store (train and test splits).

    Rows are read one by one (one HDF5 chunk each), so a 44 GB store is never
    loaded whole.

    Raises:
        FileNotFoundError: no such store.
        ValueError: not a feature store, other labels, or features of another shape than `input_shape`.
    """
    import h5py  # optional: feature stores only

    store = Path(store)
    if not store.is_file():
        raise FileNotFoundError(f"feature store {store} does not exist")
    try:
        f = h5py.File(store, "r")
    except OSError as e:
        raise ValueError(f"{store} is not an HDF5 feature store ({e})") from None
    with f:
        missing = [k for k in ("features", "split", "label") if k not in f] + (
            [] if "labels" in f.attrs else ["attribute 'labels'"])
        if missing:
            raise ValueError(f"{store} is not a feature store from `python -m train oct extract`: it lacks "
                             f"{', '.join(missing)}")
        split = f["split"].asstr()[:]
        store_labels = json.loads(f.attrs["labels"])
        if list(store_labels) != list(labels):
            raise ValueError(f"store {store.name} labels {store_labels} differ from the model's labels {list(labels)}")
        y_all = f["label"][:]
        feats = f["features"]
        if input_shape is not None and tuple(feats.shape[1:]) != tuple(input_shape):
            raise ValueError(f"store {store.name} holds features of shape {tuple(feats.shape[1:])}, but the model "
                             f"takes {tuple(input_shape)}")
        # Hashing a (possibly 44 GB) store is too slow: its features fingerprint and records hash identify it.
        digest = sha256_text(json.dumps({k: str(f.attrs.get(k, "")) for k in ("fingerprint", "records_sha")},
                                        sort_keys=True))

        def take(rows: np.ndarray, origin: str) -> ImageSet:
            rows = np.sort(rows)
            x = (np.stack([feats[int(i)] for i in rows]).astype(np.float32) if len(rows)
                 else np.zeros((0, *feats.shape[1:]), np.float32))
            return ImageSet(x, y_all[rows].astype(np.int64), [f"{store.name}#{int(i)}" for i in rows], origin, digest)

        rng = np.random.default_rng(seed)
        train = np.flatnonzero(split == "train")
        held = np.flatnonzero(split == "test")
        held_name = "test"
        if not len(held):
            held, held_name = np.flatnonzero(split == "val"), "val"
        if not len(train) or not len(held):
            raise ValueError(f"store {store} needs train and test (or val) rows")
        calib_rows = rng.permutation(train)[:calib_n]
        eval_rows = rng.permutation(held)[: eval_n if eval_n > 0 else None]
        if len(calib_rows) < MIN_CALIB_WARN:
            warnings.warn(f"only {len(calib_rows)} calibration feature maps (fewer than {MIN_CALIB_WARN})",
                          stacklevel=2)
        return (take(calib_rows, f"{store.name} (train split features)"),
                take(eval_rows, f"{store.name} ({held_name} split features)"))


RANDOM_PROOF_N = 64  # random inputs prove a float features model when no --calib is given


def load_feature_sets(
    calib: Path | None, labels: Sequence[str], input_shape: Sequence[int], calib_n: int = 300,
    eval_n: int = 1000, seed: int = 0, need_calib: bool = True,
) -> tuple[ImageSet | None, ImageSet]:
    """(calibration set or None, proof set) for a model that takes features (`part` "head"), not images.

    `calib` is a feature store .h5 (`python -m train oct extract`: train split
    calibrates, test split proves), a .npy of inputs shaped (N, *input_shape)
    (split into disjoint calibration and proof inputs, no labels), or None:
    then the proof is `RANDOM_PROOF_N` seeded standard-normal inputs of the
    model's own shape (enough to prove a float conversion numerically; no
    accuracy) and there is no calibration set (int8 rows then ask for --calib).

    Raises:
        FileNotFoundError: `calib` does not exist.
        ValueError: an unsupported file, or inputs of another shape than the model's.
    """
    shape = tuple(int(v) for v in input_shape)
    if calib is None:
        n = RANDOM_PROOF_N if eval_n <= 0 else min(eval_n, RANDOM_PROOF_N)
        x = np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)
        origin = f"random normal inputs {shape} (seed {seed}; no --calib given)"
        return None, ImageSet(x, np.full(n, -1, np.int64), [f"random#{i}" for i in range(n)], origin,
                              sha256_text(f"standard-normal:{seed}:{shape}:{n}"))
    calib = Path(calib)
    if not calib.exists():
        raise FileNotFoundError(f"--calib {calib} does not exist; give a feature store .h5 or a .npy of inputs {shape}")
    suffix = calib.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        return load_store_sets(calib, labels, calib_n, eval_n, seed, input_shape=shape)
    if suffix != ".npy":
        raise ValueError(f"--calib {calib.name}: this model takes features {shape}, not images; give a feature "
                         "store .h5 (`python -m train oct extract`) or a .npy of inputs shaped (N, "
                         f"{', '.join(map(str, shape))})")
    try:
        x = np.load(calib, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"--calib {calib.name} is not a numeric .npy array ({e})") from None
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
        raise ValueError(f"--calib {calib.name} holds an array of shape {x.shape}; the model takes inputs "
                         f"(N, {', '.join(map(str, shape))})")
    if x.dtype.kind not in "fiu":
        raise ValueError(f"--calib {calib.name} holds {x.dtype} values; give numbers")
    if len(x) < 2:
        raise ValueError(f"--calib {calib.name} holds {len(x)} inputs; need at least 2")
    order = np.random.default_rng(seed).permutation(len(x))
    k = min(calib_n, len(x) // 2) if need_calib else 0
    calib_rows = np.sort(order[:k])
    eval_rows = np.sort(order[k:][: eval_n if eval_n > 0 else None])
    if need_calib and k < MIN_CALIB_WARN:
        warnings.warn(f"only {k} calibration inputs (fewer than {MIN_CALIB_WARN}); int8 ranges may be poor",
                      stacklevel=2)
    digest, origin = sha256_file(calib), f"{calib.name} (.npy inputs; disjoint calibration and proof rows)"

    def take(rows: np.ndarray) -> ImageSet:
        return ImageSet(np.asarray(x[rows], np.float32), np.full(len(rows), -1, np.int64),
                        [f"{calib.name}#{int(i)}" for i in rows], origin, digest)

    return (take(calib_rows) if need_calib else None), take(eval_rows)
