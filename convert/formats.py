"""The format table: every export variant medge makes, one row each.

`convert`, `benchmarks`, the docs and the tests iterate this table; a row's
name is what `--formats` takes and what appears in file names:

    {model}_{format}.{ext}      e.g. malaria-edge_tflite-int8.tflite
    {model}_{format}.json       its sidecar metadata

This module imports nothing heavy, so `benchmarks` and `edge_runtime`-side
tools can read the table without TensorFlow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Format:
    """One export variant.

    Attributes:
        name: command-line and file-name key, "{family}-{precision}".
        ext: file suffix of the artifact.
        runtime: what loads it on a device ("litert" or "onnxruntime").
        precision: "float32", "float16", "dynamic-int8" or "int8".
        exporter: "module:function" that writes the raw artifact (imported
            only when the row runs, so reading the table stays light).
        calibrated: needs real calibration images.
        needs_training_data: fine-tunes on the training split (QAT).
        max_abs_diff: for float rows, the largest allowed |prob - keras prob|
            on the proof batch; None for quantized rows, which are judged by
            top-1 agreement against `--min-agreement` instead, except QAT rows
            (`needs_training_data`, fine-tunes): accuracy drop vs Keras against
            `--qat-max-drop` (`convert.export.criterion`).
    """

    name: str
    ext: str
    runtime: str
    precision: str
    exporter: str
    calibrated: bool = False
    needs_training_data: bool = False
    max_abs_diff: float | None = None

    @property
    def is_float(self) -> bool:
        return self.max_abs_diff is not None

    def filename(self, model: str) -> str:
        return f"{model}_{self.name}{self.ext}"


# Tolerances: float32 graphs differ from Keras only by op order and fused
# kernels (measured ~1e-6); float16 weights move probabilities by ~1e-3.
FORMATS: dict[str, Format] = {f.name: f for f in (
    # LiteRT, float32 weights and activations
    Format("tflite-float32", ".tflite", "litert", "float32", "convert.tflite:export_float32", max_abs_diff=1e-4),
    # LiteRT, float16 weights (half the size), float32 compute
    Format("tflite-float16", ".tflite", "litert", "float16", "convert.tflite:export_float16", max_abs_diff=2e-2),
    # LiteRT, int8 weights, activations quantized on the fly
    Format("tflite-dynamic", ".tflite", "litert", "dynamic-int8", "convert.tflite:export_dynamic"),
    # LiteRT, full integer (int8 weights and activations), calibrated
    Format("tflite-int8", ".tflite", "litert", "int8", "convert.tflite:export_int8", calibrated=True),
    # LiteRT, full integer after quantization-aware fine-tuning (tfmot, tf-keras twin)
    Format("tflite-qat-int8", ".tflite", "litert", "int8", "convert.qat:export_qat_int8", calibrated=True,
           needs_training_data=True),
    # ONNX (tf2onnx, opset 17), float32
    Format("onnx-float32", ".onnx", "onnxruntime", "float32", "convert.onnx_export:export_float32", max_abs_diff=1e-4),
    # ONNX QDQ, int8 per-channel weights, activation type chosen by measurement
    Format("onnx-int8", ".onnx", "onnxruntime", "int8", "convert.onnx_export:export_int8", calibrated=True),
    # ONNX Runtime Mobile .ort of the onnx-int8 model
    Format("ort-int8", ".ort", "onnxruntime", "int8", "convert.onnx_export:export_ort_int8", calibrated=True),
)}


def parse_formats(spec: str | Sequence[str]) -> list[Format]:
    """Rows named by "all" or a comma-separated list, in table order.

    Raises:
        ValueError: a name not in the table (the message lists the valid ones).
    """
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    if not names:
        raise ValueError(f"no formats given; choose 'all' or some of {', '.join(FORMATS)}")
    if names == ["all"]:
        return list(FORMATS.values())
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise ValueError(f"unknown format(s) {unknown}; choose 'all' or some of: {', '.join(FORMATS)}")
    return [f for f in FORMATS.values() if f.name in names]
