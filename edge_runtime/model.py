"""Load a medge artifact and classify images with it: numpy, Pillow and one runtime.

    import edge_runtime
    model = edge_runtime.load("export/malaria-edge_tflite-int8.tflite", threads=2)
    for p in model.predict(["cell1.png", "cell2.png"]):
        print(p.source, p.decision, p.confidence, p.timing)

The artifact says how to use itself (labels, preprocessing, tensor types):
its embedded medge metadata is read first, the sidecar `.json` next to it
second. Integer inputs and outputs are quantized and dequantized with the
tensors' own scale and zero point as the runtime reports them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edge_runtime import backends, compat, content_hash, registry
from edge_runtime.backends import BackendError
from edge_runtime.clinical import referral_level
from edge_runtime.images import DEFAULT_MAX_PIXELS, ImageError, load_image, preprocess
from edge_runtime.metadata import (
    ArtifactMetadata,
    MetadataNotFound,
    metadata_from_entries,
    read_metadata,
    read_sidecar,
)
from edge_runtime.spec import TensorInfo

UNCERTAIN = "uncertain — refer"
# Below this top-class probability the answer is UNCERTAIN. Used when the
# artifact's metadata carries no `confidence_threshold`. Malaria is a binary
# screen where a coin flip already scores 0.5, so the bar is high; OCT has
# four classes (chance 0.25).
DEFAULT_THRESHOLDS = {"malaria": 0.8, "oct": 0.6}
DEFAULT_THRESHOLD = 0.7

InputLike = str | os.PathLike | Image.Image | np.ndarray


class ModelError(ValueError):
    """A model file that cannot be used: missing, truncated, foreign, or metadata that does not match it."""


class ModelChanged(ModelError):
    """A sealed model file whose bytes no longer match its content hash (`edge_runtime.content_hash`)."""


@dataclasses.dataclass
class Prediction:
    """The result for one input: a class (or UNCERTAIN), or the error that kept it from being classified.

    Attributes:
        source: the file path, or "image[i]" / "array[i]" for in-memory inputs.
        label: the top class (even when uncertain), None on error.
        confidence: probability of `label`.
        probabilities: every class's probability, in label order.
        uncertain: confidence below the threshold.
        decision: `label`, or UNCERTAIN when uncertain, or "error".
        referral: OCT referral level ("urgent", "routine", "observation", "specialist review"), else None.
        error: why the input was rejected (None when classified).
        timing: milliseconds spent reading+preprocessing and in the runtime.
    """

    source: str
    label: str | None = None
    confidence: float | None = None
    probabilities: dict[str, float] | None = None
    uncertain: bool = False
    decision: str = "error"
    referral: str | None = None
    error: str | None = None
    timing: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- quantization


def quantize(x: np.ndarray, spec: TensorInfo) -> np.ndarray:
    """Float values -> the tensor's integer type: `q = round(x / scale) + zero_point`, clipped."""
    info = np.iinfo(spec.dtype)
    q = np.round(x / np.float32(spec.scale)) + spec.zero_point
    return np.clip(q, info.min, info.max).astype(spec.dtype)


def dequantize(q: np.ndarray, spec: TensorInfo) -> np.ndarray:
    """The tensor's integers -> float32: `scale * (q - zero_point)`."""
    return (q.astype(np.float32) - np.float32(spec.zero_point)) * np.float32(spec.scale)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------- loading


