"""Bottleneck store: every image run once through the frozen InceptionV3 base, features kept in HDF5.

    python -m train oct extract --manifest runs/oct.csv --base-weights imagenet --out runs/oct-features.h5
    python -m train oct extract --manifest runs/oct.csv --base-weights none --dtype float16 --out /tmp/f.h5

Layout of STORE.h5 (one row per manifest image, manifest order):

    features  (N, 8, 8, 2048) float32|float16, one chunk per image
    label     (N,) int16, index into attrs["labels"]
    path, patient, split  (N,) strings from the manifest
    attrs     format, labels, preprocess, base_weights, base_seed, base_sha256,
              fingerprint (base + layer + preprocessing), n_done, synthetic, ...

Rows are written batch by batch and `n_done` is advanced after each batch is
flushed, so memory stays bounded and a killed extraction resumes at `n_done`
(run the same command again). A store is only ever extended by the same base
and preprocessing: anything else is refused. The real OCT2017 train set is
about 84k x 512 KiB = 44 GB as float32, half as float16.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.clinical import OCT_LABELS
from edge_runtime.spec import PreprocessSpec
from train.data import make_dataset
from train.oct.facts import any_synthetic
from train.oct.models import (
    FEATURE_LAYER,
    FEATURE_SHAPE,
    build_base,
    describe_base,
    features_fingerprint,
    preprocess_spec,
    weights_fingerprint,
)
from train.split import Record, read_manifest

STORE_FORMAT = "medge-oct-bottleneck/1"
DTYPES = ("float32", "float16")


@dataclasses.dataclass(frozen=True)
class StoreInfo:
    """What a store holds and how it was made (its HDF5 attributes)."""

    path: Path
    n: int
    n_done: int
    labels: list[str]
    spec: PreprocessSpec
    base_weights: str
    base_seed: int
    base_sha256: str
    fingerprint: str
    dtype: str
    synthetic: bool
    manifest: str

    @property
    def complete(self) -> bool:
        return self.n_done >= self.n

    def describe(self) -> str:
        return (f"base {describe_base(self.base_weights, self.base_seed)} (weights sha256 {self.base_sha256[:12]}), "
                f"preprocessing scale {self.spec.scale:.6g} offset {self.spec.offset:g}, "
                f"fingerprint {self.fingerprint}")


def _h5():
    import h5py  # optional: feature stores only

    return h5py


def read_info(path: str | Path) -> StoreInfo:
    """The attributes of a store; refuses files that are not medge OCT stores."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"store {path} not found; make one with `python -m train oct extract`")
    h5py = _h5()
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path} is not a readable HDF5 file ({e}); if an extraction was killed while "
                         "writing, delete it and extract again") from None
    with f:
        a = f.attrs
        if a.get("format") != STORE_FORMAT:
            raise ValueError(f"{path} is not a medge OCT feature store (format {a.get('format')!r}, "
                             f"expected {STORE_FORMAT!r})")
        return StoreInfo(
            path=path, n=int(f["label"].shape[0]), n_done=int(a["n_done"]), labels=json.loads(a["labels"]),
            spec=PreprocessSpec.from_dict(json.loads(a["preprocess"])), base_weights=str(a["base_weights"]),
            base_seed=int(a["base_seed"]), base_sha256=str(a["base_sha256"]), fingerprint=str(a["fingerprint"]),
            dtype=str(f["features"].dtype), synthetic=bool(a["synthetic"]), manifest=str(a["manifest"]),
        )


def _records_sha(records: Sequence[Record]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.path}\t{r.label}\t{r.patient}\t{r.split}\n".encode())
    return h.hexdigest()[:16]


def model_labels(records: Sequence[Record]) -> list[str]:
    """OCT2017's four classes when the data has (a subset of) them, else the sorted class names."""
    found = sorted({r.label for r in records})
    return list(OCT_LABELS) if set(found) <= set(OCT_LABELS) else found


