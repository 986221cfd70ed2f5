"""The legacy `tflite-runtime` 2.14 wheels (Raspberry Pi OS; numpy < 2); imported on first use.

It runs the same .tflite files as LiteRT but far slower on int8 models (its
XNNPACK does not take int8): prefer `ai-edge-litert` where it installs.
"""

from __future__ import annotations

from pathlib import Path

from edge_runtime.backends._tflite import TFLiteSession

NAME = "tflite-runtime"


def open_session(path: Path, threads: int | None = None, preserve_all_tensors: bool = False) -> TFLiteSession:
    import importlib.metadata as md

    from tflite_runtime.interpreter import Interpreter

    return TFLiteSession(Interpreter, path, threads, NAME, md.version("tflite-runtime"), preserve_all_tensors)
