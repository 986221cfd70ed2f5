"""A model file's content hash (edge_runtime/content_hash.py) catches any changed byte.

    python -m pytest -q tests/test_content_hash.py
"""

from __future__ import annotations

import numpy as np
import pytest

import edge_runtime
from edge_runtime import content_hash, registry
from edge_runtime.content_hash import ContentHashError
from edge_runtime.metadata import tflite_metadata_entries
from tests.helpers import CONVERT_KEYS, tflite_without_metadata

from helpers import SAMPLE

pytest.importorskip("ai_edge_litert", reason="sealing a .tflite writes a metadata entry with the flatbuffer schema")

RELEASED = registry.RELEASED_DIR / "malaria.tflite"


@pytest.fixture(scope="module")
def sealed() -> bytes:
    return content_hash.seal_tflite(RELEASED.read_bytes())


def test_a_sealed_file_verifies_and_runs_as_before(sealed, tmp_path):
    raw = RELEASED.read_bytes()
    stored = content_hash.verify(sealed, "malaria.tflite")
    assert tflite_metadata_entries(sealed)[content_hash.KEY] == content_hash.MARKER + stored.encode()
    assert content_hash.seal_tflite(raw) == sealed  # the same file seals to the same bytes
    # The network is untouched: only the entry is added.
    assert tflite_without_metadata(sealed, (*CONVERT_KEYS, content_hash.KEY)) == tflite_without_metadata(raw)
    path = tmp_path / "malaria.tflite"
    path.write_bytes(sealed)
    cells = sorted(str(p) for p in SAMPLE.rglob("*.png"))[:8]
    got = [p.probabilities for p in edge_runtime.load(path, warmup=False).predict(cells)]
    assert got == [p.probabilities for p in edge_runtime.load(RELEASED, warmup=False).predict(cells)]


def test_a_file_without_a_record_is_refused():
    with pytest.raises(ContentHashError, match="malaria.tflite carries no content hash"):
        content_hash.verify(RELEASED.read_bytes(), "malaria.tflite")


def test_one_flipped_byte_anywhere_is_caught_in_100_copies(sealed):
    """100 copies of the int8 release, each with one random byte changed: every one is refused.

    Besides the random ones: the middle of the file (where issue 27's flip
    passed `selftest`), a digit of the record and a byte of its marker.
    """
    rng = np.random.default_rng(27)
    start = sealed.index(content_hash.MARKER)
    positions = [len(sealed) // 2, start + len(content_hash.MARKER) + 5, start + 3,
                 *rng.integers(0, len(sealed), 97).tolist()]
    caught = 0
    for pos in positions:
        copy = bytearray(sealed)
        copy[pos] ^= int(rng.integers(1, 256))  # a different byte, never the same one
        with pytest.raises(ContentHashError, match="has changed since it was made|carries no content hash"):
            content_hash.verify(bytes(copy), f"copy with byte {pos} changed")
        caught += 1
    print(f"\n{caught} of {len(positions)} copies with one changed byte refused by their content hash")
    assert caught == len(positions) == 100


def test_selftest_by_path_refuses_a_changed_byte_before_the_golden_answers(sealed, tmp_path, capsys):
    from edge_runtime.cli import main

    good, bad = tmp_path / "sealed.tflite", tmp_path / "flipped.tflite"
    good.write_bytes(sealed)
    flipped = bytearray(sealed)
    flipped[len(flipped) // 2] ^= 0x01  # one bit, in the weights: what issue 27 saw pass the golden answers
    bad.write_bytes(bytes(flipped))
    assert main(["selftest", str(good)]) == 0
    assert "selftest passed" in capsys.readouterr().out
    assert main(["selftest", str(bad)]) == 1
    assert "flipped.tflite has changed since it was made" in capsys.readouterr().out
