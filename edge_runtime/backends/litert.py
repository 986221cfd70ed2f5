"""LiteRT (`ai-edge-litert`), the preferred runtime for .tflite files; imported on first use."""

from __future__ import annotations

import importlib.metadata as md
from collections.abc import Sequence
from pathlib import Path

from edge_runtime.backends._tflite import TFLiteSession

NAME = "litert"


def open_session(path: Path, threads: int | None = None, *, batch: int | None = 1, extra_outputs: Sequence[int] = (),
                 optimize: bool = True) -> TFLiteSession:
    """A LiteRT interpreter on `path` (see `edge_runtime.backends.open_session`; `optimize` is onnxruntime's)."""
    from ai_edge_litert.interpreter import Interpreter  # inside: the runtime is imported on first use, here only

    return TFLiteSession(Interpreter, path, threads, NAME, md.version("ai-edge-litert"), batch, extra_outputs)
