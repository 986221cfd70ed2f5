"""This CPU's own ceiling: one large float32 and one int8 matrix product through each runtime.

A model's MAC/s divided by the same runtime's MAC/s on a big GEMM (the best
case for its kernels: no im2col, no small channel counts, no memory-bound
element-wise ops) says how much headroom is left, not only how many
milliseconds. The one-op models are built once and cached, and run through
the same `edge_runtime.backends` session a device uses (at their own batch M):

    litert       FULLY_CONNECTED (Keras Dense, no bias), float32 and full int8 (TFLite converter)
    onnxruntime  MatMul (float32) and MatMulInteger (uint8 x int8 -> int32), written with onnx.helper
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from convert.timing import time_fn
from edge_runtime.backends import open_session

# (M, K, N) per precision: large enough to reach the kernels' steady state,
# short enough per call (a few ms) that a run fits in a scheduler time slice on
# a busy machine. int8 (VNNI/AMX, dot-product) kernels are ~10-40x faster, so get more work.
SHAPES = {"float32": (256, 512, 512), "int8": (256, 1024, 1024)}


def _build_tflite(path: Path, int8: bool, M: int, K: int, N: int) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras  # TensorFlow: imported only when this runs
    import tensorflow as tf  # TensorFlow: imported only when this runs

    rng = np.random.default_rng(0)
    inp = keras.Input(shape=(K,), batch_size=M)
    out = keras.layers.Dense(N, use_bias=False)(inp)
    model = keras.Model(inp, out)
    model.layers[-1].set_weights([rng.normal(0, 0.05, (K, N)).astype(np.float32)])
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = lambda: ([rng.normal(0, 1, (M, K)).astype(np.float32)] for _ in range(4))
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.int8
        conv.inference_output_type = tf.int8
    path.write_bytes(conv.convert())


def _build_onnx(path: Path, int8: bool, M: int, K: int, N: int) -> None:
    import onnx  # optional: only the ONNX rows need it
    from onnx import TensorProto, helper, numpy_helper  # optional: only the ONNX rows need it

    rng = np.random.default_rng(0)
    if int8:
        w = numpy_helper.from_array(rng.integers(-127, 128, (K, N)).astype(np.int8), "W")
        node = helper.make_node("MatMulInteger", ["X", "W"], ["Y"])
        x_type, y_type = TensorProto.UINT8, TensorProto.INT32
    else:
        w = numpy_helper.from_array(rng.normal(0, 0.05, (K, N)).astype(np.float32), "W")
        node = helper.make_node("MatMul", ["X", "W"], ["Y"])
        x_type, y_type = TensorProto.FLOAT, TensorProto.FLOAT
    graph = helper.make_graph([node], "peak_matmul", [helper.make_tensor_value_info("X", x_type, [M, K])],
                              [helper.make_tensor_value_info("Y", y_type, [M, N])], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _runner(path: Path, backend: str, threads: int, M: int, K: int) -> Callable[[], Any]:
    """One call of the GEMM model through the device's backend session, at the file's own batch M."""
    sess = open_session(path, backend, threads, batch=None)
    rng = np.random.default_rng(1)
    dtype = sess.input.dtype
    if dtype == np.int8:
        x = rng.integers(-100, 100, (M, K)).astype(np.int8)
    elif dtype == np.uint8:
        x = rng.integers(0, 255, (M, K)).astype(np.uint8)
    else:
        x = rng.normal(0, 1, (M, K)).astype(np.float32)
    return lambda: sess.run(x)


RUNTIMES = {  # runtime (= its edge_runtime backend) -> suffix, builder
    "litert": (".tflite", _build_tflite),
    "onnxruntime": (".onnx", _build_onnx),
}


def measure_peaks(cache: Path, threads: list[int], runtimes=tuple(RUNTIMES), log=print) -> list[dict[str, Any]]:
    """One row per (runtime, precision, threads): GMAC/s of the matrix product in its fastest timed run.

    The fastest run, not the median: a ceiling is what the machine can do, and
    on a shared machine the median measures the neighbours too.
    """
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for rt in runtimes:
        ext, build = RUNTIMES[rt]
        for precision, (M, K, N) in SHAPES.items():
            macs = M * K * N
            path = cache / f"peak_matmul_{M}x{K}x{N}_{precision}{ext}"
            row: dict[str, Any] = {"runtime": rt, "precision": precision, "op": f"{M}x{K} @ {K}x{N}", "macs": macs}
            try:
                if not path.is_file():
                    tmp = path.with_name(".tmp-" + path.name)
                    build(tmp, precision == "int8", M, K, N)
                    tmp.replace(path)
                for t in threads:
                    stats = time_fn(_runner(path, rt, t, M, K), warmup=3, min_runs=20, min_seconds=1.0, max_seconds=5)
                    rows.append({**row, "threads": t, "status": "ok", "error": None, "latency_p50_ms": stats["p50_ms"],
                                 "latency_min_ms": stats["min_ms"],
                                 "gmacs_per_s": macs / (stats["min_ms"] / 1e3) / 1e9})
                    log(f"  peak {rt} {precision} threads={t}: {rows[-1]['gmacs_per_s']:.1f} GMAC/s")
            except Exception as e:  # a runtime that cannot build or run the GEMM is reported, not fatal
                for t in threads:
                    rows.append({**row, "threads": t, "status": "failed", "error": f"{type(e).__name__}: {e}",
                                 "latency_p50_ms": None, "latency_min_ms": None, "gmacs_per_s": None})
                log(f"  peak {rt} {precision}: failed ({type(e).__name__}: {e})")
    return rows


def peak_for(peaks: list[dict[str, Any]], runtime: str | None, precision: str, threads: int) -> float | None:
    """GMAC/s ceiling for a row: its runtime's (or, for Keras, the best float32) GEMM at its thread count."""
    kind = "int8" if precision in ("int8", "dynamic-int8") else "float32"
    vals = [p["gmacs_per_s"] for p in peaks if p["precision"] == kind and p["threads"] == threads
            and p["gmacs_per_s"] and (runtime is None or p["runtime"] == runtime)]
    return max(vals) if vals else None
