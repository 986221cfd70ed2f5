"""Writing the metadata (and the golden set) into an artifact, per file format.

`convert.export.export_row` embeds twice (the metadata, then the metadata
with its runtimes and golden set) and `convert.bounded` once per candidate;
both call `embed`. An .ort file cannot be edited after conversion, so it is
converted again from its .onnx with the new entries (`write_ort`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from convert.converters import set_metadata
from convert.formats import Format
from edge_runtime.backends.onnx_rt import write_ort_format
from edge_runtime.golden import GoldenSet
from edge_runtime.metadata import GOLDEN_KEY, ArtifactMetadata, embed_tflite


def embed(fmt: Format, path: Path, meta: ArtifactMetadata, golden: GoldenSet | None = None,
          ort_source: Path | None = None) -> None:
    """Write `meta` (and the golden set) into the artifact at `path` (in place; `path` is still the temp file).

    An .ort file is converted again from `ort_source`, the .onnx it was made
    from (`ExportJob.ort_source`), with the new entries.
    """
    extra = {GOLDEN_KEY: golden.to_json()} if golden is not None else {}
    if fmt.ext == ".tflite":
        path.write_bytes(embed_tflite(path.read_bytes(), meta, {k: v.encode("utf-8") for k, v in extra.items()}))
    elif fmt.ext == ".onnx":
        import onnx  # the ONNX rows' own dependency; the TFLite rows run without it

        proto = onnx.load(str(path))
        set_metadata(proto, meta.to_json(), extra)
        onnx.save(proto, str(path))
    elif fmt.ext == ".ort" and ort_source is not None:
        write_ort(ort_source, path, meta.to_json(), extra)
    else:
        raise ValueError(f"cannot embed metadata after export into {fmt.ext} files")


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
