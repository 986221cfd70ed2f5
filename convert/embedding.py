"""Writing the metadata (and the golden set) into an artifact, per file format.

`convert.export.export_row` embeds twice (the metadata, then the metadata
with its runtimes and golden set, sealed with the file's content hash:
`edge_runtime.content_hash`) and `convert.bounded` once per candidate;
both call `embed`. An .ort file cannot be edited after conversion, so it is
converted again from its .onnx with the new entries (`write_ort`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from convert.converters import set_metadata
from convert.formats import Format
from edge_runtime import content_hash
from edge_runtime.backends.onnx_rt import write_ort_format
from edge_runtime.golden import GoldenSet
from edge_runtime.metadata import GOLDEN_KEY, ArtifactMetadata, embed_tflite


def embed(fmt: Format, path: Path, meta: ArtifactMetadata, golden: GoldenSet | None = None,
          ort_source: Path | None = None, seal: bool = False) -> None:
    """Write `meta` (and the golden set) into the artifact at `path` (in place; `path` is still the temp file).

    An .ort file is converted again from `ort_source`, the .onnx it was made
    from (`ExportJob.ort_source`), with the new entries. `seal`: the content
    hash is written with them (`content_hash.seal`: the blank record, then
    its digits in place), so it is the file's last change.
    """
    if fmt.ext == ".ort" and ort_source is None or fmt.ext not in (".tflite", ".onnx", ".ort"):
        raise ValueError(f"cannot embed metadata after export into {fmt.ext} files")
    extra = {GOLDEN_KEY: golden.to_json()} if golden is not None else {}

    def write(_data: bytes, record: bytes | None = None) -> bytes:
        more = {**extra, **({content_hash.KEY: record.decode("ascii")} if record is not None else {})}
        if fmt.ext == ".tflite":
            path.write_bytes(embed_tflite(original, meta, {k: v.encode("utf-8") for k, v in more.items()}))
        elif fmt.ext == ".onnx":
            import onnx  # the ONNX rows' own dependency; the TFLite rows run without it

            proto = onnx.load_from_string(original)
            set_metadata(proto, meta.to_json(), more)
            path.write_bytes(proto.SerializeToString())
        else:
            write_ort(ort_source, path, meta.to_json(), more)
        return path.read_bytes()

    original = path.read_bytes()
    if seal:
        path.write_bytes(content_hash.seal(original, write))
    else:
        write(original)


def write_ort(src: Path, dest: Path, text: str, extra: Mapping[str, str] | None = None) -> None:
    """`src` (.onnx) with the metadata `text` (and `extra` entries) embedded, converted to the ORT format at `dest`.

    An .ort file cannot be edited after conversion, so embedding the golden
    set (`convert.export.export_row`) converts again from the same .onnx: the
    same graph, the same weights. The tagged .onnx is written beside `src`
    (the job's work folder).
    """
    import onnx  # optional: only the ONNX rows need it

    proto = onnx.load(str(src))
    set_metadata(proto, text, extra)
    tagged = Path(src).parent / "int8.tagged.onnx"
    onnx.save(proto, str(tagged))
    write_ort_format(tagged, dest, disabled_optimizers=("NchwcTransformer",))
