"""The QAT protocol: the job the parent hands the child, and the result the child hands back.

Both are frozen dataclasses that travel as JSON: the job as a file
(`python -m convert.qat.child JOB.json`), the result as one tagged line on the
child's stdout. `from_dict` rejects unknown and missing keys, so a parent and a
child of different medge versions fail loudly instead of silently dropping a
field. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

RESULT_TAG = "MEDGE_QAT_RESULT "
PROGRESS_TAG = "MEDGE_QAT_PROGRESS "
TWIN_KINDS = ("resnet", "oct-fused", "oct-head")


def _checked_keys(cls, d: dict[str, Any]) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    unknown, missing = sorted(set(d) - names), sorted(required - set(d))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}")
    if missing:
        raise ValueError(f"{cls.__name__} is missing keys {missing}")


@dataclasses.dataclass(frozen=True)
class Architecture:
    """Which tf-keras twin the child builds.

    kind: "resnet" (a malaria run; `resnet` holds its ResNetConfig fields),
          "oct-fused" (an OCT run's InceptionV3 + head as one flat graph) or
          "oct-head" (an OCT run's head alone); `mode` is the OCT run's mode.
    """

    kind: str
    mode: str | None = None
    resnet: dict[str, Any] | None = None

    def __post_init__(self):
        if self.kind not in TWIN_KINDS:
            raise ValueError(f"no tf-keras twin for architecture {self.kind!r}; known: {TWIN_KINDS}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Architecture:
        _checked_keys(cls, d)
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class QatJob:
    """Everything the child needs; paths are strings (they go through JSON).

    weights      .npz of the Keras model's weights, keys "i::j" (`twin.flat_weights`)
    layer_names  the Keras weighted layers' names, for error messages
    data         .npz with `calib` (calibration inputs: images or feature maps, the same
                 as `tflite-int8` uses), `probe` and `probe_probs` (Keras' answers on it)
    train        (image path, class index) pairs of the training split (empty for a head)
    store        the OCT feature store a head is fine-tuned on (None otherwise)
    out          where the child writes the .tflite (the parent's temp file)
    """

    architecture: Architecture
    input_shape: tuple[int, ...]
    labels: tuple[str, ...]
    name: str
    preprocess: dict[str, Any]
    train: tuple[tuple[str, int], ...]
    store: str | None
    epochs: int
    learning_rate: float
    batch_size: int
    seed: int
    int8_io: bool
    weights: str
    layer_names: tuple[str, ...]
    data: str
    out: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QatJob:
        _checked_keys(cls, d)
        return cls(**{
            **d,
            "architecture": Architecture.from_dict(d["architecture"]),
            "input_shape": tuple(int(x) for x in d["input_shape"]),
            "labels": tuple(d["labels"]),
            "train": tuple((str(p), int(t)) for p, t in d["train"]),
            "layer_names": tuple(d["layer_names"]),
        })

    @classmethod
    def from_json(cls, text: str) -> QatJob:
        return cls.from_dict(json.loads(text))

    def write(self, path: Path) -> Path:
        Path(path).write_text(self.to_json())
        return Path(path)

    @classmethod
    def read(cls, path: Path) -> QatJob:
        return cls.from_json(Path(path).read_text())


@dataclasses.dataclass(frozen=True)
class QatResult:
    """What the child reports on success (the .tflite itself is at `QatJob.out`).

    seconds: per stage, {"twin", "annotate", "fine_tune", "convert"}.
    """

    twin_max_abs_diff: float
    history: dict[str, list[float]]
    ranges_initialized: int
    batchnorm_frozen: int
    train_examples: int
    trainable_weights: int
    start_max_abs_diff: float
    seconds: dict[str, float]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QatResult:
        _checked_keys(cls, d)
        return cls(**d)

    def line(self) -> str:
        """The tagged stdout line the parent looks for."""
        return RESULT_TAG + self.to_json()

    @classmethod
    def from_line(cls, line: str) -> QatResult:
        return cls.from_dict(json.loads(line[len(RESULT_TAG):]))