def first_line(e: BaseException) -> str:
    """"Type: first line of the message": an error summary for one-line reports."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _read_metadata(path: Path, session) -> tuple[ArtifactMetadata, str]:
    """(metadata, where it came from): embedded first, then the sidecar .json."""
    embedded_error = None
    try:
        props = session.metadata()
        if props is not None:  # onnxruntime: read from the open session, not a second one
            return metadata_from_entries(props, path.name, "metadata_props entry"), "embedded"
        return read_metadata(path), "embedded"
    except (MetadataNotFound, ImportError) as e:  # no entry, or no flatbuffer schema (tflite-runtime only)
        embedded_error = str(e)
    except Exception as e:  # a flatbuffer that does not parse raises struct/Index errors
        raise ModelError(f"{path}: its medge metadata cannot be read ({first_line(e)})") from None
    try:
        return read_sidecar(path), "sidecar"
    except FileNotFoundError:
        raise ModelError(
            f"{path}: no medge metadata ({embedded_error}) and no sidecar {path.with_suffix('.json').name}; "
            "export the model with `python -m convert`"
        ) from None
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{path.with_suffix('.json')}: sidecar metadata is invalid ({first_line(e)})") from None


def _needs_newer_runtime(path: Path, backend: backends.Backend, error: BaseException,
                         version: str | None = None) -> str | None:
    """What `path` needs, when `backend` failed on it because it is too old (`edge_runtime.compat`), else None."""
    text = " ".join(str(error).split()) or type(error).__name__
    return compat.explain(path, backend.name, version or backend.version(), text, backend.install_hint())


def _check_contract(path: Path, meta: ArtifactMetadata, inp: TensorInfo, out: TensorInfo) -> None:
    """Refuse metadata that does not describe the tensors the runtime sees."""
    problems = []
    want = tuple(meta.preprocess.input_shape)
    # A head (part "head", e.g. the OCT head) takes the base's feature map, not the preprocessed image.
    if meta.part == "model" and (len(inp.shape) != 4 or tuple(inp.shape[1:]) != want):
        problems.append(f"input tensor is {inp.shape} but the preprocessing makes (1, {', '.join(map(str, want))})")
    if tuple(meta.input.shape[1:]) != tuple(inp.shape[1:]):
        problems.append(f"metadata input shape {meta.input.shape} != model input {inp.shape}")
    if np.dtype(meta.input.dtype) != inp.dtype:
        problems.append(f"metadata input dtype {meta.input.dtype} != model input {inp.dtype.name}")
    if np.dtype(meta.output.dtype) != out.dtype:
        problems.append(f"metadata output dtype {meta.output.dtype} != model output {out.dtype.name}")
    if not out.shape or out.shape[-1] != len(meta.labels):
        problems.append(f"model output {out.shape} does not have one value per label ({len(meta.labels)} labels)")
    for what, m, r in (("input", meta.input, inp), ("output", meta.output, out)):
        if r.quantized and m.quantized and not math.isclose(m.scale, r.scale, rel_tol=1e-5):
            problems.append(f"metadata {what} scale {m.scale} != model's {r.scale}")
    if problems:
        raise ModelError(f"{path}: metadata does not match the model: " + "; ".join(problems))


def load(
    path: str | os.PathLike,
    backend: str | None = None,
    threads: int | None = None,
    threshold: float | None = None,
    warmup: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    runtime: str | None = None,
) -> EdgeModel:
    """Open a medge artifact (.tflite, .onnx, .ort), or a released model by name, with one runtime.

    A file that carries a content hash (every file `python -m convert` writes)
    is checked against it before a runtime opens it: one changed byte is
    refused (`ModelChanged`). A file without one (made before medge recorded
    it) loads as before; `EdgeModel.content_hash` is then None.

    Args:
        path: the artifact, or the name of a model released with the package
            (`python -m edge_runtime models` lists them; e.g. "malaria").
        backend: "litert", "tflite-runtime" or "onnxruntime"; default: the
            first installed one for the file's suffix (LiteRT preferred). For a
            released name it also picks the file: `.tflite` for the TFLite
            runtimes, the release's `.onnx` for onnxruntime; without it, the
            `.tflite` when a TFLite runtime is installed, else the `.onnx`.
        runtime: the same as `backend` (either name may be used, not both).
        threads: runtime threads (default: the runtime's choice).
        threshold: confidence below which an answer is UNCERTAIN (default:
            the metadata's, else a per-task default).
        warmup: run one dummy inference now, so the first real one is not slow.
        max_pixels: larger images are rejected (decompression-bomb guard).

    Raises:
        ModelError: missing, unreadable or foreign file; metadata missing or not matching the model;
            unknown released name, or a released file that no longer matches its sha256.
        ModelChanged: a sealed file whose bytes changed since it was made.
        BackendError: unknown backend name, or its runtime is not installed (the message names the extra).
    """
    t0 = time.perf_counter()
    if runtime is not None and backend is not None and runtime != backend:
        raise BackendError(f"runtime={runtime!r} and backend={backend!r} name two runtimes; give one")
    backend = backend if backend is not None else runtime
    try:
        path = registry.resolve(path, backend)
    except registry.ReleaseError as e:
        raise ModelError(str(e)) from None
    if not path.exists():
        raise ModelError(f"model file {path} does not exist")
    if not path.is_file():
        raise ModelError(f"{path} is not a file; give a .tflite, .onnx or .ort artifact")
    if path.stat().st_size == 0:
        raise ModelError(f"model file {path} is empty (0 bytes)")
    chosen = backends.resolve(path, backend)
    try:  # before a runtime parses the bytes: a changed offset could take the runtime down with it
        sealed_hash = content_hash.check(path.read_bytes(), str(path))
    except content_hash.ContentHashError as e:
        raise ModelChanged(str(e)) from None
    try:
        session = backends.open_session(path, chosen.name, threads)
    except ImportError as e:  # installed but broken runtime
        raise BackendError(f"backend {chosen.name} failed to import ({first_line(e)}): "
                           f"{chosen.install_hint()}") from None
    except Exception as e:  # runtimes raise RuntimeError, ValueError or their own types for bad files
        too_old = _needs_newer_runtime(path, chosen, e)
        if too_old:
            raise ModelError(too_old) from None
        raise ModelError(f"{path}: {chosen.name} cannot load it, truncated or not a model ({first_line(e)})") from None
    meta, meta_source = _read_metadata(path, session)
    _check_contract(path, meta, session.input, session.output)
    model = EdgeModel(path, meta, session, threshold=threshold, max_pixels=max_pixels)
    model.metadata_source = meta_source
    model.content_hash = sealed_hash
    model.threads = threads
    model.load_ms = (time.perf_counter() - t0) * 1e3
    if warmup:
        t1 = time.perf_counter()
        model.run(np.zeros((1, *model.input_shape), np.float32))
        model.warmup_ms = (time.perf_counter() - t1) * 1e3
    return model


# ---------------------------------------------------------------- the model


class EdgeModel:
    """A loaded artifact: `predict` for images, `run` for preprocessed arrays.

    Attributes:
        path, metadata, labels, spec: the artifact and its contract.
        backend: runtime name; threshold: the UNCERTAIN bar.
        load_ms, warmup_ms: time to open (incl. metadata) and for the warm-up call.
    """

    def __init__(self, path: Path, metadata: ArtifactMetadata, session, threshold: float | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.path = Path(path)
        self.metadata = metadata
        self.session = session
        self.labels = metadata.labels
        self.spec = metadata.preprocess
        # What one input tensor is: the preprocessed image, or a head's feature map.
        self.input_shape = tuple(int(v) for v in session.input.shape[1:])
        self.backend = session.backend
        self.max_pixels = max_pixels
        self.threshold = self.default_threshold(metadata) if threshold is None else float(threshold)
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        self.metadata_source = "embedded"
        self.content_hash: str | None = None  # the file's verified content hash; None: not sealed
        self.threads: int | None = None
        self.load_ms = 0.0
        self.warmup_ms = 0.0

    def __repr__(self) -> str:
        m = self.metadata
        return (f"EdgeModel({self.path.name!r}, task={m.task!r}, format={m.format!r}, backend={self.backend!r}, "
                f"labels={list(self.labels)}, threshold={self.threshold})")

    @staticmethod
    def default_threshold(meta: ArtifactMetadata) -> float:
        if meta.confidence_threshold is not None:
            return float(meta.confidence_threshold)
        return DEFAULT_THRESHOLDS.get(meta.task, DEFAULT_THRESHOLD)

    @property
    def task(self) -> str:
        return self.metadata.task

    def describe(self) -> dict[str, Any]:
        """What `python -m edge_runtime info` prints."""
        m = self.metadata
        return {
            "file": str(self.path), "size_bytes": self.path.stat().st_size,
            "backend": self.backend, "runtime_version": self.session.runtime_version(),
            "metadata_source": self.metadata_source,
            "model": m.model, "task": m.task, "format": m.format, "precision": m.precision,
            "labels": list(m.labels), "positive_label": m.positive_label, "threshold": self.threshold,
            "preprocess": m.preprocess.to_dict(),
            "input": self.session.input.to_dict(), "output": self.session.output.to_dict(),
            "output_kind": m.output_kind, "quantization": dict(m.quantization),
            "source_sha256": m.source_sha256, "created": m.created, "medge_version": m.medge_version,
            "version": m.version or None, "content_hash": self.content_hash,
            "load_ms": round(self.load_ms, 2), "warmup_ms": round(self.warmup_ms, 2),
        }

    # -- arrays

    def run(self, x: np.ndarray) -> np.ndarray:
        """Probabilities (N, classes) for preprocessed float inputs (N, H, W, C), one runtime call each."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == len(self.input_shape):
            x = x[None]
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"expected preprocessed inputs (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {x.shape}")
        return np.stack([self._run_one(xi) for xi in x]) if len(x) else np.zeros((0, len(self.labels)), np.float32)

    def _run_one(self, x: np.ndarray) -> np.ndarray:
        inp, out = self.session.input, self.session.output
        xi = x[None]
        xi = quantize(xi, inp) if inp.quantized else xi.astype(inp.dtype, copy=False)
        try:
            y = self.session.run(xi)
        except Exception as e:  # e.g. a kernel newer than this runtime, found only when it runs
            too_old = _needs_newer_runtime(self.path, backends.BACKENDS[self.backend], e,
                                           self.session.runtime_version())
            if too_old:
                raise ModelError(too_old) from None
            raise
        y = dequantize(y, out) if out.quantized else y.astype(np.float32)
        y = y.reshape(-1)
        if self.metadata.output_kind == "logits":
            y = softmax(y)
        return y

    # -- images

    def _iter_inputs(self, inputs: InputLike | Iterable[InputLike]) -> Iterator[tuple[str, Any]]:
        """(name, item) per input; a list or a 4-D array is a batch."""
        if isinstance(inputs, (str, os.PathLike, Image.Image)):
            inputs = [inputs]
        elif isinstance(inputs, np.ndarray):
            # A batch has one more axis than one input: (N, H, W, C) images, or (N, *input_shape) features.
            batch_ndim = len(self.input_shape) + 1 if self.metadata.part == "head" else 4
            inputs = list(inputs) if inputs.ndim == batch_ndim else [inputs]
        for i, item in enumerate(inputs):
            if isinstance(item, (str, os.PathLike)):
                yield os.fspath(item), item
            elif isinstance(item, Image.Image):
                yield getattr(item, "filename", "") or f"image[{i}]", item
            else:
                yield f"array[{i}]", item

    def preprocess(self, item: InputLike, name: str | None = None) -> np.ndarray:
        """One input -> the float32 tensor (H, W, C) `run` takes, exactly as `predict` makes it.

        Args:
            item: an image file path, a PIL image, a uint8 image array, or an
                already preprocessed float array (a head: its feature map).
            name: what error messages call it (default: the path, else "input").

        Raises:
            ImageError: an unusable input, with the reason.
        """
        if name is None:
            name = os.fspath(item) if isinstance(item, (str, os.PathLike)) else "input"
        if self.metadata.part == "head":
            fe = dict(self.metadata.feature_extractor)
            base = f"from {fe['layer']}" if fe.get("layer") else "of its feature extractor"
            if isinstance(item, (str, os.PathLike, Image.Image)):
                raise ImageError(name, f"this artifact takes features, not images: float arrays {self.input_shape} "
                                       f"{base}" + ("; run the fused artifact on images" if fe.get("layer") else ""))
            arr = np.asarray(item)
            if arr.dtype.kind == "f" and arr.shape == self.input_shape:
                return arr.astype(np.float32, copy=False)
            raise ImageError(name, f"got an array of shape {arr.shape} and dtype {arr.dtype}; this artifact takes "
                                   f"float features of shape {self.input_shape} {base}")
        if isinstance(item, (str, os.PathLike)):
            return preprocess(load_image(item, self.spec.color_mode, self.max_pixels), self.spec)
        if isinstance(item, Image.Image):
            return preprocess(load_image(item, self.spec.color_mode, self.max_pixels), self.spec)
        arr = np.asarray(item)
        if arr.dtype.kind == "f" and arr.shape == self.spec.input_shape:
            return arr.astype(np.float32, copy=False)  # already preprocessed
        if arr.dtype in (np.uint8, np.uint16) and (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4))):
            img = Image.fromarray(arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)
            return preprocess(load_image(img, self.spec.color_mode, self.max_pixels), self.spec)
        raise ImageError(name, f"array of shape {arr.shape} and dtype {arr.dtype} is neither an image "
                               f"(uint8 HxW or HxWx1/3/4) nor a preprocessed input (float {self.spec.input_shape})")

    def predict(self, inputs: InputLike | Iterable[InputLike], threshold: float | None = None) -> list[Prediction]:
        """Classify inputs; one `Prediction` per input, in order, bad ones as error records.

        Args:
            inputs: a file path, PIL image or numpy array, or a list of them, or
                an (N, H, W, C) batch. uint8 arrays are images (resized and
                scaled like files); float arrays of the model's input shape
                are taken as already preprocessed.
            threshold: override of the UNCERTAIN bar for this call.
        """
        return list(self.iter_predict(inputs, threshold))

    def iter_predict(self, inputs: InputLike | Iterable[InputLike],
                     threshold: float | None = None) -> Iterator[Prediction]:
        """`predict` one result at a time (for progress on large folders)."""
        bar = self.threshold if threshold is None else float(threshold)
        for name, item in self._iter_inputs(inputs):
            t0 = time.perf_counter()
            try:
                x = self.preprocess(item, name)
            except ImageError as e:
                yield Prediction(source=name, error=e.reason,
                                 timing={"preprocess_ms": round((time.perf_counter() - t0) * 1e3, 3)})
                continue
            t1 = time.perf_counter()
            probs = self._run_one(x)
            t2 = time.perf_counter()
            yield self._result(name, probs, bar, {"preprocess_ms": round((t1 - t0) * 1e3, 3),
                                                  "inference_ms": round((t2 - t1) * 1e3, 3)})

    def _result(self, name: str, probs: np.ndarray, bar: float, timing: dict[str, float]) -> Prediction:
        k = int(np.argmax(probs))
        label, conf = self.labels[k], float(probs[k])
        uncertain = conf < bar
        return Prediction(
            source=name, label=label, confidence=conf,
            probabilities={l: float(p) for l, p in zip(self.labels, probs)},
            uncertain=uncertain, decision=UNCERTAIN if uncertain else label,
            referral=referral_level(self.metadata, label, uncertain), timing=timing,
        )

