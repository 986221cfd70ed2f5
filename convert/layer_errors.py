"""Per-layer quantization error of the int8 rows: which layer loses what, in graph order.

    python -m convert runs/malaria-edge --out export --formats tflite-int8,onnx-int8   # report on by default
    python -m convert inspect export/malaria-edge_tflite-int8.tflite                  # shows the worst layers

Each int8 row gets a table, one line per quantized layer in graph order, made
on the first `--layer-report-n` calibration images (default 64) by the
library that quantized it:

- `tflite-int8`: TFLite's `tf.lite.experimental.QuantizationDebugger` with the
  row's converter settings. Its debug model runs every quantized op beside
  its float twin fed with the same (dequantized) inputs, so each line is that
  op's own error, not what it inherited. Columns: `sqnr_db` (signal over
  quantization noise of the op's output: 10 log10 E[f^2] / E[(f - q)^2]),
  `rmse_over_scale` (RMSE in quantization steps; about 0.29 is plain
  rounding, more means clipping or weight error), `max_abs_error`.
- `onnx-int8`: onnxruntime's `quantization.qdq_loss_debug` on the float and
  the QDQ model (its activations, their matching, its weight error). Columns:
  `sqnr_db`, the lower of the tensor's own QDQ error (`activation_sqnr_db`,
  the tensor before vs after its Quantize/DequantizeLinear pair: rounding and
  clipping) and, for Conv/Gemm/MatMul, its weight's (`weight_sqnr_db`); `accumulated_sqnr_db`
  compares with the float model's same tensor, i.e. everything the layers
  before added too.

The worst layers (lowest `sqnr_db`) are listed in the artifact's metadata
(`quantization.worst_layers`), the whole table goes to conversion.json (the
row's `layer_errors`) and a PNG `{model}_{format}_layers.png` beside the
artifact plots it, worst marked.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from convert.converters import int8_config, keras_converter, representative

WORST_N = 3
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
DEFAULT_IMAGES = 64


def short_name(tensor: str) -> str:
    """A Keras layer name from a converter's tensor name, e.g.
    "model_1/s1m1_3_bn_1/batchnorm/add_1;model_1/s1m1_3_conv_1/convolution" -> "s1m1_3_conv".

    Fused ops carry several names joined by ";"; the last is the op's first
    layer (the conv of conv+BN+ReLU). A model nested in another (the OCT base
    inside the fused model) adds a scope: the innermost layer scope names the
    layer, "oct_fused_1/inception_v3_1/conv2d_5_1/convolution" -> "conv2d_5".
    """
    piece = tensor.split(";")[-1]
    parts = [p for p in piece.split("/") if p]
    scopes = [p for p in parts[1:-1] if p not in _OP_SCOPES]  # the first part is the outer model, the last the op
    name = scopes[-1] if scopes else parts[1] if len(parts) > 1 else (parts[0] if parts else tensor)
    return re.sub(r"_\d+$", "", name.split(":")[0])


# Scopes TF opens inside one Keras layer's call (not layer names).
_OP_SCOPES = frozenset({"batchnorm"})


def sqnr_db(signal: np.ndarray, noise: np.ndarray) -> float:
    """10 log10(E[signal^2] / E[noise^2]); inf when the noise is zero."""
    return _power_ratio_db(float(np.mean(np.square(signal, dtype=np.float64))),
                           float(np.mean(np.square(noise, dtype=np.float64))))


def _power_ratio_db(signal_power: float, noise_power: float) -> float:
    """10 log10(signal / noise) of two powers (or of two sums over the same count); inf when the noise is zero."""
    if noise_power == 0.0:
        return math.inf
    if signal_power == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal_power / noise_power)


def _finite(v: float) -> float | None:
    return round(float(v), 3) if v is not None and math.isfinite(v) else None


def summarize(layers: list[dict[str, Any]], tool: str, images: int, n: int = WORST_N) -> dict[str, Any]:
    """The `layer_errors` record of a row: the table, the worst `n` (lowest sqnr_db) marked and listed."""
    ranked = sorted((r for r in layers if r.get("sqnr_db") is not None), key=lambda r: r["sqnr_db"])
    worst = [r["index"] for r in ranked[:n]]
    for r in layers:
        r["worst_rank"] = worst.index(r["index"]) + 1 if r["index"] in worst else None
    return {"tool": tool, "images": images, "metric": "sqnr_db (lower is worse)", "layers": layers,
            "worst": [{"index": r["index"], "layer": r["layer"], "op": r["op"], "sqnr_db": r["sqnr_db"]}
                      for r in ranked[:n]]}


# ---------------------------------------------------------------- TFLite


def tflite_layer_errors(model, calib: np.ndarray, int8_io: bool = False,
                        saved_model: Path | None = None) -> dict[str, Any]:
    """Per-op error of the converter's full-int8 model of `model` on `calib` (TFLite QuantizationDebugger);
    `saved_model`: the model as `convert.converters.export_saved_model` wrote it, converted from there."""
    import tensorflow as tf  # heavy: only when the report is made

    def direct_sqnr(f, q, scale, zp):
        return sqnr_db(f, f - (q.astype(np.float32) - zp) * np.float32(scale))

    conv = keras_converter(model, saved_model)
    int8_config(calib, int8_io)(conv)
    options = tf.lite.experimental.QuantizationDebugOptions(layer_direct_compare_metrics={"sqnr_db": direct_sqnr})
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # Keras' export lists every variable
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=conv, debug_dataset=representative(calib), debug_options=options)
        debugger.run()
    dump = io.StringIO()
    debugger.layer_statistics_dump(dump)
    layers = []
    for i, r in enumerate(csv.DictReader(io.StringIO(dump.getvalue()))):  # graph (execution) order
        scale = float(r["scale"])
        mse = float(r["mean_squared_error"])
        layers.append({
            "index": i, "layer": short_name(r["tensor_name"]), "op": r["op_name"], "tensor": r["tensor_name"],
            "sqnr_db": _finite(float(r["sqnr_db"])),
            "rmse_over_scale": _finite(math.sqrt(mse) / scale) if scale else None,
            "max_abs_error": _finite(float(r["max_abs_error"])), "scale": scale,
        })
    return summarize(layers, "tf.lite.experimental.QuantizationDebugger", len(calib))


# ---------------------------------------------------------------- ONNX


LAYER_CHUNK = 4  # images per pass of the ONNX layer report


def _graph_nodes(path: Path):
    import onnx  # optional: only the ONNX rows need it

    return onnx.load(str(path), load_external_data=False).graph.node


class _PowerSums:
    """Per tensor, running sums of signal and noise power over images: [sum signal^2, sum noise^2]."""

    def __init__(self):
        self.own: dict[str, list[float]] = {}
        self.acc: dict[str, list[float]] = {}

    @staticmethod
    def _add(into: dict[str, list[float]], key: str, signal: np.ndarray, noise: np.ndarray) -> None:
        s = into.setdefault(key, [0.0, 0.0])
        s[0] += float(np.sum(np.square(signal, dtype=np.float64)))
        s[1] += float(np.sum(np.square(noise, dtype=np.float64)))

    def add(self, matching: dict[str, dict[str, list[np.ndarray]]], relu: set[str]) -> None:
        for out, m in matching.items():
            pre = np.concatenate(m["pre_qdq"]).astype(np.float32)
            post = np.concatenate(m["post_qdq"]).astype(np.float32)
            if out in relu:
                # The QDQ quantizer drops a Relu whose output range the QuantizeLinear already clips to (the
                # tensor keeps the Relu's name): compare what the Relu would give with what the QDQ pair gives.
                pre = np.maximum(pre, 0)
            self._add(self.own, out, pre, pre - post)
            if "float" in m:
                ref = np.concatenate(m["float"]).astype(np.float32)
                self._add(self.acc, out, ref, ref - post)

    @staticmethod
    def sqnr(sums: list[float]) -> float:
        """sqnr_db from power sums: the same as on the concatenated tensors (the means' counts cancel)."""
        return _power_ratio_db(*sums)


def onnx_layer_errors(float_path: Path, qdq_path: Path, calib: np.ndarray, work: Path,
                      input_name: str = "image") -> dict[str, Any]:
    """Per-tensor error of a QDQ model against its float model on `calib` (onnxruntime's qdq_loss_debug)."""
    from onnxruntime.quantization.qdq_loss_debug import (  # optional runtime: imported only when this runs
        collect_activations,
        compute_weight_error,
        create_activation_matching,
        create_weight_matching,
        modify_model_output_intermediate_tensors,
    )

    work = Path(work)
    aug_float, aug_qdq = work / "float.debug.onnx", work / "qdq.debug.onnx"
    modify_model_output_intermediate_tensors(str(float_path), str(aug_float))
    modify_model_output_intermediate_tensors(str(qdq_path), str(aug_qdq))
    # Streamed a few images at a time: only sums of squares are kept per tensor, so memory does not grow with
    # the number of images (kept whole, InceptionV3's for 32 images at 299x299 took gigabytes).
    power = _PowerSums()
    nodes = _graph_nodes(float_path)  # topologically sorted: graph order
    relu = {o for n in nodes if n.op_type == "Relu" for o in n.output}
    for lo in range(0, len(calib), LAYER_CHUNK):
        feeds = [{input_name: calib[i: i + 1].astype(np.float32)} for i in range(lo, min(lo + LAYER_CHUNK, len(calib)))]
        matching = create_activation_matching(collect_activations(str(aug_qdq), feeds),
                                              collect_activations(str(aug_float), feeds))
        power.add(matching, relu)
    w_err = compute_weight_error(create_weight_matching(str(float_path), str(qdq_path)))
    layers = []
    for node in nodes:
        for out in node.output:
            if out not in power.own:
                continue
            own = power.sqnr(power.own[out])
            acc = power.sqnr(power.acc[out]) if out in power.acc else None
            weights = [w_err[i] for i in node.input if i in w_err]
            # A weight's own SQNR says how much of the layer's output it spoils only where it multiplies the
            # input (conv, matmul); a small constant added by an Add (a folded BN offset) may round badly and
            # still not matter beside the signal it is added to, which `activation_sqnr_db` already measures.
            counted = weights if node.op_type in WEIGHTED_OPS else []
            local = [v for v in (own, *counted) if v is not None and not math.isnan(v)]
            layers.append({
                "index": len(layers), "op": node.op_type, "tensor": out,
                # tf2onnx names a fused conv's output after the node ("Conv__74:0"); its weight keeps the layer.
                "layer": short_name(out if "/" in out or len(node.input) < 2 else node.input[1]),
                "node": node.name,
                "sqnr_db": _finite(min(local)) if local else None,
                "activation_sqnr_db": _finite(own),
                "weight_sqnr_db": _finite(min(weights)) if weights else None,
                "accumulated_sqnr_db": _finite(acc) if acc is not None else None,
            })
    return summarize(layers, "onnxruntime.quantization.qdq_loss_debug", len(calib))


# ---------------------------------------------------------------- plot and text


def plot_png(report: dict[str, Any], title: str) -> bytes:
    """A bar per layer in graph order (sqnr_db; lower is worse), the worst in red and labelled."""
    import matplotlib  # optional: plots only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: plots only

    layers = report["layers"]
    x = np.arange(len(layers))
    y = np.array([r["sqnr_db"] if r["sqnr_db"] is not None else np.nan for r in layers], float)
    worst = {w["index"] for w in report["worst"]}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(layers) + 2), 4.2), dpi=110)
    ax.bar(x, y, color=["#d62728" if r["index"] in worst else "#4c72b0" for r in layers])
    acc = [r.get("accumulated_sqnr_db") for r in layers]
    if any(v is not None for v in acc):
        ax.plot(x, [np.nan if v is None else v for v in acc], "k.-", lw=1, ms=3, label="accumulated (vs float model)")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{r['layer']} ({r['op']})" for r in layers], rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("SQNR (dB), lower is worse")
    names = ", ".join(f"{w['layer']} {w['sqnr_db']:.1f} dB" for w in report["worst"])
    ax.set_title(f"{title}: per-layer int8 error on {report['images']} calibration images\nworst: {names}",
                 fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def format_table(report: dict[str, Any], limit: int | None = None) -> str:
    """The table as text, graph order, worst marked with "<< worst N"."""
    extra = [k for k in ("rmse_over_scale", "activation_sqnr_db", "weight_sqnr_db", "accumulated_sqnr_db")
             if any(k in r for r in report["layers"])]
    head = ["#", "layer", "op", "sqnr_db", *extra, ""]
    rows = []
    for r in report["layers"]:
        mark = f"<< worst {r['worst_rank']}" if r.get("worst_rank") else ""
        rows.append([str(r["index"]), r["layer"], r["op"], _cell(r["sqnr_db"]), *[_cell(r.get(k)) for k in extra],
                     mark])
    if limit is not None:
        rows = [r for r in rows if r[-1]][:limit]
    widths = [max(len(c) for c in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), *map(line, rows)])


def _cell(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def worst_summary(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The short list embedded in the artifact's metadata (`quantization.worst_layers`)."""
    return [{"layer": w["layer"], "op": w["op"], "sqnr_db": w["sqnr_db"]} for w in report["worst"]]


def layer_png_name(model: str, fmt_name: str) -> str:
    return f"{model}_{fmt_name}_layers.png"


def describe(report: dict[str, Any] | None) -> Sequence[str]:
    """One line per worst layer, for logs."""
    if not report or "worst" not in report:
        return []
    return [f"worst layer {i + 1}: {w['layer']} ({w['op']}) {w['sqnr_db']} dB" for i, w in enumerate(report["worst"])]
