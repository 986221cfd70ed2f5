"""A `Session` over a TFLite-style `Interpreter` (shared by LiteRT and the legacy tflite-runtime)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.backends import Op
from edge_runtime.spec import TensorInfo


def tensor_info(d: dict[str, Any]) -> TensorInfo:
    """An interpreter's tensor details -> TensorInfo, with the tensor's own quantization (per-tensor)."""
    dtype = np.dtype(d["dtype"])
    scale, zp = d.get("quantization", (0.0, 0))
    quant = np.issubdtype(dtype, np.integer) and scale != 0.0
    shape = d.get("shape_signature")
    if shape is None or len(shape) == 0:
        shape = d["shape"]
    return TensorInfo(d["name"], tuple(int(v) for v in shape), dtype,
                      float(scale) if quant else None, int(zp) if quant else None)


def with_extra_outputs(model: bytes, indices: Sequence[int]) -> bytes | None:
    """The .tflite bytes with tensors `indices` of the main graph appended to its outputs, or None without the schema.

    The runtime then returns them beside the model's output in one normal
    (delegated, fast) invoke. The flatbuffer schema ships with ai-edge-litert;
    the legacy tflite-runtime lacks it.
    """
    try:  # inside: the schema and flatbuffers come with ai-edge-litert, which a tflite-runtime Pi does not have
        import flatbuffers
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        return None
    m = schema.ModelT.InitFromPackedBuf(bytearray(model), 0)
    sg = m.subgraphs[0]
    sg.outputs = np.append(np.asarray(sg.outputs, np.int32), np.asarray(indices, np.int32))
    b = flatbuffers.Builder(len(model) + 4096)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


class TFLiteSession:
    """One interpreter, batch 1 by default (what a Pi or a phone runs; XNNPACK is fastest at batch 1).

    Args:
        interpreter_cls: the runtime's `Interpreter`.
        path: the .tflite file.
        threads: `num_threads` (None: the runtime's choice).
        backend, version: the row's name and the runtime's version.
        batch: inputs per invoke (the input is resized to it); None keeps the file's own shape.
        extra_outputs: tensor indices `run_with` returns too. With the flatbuffer
            schema they become extra outputs of an in-memory copy of the model
            (`extra_mode` "extra-output"); without it (tflite-runtime) every
            intermediate tensor is kept instead ("preserve-all-tensors":
            slower, no delegate, more memory).
    """

    def __init__(self, interpreter_cls, path: Path, threads: int | None, backend: str, version: str,
                 batch: int | None = 1, extra_outputs: Sequence[int] = ()):
        kw: dict[str, Any] = {"model_path": str(path), "num_threads": threads}
        self.extra_mode: str | None = None
        if extra_outputs:
            content = with_extra_outputs(Path(path).read_bytes(), extra_outputs)
            if content is not None:
                kw = {"model_content": content, "num_threads": threads}
                self.extra_mode = "extra-output"
            else:
                kw["experimental_preserve_all_tensors"] = True
                self.extra_mode = "preserve-all-tensors"
        with warnings.catch_warnings():  # "keeping all tensors is for debugging": for a tap it is the point
            warnings.simplefilter("ignore", UserWarning)
            self.interp = interpreter_cls(**kw)
        self._extra = tuple(int(i) for i in extra_outputs)
        inputs = self.interp.get_input_details()
        outputs = [o for o in self.interp.get_output_details() if o["index"] not in self._extra]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"expected a model with one input and one output, found {len(inputs)} and {len(outputs)}")
        shape = [int(v) for v in inputs[0]["shape"]]
        if batch is not None and shape and shape[0] != batch:
            # A model exported with another fixed batch or a dynamic one: run it at `batch`.
            self.interp.resize_tensor_input(inputs[0]["index"], [batch, *shape[1:]])
        self.interp.allocate_tensors()
        self._in = self.interp.get_input_details()[0]
        self._out = next(o for o in self.interp.get_output_details() if o["index"] not in self._extra)
        self.input, self.output = tensor_info(self._in), tensor_info(self._out)
        self.batch: int | None = int(self._in["shape"][0]) if len(self._in["shape"]) else 1
        self.extra_outputs = tuple(tensor_info(self.interp._get_tensor_details(i, 0)) for i in self._extra)
        self.backend, self._version = backend, version

    def run(self, x: np.ndarray) -> np.ndarray:
        self.interp.set_tensor(self._in["index"], x)
        self.interp.invoke()
        return self.interp.get_tensor(self._out["index"])

    def run_batch(self, x: np.ndarray) -> np.ndarray:
        if len(x) == self.batch:
            return self.run(x)
        if self.batch == 1:
            return np.concatenate([self.run(x[i: i + 1]) for i in range(len(x))])
        raise ValueError(f"this session runs batches of {self.batch}, got {len(x)} inputs; "
                         "open it with batch=1 to run any number")

    def run_with(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        out = self.run(x).copy()
        return out, [self.interp.get_tensor(i).copy() for i in self._extra]

    def ops(self) -> list[Op]:
        return [Op(str(d["op_name"]), tuple(int(i) for i in d["inputs"]), tuple(int(i) for i in d["outputs"]))
                for d in self.interp._get_ops_details()]

    def tensors(self) -> dict[int, TensorInfo]:
        return {int(d["index"]): tensor_info(d) for d in self.interp.get_tensor_details()}

    def metadata(self) -> None:
        return None  # interpreters expose no metadata; edge_runtime.metadata reads the flatbuffer

    def runtime_version(self) -> str:
        return self._version
