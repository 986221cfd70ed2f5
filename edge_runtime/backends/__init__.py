"""The backend table: which runtime runs which artifact, imported only when used.

    name             suffixes      module                              pip package
    litert           .tflite       edge_runtime.backends.litert        ai-edge-litert  (preferred)
    tflite-runtime   .tflite       edge_runtime.backends.tflite_rt     tflite-runtime  (legacy Pi wheels, numpy < 2)
    onnxruntime      .onnx .ort    edge_runtime.backends.onnx_rt       onnxruntime     (the `onnx` extra)

`resolve(path, name)` picks a row: the named one, or the first row for the
file's suffix whose runtime is installed. Nothing here imports a runtime; the
chosen backend module imports its own on first use. Everything a model needs
from a backend is the small `Session` interface below.

These modules are the only place in medge that creates a LiteRT/tflite-runtime
`Interpreter` or an `onnxruntime.InferenceSession`: the device (`edge_runtime.load`),
the proof in `convert`, the Grad-CAM feature tap and the benchmarks' probes
all open files through `open_session`.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata as md
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from edge_runtime.spec import TensorInfo

EXTRA = "pip install 'medge[edge]'"
# ONNX Runtime is an extra of its own: both released models are .tflite, and a device that runs only those
# saves its 68 MB (docs/install-sizes.md).
ONNX_EXTRA = "pip install 'medge[onnx]'"


@dataclasses.dataclass(frozen=True)
class Backend:
    """One row of the table.

    Attributes:
        name: what `--backend` takes.
        suffixes: artifact suffixes it runs.
        module: `edge_runtime.backends.*` module with `open_session(path, threads, *, batch, extra_outputs,
            optimize)`.
        import_name: the runtime's top-level module (checked with find_spec, not imported).
        package: what to pip install for it.
    """

    name: str
    suffixes: tuple[str, ...]
    module: str
    import_name: str
    package: str

    def installed(self) -> bool:
        return importlib.util.find_spec(self.import_name) is not None

    def version(self) -> str:
        """The installed runtime package's version, read without importing it ("unknown" if not found)."""
        try:
            return md.version(self.package)
        except md.PackageNotFoundError:
            return "unknown"

    def install_hint(self) -> str:
        if self.name == "tflite-runtime":
            return "pip install tflite-runtime (needs numpy < 2; prefer ai-edge-litert: " + EXTRA + ")"
        if self.name == "onnxruntime":
            return f"{ONNX_EXTRA} (or pip install {self.package})"
        return f"{EXTRA} (or pip install {self.package})"


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("litert", (".tflite",), "edge_runtime.backends.litert", "ai_edge_litert", "ai-edge-litert"),
    Backend("tflite-runtime", (".tflite",), "edge_runtime.backends.tflite_rt", "tflite_runtime", "tflite-runtime"),
    Backend("onnxruntime", (".onnx", ".ort"), "edge_runtime.backends.onnx_rt", "onnxruntime", "onnxruntime"),
)}
SUFFIXES = tuple(sorted({s for b in BACKENDS.values() for s in b.suffixes}))


class BackendError(ValueError):
    """No usable backend: unknown name, wrong suffix, or runtime not installed."""


@dataclasses.dataclass(frozen=True)
class Op:
    """One operator of a graph, in execution order: its kind (e.g. "CONV_2D") and tensor indices."""

    name: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


