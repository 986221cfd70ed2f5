"""What every medge artifact says about itself, and how to read and write it without TensorFlow.

`python -m convert` embeds one `ArtifactMetadata` in each file it makes:

- `.tflite`: a flatbuffer `Model.metadata` entry named `medge` whose buffer
  holds the UTF-8 JSON (the TFLite schema's own slot for such data; LiteRT
  ignores entries it does not know). Written here with the schema that ships
  with `ai_edge_litert` (`schema_py_generated`) and `flatbuffers`; read with
  `tflite_file`'s small reader, which needs neither (the legacy tflite-runtime has no schema).
- `.onnx` / `.ort`: the model's `metadata_props` under the key `medge`, read
  through onnxruntime's `get_modelmeta().custom_metadata_map`.
- every artifact also gets a sidecar `<artifact stem>.json` with the same
  dictionary, for tools that cannot open the model file.

An image-input `.tflite` also gets the standard TFLite Model Metadata
(`TFLITE_METADATA` entry and `labels.txt` packed after the flatbuffer), derived
from the `medge` entry, so MediaPipe Tasks classifies with the file as it is
(`edge_runtime.standard_metadata`).

    python -m convert inspect runs/malaria-edge/export/malaria-edge_tflite-int8.tflite

Nothing here imports TensorFlow or Keras; a test checks that.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edge_runtime import standard_metadata as std
from edge_runtime.backends import open_session

# GOLDEN_KEY and TensorInfo are also imported from here by convert/ (the entry names and the tensor record live
# in spec.py, beside the other contract types).
from edge_runtime.spec import GOLDEN_KEY, METADATA_KEY, STANDARD_KEY, PreprocessSpec, TensorInfo, known_keys  # noqa: F401
from edge_runtime.tflite_file import check_tflite, embed_entries, tflite_metadata_entries

PathLike = str | os.PathLike

SCHEMA = "medge-artifact/1"


@dataclasses.dataclass(frozen=True)
class ArtifactMetadata:
    """The contract a device needs to use an exported model correctly.

    Attributes:
        model: model name used in file names (`{model}_{format}.{ext}`).
        task: what the model does, e.g. "malaria" or "oct".
        labels: class names in output order.
        preprocess: how an image becomes the input tensor.
        format: row of the convert format table, e.g. "tflite-int8".
        precision: "float32", "float16", "dynamic-int8" or "int8".
        input, output: the runtime-visible tensors (dtype and quantization).
        quantization: how weights/activations were quantized (empty for float):
            e.g. {"weights": "int8 per-channel", "activations": "uint8",
            "calibration": "minmax", "calibration_images": 300,
            "calibration_from": "malaria.csv (train split)", "calibration_sha256": ...}.
            `calibration_from` names the manifest or folder by basename (files
            written before it did carry the build machine's absolute path).
        output_kind: "probabilities" (softmax inside the model) or "logits".
        positive_label: the class a screening result flags, if any.
        confidence_threshold: top-class probability below which a device
            answers "uncertain — refer" instead of a class (None: the
            runtime's default for the task).
        source_sha256: sha256 of the Keras model file the artifact came from.
        source_name: that file's name.
        medge_version: version of the toolchain that wrote the artifact.
        created: ISO 8601 UTC time of export.
        tools: versions of the converters used.
        part: "model" (takes the preprocessed image) or "head" (takes the
            feature map of `feature_extractor`, e.g. InceptionV3 "mixed10"
            for the OCT head; `preprocess` then describes the base's images).
        feature_extractor: for a head, the base layer, weights and features fingerprint; for a
            bare features model (`python -m convert head.h5 --labels ...`, any input that is not an
            image) `base` and `layer` are None: the file names no base and `preprocess` does not apply.
        version: the release's version (e.g. "1.1.0", `python -m convert --model-version`; the standard
            TFLite metadata's `version` too); "" for a conversion outside a release (then left out of the JSON).
        runtimes: what the file requires of a runtime and where it was proven
            (`edge_runtime.compat`): {"requires": {"min_runtime_version", "op_versions"}
            or {"ir_version", "opsets"}, "proven_on": [{"runtime", "version", ...}]};
            empty in files made before medge recorded it (and then left out of the JSON).
        schema: metadata schema id; readers refuse an unknown major version.
    """

    model: str
    task: str
    labels: tuple[str, ...]
    preprocess: PreprocessSpec
    format: str
    precision: str
    input: TensorInfo
    output: TensorInfo
    quantization: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    output_kind: str = "probabilities"
    positive_label: str | None = None
    confidence_threshold: float | None = None
    source_sha256: str = ""
    source_name: str = ""
    medge_version: str = ""
    created: str = ""
    tools: Mapping[str, str] = dataclasses.field(default_factory=dict)
    part: str = "model"
    feature_extractor: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    runtimes: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    version: str = ""
    schema: str = SCHEMA

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(str(l) for l in self.labels))
        if not self.labels:
            raise ValueError("metadata needs at least one label")
        if self.confidence_threshold is not None and not 0.0 <= self.confidence_threshold <= 1.0:
            raise ValueError(f"confidence_threshold {self.confidence_threshold} is not a probability in [0, 1]")
        if self.positive_label is not None and self.positive_label not in self.labels:
            raise ValueError(f"positive_label {self.positive_label!r} is not among labels {list(self.labels)}")
        if self.part not in ("model", "head"):
            raise ValueError(f"part {self.part!r} is not 'model' or 'head'")
        if self.schema.split(".")[0] != SCHEMA:  # "medge-artifact/1.x" stays readable
            raise ValueError(f"metadata schema {self.schema!r} is not {SCHEMA!r}; upgrade medge to read this artifact")

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "model": self.model,
            "task": self.task,
            "labels": list(self.labels),
            "positive_label": self.positive_label,
            "confidence_threshold": self.confidence_threshold,
            "preprocess": self.preprocess.to_dict(),
            "format": self.format,
            "precision": self.precision,
            "input": self.input.to_dict(),
            "output": self.output.to_dict(),
            "output_kind": self.output_kind,
            "quantization": dict(self.quantization),
            "source_sha256": self.source_sha256,
            "source_name": self.source_name,
            "medge_version": self.medge_version,
            "created": self.created,
            "tools": dict(self.tools),
            "part": self.part,
            "feature_extractor": dict(self.feature_extractor),
            **({"runtimes": json.loads(json.dumps(self.runtimes))} if self.runtimes else {}),
            **({"version": self.version} if self.version else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ArtifactMetadata:
        d = known_keys(cls, d, "artifact metadata")
        d["preprocess"] = PreprocessSpec.from_dict(d["preprocess"])
        d["input"] = TensorInfo.from_dict(d["input"])
        d["output"] = TensorInfo.from_dict(d["output"])
        return cls(**d)

    @classmethod
    def from_json(cls, text: str | bytes) -> ArtifactMetadata:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"medge metadata is not valid JSON: {e}") from None
        return cls.from_dict(d)


class MetadataNotFound(LookupError):
    """The file is a model but carries no medge metadata."""


# ---------------------------------------------------------------- TFLite


def embed_tflite(model: bytes | bytearray, meta: ArtifactMetadata, extra: Mapping[str, bytes] | None = None) -> bytes:
    """The .tflite bytes with `meta` as the `medge` metadata entry (replacing an older one).

    `extra` adds (or replaces) further entries by name, e.g. the golden set
    (`edge_runtime.golden`). Other entries (the converter's
    `min_runtime_version`, `CONVERSION_METADATA`) are kept. An image-input
    model (`meta.part == "model"`) also gets the standard `TFLITE_METADATA`
    entry and its `labels.txt`, made from `meta` (`edge_runtime.standard_metadata`).
    """
    entries = {METADATA_KEY: meta.to_json().encode("utf-8"), **dict(extra or {})}
    files = None
    if std.applies(meta):
        entries[STANDARD_KEY] = std.build(meta)
        files = std.associated_files(meta)
    return embed_entries(model, entries, files)


def read_tflite(path_or_bytes: PathLike | bytes) -> ArtifactMetadata:
    """The medge metadata embedded in a .tflite file (path or bytes)."""
    if isinstance(path_or_bytes, (bytes, bytearray)):
        buf, where = bytes(path_or_bytes), "model"
    else:
        buf, where = Path(path_or_bytes).read_bytes(), str(path_or_bytes)
    check_tflite(buf, where)
    return metadata_from_entries(tflite_metadata_entries(buf), where, "metadata entry")


def metadata_from_entries(entries: dict[str, Any], where: str, kind: str) -> ArtifactMetadata:
    """The medge entry of a file's metadata key/value pairs, or MetadataNotFound naming what was there."""
    if METADATA_KEY not in entries:
        raise MetadataNotFound(
            f"{where} has no '{METADATA_KEY}' {kind} (keys: {sorted(entries)}); "
            "export it with `python -m convert` or read its sidecar .json"
        )
    return ArtifactMetadata.from_json(entries[METADATA_KEY])


# ---------------------------------------------------------------- ONNX / ORT


def read_onnx(path: PathLike) -> ArtifactMetadata:
    """The medge metadata of a .onnx or .ort file, read with onnxruntime (through `edge_runtime.backends`)."""
    return metadata_from_entries(open_session(path, "onnxruntime", optimize=False).metadata() or {}, str(path),
                         "metadata_props entry")


def sidecar_path(artifact: PathLike) -> Path:
    """`model_tflite-int8.tflite` -> `model_tflite-int8.json` (one sidecar per artifact)."""
    return Path(artifact).with_suffix(".json")


def read_sidecar(artifact: PathLike) -> ArtifactMetadata:
    p = sidecar_path(artifact)
    if not p.is_file():
        raise FileNotFoundError(f"no sidecar {p} next to {artifact}")
    return ArtifactMetadata.from_json(p.read_text())


READERS = {".tflite": read_tflite, ".onnx": read_onnx, ".ort": read_onnx}


def read_metadata(path: PathLike) -> ArtifactMetadata:
    """The metadata embedded in an artifact, chosen by file suffix (.tflite, .onnx, .ort).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unknown suffix, or metadata that does not parse.
        MetadataNotFound: the file carries no medge metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"cannot read metadata from {path.name}: suffix must be one of {sorted(READERS)}")
    return reader(path)
