"""Which extra each command needs, and one sentence (exit 2) when it is missing.

    python -m train        medge[train]
    python -m convert      medge[train]   (TensorFlow, tf2onnx, the quantizers; `convert inspect` needs only edge)
    python -m benchmarks   medge[train]   (builds, converts and measures the models)
    python -m edge_runtime smear   medge[smear]   (OpenCV; checked in edge_runtime.cli, which returns 2)

Every medge wheel carries the `train`, `convert` and `benchmarks` packages, so
on a device installed with `.[edge]` only, `python -m train oct synth` used to
end in a raw `ModuleNotFoundError: No module named 'scipy'` from deep in an
import chain (issue 27). Each of those `__main__` modules calls `require` first,
before importing its command line: the check looks for each package's module
with `importlib.util.find_spec` (nothing is imported) and names every missing
one beside the install command. Only the standard library is imported here.

    from edge_runtime.extras import require
    require("train", "python -m train")
"""

from __future__ import annotations

import importlib.util
import sys

# The packages of each extra, as pyproject.toml's [project.optional-dependencies] lists them (a `medge[smear]`
# line spelled out); tests/test_extras.py checks that the two agree.
EXTRAS: dict[str, tuple[str, ...]] = {
    "edge": ("ai-edge-litert", "flatbuffers"),
    "onnx": ("onnxruntime",),
    "smear": ("opencv-python-headless",),
    "serve": ("opencv-python-headless", "starlette", "uvicorn", "python-multipart"),
    "train": ("tensorflow", "keras", "tf-keras", "tensorflow-model-optimization", "tf2onnx", "onnx", "onnxruntime",
              "ai-edge-litert", "flatbuffers", "h5py", "matplotlib", "scikit-learn", "scipy", "sympy", "tqdm",
              "cleanlab", "opencv-python-headless"),
}

# The module a package installs, where it is not the package name with "-" as "_".
MODULES: dict[str, str] = {
    "opencv-python-headless": "cv2",
    "scikit-learn": "sklearn",
    "python-multipart": "python_multipart",
}


def module_of(package: str) -> str:
    """The top-level module `package` installs (e.g. "scikit-learn" -> "sklearn")."""
    return MODULES.get(package, package.replace("-", "_"))


def missing(extra: str) -> list[str]:
    """The packages of `extra` whose module cannot be found, in the extra's order.

    Raises:
        ValueError: an unknown extra (the known ones listed).
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; known: {', '.join(EXTRAS)}")
    # find_spec, not import: TensorFlow alone takes seconds to import, and the command imports it anyway.
    return [p for p in EXTRAS[extra] if importlib.util.find_spec(module_of(p)) is None]


def message(extra: str, command: str) -> str | None:
    """The sentence naming what `command` lacks and the extra to install, or None when nothing is missing.

    Args:
        extra: a key of `EXTRAS`.
        command: what the user ran, for the message (e.g. "python -m train").
    """
    lacking = missing(extra)
    if not lacking:
        return None
    return (f"error: {command} needs the `{extra}` extra, and this environment lacks {', '.join(lacking)}: "
            f"pip install 'medge[{extra}]'")


def require(extra: str, command: str) -> None:
    """Exit 2 with `message`'s sentence on stderr when any of the extra's packages is missing."""
    text = message(extra, command)
    if text:
        print(text, file=sys.stderr)
        raise SystemExit(2)
