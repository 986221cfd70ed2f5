"""A model file's content hash (edge_runtime/content_hash.py) catches any changed byte, wherever the file is loaded.

    python -m pytest -q tests/test_content_hash.py
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import edge_runtime
from edge_runtime import content_hash, registry
from edge_runtime.content_hash import ContentHashError
from edge_runtime.metadata import tflite_metadata_entries
from edge_runtime.model import ModelChanged
from tests.helpers import CONVERT_KEYS, run_cli, tflite_without_metadata

from helpers import SAMPLE

pytest.importorskip("ai_edge_litert", reason="sealing a .tflite writes a metadata entry with the flatbuffer schema")

RELEASED = registry.RELEASED_DIR / "malaria.tflite"
FILES = [f for r in registry.read_registry() for f in r.all_files]
needs_onnxruntime = pytest.mark.skipif(not edge_runtime.BACKENDS["onnxruntime"].installed(),
                                       reason="the .onnx/.ort files need the onnx extra")


def _runs(f) -> bool:
    return f.runtime != "onnxruntime" or edge_runtime.BACKENDS["onnxruntime"].installed()


@pytest.fixture(scope="module")
def unsealed() -> bytes:
    """The released .tflite without its record: a file made before medge wrote one."""
    return tflite_without_metadata(RELEASED.read_bytes(), (content_hash.KEY,))


@pytest.mark.parametrize("f", FILES, ids=[f.file for f in FILES])
def test_every_released_file_is_sealed_and_loads(f):
    """Every file of every release carries its content hash (written by `python -m convert`), and it holds."""
    data = f.path.read_bytes()
    stored = content_hash.check(data, f.file)
    assert stored is not None and stored == content_hash.record(data)
    if _runs(f):
        model = edge_runtime.load(f.path, warmup=False)
        assert model.content_hash == stored and model.describe()["content_hash"] == stored


def test_sealing_adds_one_entry_and_changes_no_answer(unsealed, tmp_path):
    assert content_hash.check(unsealed) is None and not content_hash.sealed(unsealed)
    sealed = content_hash.seal_tflite(unsealed)
    stored = content_hash.verify(sealed, "malaria.tflite")
    assert tflite_metadata_entries(sealed)[content_hash.KEY] == content_hash.MARKER + stored.encode()
    assert content_hash.seal_tflite(unsealed) == sealed  # the same file seals to the same bytes
    # The network is untouched: only the entry is added.
    assert tflite_without_metadata(sealed, CONVERT_KEYS) == tflite_without_metadata(unsealed, CONVERT_KEYS)
    a, b = tmp_path / "a.tflite", tmp_path / "b.tflite"
    a.write_bytes(sealed)
    b.write_bytes(unsealed)
    cells = sorted(str(p) for p in SAMPLE.rglob("*.png"))[:8]
    got = [p.probabilities for p in edge_runtime.load(a, warmup=False).predict(cells)]
    assert got == [p.probabilities for p in edge_runtime.load(b, warmup=False).predict(cells)]


def test_a_file_without_a_record_loads_as_not_sealed(unsealed, tmp_path):
    with pytest.raises(ContentHashError, match="malaria.tflite carries no content hash"):
        content_hash.verify(unsealed, "malaria.tflite")
    path = tmp_path / "old.tflite"
    path.write_bytes(unsealed)
    assert edge_runtime.load(path, warmup=False).content_hash is None
    code, out, err = run_cli("selftest", path)
    assert code == 0 and "selftest passed" in out and "not sealed" in out, out + err
    assert "warning" not in (out + err).lower()


def test_an_edit_with_medge_s_writers_removes_the_stale_record():
    from edge_runtime.metadata import embed_tflite, read_tflite

    data = RELEASED.read_bytes()
    edited = embed_tflite(data, read_tflite(data))  # e.g. metadata written again
    assert content_hash.KEY not in tflite_metadata_entries(edited) and content_hash.check(edited) is None


@pytest.mark.parametrize("f", FILES, ids=[f.file for f in FILES])
def test_one_flipped_byte_anywhere_is_caught_in_100_copies(f):
    """100 copies of each released file, each with one random byte changed: `check` (what `load` and `selftest`
    run first) refuses every one. Besides the random ones: the middle of the file (where issue 27's flip passed
    `selftest`), a digit of the record, a byte of its marker and a byte of the entry's name.
    """
    data = f.path.read_bytes()
    rng = np.random.default_rng(27)
    start = data.index(content_hash.MARKER)
    name = data.index(content_hash.KEY.encode())  # the entry's name (or key), before its value
    positions = [len(data) // 2, start + len(content_hash.MARKER) + 5, start + 3, name + 2,
                 *rng.integers(0, len(data), 96).tolist()]
    caught = 0
    for pos in positions:
        copy = bytearray(data)
        copy[pos] ^= int(rng.integers(1, 256))  # a different byte, never the same one
        with pytest.raises(ContentHashError, match="has changed since it was made"):
            content_hash.check(bytes(copy), f"copy with byte {pos} changed")
        caught += 1
    print(f"\n{f.file}: {caught} of {len(positions)} copies with one changed byte refused by their content hash")
    assert caught == len(positions) == 100


@pytest.mark.parametrize("f", [f for f in FILES if f.format in ("tflite-int8", "onnx-int8")],
                         ids=lambda f: f.file)
def test_a_flipped_byte_fails_load_and_selftest_by_path(f, tmp_path):
    if not _runs(f):
        pytest.skip("the .onnx needs the onnx extra")
    bad = tmp_path / f"flipped{f.path.suffix}"
    data = bytearray(f.path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, in the weights: what issue 27 saw pass the golden answers
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelChanged, match=f"{bad.name} has changed since it was made"):
        edge_runtime.load(bad)
    code, out, err = run_cli("selftest", bad)
    assert code == 1 and f"selftest FAILED: {bad} has changed since it was made" in out, out + err
    code, out, err = run_cli("selftest", bad, "--json")
    assert code == 1 and json.loads(out)["content_hash"] == "changed"
    code, out, err = run_cli("predict", bad, SAMPLE)
    assert code == 2 and "has changed since it was made" in err