class Session(Protocol):
    """What a backend module's `open_session` returns.

    Raw tensors in and out: quantizing float inputs and dequantizing integer
    outputs with `input`/`output`'s scale and zero point is the caller's
    (`edge_runtime.model.quantize` / `dequantize`).

    Attributes:
        backend: the row's name ("litert", "tflite-runtime", "onnxruntime").
        input, output: the model's one input and one output, as the runtime reports them.
        batch: inputs one `run` call takes (1 for a device; None: any, a dynamic batch dimension).
        extra_outputs: the inner tensors asked for with `open_session(..., extra_outputs=...)`.
        extra_mode: how they are read ("extra-output": added to an in-memory
            copy's outputs; "preserve-all-tensors": the interpreter keeps every
            tensor), None without them.
    """

    backend: str
    input: TensorInfo
    output: TensorInfo
    batch: int | None
    extra_outputs: tuple[TensorInfo, ...]
    extra_mode: str | None

    def run(self, x: np.ndarray) -> np.ndarray:
        """Raw output for one raw (already quantized if needed) input of the session's batch."""

    def run_batch(self, x: np.ndarray) -> np.ndarray:
        """Raw outputs for N raw inputs: one runtime call when the session takes N at once, else one per input.

        TFLite sessions opened at batch 1 (the default, what a device runs:
        XNNPACK is fastest there) invoke once per input; onnxruntime with a
        dynamic batch dimension runs the whole batch in one call.
        """

    def run_with(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """`run`, plus copies of the raw `extra_outputs` tensors of the same call (Grad-CAM's feature tap)."""

    def ops(self) -> list[Op]:
        """The graph's operators in execution order (TFLite; onnxruntime exposes none and raises)."""

    def tensors(self) -> dict[int, TensorInfo]:
        """Every tensor of the graph by index, with its shape and quantization (TFLite; onnxruntime raises)."""

    def metadata(self) -> dict[str, str] | None:
        """Metadata the runtime exposes from the file (onnxruntime: `metadata_props`).

        None where the runtime exposes none (TFLite interpreters): then
        `edge_runtime.metadata` reads the flatbuffer's metadata entries itself.
        """

    def runtime_version(self) -> str:
        """Version of the runtime package."""


def resolve(path: str | Path, name: str | None = None) -> Backend:
    """The backend for `path`: `name` if given, else the first installed row for its suffix.

    Raises:
        BackendError: unknown name, a backend that cannot run this suffix, or no runtime installed.
    """
    suffix = Path(path).suffix.lower()
    if name is not None:
        if name not in BACKENDS:
            raise BackendError(
                f"unknown backend {name!r}; known: {', '.join(BACKENDS)} "
                f"(install with {EXTRA}; .onnx/.ort: {ONNX_EXTRA})"
            )
        b = BACKENDS[name]
        if suffix not in b.suffixes:
            raise BackendError(f"backend {name} runs {'/'.join(b.suffixes)} files, not {suffix or 'this file'}")
        if not b.installed():
            raise BackendError(f"backend {name} is not installed: {b.install_hint()}")
        return b
    rows = [b for b in BACKENDS.values() if suffix in b.suffixes]
    if not rows:
        raise BackendError(f"cannot run {Path(path).name}: model files must end in {', '.join(SUFFIXES)}")
    for b in rows:
        if b.installed():
            return b
    raise BackendError(
        f"no runtime for {suffix} files is installed (tried {', '.join(b.name for b in rows)}): "
        f"{rows[0].install_hint()}"
    )


def open_session(path: str | Path, name: str | None = None, threads: int | None = None, *,
                 batch: int | None = 1, extra_outputs: Sequence[int] = (), optimize: bool = True) -> Session:
    """Resolve a backend and open `path` with it (the runtime is imported here, first use).

    Args:
        path: a .tflite, .onnx or .ort file.
        name: backend row (default: by suffix, see `resolve`).
        threads: runtime threads (default: the runtime's choice).
        batch: TFLite: run this many inputs per invoke (1, what a device does;
            None keeps the file's own input shape). onnxruntime takes whatever
            batch its graph allows and ignores this.
        extra_outputs: TFLite tensor indices (see `Session.ops`/`tensors`) that
            `Session.run_with` returns beside the output.
        optimize: onnxruntime graph optimizations (off: faster to open, e.g. to read metadata only).
    """
    b = resolve(path, name)
    mod = importlib.import_module(b.module)
    return mod.open_session(Path(path), threads, batch=batch, extra_outputs=tuple(extra_outputs), optimize=optimize)
