"""ONNX exporters: float32 (tf2onnx), int8 QDQ (onnxruntime quantize_static), and the .ort Mobile format.

The int8 activation type is chosen by measurement (`--onnx-activations auto`):
both uint8 and int8 activations are quantized and timed on this machine,
batch 1, and the faster is kept. On the x86 machine this project was built
on (AVX-512 VNNI), uint8 activations with int8 weights ran the paper ResNet
2.3x faster than float32 while int8 activations ran no faster; ARM devices
may differ, so the measurement and the choice are recorded in the metadata.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from convert.layer_errors import onnx_layer_errors
from edge_runtime.metadata import METADATA_KEY

OPSET = 17
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
ACTIVATION_TYPES = ("auto", "uint8", "int8")


def keras_to_onnx(model, input_shape: tuple[int, ...], opset: int = OPSET):
    """A Keras model as an ONNX ModelProto with input "image" (batch, *input_shape) and a named batch dim."""
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, *input_shape), tf.float32, name="image"),)
    try:
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)
    except Exception as e:  # tf2onnx raises plain exceptions naming the unsupported op
        raise ValueError(f"tf2onnx could not convert the model: {str(e).splitlines()[0]}") from e
    for v in (*proto.graph.input, *proto.graph.output):
        dims = v.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"
    proto.producer_name = "medge"
    return proto


def set_metadata(proto, text: str, extra: Mapping[str, str] | None = None) -> None:
    """Put the medge JSON in `metadata_props` (replacing an older entry), plus `extra` key/values (e.g. the golden set)."""
    new = {METADATA_KEY: text, **dict(extra or {})}
    keep = [(p.key, p.value) for p in proto.metadata_props if p.key not in new]
    del proto.metadata_props[:]
    for k, v in keep + list(new.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v


def float_onnx(job) -> Path:
    """The float32 ONNX model, made once per job in its work folder and reused by the int8 rows."""
    import onnx

    p = job.workdir / "float32.onnx"
    if not p.exists():
        proto = keras_to_onnx(job.model, tuple(int(d) for d in job.model.inputs[0].shape[1:]), job.options.opset)
        onnx.save(proto, str(p))
    return p


def export_float32(job, fmt, dest: Path) -> dict[str, Any]:
    shutil.copyfile(float_onnx(job), dest)
    return {}


class _Reader:
    """onnxruntime CalibrationDataReader over preprocessed images, one per call."""

    def __init__(self, x: np.ndarray, name: str):
        self.x, self.name, self.i = x, name, 0

    def get_next(self):
        if self.i >= len(self.x):
            return None
        self.i += 1
        return {self.name: self.x[self.i - 1: self.i].astype(np.float32)}

    def rewind(self):
        self.i = 0


def _quantize(src: Path, dest: Path, calib: np.ndarray, activations: str, method: str,
              exclude: Sequence[str] = ()) -> None:
    """QDQ, int8 per-channel weights; `activations` uint8, int8 or int16 (QDQ at opset 21); `exclude`: nodes left
    in float (`--max-drop`)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8, "int16": QuantType.QInt16}
    with contextlib.redirect_stdout(io.StringIO()):  # Entropy and Percentile print progress; stdout is the report's
        quantize_static(
            str(src), str(dest), _Reader(calib, "image"),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=types[activations],
            weight_type=QuantType.QInt8,
            calibrate_method=methods[method],
            nodes_to_exclude=list(exclude) or None,
        )


def _time_ms(path: Path, x: np.ndarray, runs: int = 30, warmup: int = 5) -> float:
    """Median batch-1 latency in ms on one thread: the device's session and medge's one timing loop."""
    from edge_runtime.backends import open_session
    from edge_runtime.timing import time_fn

    sess = open_session(path, "onnxruntime", threads=1)
    xi = x[:1].astype(np.float32)
    stats = time_fn(lambda: sess.run(xi), warmup=warmup, min_runs=runs, max_runs=runs, min_seconds=0.0,
                    max_seconds=float("inf"))
    return stats["p50_ms"]


