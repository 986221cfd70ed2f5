"""What one `python -m convert` run shares with its exporters: the options and the job.

The exporters (`convert.tflite`, `convert.onnx_export`, `convert.qat`) and
the `--max-drop` search take an `ExportJob` and a `Format`; this module sits
below them and below the orchestrator (`convert.export`), so they can type
both without importing the orchestrator.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import edge_runtime
from convert.calibration import ImageSet
from convert.formats import Format
from convert.layer_errors import describe, worst_summary
from edge_runtime.backends import open_session
from edge_runtime.metadata import ArtifactMetadata
from edge_runtime.model import DEFAULT_THRESHOLD, DEFAULT_THRESHOLDS
from edge_runtime.versions import installed_versions

DEFAULT_MIN_AGREEMENT = 0.98
# QAT rows are fine-tunes: held to their accuracy on the proof split, within this many points of Keras'.
DEFAULT_QAT_MAX_DROP = 1.0
TOOLS = ("tensorflow", "keras", "tf-keras", "tensorflow-model-optimization", "tf2onnx", "onnx", "onnxruntime",
         "ai-edge-litert")

GOLDEN_N = 4  # per artifact: 4 cells are ~26 KB of JSON, +15% on the 173 KB int8 malaria model


@dataclasses.dataclass(frozen=True)
class Options:
    """Settings of one `python -m convert` run (see `convert.cli` for their flags)."""

    calib: Path | None = None
    calib_n: int = 300
    eval_n: int = 1000
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    allow_drop: bool = False
    force: bool = False
    calib_method: str = "minmax"
    onnx_activations: str = "auto"
    int8_io: bool = False
    int8_quantizer: str = "converter"
    opset: int = 17
    qat_epochs: int = 2
    qat_learning_rate: float = 1e-3
    qat_batch_size: int = 32
    seed: int = 0
    bundle: bool = False
    layer_report_n: int = 64
    golden_n: int = GOLDEN_N
    max_drop: float | None = None
    threshold: float | None = None  # the metadata's confidence_threshold (None: the task's default)
    model_version: str = ""  # the release's version, in the metadata (medge's and the standard TFLite entry's)
    qat_max_drop: float = DEFAULT_QAT_MAX_DROP

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["calib"] = str(self.calib) if self.calib else None
        return d


def medge_version() -> str:
    try:
        return md.version("medge")
    except md.PackageNotFoundError:
        return edge_runtime.__version__


def tool_versions() -> dict[str, str]:
    return installed_versions(TOOLS)


class ExportJob:
    """Everything the exporters of one run share: the model, its source, the image sets, a work folder."""

    def __init__(self, model, source, options: Options, workdir: Path, calib: ImageSet | None,
                 proof: ImageSet, train_items: list[tuple[str, str]], log=print):
        self.model, self.source, self.options, self.workdir = model, source, options, Path(workdir)
        self.log = log  # progress lines of long rows (QAT)
        self._calib, self.proof, self.train_items = calib, proof, train_items
        # What one row makes and a later step (or a row sharing it) reads back:
        self.layer_reports: dict[str, dict[str, Any]] = {}  # per-layer report by row (and "int8_onnx", shared)
        self.max_drop: dict[str, dict[str, Any]] = {}  # the --max-drop record by row (onnx-int8 and ort-int8 share one)
        self.float32_tflite: bytes | None = None  # the float model LiteRT Quantizer starts from
        self.int8_onnx: tuple[Path, dict[str, Any]] | None = None  # the QDQ graph and its quantization record
        self.int8_onnx_error: ValueError | None = None  # why it could not be made (the second row fails alike)
        self.ort_source: Path | None = None  # the .onnx the .ort row is converted from (again, to embed)
        self.keras_probs: np.ndarray | None = None  # Keras on the proof images (set by run_export)
        self.tools = tool_versions()
        self._saved_model: Path | None | bool = False  # False: not written yet; None: cannot be (`saved_model`)

    def saved_model(self) -> Path | None:
        """The model as the SavedModel every TFLite conversion of this job starts from, written once into the
        work folder (`convert.converters.export_saved_model`); None when the model cannot be written so, or the
        export failed (then each conversion exports the Keras model itself, as before; the log says why)."""
        if self._saved_model is False:
            from convert.converters import export_saved_model  # TensorFlow: only when a TFLite row runs

            try:
                self._saved_model = export_saved_model(self.model, self.workdir / "saved_model")
            except Exception as e:  # the converter's own path (from_keras_model) may still work: let it try
                self.log(f"SavedModel export for the TFLite rows failed ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); each row converts the Keras model itself")
                self._saved_model = None
        return self._saved_model or None

    def calibration(self) -> ImageSet:
        if self._calib is None or len(self._calib) == 0:
            if self.source.part == "head":
                shape = tuple(int(d) for d in self.model.inputs[0].shape[1:])
                raise ValueError(f"this format needs calibration inputs; pass --calib with a feature store .h5 "
                                 f"(`python -m train oct extract`) or a .npy of inputs "
                                 f"(N, {', '.join(map(str, shape))})")
            raise ValueError("this format needs calibration images; pass --calib MANIFEST|DIR")
        return self._calib

    def layer_report(self, key: str, make) -> dict[str, Any]:
        """`make(images)`: the per-layer error report (`convert.layer_errors`) on the first
        `--layer-report-n` calibration images, kept for the row under `key`; returns what the
        metadata's `quantization` records of it ({} when off or failed).
        """
        n = self.options.layer_report_n
        if n <= 0:
            return {}
        x = self.calibration().x[:n]
        try:
            report = make(x)
        except Exception as e:  # the artifact is sound without its report: the row says why it has none
            self.layer_reports[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            self.log(f"per-layer report failed: {self.layer_reports[key]['error']}")
            return {}
        self.layer_reports[key] = report
        for line in describe(report):
            self.log(f"  {line}")
        return {"worst_layers": worst_summary(report), "layer_report_images": len(x)}

    def share_layer_report(self, fmt: Format, key: str) -> None:
        """Give `fmt`'s row the report made under `key` (onnx-int8 and ort-int8 share one QDQ graph)."""
        if key in self.layer_reports:
            self.layer_reports[fmt.name] = self.layer_reports[key]

    def metadata(self, fmt: Format, artifact: Path, quantization: dict[str, Any]) -> ArtifactMetadata:
        """Metadata for `fmt`, with the I/O tensors read from the artifact by its runtime (the device's backend)."""
        session = open_session(artifact, fmt.runtime)
        inp, out = session.input, session.output
        if "calibration_from" in quantization and self._calib is not None:
            # The exporters name the set (a basename: no build-machine path in a released file); pin its content.
            quantization = {**quantization, "calibration_sha256": self._calib.sha256}
        return ArtifactMetadata(
            model=self.source.name,
            task=self.source.task,
            labels=self.source.labels,
            preprocess=self.source.spec,
            format=fmt.name,
            precision=fmt.precision,
            input=inp,
            output=out,
            quantization=quantization,
            positive_label=self.source.positive_label,
            confidence_threshold=(self.options.threshold if self.options.threshold is not None
                                  else DEFAULT_THRESHOLDS.get(self.source.task, DEFAULT_THRESHOLD)),
            source_sha256=self.source.sha256,
            source_name=self.source.path.name,
            medge_version=medge_version(),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            tools=self.tools,
            part=self.source.part,
            feature_extractor=self.source.feature_extractor,
            version=self.options.model_version,
        )
