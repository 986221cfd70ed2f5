"""Reading and writing the entries of a .tflite file: `Model.metadata` entries and the files packed after it.

A .tflite is a flatbuffer (identifier `TFL3`). medge keeps what an artifact says about itself in its
`Model.metadata` entries (name -> buffer bytes: `medge`, `medge-golden`, `TFLITE_METADATA`, beside the
converter's own `min_runtime_version` and `CONVERSION_METADATA`), and the standard metadata's associated files
(`labels.txt`) in a zip archive appended to the flatbuffer, where LiteRT ignores them.

- Reading needs no schema package: `tflite_entries` walks the flatbuffer with a small reader of its own
  (`tflite_model`), so a Pi with only the legacy tflite-runtime (which ships no schema) reads metadata too.
- Writing (`embed_entries`) unpacks and repacks the model with the schema that ships with `ai_edge_litert`
  (`schema_py_generated`) and `flatbuffers`, the toolchain's side.

What the entries mean lives elsewhere: `edge_runtime.metadata` (the `medge` record), `edge_runtime.golden`
(the golden set), `edge_runtime.standard_metadata` (the `TFLITE_METADATA` flatbuffer). No TensorFlow here.
"""

from __future__ import annotations

import io
import struct
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from edge_runtime.spec import CONTENT_HASH_KEY, STANDARD_KEY

TFLITE_IDENTIFIER = b"TFL3"
# A fixed zip time stamp for the packed files: two conversions of one model give the same bytes.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def check_tflite(buf: bytes, where: str) -> None:
    """ValueError naming `where` unless `buf` starts like a TFLite flatbuffer."""
    if len(buf) < 8 or buf[4:8] != TFLITE_IDENTIFIER:
        raise ValueError(f"{where} is not a TFLite flatbuffer (no 'TFL3' identifier)")


def schema():
    """The TFLite flatbuffer schema of ai-edge-litert, with the install command when it is missing."""
    try:
        # Inside the function: only writing needs it, and the legacy tflite-runtime install has no schema.
        from ai_edge_litert import schema_py_generated
    except ImportError:  # pragma: no cover - depends on the install
        raise ImportError(
            "reading .tflite metadata needs ai-edge-litert (its flatbuffer schema): pip install 'medge[edge]'"
        ) from None
    return schema_py_generated


# ---------------------------------------------------------------- a minimal flatbuffer reader (no schema)


class _Table:
    """One flatbuffer table: fields by index (the schema's field order)."""

    def __init__(self, buf: bytes, pos: int):
        self.buf, self.pos = buf, pos
        self.vt = pos - struct.unpack_from("<i", buf, pos)[0]
        self.vt_size = struct.unpack_from("<H", buf, self.vt)[0]

    def _off(self, field: int) -> int:
        o = 4 + 2 * field
        return struct.unpack_from("<H", self.buf, self.vt + o)[0] if o < self.vt_size else 0

    def scalar(self, field: int, fmt: str, default: int) -> int:
        off = self._off(field)
        return struct.unpack_from("<" + fmt, self.buf, self.pos + off)[0] if off else default

    def vector(self, field: int) -> tuple[int, int]:
        """(file offset of the first element, element count) of a vector field; (0, 0) when absent."""
        off = self._off(field)
        if not off:
            return 0, 0
        p = self.pos + off
        start = p + struct.unpack_from("<I", self.buf, p)[0]
        return start + 4, struct.unpack_from("<I", self.buf, start)[0]

    def tables(self, field: int) -> list[_Table]:
        start, n = self.vector(field)
        return [_Table(self.buf, start + 4 * i + struct.unpack_from("<I", self.buf, start + 4 * i)[0])
                for i in range(n)]

    def bytes(self, field: int) -> bytes:
        start, n = self.vector(field)
        return self.buf[start: start + n]


def tflite_model(buf: bytes) -> _Table:
    """The root `Model` table of .tflite bytes (fields by the schema's order: 2 subgraphs, 4 buffers, 6 metadata)."""
    return _Table(buf, struct.unpack_from("<I", buf, 0)[0])


def tflite_entries(buf: bytes) -> dict[str, bytes]:
    """The `Model.metadata` entries (name -> bytes) of a .tflite flatbuffer, without the schema package.

    Raises:
        ValueError: not a TFLite flatbuffer, or one that does not parse.
    """
    if len(buf) < 8 or buf[4:8] != TFLITE_IDENTIFIER:
        raise ValueError("not a TFLite flatbuffer (no 'TFL3' identifier)")
    try:
        model = tflite_model(buf)
        buffers = model.tables(4)
        out = {}
        for entry in model.tables(6):
            b = buffers[entry.scalar(1, "I", 0)]
            offset, size = b.scalar(1, "Q", 0), b.scalar(2, "Q", 0)
            out[entry.bytes(0).decode("utf-8", "replace")] = buf[offset: offset + size] if offset > 1 else b.bytes(0)
        return out
    except (struct.error, IndexError) as e:
        raise ValueError(f"TFLite flatbuffer does not parse ({e})") from None


