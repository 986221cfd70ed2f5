"""The format table against what uses it: a backend for every row, and the table in docs/conversion.md."""

from __future__ import annotations

import re
from pathlib import Path

from convert.formats import FORMATS
from edge_runtime.backends import BACKENDS, SUFFIXES

CONVERSION_DOC = Path(__file__).resolve().parents[1] / "docs" / "conversion.md"


def test_every_format_has_a_backend_for_its_runtime_and_suffix():
    for f in FORMATS.values():
        assert f.runtime in BACKENDS, f"{f.name}: runtime {f.runtime!r} is not a backend ({', '.join(BACKENDS)})"
        assert f.ext in BACKENDS[f.runtime].suffixes, f"{f.name}: backend {f.runtime} does not run {f.ext} files"
        assert f.ext in SUFFIXES


def test_docs_format_table_lists_the_table_in_order():
    text = CONVERSION_DOC.read_text()
    start = text.index("| format | file | what |")
    rows = re.findall(r"^\| `([a-z0-9-]+)` \| `(\.[a-z]+)` \|", text[start:].split("\n\n", 1)[0], flags=re.M)
    assert rows == [(f.name, f.ext) for f in FORMATS.values()], \
        "docs/conversion.md's format table and convert/formats.py differ"
