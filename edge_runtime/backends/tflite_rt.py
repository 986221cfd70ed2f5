"""The legacy `tflite-runtime` 2.14 wheels (Raspberry Pi OS; numpy < 2); imported on first use.

It runs the same .tflite files as LiteRT but far slower on int8 models (its
XNNPACK does not take int8): prefer `ai-edge-litert` where it installs.

Unlike LiteRT it does not verify the flatbuffer: a truncated or corrupt file
crashes the process (SIGSEGV) instead of raising. So each file is first
opened in a short-lived child process; only if that survives is it opened
here. This costs one extra interpreter start per `load` (about 0.1-0.3 s),
paid only on this backend.
"""

from __future__ import annotations

import importlib.metadata as md
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from edge_runtime.backends._tflite import TFLiteSession

NAME = "tflite-runtime"
_PROBE = ("import sys\n"
          "from tflite_runtime.interpreter import Interpreter\n"
          "Interpreter(model_path=sys.argv[1]).allocate_tensors()\n")


def probe(path: Path, timeout: float = 120.0) -> None:
    """Open `path` in a child process; raise ValueError if that fails or crashes."""
    try:
        res = subprocess.run([sys.executable, "-c", _PROBE, str(path)], capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ValueError(f"tflite-runtime took over {timeout:.0f} s to open it") from None
    if res.returncode < 0:
        try:
            sig = signal.Signals(-res.returncode).name
        except ValueError:
            sig = f"signal {-res.returncode}"
        raise ValueError(f"tflite-runtime crashed opening it ({sig}); the file is truncated or corrupt "
                         "(tflite-runtime 2.14 does not verify model files; LiteRT does)")
    if res.returncode != 0:
        raise ValueError(_exception_text(res.stderr) or f"tflite-runtime exited with code {res.returncode}")


def _exception_text(stderr: str) -> str:
    """The exception of a child's traceback, all its lines: TFLite's "Didn't find op ... version '12'" comes
    on the line before the last one ("Registration failed.")."""
    lines = [l for l in stderr.strip().splitlines() if l.strip()]
    frames = [i for i, l in enumerate(lines) if l.startswith(" ")]  # traceback frames are indented
    tail = lines[frames[-1] + 1:] if frames else lines[-1:]
    return " ".join(l.strip() for l in tail)


def open_session(path: Path, threads: int | None = None, *, batch: int | None = 1, extra_outputs: Sequence[int] = (),
                 optimize: bool = True) -> TFLiteSession:
    """A tflite-runtime interpreter on `path`, after the child-process probe (see `backends.open_session`)."""
    from tflite_runtime.interpreter import Interpreter  # inside: the runtime is imported on first use, here only

    probe(path)
    return TFLiteSession(Interpreter, path, threads, NAME, md.version("tflite-runtime"), batch, extra_outputs)