def _create(path: Path, records: Sequence[Record], labels: list[str], dtype: str, attrs: dict[str, Any]):
    h5py = _h5()
    path.parent.mkdir(parents=True, exist_ok=True)
    f = h5py.File(path, "w")
    n = len(records)
    f.create_dataset("features", shape=(n, *FEATURE_SHAPE), dtype=dtype, chunks=(1, *FEATURE_SHAPE))
    index = {l: i for i, l in enumerate(labels)}
    f.create_dataset("label", data=np.array([index[r.label] for r in records], dtype=np.int16))
    str_t = h5py.string_dtype()
    for key in ("path", "patient", "split"):
        f.create_dataset(key, data=np.array([getattr(r, key) for r in records], dtype=object), dtype=str_t)
    for k, v in attrs.items():
        f.attrs[k] = v
    f.attrs["n_done"] = 0
    f.flush()
    return f


def extract(
    manifest: Path,
    out: Path,
    base_weights: str = "imagenet",
    base_seed: int = 0,
    preprocess: str = "inception",
    dtype: str = "float32",
    batch_size: int = 16,
    splits: Sequence[str] | None = None,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> StoreInfo:
    """Run every manifest image through the frozen base and store its features; resume a partial store.

    Args:
        manifest: CSV from `python -m train split`.
        out: the .h5 store; if it exists, it must come from the same manifest,
            base and preprocessing, and extraction continues where it stopped.
        base_weights: "imagenet", "none" or a weights path (see `oct_models.build_base`).
        base_seed: seed of the random base when `base_weights` is "none".
        preprocess: "inception" ([-1, 1]) or "rescale" (1/255).
        dtype: "float32" or "float16" storage.
        batch_size: images per forward pass (and per write).
        splits: keep only these manifest splits (default all).
        progress: show a progress bar with images per second.
        on_batch: called with the number of rows done after each flushed batch.
    """
    from tqdm import tqdm

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {DTYPES}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    out = Path(out)
    spec = preprocess_spec(preprocess)
    records = read_manifest(manifest)
    if splits:
        records = [r for r in records if r.split in set(splits)]
    if not records:
        raise ValueError(f"no images in {manifest}" + (f" for splits {list(splits)}" if splits else ""))
    labels = model_labels(records)

    t_build = time.perf_counter()
    base = build_base(base_weights, base_seed)
    sha = weights_fingerprint(base)
    fp = features_fingerprint(sha, spec)
    rec_sha = _records_sha(records)
    print(f"base {describe_base(base_weights, base_seed)} ready in {time.perf_counter() - t_build:.1f} s "
          f"(weights sha256 {sha[:12]}, features fingerprint {fp})")

    h5py = _h5()
    if out.exists():
        info = read_info(out)
        if info.fingerprint != fp:
            raise ValueError(
                f"{out} already holds features of {info.describe()}; this extraction would use base "
                f"{describe_base(base_weights, base_seed)} (sha256 {sha[:12]}) with {preprocess} preprocessing "
                f"(fingerprint {fp}). Features of two bases cannot share a store: choose another --out"
            )
        f = h5py.File(out, "r+")
        if f.attrs["records_sha"] != rec_sha:
            f.close()
            raise ValueError(f"{out} was extracted from another manifest or split selection ({info.manifest}); "
                             "choose another --out")
        start = info.n_done
        if info.dtype != dtype:
            print(f"note: {out} stores {info.dtype}; continuing in {info.dtype}, not --dtype {dtype}")
            dtype = info.dtype
        if start >= len(records):
            f.close()
            print(f"{out} is complete ({len(records)} images); nothing to do")
            return read_info(out)
        print(f"resuming {out} at image {start + 1} of {len(records)}")
    else:
        start = 0
        f = _create(out, records, labels, dtype, {
            "format": STORE_FORMAT,
            "labels": json.dumps(labels),
            "preprocess": json.dumps(spec.to_dict()),
            "preprocess_name": preprocess,
            "base_weights": base_weights,
            "base_seed": base_seed,
            "base_sha256": sha,
            "feature_layer": FEATURE_LAYER,
            "fingerprint": fp,
            "records_sha": rec_sha,
            "manifest": str(Path(manifest).resolve()),
            "synthetic": any_synthetic(r.path for r in records),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })
    try:
        ds = make_dataset(records[start:], labels, spec, batch_size, cache=False)
        feats = f["features"]
        done = start
        t0 = time.perf_counter()
        with tqdm(total=len(records), initial=start, unit="img", desc="extracting", disable=not progress,
                  dynamic_ncols=True) as bar:
            for x, _ in ds:
                y = base.predict_on_batch(x)
                feats[done:done + len(y)] = y.astype(dtype)
                done += len(y)
                f.attrs["n_done"] = done  # only after the rows it covers are written
                f.flush()
                bar.update(len(y))
                if on_batch is not None:
                    on_batch(done)
        secs = time.perf_counter() - t0
        f.attrs["seconds"] = float(f.attrs.get("seconds", 0.0)) + secs
    finally:
        f.close()
    n_new = done - start
    print(f"extracted {n_new} images in {secs:.1f} s ({n_new / max(secs, 1e-9):.1f} img/s) -> {out} "
          f"({out.stat().st_size / 2**20:.1f} MiB, {dtype})")
    return read_info(out)


def split_indices(path: str | Path, split: str) -> np.ndarray:
    """Row numbers of one split in a store."""
    with _h5().File(path, "r") as f:
        s = f["split"].asstr()[:]
    return np.flatnonzero(s == split)


def read_column(path: str | Path, key: str, index: np.ndarray | None = None) -> np.ndarray:
    """One small column (label, path, patient, split) of a store."""
    with _h5().File(path, "r") as f:
        d = f[key].asstr() if key in ("path", "patient", "split") else f[key]
        a = d[:]
    return a if index is None else a[index]


def make_sequence(path: str | Path, split: str, batch_size: int, shuffle: bool, seed: int = 42,
                  keras_module=None):
    """A `keras.utils.PyDataset` of (features, one-hot) batches of one split, read from disk per batch.

    The store is never loaded whole: each batch reads its rows (sorted, as
    HDF5 wants) from the per-image chunks; the order is reshuffled every epoch.
    `keras_module=tf_keras` gives a `tf_keras.utils.Sequence` instead (QAT of a head).
    """
    if keras_module is None:
        import keras as keras_module  # TensorFlow: imported only when this runs
    py_dataset = getattr(keras_module.utils, "PyDataset", None)  # Keras 3; tf-keras has only Sequence

    class StoreSequence(py_dataset or keras_module.utils.Sequence):
        def __init__(self):
            if py_dataset is not None:
                super().__init__(workers=1, use_multiprocessing=False)
            info = read_info(path)
            if not info.complete:
                raise ValueError(f"{path} is incomplete ({info.n_done}/{info.n} images): run the same "
                                 "`oct extract` command again to finish it")
            self.n_classes = len(info.labels)
            self.index = split_indices(path, split)
            if len(self.index) == 0:
                raise ValueError(f"store {path} has no images in split {split!r}")
            self.labels = read_column(path, "label")
            self.rng = np.random.default_rng(seed)
            self.order = self.index.copy()
            if shuffle:
                self.rng.shuffle(self.order)
            self.file = _h5().File(path, "r")
            self.feats = self.file["features"]

        def __len__(self):
            return math.ceil(len(self.order) / batch_size)

        def __getitem__(self, i):
            rows = np.sort(self.order[i * batch_size:(i + 1) * batch_size])
            x = np.empty((len(rows), *FEATURE_SHAPE), np.float32)
            # Row by row: h5py's fancy indexing (feats[rows]) is ~20x slower than reading each chunk.
            for j, r in enumerate(rows):
                x[j] = self.feats[r]
            y = np.eye(self.n_classes, dtype=np.float32)[self.labels[rows]]
            return x, y

        def on_epoch_end(self):
            if shuffle:
                self.rng.shuffle(self.order)

    return StoreSequence()


def run(manifest: Path, out: Path, base_weights: str, base_seed: int, preprocess: str, dtype: str,
        batch_size: int, splits: Sequence[str] | None) -> int:
    """CLI body of `python -m train oct extract`."""
    info = extract(manifest, out, base_weights, base_seed, preprocess, dtype, batch_size, splits)
    counts = {s: int(len(split_indices(out, s))) for s in ("train", "val", "test")}
    print(f"store {out}: {info.n} images ({', '.join(f'{k} {v}' for k, v in counts.items())}), {info.describe()}"
          + ("; SYNTHETIC data" if info.synthetic else ""))
    return 0
