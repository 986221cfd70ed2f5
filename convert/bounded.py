"""Accuracy-bounded int8 (`--max-drop PP`, tflite-int8): keep the most sensitive layers in float until the drop holds.

    python -m convert runs/malaria-edge --out export --formats tflite-int8 --max-drop 0.3

Step 0 is the ordinary full-int8 artifact. While its accuracy on the proof
split, measured through `edge_runtime` exactly as a device runs it, is more
than PP percentage points below Keras', the next layer of the per-layer
report (`convert.layer_errors`, lowest SQNR first) is kept in float
(TFLite's selective quantization: `QuantizationDebugOptions.denylisted_nodes`,
model from `QuantizationDebugger.get_nondebug_quantized_model`), and the
model is measured again. Every step (layers in float, accuracy, drop,
agreement with Keras, batch-1 latency, size) goes to the row's `max_drop`
record in conversion.json; the first step within the bound is the artifact.
None within `MAX_STEPS`: the row fails and says the best it reached.

The proof split both chooses and measures here, so the final drop is
slightly optimistic; a bound with a margin, or a separate split, is safer.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np

MAX_STEPS = 8


def _measure(job, fmt, data: bytes, work: Path, step: int) -> dict[str, Any]:
    """Accuracy, drop, agreement, latency and size of candidate `data`, run through edge_runtime."""
    import edge_runtime
    from convert import verify
    from edge_runtime.metadata import embed_tflite
    from edge_runtime.timing import time_fn

    path = work / f"bounded_step{step}.tflite"
    path.write_bytes(data)
    path.write_bytes(embed_tflite(data, job.metadata(fmt, path, {})))  # edge_runtime needs the contract
    model = edge_runtime.load(path, backend=fmt.runtime, threads=1, warmup=False)
    probs = model.run(job.proof.x)
    cmp = verify.compare(job.keras_probs, probs, job.proof.y)
    x1 = job.proof.x[:1]
    stats = time_fn(lambda: model.run(x1), warmup=5, min_runs=30, max_runs=30, min_seconds=0.0,
                    max_seconds=float("inf"))
    return {"accuracy": cmp["accuracy"], "drop_pp": round(-100 * cmp["accuracy_delta"], 3),
            "top1_agreement": cmp["top1_agreement"], "latency_ms_batch1_1thread": round(stats["p50_ms"], 3),
            "size_bytes": len(data)}


def bounded_int8(job, fmt, first: bytes, report: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """(the chosen model's bytes, the `max_drop` record) for `--max-drop`; raises ValueError when no step holds.

    Args:
        first: the full-int8 model (step 0).
        report: its per-layer report (`convert.layer_errors.tflite_layer_errors`).
    """
    import tensorflow as tf

    from convert.tflite import int8_config, representative

    bound = float(job.options.max_drop)
    if job.proof.y is None or not (np.asarray(job.proof.y) >= 0).any():
        raise ValueError("--max-drop needs labelled proof images (a manifest or class folders) to measure accuracy")
    order = [r for r in sorted((r for r in report.get("layers", []) if r.get("sqnr_db") is not None),
                               key=lambda r: r["sqnr_db"])]
    work = job.workdir
    record: dict[str, Any] = {"bound_pp": bound, "measured_on": job.proof.origin, "images": len(job.proof),
                              "keras_accuracy": None, "steps": [], "chosen_step": None}
    job.cache[("max_drop", fmt.name)] = record
    debugger = None
    data = first
    for step in range(min(MAX_STEPS, len(order)) + 1):
        floats = order[:step]
        if step > 0:
            options = tf.lite.experimental.QuantizationDebugOptions(
                denylisted_nodes=[r["tensor"] for r in floats], fully_quantize=job.options.int8_io)
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                if debugger is None:  # calibrates once; each step re-quantizes the calibrated model
                    conv = tf.lite.TFLiteConverter.from_keras_model(job.model)
                    calib = job.calibration().x
                    int8_config(calib, job.options.int8_io)(conv)
                    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                                                      tf.lite.OpsSet.TFLITE_BUILTINS]  # float ops allowed now
                    debugger = tf.lite.experimental.QuantizationDebugger(
                        converter=conv, debug_dataset=representative(calib[:1]), debug_options=options)
                else:
                    debugger.options = options
                data = debugger.get_nondebug_quantized_model()
        m = _measure(job, fmt, data, work, step)
        record["keras_accuracy"] = record["keras_accuracy"] or _keras_accuracy(job)
        entry = {"step": step, "float_layers": [f"{r['layer']} ({r['op']})" for r in floats],
                 "float_tensors": [r["tensor"] for r in floats], **m}
        record["steps"].append(entry)
        job.log(f"  --max-drop step {step}: {len(floats)} layer(s) in float, drop {m['drop_pp']:.2f} pp, "
                f"{m['latency_ms_batch1_1thread']:.2f} ms, {m['size_bytes'] / 1e3:.0f} KB")
        if m["drop_pp"] <= bound:
            record["chosen_step"] = step
            return data, record
    best = min(record["steps"], key=lambda s: s["drop_pp"])
    raise ValueError(
        f"--max-drop {bound:g} pp: no mix met it in {len(record['steps'])} step(s); the best was step {best['step']} "
        f"({len(best['float_layers'])} layer(s) in float) at a drop of {best['drop_pp']:.2f} pp; "
        "see the row's max_drop steps in conversion.json (try onnx-int8, QAT or a looser bound)")


def _keras_accuracy(job) -> float | None:
    y = np.asarray(job.proof.y)
    known = y >= 0
    return float((job.keras_probs.argmax(1)[known] == y[known]).mean()) if known.any() else None
