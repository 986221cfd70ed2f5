"""The contract types every medge model carries: its preprocessing, its tensors, and the names it travels under.

Training (`train/data.py`, TensorFlow) and the device (`edge_runtime`, Pillow +
numpy) both read `PreprocessSpec`, and `convert` embeds it in every artifact, so
a model and the pixels it expects never travel apart. `TensorInfo` is one model
tensor as a backend reports it and the metadata records it. The whole artifact
record (`ArtifactMetadata`) is in `edge_runtime.metadata`, built on these.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

# Name of the metadata entry (TFLite) and of the metadata_props key (ONNX) that holds `ArtifactMetadata`.
METADATA_KEY = "medge"
# The golden set's entry (edge_runtime.golden), beside METADATA_KEY; readers that do not know it ignore it.
GOLDEN_KEY = "medge-golden"
# The standard TFLite Model Metadata's entry (MediaPipe Tasks, TFLite Support), made from METADATA_KEY's contract.
STANDARD_KEY = "TFLITE_METADATA"
# The content hash's entry (edge_runtime.content_hash): the file's own sha256, written last; any later edit voids it.
CONTENT_HASH_KEY = "medge-content-sha256"

COLOR_MODES = ("rgb", "grayscale")
RESIZE_METHODS = ("bilinear", "nearest", "bicubic")


@dataclasses.dataclass(frozen=True)
class PreprocessSpec:
    """How an image file becomes the model's input tensor.

    `pixel = uint8_value * scale + offset`, computed in float32 after resizing
    to `input_size` (height, width) with `resize_method` (antialiased when
    downscaling, as both TensorFlow's `antialias=True` and Pillow do).

    Attributes:
        input_size: (height, width) of the model input.
        color_mode: "rgb" (3 channels) or "grayscale" (1 channel).
        resize_method: "bilinear", "nearest" or "bicubic".
        scale: multiplier applied to 0..255 values.
        offset: added after scaling; 1/127.5 with -1.0 gives [-1, 1].
        layout: tensor layout of the model input; always "NHWC" for now.
    """

    input_size: tuple[int, int] = (64, 64)
    color_mode: str = "rgb"
    resize_method: str = "bilinear"
    scale: float = 1.0 / 255.0
    offset: float = 0.0
    layout: str = "NHWC"

    def __post_init__(self) -> None:
        size = tuple(int(v) for v in self.input_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"input_size must be (height, width) > 0, got {self.input_size!r}")
        object.__setattr__(self, "input_size", size)
        if self.color_mode not in COLOR_MODES:
            raise ValueError(f"color_mode {self.color_mode!r} is not one of {COLOR_MODES}")
        if self.resize_method not in RESIZE_METHODS:
            raise ValueError(f"resize_method {self.resize_method!r} is not one of {RESIZE_METHODS}")
        if self.layout != "NHWC":
            raise ValueError(f"layout {self.layout!r} is not supported; only 'NHWC' is")

    @property
    def channels(self) -> int:
        return 3 if self.color_mode == "rgb" else 1

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of one input image."""
        return (*self.input_size, self.channels)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["input_size"] = list(self.input_size)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown preprocessing keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: (tuple(v) if k == "input_size" else v) for k, v in d.items()})


def known_keys(cls, d: Mapping[str, Any], what: str) -> dict[str, Any]:
    """Copy of `d` after checking it holds no key the dataclass does not know."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {what} keys {sorted(unknown)}; known: {sorted(known)}")
    return dict(d)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One model tensor as the runtime sees it: what a backend reports and what the metadata records.

    Attributes:
        name: tensor name in the artifact.
        shape: shape with -1 for a dynamic (batch) dimension.
        dtype: numpy dtype (given as a dtype, a type or a name such as "int8";
            written to JSON by name, e.g. "float32", "int8", "uint8").
        scale, zero_point: affine quantization (`real = scale * (q - zero_point)`)
            when `dtype` is an integer type, else None.
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    scale: float | None = None
    zero_point: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(v) for v in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))

    @property
    def quantized(self) -> bool:
        return self.scale is not None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype.name, "scale": self.scale,
                "zero_point": self.zero_point}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorInfo:
        return cls(**known_keys(cls, d, "tensor"))


# Presets used by the two models. InceptionV3's ImageNet weights expect [-1, 1].
MALARIA_SPEC = PreprocessSpec(input_size=(64, 64), color_mode="rgb", scale=1.0 / 255.0, offset=0.0)
OCT_INCEPTION_SPEC = PreprocessSpec(input_size=(299, 299), color_mode="rgb", scale=1.0 / 127.5, offset=-1.0)
OCT_RESCALE_SPEC = PreprocessSpec(input_size=(299, 299), color_mode="rgb", scale=1.0 / 255.0, offset=0.0)