def tflite_metadata_entries(model: bytes | bytearray) -> dict[str, bytes]:
    """All `Model.metadata` entries of a .tflite flatbuffer: name -> buffer bytes (read without the schema)."""
    buf = bytes(model)
    check_tflite(buf, "model")
    return tflite_entries(buf)


def entry_name(n: Any) -> str:
    """A metadata entry's name as str (the schema's object API gives bytes)."""
    return n.decode("utf-8") if isinstance(n, (bytes, bytearray)) else str(n)


# ---------------------------------------------------------------- the zip of associated files


def pack_files(flatbuffer: bytes, files: Mapping[str, bytes]) -> bytes:
    """`flatbuffer` followed by a zip archive of `files` (stored, fixed time stamps), as the metadata writers pack them.

    The zip's offsets count from the start of the whole file, so both
    MediaPipe's reader and Python's `zipfile` open the model file itself as
    the archive.
    """
    if not files:
        return bytes(flatbuffer)
    out = io.BytesIO()
    out.write(flatbuffer)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:  # mode "w" starts at the current position
        for name, data in files.items():
            zf.writestr(zipfile.ZipInfo(name, date_time=_ZIP_TIME), bytes(data))
    return out.getvalue()


def packed_files(model: bytes) -> dict[str, bytes]:
    """The files packed after a .tflite flatbuffer (name -> bytes); {} when none.

    Call it only for a model with a `TFLITE_METADATA` entry: without one, a
    zip signature inside the weights is not an archive.
    """
    data = io.BytesIO(bytes(model))
    if not zipfile.is_zipfile(data):
        return {}
    try:
        with zipfile.ZipFile(data) as zf:
            return {n: zf.read(n) for n in zf.namelist()}
    except (zipfile.BadZipFile, KeyError, ValueError) as e:
        raise ValueError(f"the files packed in the model are not a readable zip archive: {e}") from None


# ---------------------------------------------------------------- writing (schema and flatbuffers)


def pack_model(m: Any, size_hint: int = 0) -> bytes:
    """The flatbuffer bytes of a `schema().ModelT` (an unpacked, edited model): files packed after it are not
    included (`pack_files`). `size_hint`: the bytes expected, so the builder need not grow."""
    # Inside the function: flatbuffers comes with the writing side (ai-edge-litert), not every device install.
    import flatbuffers

    builder = flatbuffers.Builder(size_hint + 1024)
    builder.Finish(m.Pack(builder), file_identifier=TFLITE_IDENTIFIER)
    return bytes(builder.Output())


def embed_entries(model: bytes | bytearray, entries: Mapping[str, bytes],
                  files: Mapping[str, bytes] | None = None) -> bytes:
    """The .tflite bytes with `entries` (name -> bytes) as `Model.metadata` entries, replacing same-named ones.

    `files` (name -> bytes) are packed after the flatbuffer as the standard
    metadata's associated files (a zip archive); None keeps the ones the model
    already carries, when it has a `TFLITE_METADATA` entry that names them.

    An edit voids a content hash (`edge_runtime.content_hash`): unless `entries`
    writes one, the file's old record is removed with the others replaced, so
    the result is "not sealed" rather than a file its own record refuses.
    """
    fb_schema = schema()
    buf = bytes(model)
    check_tflite(buf, "model")
    if files is None:  # repacking writes the flatbuffer alone: carry the packed files over
        files = packed_files(buf) if STANDARD_KEY in tflite_metadata_entries(buf) else {}
    m = fb_schema.ModelT.InitFromPackedBuf(bytearray(buf), 0)
    if any(b.offset > 1 for b in (m.buffers or [])):
        raise ValueError("models over 2 GB (buffers outside the flatbuffer) are not supported for metadata embedding")
    m.buffers = list(m.buffers or [])
    dropped = {*entries, CONTENT_HASH_KEY}
    old = [e for e in (m.metadata or []) if entry_name(e.name) in dropped]
    for e in old:  # empty the replaced entries' buffers (indices of the others must not move)
        m.buffers[e.buffer] = fb_schema.BufferT()
    m.metadata = [e for e in (m.metadata or []) if entry_name(e.name) not in dropped]
    size = 0
    for key, data in entries.items():
        buffer = fb_schema.BufferT()
        buffer.data = np.frombuffer(bytes(data), dtype=np.uint8)
        size += len(data)
        m.buffers.append(buffer)
        entry = fb_schema.MetadataT()
        entry.name = key
        entry.buffer = len(m.buffers) - 1
        m.metadata.append(entry)
    return pack_files(pack_model(m, len(buf) + size), files)
