"""ONNX Runtime for .onnx and .ort files; imported on first use."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_runtime.backends import IOSpec

NAME = "onnxruntime"
_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8,
          "tensor(uint8)": np.uint8, "tensor(int64)": np.int64, "tensor(double)": np.float64}


def _io(arg) -> IOSpec:
    shape = tuple(v if isinstance(v, int) else -1 for v in arg.shape)
    if arg.type not in _TYPES:
        raise ValueError(f"tensor {arg.name} has type {arg.type}, which medge models do not use")
    # ONNX QDQ models keep float I/O; quantization lives inside the graph.
    return IOSpec(arg.name, shape, np.dtype(_TYPES[arg.type]))


class OrtSession:
    def __init__(self, path: Path, threads: int | None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        self.sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        inputs, outputs = self.sess.get_inputs(), self.sess.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"expected a model with one input and one output, found {len(inputs)} and {len(outputs)}")
        self.input, self.output = _io(inputs[0]), _io(outputs[0])
        self._version = ort.__version__
        self.backend = NAME

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.sess.run([self.output.name], {self.input.name: x})[0]

    def runtime_version(self) -> str:
        return self._version

    def metadata_props(self) -> dict[str, str]:
        """The model's metadata_props (where `convert` embeds medge metadata), from this open session."""
        return dict(self.sess.get_modelmeta().custom_metadata_map)


def open_session(path: Path, threads: int | None = None) -> OrtSession:
    return OrtSession(path, threads)
