"""ONNX exporters: float32 (tf2onnx), int8 QDQ (onnxruntime quantize_static), and the .ort Mobile format.

The int8 activation type is chosen by measurement (`--onnx-activations auto`):
both uint8 and int8 activations are quantized and timed on this machine,
batch 1, and the faster is kept. On the x86 machine this project was built
on (AVX-512 VNNI), uint8 activations with int8 weights ran the paper ResNet
2.3x faster than float32 while int8 activations ran no faster; ARM devices
may differ, so the measurement and the choice are recorded in the metadata.
uint8 activations come with 7-bit weights (`quantize_qdq`), so the file gives
the same answers on x86 CPUs with and without VNNI.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from convert.bounded import OnnxLadder, apply_choice, bounded_search
from convert.converters import CALIBRATION_METHODS, keras_to_onnx, quantize_qdq
from convert.embedding import write_ort
from convert.formats import FORMATS, Format
from convert.job import ExportJob
from convert.layer_errors import onnx_layer_errors
from convert.timing import time_fn
from edge_runtime.backends import open_session

ACTIVATION_TYPES = ("auto", "uint8", "int8")


def float_onnx(job: ExportJob) -> Path:
    """The float32 ONNX model, made once per job in its work folder and reused by the int8 rows."""
    import onnx  # optional: only the ONNX rows need it

    p = job.workdir / "float32.onnx"
    if not p.exists():
        proto = keras_to_onnx(job.model, tuple(int(d) for d in job.model.inputs[0].shape[1:]), job.options.opset)
        onnx.save(proto, str(p))
    return p


def export_float32(job: ExportJob, fmt: Format, dest: Path) -> dict[str, Any]:
    shutil.copyfile(float_onnx(job), dest)
    return {}


def _time_ms(path: Path, x: np.ndarray, runs: int = 30, warmup: int = 5, min_runs: int = 5,
             seconds: float = 1.5) -> float:
    """Median batch-1 latency in ms on one thread: the device's session and medge's one timing loop.

    `runs` calls, or fewer (at least `min_runs`) once `seconds` have passed: a 1 ms model gets its 30 calls, the
    fused InceptionV3 (~100-200 ms a call) about 1.5 s of them instead of 35 calls for each of three files.
    """
    sess = open_session(path, "onnxruntime", threads=1)
    xi = x[:1].astype(np.float32)
    stats = time_fn(lambda: sess.run(xi), warmup=warmup, min_runs=min_runs, max_runs=runs, min_seconds=seconds,
                    max_seconds=float("inf"))
    return stats["p50_ms"]


def int8_onnx(job: ExportJob) -> tuple[Path, dict[str, Any]]:
    """The QDQ int8 ONNX model (made once per job) and how it was quantized."""
    if job.int8_onnx_error is not None:
        raise job.int8_onnx_error
    if job.int8_onnx is not None:
        return job.int8_onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process  # optional runtime, on use

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
    # One calibration for both candidates: the tensor ranges do not depend on the activation type, so the second
    # reads the first's from onnxruntime's calibration cache (the same file as calibrating again, measured).
    cache = job.workdir / f"calibration.{method}.json"
    for act in candidates:
        paths[act] = job.workdir / f"int8.{act}.onnx"
        quantize_qdq(prep, paths[act], calib.x, act, method, cache=cache)
        if wanted == "auto":
            timing[act] = round(_time_ms(paths[act], calib.x), 3)
    if wanted == "auto":
        timing["float32"] = round(_time_ms(float_onnx(job), calib.x), 3)
        chosen = min(candidates, key=lambda a: timing[a])
    else:
        chosen = wanted
    info: dict[str, Any] = {
        "weights": ("int8 per-channel (symmetric)" if chosen != "uint8" else
                    "int8 per-channel (symmetric), 7-bit range: no u8s8 saturation on x86 without VNNI"),
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
        rows = ("onnx-int8", "ort-int8")  # one QDQ graph for both; measured as the .onnx
        ladder = OnnxLadder(job, prep, path, chosen, method)
        try:
            path, record = bounded_search(job, FORMATS["onnx-int8"], ladder,
                                          job.layer_reports.get("int8_onnx", {}), rows[1:])
        except ValueError as e:
            job.int8_onnx_error = e  # the second row fails the same way without searching again
            raise
        apply_choice(info, record)
        if record["chosen_step"] > 0:
            info["quantizer"] += " + --max-drop search (calibration, int16 activations, nodes_to_exclude)"
    job.int8_onnx = (path, info)
    return path, info


def export_int8(job: ExportJob, fmt: Format, dest: Path) -> dict[str, Any]:
    path, info = int8_onnx(job)
    job.share_layer_report(fmt, "int8_onnx")
    shutil.copyfile(path, dest)
    return dict(info)


def export_ort_int8(job: ExportJob, fmt: Format, dest: Path) -> dict[str, Any]:
    """Convert the int8 ONNX model to the ORT Mobile format, metadata embedded before conversion.

    Optimized as `python -m onnxruntime.tools.convert_onnx_models_to_ort` does
    by default (all optimizations except the x86-only NCHWc layout), so the
    file runs on ARM phones too.
    """
    path, info = int8_onnx(job)
    job.share_layer_report(fmt, "int8_onnx")  # the same QDQ graph as onnx-int8
    info = dict(info, ort_optimization="all (without NchwcTransformer)")
    job.ort_source = path
    write_ort(path, dest, job.metadata(fmt, path, info).to_json())  # I/O of the .ort = I/O of the .onnx
    return info