def int8_onnx(job) -> tuple[Path, dict[str, Any]]:
    """The QDQ int8 ONNX model (made once per job) and how it was quantized."""
    if "int8_onnx" in job.cache:
        if isinstance(job.cache["int8_onnx"], Exception):
            raise job.cache["int8_onnx"]
        return job.cache["int8_onnx"]
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calib = job.calibration()
    method = job.options.calib_method
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method {method!r} is not one of {CALIBRATION_METHODS}")
    prep = job.workdir / "float32.prep.onnx"
    if not prep.exists():
        quant_pre_process(str(float_onnx(job)), str(prep))
    wanted = job.options.onnx_activations
    if wanted not in ACTIVATION_TYPES:
        raise ValueError(f"--onnx-activations {wanted!r} is not one of {ACTIVATION_TYPES}")
    candidates = ["uint8", "int8"] if wanted == "auto" else [wanted]
    paths, timing = {}, {}
    for act in candidates:
        paths[act] = job.workdir / f"int8.{act}.onnx"
        _quantize(prep, paths[act], calib.x, act, method)
        if wanted == "auto":
            timing[act] = round(_time_ms(paths[act], calib.x), 3)
    if wanted == "auto":
        timing["float32"] = round(_time_ms(float_onnx(job), calib.x), 3)
        chosen = min(candidates, key=lambda a: timing[a])
    else:
        chosen = wanted
    info: dict[str, Any] = {
        "weights": "int8 per-channel (symmetric)",
        "activations": chosen,
        "format": "QDQ",
        "quantizer": "onnxruntime.quantization.quantize_static",
        "calibration": method,
        "calibration_images": len(calib),
        "calibration_from": calib.origin,
        "activation_choice": "measured" if wanted == "auto" else "given",
    }
    if timing:
        info["latency_ms_batch1_1thread"] = timing
    info.update(job.layer_report("int8_onnx", lambda x: onnx_layer_errors(prep, paths[chosen], x, job.workdir)))
    path = paths[chosen]
    if job.options.max_drop is not None:
        from convert.bounded import OnnxLadder, apply_choice, bounded_search
        from convert.formats import FORMATS

        rows = ("onnx-int8", "ort-int8")  # one QDQ graph for both; measured as the .onnx
        ladder = OnnxLadder(job, prep, path, chosen, method)
        try:
            path, record = bounded_search(job, FORMATS["onnx-int8"], ladder,
                                          job.cache.get(("layer_errors", "int8_onnx"), {}), rows[1:])
        except ValueError as e:
            job.cache["int8_onnx"] = e  # the second row fails the same way without searching again
            raise
        apply_choice(info, record)
        if record["chosen_step"] > 0:
            info["quantizer"] += " + --max-drop search (calibration, int16 activations, nodes_to_exclude)"
    job.cache["int8_onnx"] = (path, info)
    return path, info


def export_int8(job, fmt, dest: Path) -> dict[str, Any]:
    path, info = int8_onnx(job)
    job.share_layer_report(fmt, "int8_onnx")
    shutil.copyfile(path, dest)
    return dict(info)


def export_ort_int8(job, fmt, dest: Path) -> dict[str, Any]:
    """Convert the int8 ONNX model to the ORT Mobile format, metadata embedded before conversion.

    Optimized as `python -m onnxruntime.tools.convert_onnx_models_to_ort` does
    by default (all optimizations except the x86-only NCHWc layout), so the
    file runs on ARM phones too.
    """
    path, info = int8_onnx(job)
    job.share_layer_report(fmt, "int8_onnx")  # the same QDQ graph as onnx-int8
    info = dict(info, ort_optimization="all (without NchwcTransformer)")
    job.cache["ort_source"] = path
    write_ort(job, path, dest, job.metadata(fmt, path, info).to_json())  # I/O of the .ort = I/O of the .onnx
    return info


def write_ort(job, src: Path, dest: Path, text: str, extra: Mapping[str, str] | None = None) -> None:
    """`src` (.onnx) with the metadata `text` (and `extra` entries) embedded, converted to the ORT format at `dest`.

    An .ort file cannot be edited after conversion, so embedding the golden
    set (`convert.export.export_row`) converts again from the same .onnx: the
    same graph, the same weights.
    """
    import onnx

    from edge_runtime.backends.onnx_rt import write_ort_format

    proto = onnx.load(str(src))
    set_metadata(proto, text, extra)
    tagged = job.workdir / "int8.tagged.onnx"
    onnx.save(proto, str(tagged))
    write_ort_format(tagged, dest, disabled_optimizers=("NchwcTransformer",))
