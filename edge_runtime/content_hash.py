"""A hash of a model file's own content, recorded in the file, so a changed byte is caught wherever it is loaded.

    from edge_runtime import content_hash
    sealed = content_hash.seal_tflite(data)      # at conversion, after every other metadata entry is written
    content_hash.verify(sealed)                  # on the device: raises ContentHashError if any byte changed
    content_hash.check(data)                     # what `edge_runtime.load` and `selftest` do: verify a sealed
                                                 # file, None for one that carries no record (not sealed)

A file loaded by path was checked only by its golden answers, and one byte
flipped in the middle of an int8 file's weights passed `selftest` (issue 27):
a flip that moves no golden answer past its tolerance is invisible there.

The record is one metadata entry (`KEY`: a `Model.metadata` entry of a
.tflite, a `metadata_props` key of a .onnx/.ort) whose value is `MARKER` followed by 64 hex digits: the
sha256 of the whole file with those 64 digits set to b"0". Everything else is
covered: graph, weights, the converter's and medge's metadata, the golden set,
even padding. Verification reads raw bytes only (no flatbuffer or protobuf
parsing), so it is the same for every format and a flip anywhere is caught:
in the digits (they no longer match, or are no longer 64 hex digits), in the
marker (no record found), or anywhere else (another digest). It must be the
last change made to a file: any later edit, a repack included, is a change.
`python -m convert` seals every artifact it writes (`convert.embedding.embed`,
which writes a .onnx's and an .ort's record through their `metadata_props`
with the other entries; an .ort cannot be edited afterwards, so it is
converted once more with the blank record, then the digits are written in
place). Editing entries with medge's own writers removes the record.

A file is sealed when `KEY` occurs in its bytes (the entry's name, and the
marker's first bytes): a flip in the marker then still finds the name, and a
flip in the name is another digest, so no single changed byte turns a sealed
file into an unsealed one. Files made before medge recorded a hash load as
"not sealed", with their golden answers as their only check.

Standard library only.
"""

from __future__ import annotations

import hashlib
import re

from edge_runtime.spec import CONTENT_HASH_KEY
from edge_runtime.tflite_file import embed_entries

KEY = CONTENT_HASH_KEY
MARKER = KEY.encode() + b":"
_RECORD = re.compile(re.escape(MARKER) + rb"([0-9a-f]{64})")
_BLANK = b"0" * 64


class ContentHashError(ValueError):
    """The file carries no content hash, or one its bytes no longer match."""


def digest(data: bytes | bytearray, start: int) -> str:
    """sha256 (hex) of `data` with the 64 digits at `start` read as "0"s."""
    h = hashlib.sha256()
    h.update(memoryview(data)[:start])
    h.update(_BLANK)
    h.update(memoryview(data)[start + 64:])
    return h.hexdigest()


def _record(data: bytes | bytearray, where: str) -> re.Match:
    found = list(_RECORD.finditer(data))
    if not found:
        raise ContentHashError(f"{where} carries no content hash ({KEY}): the file predates it, or the record itself "
                               "was changed; convert the model again, or copy the released file again")
    if len(found) > 1:
        raise ContentHashError(f"{where} carries {len(found)} content hash records ({KEY}); a file has one")
    return found[0]


def record(data: bytes | bytearray, where: str = "model") -> str:
    """The content hash recorded in `data` (hex), without checking it."""
    return _record(data, where).group(1).decode()


def verify(data: bytes | bytearray, where: str = "model") -> str:
    """Check that `data` is the content its recorded hash says; returns the hash.

    Args:
        data: the file's bytes (.tflite, .onnx, .ort).
        where: the file's name, for the message.

    Raises:
        ContentHashError: no record, more than one, or bytes that no longer match it.
    """
    m = _record(data, where)
    stored = m.group(1).decode()
    got = digest(data, m.start(1))
    if got != stored:
        raise ContentHashError(f"{where} has changed since it was made: its content hashes to {got[:16]}..., its "
                               f"record says {stored[:16]}... (a damaged copy or storage); copy the file again")
    return stored


def sealed(data: bytes | bytearray) -> bool:
    """Whether `data` says it carries a content hash (see the module docstring; not whether it matches)."""
    return KEY.encode() in data


def check(data: bytes | bytearray, where: str = "model") -> str | None:
    """`verify` for a sealed file; None for a file that carries no record (made before medge wrote one).

    Raises:
        ContentHashError: a sealed file whose bytes no longer match its record.
    """
    if not sealed(data):
        return None
    if not _RECORD.search(data):  # the entry is named, its record is not there: a byte of the marker changed
        raise ContentHashError(f"{where} has changed since it was made: it names a content hash ({KEY}) but the "
                               "record is damaged (a damaged copy or storage); copy the file again")
    return verify(data, where)


def blank_record() -> str:
    """The value `seal` writes first, before the digest over the final layout replaces its zeros."""
    return (MARKER + _BLANK).decode()


def seal(data: bytes | bytearray, embed) -> bytes:
    """`data` with a content hash recorded through `embed(data, value) -> bytes` (one entry, value as given).

    The record is written twice: first with zero digits (this may repack the
    file), then the digest over that final layout is written into the same
    64 bytes in place, which changes nothing else.
    """
    return reseal(embed(bytes(data), MARKER + _BLANK), "the sealed model")


def reseal(data: bytes | bytearray, where: str = "model") -> bytes:
    """`data`, a sealed file changed in place by a trusted step after it was verified (the field app fixing a
    .tflite's batch dimension for the phone: same layout, a few integers changed), with the digest over its new
    bytes written into its existing record, so the copy it serves is checked like the original.

    Raises:
        ContentHashError: `data` carries no record (or more than one).
    """
    m = _record(data, where)
    out = bytearray(data)
    out[m.start(1):m.end(1)] = digest(out, m.start(1)).encode()
    return bytes(out)


def seal_tflite(data: bytes | bytearray) -> bytes:
    """A .tflite with its content hash as metadata entry `KEY` (needs the flatbuffer schema: ai-edge-litert)."""
    return seal(data, lambda d, value: embed_entries(d, {KEY: value}))
