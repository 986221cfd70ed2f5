"""LiteRT (`ai-edge-litert`), the preferred runtime for .tflite files; imported on first use."""

from __future__ import annotations

from pathlib import Path

from edge_runtime.backends._tflite import TFLiteSession

NAME = "litert"


def open_session(path: Path, threads: int | None = None, preserve_all_tensors: bool = False) -> TFLiteSession:
    import importlib.metadata as md

    from ai_edge_litert.interpreter import Interpreter

    return TFLiteSession(Interpreter, path, threads, NAME, md.version("ai-edge-litert"), preserve_all_tensors)


def interpreter_class():
    """The runtime's Interpreter class (for callers that build one from bytes)."""
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter
