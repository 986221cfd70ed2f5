"""The backend table: which runtime runs which artifact, imported only when used.

    name             suffixes      module                              pip package
    litert           .tflite       edge_runtime.backends.litert        ai-edge-litert  (preferred)
    tflite-runtime   .tflite       edge_runtime.backends.tflite_rt     tflite-runtime  (legacy Pi wheels, numpy < 2)
    onnxruntime      .onnx .ort    edge_runtime.backends.onnx_rt       onnxruntime

`resolve(path, name)` picks a row: the named one, or the first row for the
file's suffix whose runtime is installed. Nothing here imports a runtime; the
chosen backend module imports its own on first use. Everything a model needs
from a backend is the small `Session` interface below.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from pathlib import Path
from typing import Any, Protocol

import numpy as np

EXTRA = "pip install 'medge[edge]'"


@dataclasses.dataclass(frozen=True)
class Backend:
    """One row of the table.

    Attributes:
        name: what `--backend` takes.
        suffixes: artifact suffixes it runs.
        module: `edge_runtime.backends.*` module with `open_session(path, threads)`.
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

    def install_hint(self) -> str:
        if self.name == "tflite-runtime":
            return "pip install tflite-runtime (needs numpy < 2; prefer ai-edge-litert: " + EXTRA + ")"
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
class IOSpec:
    """A model input or output as the runtime reports it (quantization from the tensor itself)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    scale: float | None = None
    zero_point: int | None = None

    @property
    def quantized(self) -> bool:
        return self.scale is not None


class Session(Protocol):
    """What a backend module's `open_session` returns."""

    backend: str
    input: IOSpec
    output: IOSpec

    def run(self, x: np.ndarray) -> np.ndarray:
        """Raw output for one raw (already quantized if needed) batch-1 input."""

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
                f"unknown backend {name!r}; known: {', '.join(BACKENDS)} (install with {EXTRA})"
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
        f"no runtime for {suffix} files is installed (tried {', '.join(b.name for b in rows)}): {rows[0].install_hint()}"
    )


def open_session(path: str | Path, name: str | None = None, threads: int | None = None) -> Session:
    """Resolve a backend and open `path` with it (the runtime is imported here, first use)."""
    b = resolve(path, name)
    mod = importlib.import_module(b.module)
    return mod.open_session(Path(path), threads)


def available() -> list[dict[str, Any]]:
    """Rows of the table with whether each runtime is installed (for `info` and error messages)."""
    return [{"backend": b.name, "suffixes": list(b.suffixes), "package": b.package, "installed": b.installed()}
            for b in BACKENDS.values()]


