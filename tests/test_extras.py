"""A missing extra is one sentence and exit 2, not a traceback (edge_runtime/extras.py).

    python -m pytest -q tests/test_extras.py

A device installed with `.[edge]` only is simulated in a fresh process by
hiding one package of the `train` extra (`sys.modules[name] = None`: import
and `find_spec` both then report it missing) before `python -m train`,
`python -m convert` or `python -m benchmarks` starts.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from edge_runtime import extras

ROOT = Path(__file__).resolve().parents[1]


def run_hiding(module: str, package: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m package args` in a fresh process where `module` cannot be imported."""
    code = (f"import runpy, sys; sys.modules[{module!r}] = None; sys.argv = [{package!r}, *{list(args)!r}]; "
            f"runpy.run_module({package!r}, run_name='__main__', alter_sys=True)")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("package, hidden, args", [
    ("train", "scipy", ("oct", "synth", "--help")),   # what issue 27 met: a raw ModuleNotFoundError for scipy
    ("convert", "tf2onnx", ("runs/none", "--out", "export")),
    ("benchmarks", "tensorflow", ("--help",)),
])
def test_missing_extra_is_a_sentence(package, hidden, args):
    r = run_hiding(extras.module_of(hidden), package, *args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip() == (f"error: python -m {package} needs the `train` extra, and this environment lacks "
                                f"{hidden}: pip install 'medge[train]'")


def test_every_missing_package_is_named():
    code = ("import sys; sys.modules['sklearn'] = None; sys.modules['cv2'] = None; "
            "from edge_runtime.extras import require; require('train', 'python -m train')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "lacks scikit-learn, opencv-python-headless: pip install 'medge[train]'" in r.stderr


def test_convert_inspect_needs_only_the_edge_runtime():
    """`convert inspect FILE` reads an artifact's metadata with edge_runtime: the train guard lets it through."""
    pytest.importorskip("ai_edge_litert", reason="inspect reads the .tflite with LiteRT")
    released = sorted((ROOT / "edge_runtime" / "released").glob("*.tflite"))
    if not released:
        pytest.skip("no model released yet")
    r = run_hiding("tensorflow", "convert", "inspect", str(released[0]), "--format", "json")
    assert r.returncode == 0, r.stderr
    assert "medge[train]" not in r.stderr and '"labels"' in r.stdout


def test_unknown_extra_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown extra 'gpu'; known: edge, onnx, smear, serve, train"):
        extras.missing("gpu")


def test_the_table_is_pyproject_s():
    """EXTRAS lists what pyproject.toml's extras install (a `medge[x]` line spelled out), in any order."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def packages(extra: str) -> set[str]:
        out = set()
        for req in deps[extra]:
            name = re.match(r"[A-Za-z0-9._-]+(\[[^\]]*\])?", req)
            if name.group(0).startswith("medge["):
                for sub in name.group(1).strip("[]").split(","):
                    out |= packages(sub.strip())
            else:
                out.add(name.group(0).lower())
        return out

    for extra, listed in extras.EXTRAS.items():
        assert set(listed) == packages(extra), extra


def test_smear_without_opencv_is_a_sentence(monkeypatch, capsys):
    """`.[edge]` alone has no OpenCV since issue 27: `edge_runtime smear` says to add the `smear` extra."""
    from edge_runtime.cli import main

    monkeypatch.setitem(sys.modules, "cv2", None)
    assert main(["smear", "malaria", str(ROOT / "tests" / "data" / "malaria_sample")]) == 2
    assert capsys.readouterr().err.strip() == ("error: python -m edge_runtime smear needs the `smear` extra, and "
                                               "this environment lacks opencv-python-headless: "
                                               "pip install 'medge[smear]'")
