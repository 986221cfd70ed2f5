"""The standard TFLite Model Metadata, written from medge's contract, so MediaPipe Tasks classifies with our files.

MediaPipe Tasks' `ImageClassifier` (Android, iOS, web, Python), the TFLite
Support library and Android Studio's ML binding read a `.tflite` through a
`TFLITE_METADATA` entry of the flatbuffer: a `ModelMetadata` flatbuffer
(schema `metadata_schema.fbs`, identifier `M001`) that says how to normalise
the input image and where the label file is, plus that label file packed in
a zip archive appended to the model (the model file is also a zip holding
`labels.txt`; LiteRT ignores the bytes after the flatbuffer).

Every image-input `.tflite` that `python -m convert` writes carries it
beside medge's own `medge` entry, which stays the source of truth for what
this schema has no field for (resize method, confidence threshold, referral,
quantization, provenance). The entry is derived from that contract only:

- input: `value = pixel * scale + offset` is the schema's `(pixel - mean) / std`
  with `mean = -offset / scale` and `std = 1 / scale` per channel (malaria:
  mean 0, std 255; OCT's InceptionV3: mean 127.5, std 127.5), the colour
  space, and the value range it gives;
- output: the class scores (`FeatureProperties`, range 0..1 for
  probabilities) with `labels.txt` (one label a line, in output order) as a
  `TENSOR_AXIS_LABELS` file;
- name, description, version (the release's, e.g. "1.1.0", given to
  `python -m convert --model-version`; else the source model's sha256 prefix),
  author, licence, `min_parser_version` 1.0.0 (no field newer than schema 1.0).

It contains no time stamp, so two conversions of one model write the same
bytes. Written with `flatbuffers` alone, field by field from the schema (no
MediaPipe or tflite-support in the toolchain); `tests/test_mediapipe.py`
proves MediaPipe reads it. Nothing here imports TensorFlow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edge_runtime.spec import STANDARD_KEY
from edge_runtime.tflite_file import pack_files, packed_files, tflite_metadata_entries

if TYPE_CHECKING:  # pragma: no cover - the record is built in metadata.py, which imports this module to embed it
    from edge_runtime.metadata import ArtifactMetadata

__all__ = ["STANDARD_KEY", "build", "parse", "read", "pack_files", "packed_files", "associated_files"]
IDENTIFIER = b"M001"
LABELS_FILE = "labels.txt"
MIN_PARSER_VERSION = "1.0.0"
AUTHOR = "medge (python -m convert)"
LICENSE = ("Apache-2.0 for the medge toolchain that wrote this file; the weights follow the terms of their "
           "training data (see the model card)")

# Enum values and union tags of metadata_schema.fbs (schema 1.5.0; all present since 1.0).
COLOR_SPACES = {"rgb": 1, "grayscale": 2}  # ColorSpaceType
_COLOR_NAMES = {0: "UNKNOWN", 1: "RGB", 2: "GRAYSCALE"}
_FEATURE_PROPERTIES, _IMAGE_PROPERTIES = 1, 2  # ContentProperties union
_NORMALIZATION_OPTIONS = 1  # ProcessUnitOptions union
_TENSOR_AXIS_LABELS = 2  # AssociatedFileType
_FILE_TYPES = {0: "UNKNOWN", 1: "DESCRIPTIONS", 2: "TENSOR_AXIS_LABELS", 3: "TENSOR_VALUE_LABELS",
               4: "TENSOR_AXIS_SCORE_CALIBRATION", 5: "VOCABULARY", 6: "SCANN_INDEX_FILE"}

# Field slots (declaration order in metadata_schema.fbs; a union takes two: its type, then its value).
_MODEL = dict(name=0, description=1, version=2, subgraph_metadata=3, author=4, license=5, associated_files=6,
              min_parser_version=7)
_SUBGRAPH = dict(name=0, description=1, input_tensor_metadata=2, output_tensor_metadata=3)
_TENSOR = dict(name=0, description=1, dimension_names=2, content=3, process_units=4, stats=5, associated_files=6)
_CONTENT = dict(content_properties_type=0, content_properties=1, range=2)
_IMAGE_PROPS = dict(color_space=0, default_size=1)
_PROCESS_UNIT = dict(options_type=0, options=1)
_NORMALIZATION = dict(mean=0, std=1)
_STATS = dict(max=0, min=1)
_FILE = dict(name=0, description=1, type=2, locale=3)


def applies(meta: ArtifactMetadata) -> bool:
    """Whether the artifact takes an image (a head takes a feature map: no image task can feed it)."""
    return meta.part == "model"


def normalization(meta: ArtifactMetadata) -> tuple[list[float], list[float]]:
    """(mean, std) per channel such that `(pixel - mean) / std == pixel * scale + offset`."""
    p = meta.preprocess
    if p.scale == 0:
        raise ValueError("preprocessing scale 0 has no (mean, std) form: every pixel would give the same input")
    mean, std = -p.offset / p.scale + 0.0, 1.0 / p.scale  # + 0.0: no "-0.0" for a zero offset
    return [mean] * p.channels, [std] * p.channels


def resize_description(meta: ArtifactMetadata) -> str:
    """How the input image is made, for the input tensor's description: the schema has no field for the resize.

    medge resizes as training did (Pillow, TensorFlow's `antialias=True`): a
    shrunk image is averaged over each output pixel's area. tflite-support's
    and MediaPipe's classifiers sample bilinearly without that, which moves
    borderline answers (docs/clients.md); an app gets medge's answers by
    resizing first.
    """
    p = meta.preprocess
    h, w = p.input_size
    text = f"{w}x{h} {p.color_mode.upper()} image, resized {p.resize_method}"
    if p.resize_method != "nearest":
        text += (" with antialiasing (area-averaged when shrinking, as Pillow and TensorFlow's antialias=True; "
                 f"a classifier that samples without it answers differently near the threshold: resize to {w}x{h} "
                 "first for the same answers)")
    return text


def labels_file(meta: ArtifactMetadata) -> bytes:
    """labels.txt: one label a line, in output order."""
    for label in meta.labels:
        if "\n" in label or "\r" in label:
            raise ValueError(f"label {label!r} holds a line break; labels.txt has one label a line")
    return "".join(f"{label}\n" for label in meta.labels).encode("utf-8")


def describe(meta: ArtifactMetadata) -> str:
    """The model description: what it classifies, and where the rest of the contract lives."""
    return (f"medge {meta.task} classifier '{meta.model}' ({meta.format}, {meta.precision}): "
            f"{', '.join(meta.labels)}. The 'medge' metadata entry is the full contract: "
            f"resize {meta.preprocess.resize_method}, confidence threshold {meta.confidence_threshold} "
            "(below it: uncertain - refer), quantization, provenance.")


# ---------------------------------------------------------------- writing


def build(meta: ArtifactMetadata) -> bytes:
    """The `TFLITE_METADATA` buffer (a ModelMetadata flatbuffer) for `meta`'s artifact.

    Raises:
        ValueError: the artifact does not take an image (`meta.part` is "head").
    """
    import flatbuffers  # inside: writing needs the toolchain's flatbuffers, which a bare Pi may lack

    if not applies(meta):
        raise ValueError(f"{meta.model}: the standard image metadata needs an image input; part is {meta.part!r}")
    mean, std = normalization(meta)
    p = meta.preprocess
    b = flatbuffers.Builder(1024)

    # Input: an image, normalised, with the value range that normalisation gives.
    image_props = _table(b, [(_IMAGE_PROPS["color_space"], "u8", COLOR_SPACES[p.color_mode])])
    in_content = _table(b, [(_CONTENT["content_properties_type"], "u8", _IMAGE_PROPERTIES),
                            (_CONTENT["content_properties"], "off", image_props)])
    norm = _table(b, [(_NORMALIZATION["mean"], "off", _floats(b, mean)),
                      (_NORMALIZATION["std"], "off", _floats(b, std))])
    unit = _table(b, [(_PROCESS_UNIT["options_type"], "u8", _NORMALIZATION_OPTIONS),
                      (_PROCESS_UNIT["options"], "off", norm)])
    in_stats = _table(b, [(_STATS["max"], "off", _floats(b, [(255.0 - m) / s for m, s in zip(mean, std)])),
                          (_STATS["min"], "off", _floats(b, [(0.0 - m) / s for m, s in zip(mean, std)]))])
    image = _table(b, [
        (_TENSOR["name"], "off", b.CreateString("image")),
        (_TENSOR["description"], "off", b.CreateString(resize_description(meta) + "; value = (pixel - mean) / std")),
        (_TENSOR["content"], "off", in_content),
        (_TENSOR["process_units"], "off", _offsets(b, [unit])),
        (_TENSOR["stats"], "off", in_stats),
    ])

    # Output: one score per label, labels.txt naming them.
    feature = _table(b, [])
    out_content = _table(b, [(_CONTENT["content_properties_type"], "u8", _FEATURE_PROPERTIES),
                             (_CONTENT["content_properties"], "off", feature)])
    label_file = _table(b, [
        (_FILE["name"], "off", b.CreateString(LABELS_FILE)),
        (_FILE["description"], "off", b.CreateString("Labels for the classes, in output order.")),
        (_FILE["type"], "u8", _TENSOR_AXIS_LABELS),
    ])
    out_fields = [
        (_TENSOR["name"], "off", b.CreateString("probability" if meta.output_kind == "probabilities" else "score")),
        (_TENSOR["description"], "off", b.CreateString(
            f"{meta.output_kind} of {', '.join(meta.labels)} (the order of {LABELS_FILE})")),
        (_TENSOR["content"], "off", out_content),
        (_TENSOR["associated_files"], "off", _offsets(b, [label_file])),
    ]
    if meta.output_kind == "probabilities":
        out_stats = _table(b, [(_STATS["max"], "off", _floats(b, [1.0])), (_STATS["min"], "off", _floats(b, [0.0]))])
        out_fields.append((_TENSOR["stats"], "off", out_stats))
    scores = _table(b, out_fields)

    subgraph = _table(b, [(_SUBGRAPH["input_tensor_metadata"], "off", _offsets(b, [image])),
                          (_SUBGRAPH["output_tensor_metadata"], "off", _offsets(b, [scores]))])
    root = _table(b, [
        (_MODEL["name"], "off", b.CreateString(meta.model)),
        (_MODEL["description"], "off", b.CreateString(describe(meta))),
        (_MODEL["version"], "off", b.CreateString(version(meta))),
        (_MODEL["subgraph_metadata"], "off", _offsets(b, [subgraph])),
        (_MODEL["author"], "off", b.CreateString(AUTHOR)),
        (_MODEL["license"], "off", b.CreateString(LICENSE)),
        (_MODEL["min_parser_version"], "off", b.CreateString(MIN_PARSER_VERSION)),
    ])
    b.Finish(root, file_identifier=IDENTIFIER)
    return bytes(b.Output())


def version(meta: ArtifactMetadata) -> str:
    """The model's version for the standard entry: the release's, else the source model's sha256 prefix."""
    if meta.version:
        return meta.version
    return f"sha256:{meta.source_sha256[:16]}" if meta.source_sha256 else "unknown"


def associated_files(meta: ArtifactMetadata) -> dict[str, bytes]:
    """The files the standard entry names, to pack into the model (name -> bytes)."""
    return {LABELS_FILE: labels_file(meta)}


def _table(b, fields) -> int:
    """One table from (slot, kind, value) fields, kind "u8" (byte/enum/union tag) or "off" (built child)."""
    b.StartObject(1 + max((slot for slot, _, _ in fields), default=-1))
    for slot, kind, value in fields:
        if kind == "u8":
            b.PrependUint8Slot(slot, value, 0)
        else:
            b.PrependUOffsetTRelativeSlot(slot, value, 0)
    return b.EndObject()


def _floats(b, values) -> int:
    b.StartVector(4, len(values), 4)
    for v in reversed(values):
        b.PrependFloat32(float(v))
    return b.EndVector()


def _offsets(b, offsets) -> int:
    b.StartVector(4, len(offsets), 4)
    for o in reversed(offsets):
        b.PrependUOffsetTRelative(o)
    return b.EndVector()


# ---------------------------------------------------------------- reading


def parse(buf: bytes) -> dict[str, Any]:
    """The fields of a `TFLITE_METADATA` buffer that medge writes (and the metadata writers use), as a dict.

    Raises:
        ValueError: not a ModelMetadata flatbuffer (no `M001` identifier).
    """
    from flatbuffers import encode, packer, table  # inside: optional on a bare Pi (see `read`)
    from flatbuffers import number_types as N

    buf = bytes(buf)
    if len(buf) < 8 or buf[4:8] != IDENTIFIER:
        raise ValueError("the TFLITE_METADATA entry is not a ModelMetadata flatbuffer (no 'M001' identifier)")

    def root(pos):
        return table.Table(bytearray(buf), pos)

    def field(t, slot):
        return t.Offset(4 + 2 * slot)

    def string(t, slot):
        o = field(t, slot)
        return t.String(o + t.Pos).decode("utf-8") if o else None

    def u8(t, slot):
        o = field(t, slot)
        return t.Get(N.Uint8Flags, o + t.Pos) if o else 0

    def sub(t, slot):
        o = field(t, slot)
        return table.Table(t.Bytes, t.Indirect(o + t.Pos)) if o else None

    def tables(t, slot):
        o = field(t, slot)
        if not o:
            return []
        start = t.Vector(o)
        return [table.Table(t.Bytes, t.Indirect(start + 4 * i)) for i in range(t.VectorLen(o))]

    def floats(t, slot):
        o = field(t, slot)
        return [float(v) for v in t.GetVectorAsNumpy(N.Float32Flags, o)] if o else []

    def union(t, slot):
        o = field(t, slot)
        if not o:
            return None
        u = table.Table(bytearray(), 0)
        t.Union(u, o)
        return u

    def files(t, slot):
        return [{"name": string(f, _FILE["name"]), "description": string(f, _FILE["description"]),
                 "type": _FILE_TYPES.get(u8(f, _FILE["type"]), "UNKNOWN")} for f in tables(t, slot)]

    def tensor(t):
        d: dict[str, Any] = {"name": string(t, _TENSOR["name"]), "description": string(t, _TENSOR["description"])}
        content = sub(t, _TENSOR["content"])
        if content is not None:
            kind = u8(content, _CONTENT["content_properties_type"])
            d["content"] = {0: "NONE", 1: "FeatureProperties", 2: "ImageProperties",
                            3: "BoundingBoxProperties", 4: "AudioProperties"}.get(kind, str(kind))
            if kind == _IMAGE_PROPERTIES:
                props = union(content, _CONTENT["content_properties"])
                d["color_space"] = _COLOR_NAMES.get(u8(props, _IMAGE_PROPS["color_space"]), "UNKNOWN")
        for unit in tables(t, _TENSOR["process_units"]):
            if u8(unit, _PROCESS_UNIT["options_type"]) == _NORMALIZATION_OPTIONS:
                opts = union(unit, _PROCESS_UNIT["options"])
                d["normalization"] = {"mean": floats(opts, _NORMALIZATION["mean"]),
                                      "std": floats(opts, _NORMALIZATION["std"])}
        stats = sub(t, _TENSOR["stats"])
        if stats is not None:
            d["stats"] = {"min": floats(stats, _STATS["min"]), "max": floats(stats, _STATS["max"])}
        d["associated_files"] = files(t, _TENSOR["associated_files"])
        return d

    m = root(encode.Get(packer.uoffset, buf, 0))
    subgraphs = tables(m, _MODEL["subgraph_metadata"])
    return {
        "name": string(m, _MODEL["name"]),
        "description": string(m, _MODEL["description"]),
        "version": string(m, _MODEL["version"]),
        "author": string(m, _MODEL["author"]),
        "license": string(m, _MODEL["license"]),
        "min_parser_version": string(m, _MODEL["min_parser_version"]),
        "associated_files": files(m, _MODEL["associated_files"]),
        "inputs": [tensor(t) for g in subgraphs[:1] for t in tables(g, _SUBGRAPH["input_tensor_metadata"])],
        "outputs": [tensor(t) for g in subgraphs[:1] for t in tables(g, _SUBGRAPH["output_tensor_metadata"])],
    }


def read(model: bytes) -> dict[str, Any] | None:
    """The standard metadata of a .tflite (parsed, with its packed files' names), or None when it has none."""
    entries = tflite_metadata_entries(model)
    if STANDARD_KEY not in entries:
        return None
    d = parse(entries[STANDARD_KEY])
    d["packed_files"] = sorted(packed_files(model))
    return d


def format_lines(d: dict[str, Any]) -> str:
    """The standard TFLite metadata (`read`), one field a line."""
    lines = [f"  {k}: {d[k]}" for k in ("name", "version", "author", "license", "min_parser_version")]
    for kind in ("inputs", "outputs"):
        for t in d[kind]:
            norm = t.get("normalization")
            lines.append(f"  {kind[:-1]} {t['name']}: {t.get('content')}"
                         + (f" {t['color_space']}" if t.get("color_space") else "")
                         + (f", normalisation mean {norm['mean']} std {norm['std']}" if norm else "")
                         + (f", range {t['stats']['min']}..{t['stats']['max']}" if t.get("stats") else "")
                         + "".join(f", {f['type']} file {f['name']}" for f in t["associated_files"]))
    lines.append(f"  packed files: {', '.join(d['packed_files']) or 'none'}")
    return "\n".join(lines)
