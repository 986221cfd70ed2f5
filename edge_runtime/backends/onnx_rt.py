"""ONNX Runtime for .onnx and .ort files; imported on first use."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edge_runtime.backends import Op
from edge_runtime.spec import TensorInfo

NAME = "onnxruntime"
_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8,
          "tensor(uint8)": np.uint8, "tensor(int32)": np.int32, "tensor(int64)": np.int64,
          "tensor(double)": np.float64}
_NO_INNER = "onnxruntime exposes no inner operators or tensors; use the .tflite artifact"


def _io(arg) -> TensorInfo:
    shape = tuple(v if isinstance(v, int) else -1 for v in arg.shape)
    if arg.type not in _TYPES:
        raise ValueError(f"tensor {arg.name} has type {arg.type}, which medge models do not use")
    # ONNX QDQ models keep float I/O; quantization lives inside the graph.
    return TensorInfo(arg.name, shape, np.dtype(_TYPES[arg.type]))


def _session_options(threads: int | None, optimize: bool):
    import onnxruntime as ort  # inside: the runtime is imported on first use, only by its backend

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return so


class OrtSession:
    """One CPU InferenceSession; a dynamic batch dimension lets `run_batch` run a whole batch in one call."""

    def __init__(self, path: Path, threads: int | None, optimize: bool = True):
        import onnxruntime as ort  # inside: the runtime is imported on first use, only by its backend

        self._sess = ort.InferenceSession(str(path), sess_options=_session_options(threads, optimize),
                                          providers=["CPUExecutionProvider"])
        inputs, outputs = self._sess.get_inputs(), self._sess.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"expected a model with one input and one output, found {len(inputs)} and {len(outputs)}")
        self.input, self.output = _io(inputs[0]), _io(outputs[0])
        first = self.input.shape[0] if self.input.shape else 1
        self.batch: int | None = None if first < 0 else first
        self.extra_outputs: tuple[TensorInfo, ...] = ()
        self.extra_mode: str | None = None
        self._version = ort.__version__
        self.backend = NAME

    def run(self, x: np.ndarray) -> np.ndarray:
        return self._sess.run([self.output.name], {self.input.name: x})[0]

    def run_batch(self, x: np.ndarray) -> np.ndarray:
        if self.batch is None or self.batch == len(x):
            return self.run(x)
        if self.batch == 1:
            return np.concatenate([self.run(x[i: i + 1]) for i in range(len(x))])
        raise ValueError(f"this model takes batches of {self.batch}, got {len(x)} inputs")

    def run_with(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        return self.run(x), []

    def ops(self) -> list[Op]:
        raise NotImplementedError(_NO_INNER)

    def tensors(self) -> dict[int, TensorInfo]:
        raise NotImplementedError(_NO_INNER)

    def metadata(self) -> dict[str, str]:
        """The model's metadata_props (where `convert` embeds medge metadata), from this open session."""
        return dict(self._sess.get_modelmeta().custom_metadata_map)

    def runtime_version(self) -> str:
        return self._version


def open_session(path: Path, threads: int | None = None, *, batch: int | None = 1, extra_outputs: Sequence[int] = (),
                 optimize: bool = True) -> OrtSession:
    """An onnxruntime CPU session on `path` (see `edge_runtime.backends.open_session`; `batch` is TFLite's)."""
    if extra_outputs:
        raise ValueError(_NO_INNER)
    return OrtSession(path, threads, optimize)


def write_ort_format(src: Path, dest: Path, disabled_optimizers: Sequence[str] = ("NchwcTransformer",)) -> None:
    """Save `src` (.onnx) as an ORT-format file `dest`, with every graph optimization but `disabled_optimizers`.

    What `python -m onnxruntime.tools.convert_onnx_models_to_ort` does by
    default; leaving out the x86-only NCHWc layout keeps the file runnable on
    ARM phones.
    """
    import onnxruntime as ort  # inside: the runtime is imported on first use, only by its backend

    so = _session_options(None, optimize=True)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(dest)
    so.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"],
                         disabled_optimizers=list(disabled_optimizers))
