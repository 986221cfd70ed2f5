"""A `Session` over a TFLite-style `Interpreter` (shared by LiteRT and the legacy tflite-runtime)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edge_runtime.backends import IOSpec


def io_spec(d: dict[str, Any]) -> IOSpec:
    """An interpreter's tensor details -> IOSpec, with the tensor's own quantization (per-tensor)."""
    dtype = np.dtype(d["dtype"])
    scale, zp = d.get("quantization", (0.0, 0))
    quant = np.issubdtype(dtype, np.integer) and scale != 0.0
    shape = d.get("shape_signature")
    if shape is None or len(shape) == 0:
        shape = d["shape"]
    return IOSpec(d["name"], tuple(int(v) for v in shape), dtype,
                  float(scale) if quant else None, int(zp) if quant else None)


class TFLiteSession:
    """One interpreter, batch 1 (what a Pi or a phone runs; XNNPACK is fastest at batch 1)."""

    def __init__(self, interpreter_cls, path: Path, threads: int | None, backend: str, version: str,
                 preserve_all_tensors: bool = False):
        kw: dict[str, Any] = {"model_path": str(path), "num_threads": threads}
        if preserve_all_tensors:
            kw["experimental_preserve_all_tensors"] = True
        self.interp = interpreter_cls(**kw)
        inputs, outputs = self.interp.get_input_details(), self.interp.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"expected a model with one input and one output, found {len(inputs)} and {len(outputs)}")
        self._in, self._out = inputs[0], outputs[0]
        shape = [int(v) for v in self._in["shape"]]
        if shape and shape[0] != 1:
            # A model exported with a fixed batch > 1 or a dynamic one: run it at batch 1.
            self.interp.resize_tensor_input(self._in["index"], [1, *shape[1:]])
        self.interp.allocate_tensors()
        self._in, self._out = self.interp.get_input_details()[0], self.interp.get_output_details()[0]
        self.input, self.output = io_spec(self._in), io_spec(self._out)
        self.backend, self._version = backend, version

    def run(self, x: np.ndarray) -> np.ndarray:
        self.interp.set_tensor(self._in["index"], x)
        self.interp.invoke()
        return self.interp.get_tensor(self._out["index"])

    def run_with_tensors(self, x: np.ndarray, indices: Sequence[int]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Output plus copies of intermediate tensors (needs `preserve_all_tensors`)."""
        out = self.run(x).copy()
        return out, [self.interp.get_tensor(i).copy() for i in indices]

    def ops(self) -> list[dict[str, Any]]:
        """The graph's operators in execution order (op_name, inputs, outputs tensor indices)."""
        return self.interp._get_ops_details()

    def tensor(self, index: int) -> dict[str, Any]:
        return self.interp._get_tensor_details(index, 0)

    def runtime_version(self) -> str:
        return self._version
