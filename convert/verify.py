"""Run an exported artifact with its own runtime and compare it with the Keras model.

The runners here use the device runtimes (LiteRT, onnxruntime) exactly as a
device would: batch 1 for LiteRT, float input quantized with the input
tensor's own scale and zero point when the model takes integers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.metadata import TensorInfo

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int8)": "int8",
              "tensor(uint8)": "uint8", "tensor(int64)": "int64"}


def _litert(path: Path):
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path), num_threads=2)
    interp.allocate_tensors()
    return interp


def _tensor_info(d: dict[str, Any]) -> TensorInfo:
    scale, zp = d.get("quantization", (0.0, 0))
    quant = np.issubdtype(d["dtype"], np.integer) and scale != 0.0
    shape = d.get("shape_signature", d["shape"])
    return TensorInfo(d["name"], tuple(int(v) for v in shape), np.dtype(d["dtype"]).name,
                      float(scale) if quant else None, int(zp) if quant else None)


def _ort_session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _ort_info(arg) -> TensorInfo:
    shape = tuple(v if isinstance(v, int) else -1 for v in arg.shape)
    return TensorInfo(arg.name, shape, _ORT_TYPES.get(arg.type, arg.type))


def io_info(path: Path, runtime: str) -> tuple[TensorInfo, TensorInfo]:
    """(input, output) tensors of an artifact as its runtime reports them."""
    if runtime == "litert":
        interp = _litert(path)
        return _tensor_info(interp.get_input_details()[0]), _tensor_info(interp.get_output_details()[0])
    if runtime == "onnxruntime":
        sess = _ort_session(path)
        return _ort_info(sess.get_inputs()[0]), _ort_info(sess.get_outputs()[0])
    raise ValueError(f"unknown runtime {runtime!r}; known: litert, onnxruntime")


def _quantize(x: np.ndarray, info: TensorInfo) -> np.ndarray:
    dt = np.dtype(info.dtype)
    q = np.round(x / info.scale + info.zero_point)
    return np.clip(q, np.iinfo(dt).min, np.iinfo(dt).max).astype(dt)


def predict(path: Path, runtime: str, x: np.ndarray, batch: int = 64) -> np.ndarray:
    """Float outputs of the artifact for float inputs `x` (N, H, W, C)."""
    if runtime == "litert":
        interp = _litert(path)
        inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
        in_info, out_info = _tensor_info(inp), _tensor_info(out)
        if tuple(inp["shape"][1:]) != tuple(x.shape[1:]):
            raise ValueError(f"{path.name} expects input {tuple(inp['shape'])}, got images {x.shape[1:]}")
        rows = []
        for i in range(len(x)):
            xi = x[i: i + 1]
            xi = _quantize(xi, in_info) if in_info.quantized else xi.astype(inp["dtype"])
            interp.set_tensor(inp["index"], xi)
            interp.invoke()
            y = interp.get_tensor(out["index"])
            if out_info.quantized:
                y = (y.astype(np.float32) - out_info.zero_point) * out_info.scale
            rows.append(y.astype(np.float32))
        return np.concatenate(rows)
    if runtime == "onnxruntime":
        sess = _ort_session(path)
        name = sess.get_inputs()[0].name
        return np.concatenate([sess.run(None, {name: x[i: i + batch]})[0] for i in range(0, len(x), batch)])
    raise ValueError(f"unknown runtime {runtime!r}; known: litert, onnxruntime")


def compare(reference: np.ndarray, candidate: np.ndarray, y: np.ndarray | None = None) -> dict[str, Any]:
    """Top-1 agreement, max and mean |Δprob|, and accuracy of both (when labels are known)."""
    if reference.shape != candidate.shape:
        raise ValueError(f"output shapes differ: keras {reference.shape}, artifact {candidate.shape}")
    diff = np.abs(reference - candidate)
    r, c = reference.argmax(1), candidate.argmax(1)
    out: dict[str, Any] = {
        "images": int(len(reference)),
        "top1_agreement": float((r == c).mean()),
        "disagreements": int((r != c).sum()),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "keras_accuracy": None,
        "accuracy": None,
        "accuracy_delta": None,
    }
    if y is not None and (y >= 0).any():
        known = y >= 0
        out["keras_accuracy"] = float((r[known] == y[known]).mean())
        out["accuracy"] = float((c[known] == y[known]).mean())
        out["accuracy_delta"] = out["accuracy"] - out["keras_accuracy"]
    return out
