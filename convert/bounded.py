"""Accuracy-bounded int8 (`--max-drop PP`, tflite-int8 and onnx-int8/ort-int8): search calibrations, int16
activations and layers kept in float until the accuracy drop holds.

    python -m convert runs/malaria-edge --out export --formats tflite-int8,onnx-int8 --max-drop 0.3

Every candidate is written, given its metadata and measured through
`edge_runtime` exactly as a device runs it (accuracy on the proof split against
Keras', batch-1 latency on one thread, size). The ladder, one step at a time:

1. **calibration**: step 0 is the ordinary int8 artifact; then the other
   calibrations: onnx-int8 ONNX Runtime's other `CalibrationMethod`s
   (MinMax, Percentile, Entropy; `--calib-method` first), tflite-int8 (whose
   converter only does MinMax) MinMax on a third and a tenth of the
   calibration images. The first within the bound ends the search; otherwise
   the calibration with the lowest drop is kept for the next steps.
2. **int16 activations** for the whole model (int8 weights): TFLite's 16x8
   mode (`EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8`; LiteRT
   runs it with reference kernels, slowly), ONNX Runtime `QInt16` activations
   (QDQ at opset 21). A candidate the device's runtime cannot load or run is
   recorded as skipped with its error, never counted.
3. **float fallback**: the next worst layer of the per-layer report
   (`convert.layer_errors`, lowest SQNR first) is kept in float, one more per
   step, up to `MAX_STEPS`: TFLite selective quantization
   (`QuantizationDebugOptions.denylisted_nodes`), ORT `nodes_to_exclude` (a
   Relu with the node feeding it: QDQ quantizes the pair's output as one).

The artifact is the fastest measured step within the bound (int16 and the
first float step within it compete: int16 is often slower than a few float
layers). Every step goes to the row's `max_drop` record in conversion.json;
none within the bound: the row fails and says the best it reached.

The proof split both chooses and measures here, so the final drop is
slightly optimistic; a bound with a margin, or a separate split, is safer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np

import edge_runtime
from convert import verify
from convert.converters import (
    CALIBRATION_METHODS,
    convert_keras,
    int8_config,
    keras_converter,
    quantize_qdq,
    representative,
)
from convert.embedding import embed
from convert.formats import Format
from convert.job import ExportJob
from convert.timing import time_fn

MAX_STEPS = 8  # float-fallback steps
MIN_CALIB = 10  # smallest calibration subset tried (tflite-int8)
CALIB_FRACTIONS = (3, 10)  # tflite-int8 also calibrates on len // 3 and len // 10 images


class Skip(Exception):
    """A candidate that cannot be made or run here (recorded as skipped, with this reason)."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One step of the ladder: how it was calibrated, its activation type, the report rows kept in float."""

    stage: str  # "calibration", "int16" or "float-fallback"
    calibration: str
    activations: str = "int8"
    floats: tuple[dict[str, Any], ...] = ()


# ---------------------------------------------------------------- the two quantizers


class TfliteLadder:
    """tflite-int8 candidates from the TFLite converter (the report's rows name tensors)."""

    ext = ".tflite"
    eight_bit = "int8"  # the activation type of the 8-bit steps

    def __init__(self, job: ExportJob, first: bytes):
        self.job, self.first = job, first
        self.calib = job.calibration().x
        n = len(self.calib)
        sizes = [n, *sorted({n // k for k in CALIB_FRACTIONS if n // k >= MIN_CALIB and n // k < n}, reverse=True)]
        self.sizes = {f"minmax, {s} images": s for s in sizes}
        self.calibrations = list(self.sizes)
        self.debuggers: dict[int, Any] = {}

    @staticmethod
    def key(row: dict[str, Any]) -> list[str]:
        return [row["tensor"]]

    def make(self, c: Candidate, dest: Path) -> dict[str, Any]:
        import tensorflow as tf  # heavy: only when a candidate is made

        n = self.sizes[c.calibration]
        x, io8 = self.calib[:n], self.job.options.int8_io
        if c.activations == "int16":
            if io8:
                raise Skip("--int8-io: a 16x8 model takes int16 input, not int8")

            def cfg(conv):
                conv.optimizations = [tf.lite.Optimize.DEFAULT]
                conv.representative_dataset = representative(x)
                conv.target_spec.supported_ops = [
                    tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]

            dest.write_bytes(convert_keras(self.job.model, cfg, self.job.saved_model()))
            return {"calibration_images": n,
                    "mode": "16x8 (EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8)"}
        if c.floats:
            options = tf.lite.experimental.QuantizationDebugOptions(
                denylisted_nodes=[t for r in c.floats for t in self.key(r)], fully_quantize=io8)
            with contextlib.redirect_stdout(io.StringIO()):  # Keras' export lists every variable
                if n not in self.debuggers:  # calibrates once per size; each step re-quantizes the calibrated model
                    conv = keras_converter(self.job.model, self.job.saved_model())
                    int8_config(x, io8)(conv)
                    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                                                      tf.lite.OpsSet.TFLITE_BUILTINS]  # float ops allowed now
                    self.debuggers[n] = tf.lite.experimental.QuantizationDebugger(
                        converter=conv, debug_dataset=representative(x[:1]), debug_options=options)
                else:
                    self.debuggers[n].options = options
                dest.write_bytes(self.debuggers[n].get_nondebug_quantized_model())
            return {"calibration_images": n}
        dest.write_bytes(self.first if n == len(self.calib)
                         else convert_keras(self.job.model, int8_config(x, io8), self.job.saved_model()))
        return {"calibration_images": n}


class OnnxLadder:
    """onnx-int8 candidates from onnxruntime's quantize_static (the report's rows name nodes of `prep`)."""

    ext = ".onnx"

    def __init__(self, job: ExportJob | None, prep: Path, first: Path, activations: str, method: str):
        import onnx  # optional: only the ONNX rows need it

        self.job, self.prep, self.first, self.activations, self.method = job, prep, first, activations, method
        self.eight_bit = activations  # uint8 or int8, as `--onnx-activations` chose
        self.calibrations = [method, *(m for m in CALIBRATION_METHODS if m != method)]
        graph = onnx.load(str(prep), load_external_data=False).graph
        self.producer = {o: n.name for n in graph.node for o in n.output}
        self.inputs = {n.name: list(n.input) for n in graph.node}

    def key(self, row: dict[str, Any]) -> list[str]:
        names = [row["node"]]
        if row["op"] in ("Relu", "Clip"):  # QDQ quantizes conv+relu's output once: keep both in float
            feeder = self.producer.get((self.inputs.get(row["node"]) or [""])[0])
            names = ([feeder] if feeder else []) + names
        return names

    def make(self, c: Candidate, dest: Path) -> dict[str, Any]:
        if c.calibration == self.method and c.activations == "int8" and not c.floats:
            shutil.copyfile(self.first, dest)
            return {}
        act = "int16" if c.activations == "int16" else self.activations
        exclude = [n for r in c.floats for n in self.key(r)]
        quantize_qdq(self.prep, dest, self.job.calibration().x, act, c.calibration, exclude)
        return {"activation_type": act} if c.activations == "int16" else {}


Ladder = TfliteLadder | OnnxLadder


# ---------------------------------------------------------------- the search


def _measure(job: ExportJob, fmt: Format, ladder: Ladder, c: Candidate, step: int) -> dict[str, Any]:
    """Make candidate `c` and measure it through edge_runtime: accuracy, drop, agreement, latency, size."""
    raw = job.workdir / f"bounded_{fmt.name}_step{step}.raw{ladder.ext}"  # what the row gets, as made
    made = ladder.make(c, raw)
    path = job.workdir / f"bounded_{fmt.name}_step{step}{ladder.ext}"
    shutil.copyfile(raw, path)
    embed(fmt, path, job.metadata(fmt, path, {}))  # edge_runtime needs the contract
    try:
        model = edge_runtime.load(path, backend=fmt.runtime, threads=1, warmup=False)
        probs = model.run(job.proof.x)
    except Exception as e:
        if c.activations != "int16":
            raise
        raise Skip(f"{fmt.runtime} cannot run it: "
                   f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    cmp = verify.compare(job.keras_probs, probs, job.proof.y)
    x1 = job.proof.x[:1]
    # 30 runs, or 5 s for a slow candidate (LiteRT's 16x8 reference kernels).
    stats = time_fn(lambda: model.run(x1), warmup=3, min_runs=30, max_runs=30, min_seconds=0.0, max_seconds=5.0)
    drop = round(-100 * cmp["accuracy_delta"], 6) + 0.0  # rounded as `criterion` does; + 0.0: no -0.0
    return {**made, "path": raw, "accuracy": cmp["accuracy"], "drop_pp": drop,
            "top1_agreement": cmp["top1_agreement"], "latency_ms_batch1_1thread": round(stats["p50_ms"], 3),
            "latency_runs": stats["runs"], "size_bytes": raw.stat().st_size}


def bounded_search(job: ExportJob, fmt: Format, ladder: Ladder, report: dict[str, Any],
                   names: tuple[str, ...] = ()) -> tuple[Path, dict]:
    """(the chosen candidate's file, the `max_drop` record) for `--max-drop`; raises ValueError when no step holds.

    Args:
        fmt: the row measured (its metadata and runtime).
        ladder: `TfliteLadder` or `OnnxLadder`.
        report: the step-0 model's per-layer report (`convert.layer_errors`), which orders the float fallback.
        names: other rows that share the result (ort-int8 with onnx-int8): the record is theirs too.
    """
    bound = float(job.options.max_drop)
    if job.proof.y is None or not (np.asarray(job.proof.y) >= 0).any():
        raise ValueError("--max-drop needs labelled proof images (a manifest or class folders) to measure accuracy")
    if "layers" not in report:
        raise ValueError("--max-drop needs the per-layer report to order the layers; "
                         f"it has none ({report.get('error', '--layer-report-n is 0')})")
    order = sorted((r for r in report["layers"] if r.get("sqnr_db") is not None), key=lambda r: r["sqnr_db"])
    record: dict[str, Any] = {
        "bound_pp": bound, "measured_on": job.proof.origin, "images": len(job.proof),
        "keras_accuracy": _keras_accuracy(job), "calibrations": list(ladder.calibrations),
        "choice": "the fastest step within the bound (batch-1 latency, 1 thread)", "steps": [], "chosen_step": None}
    for name in (fmt.name, *names):
        job.max_drop[name] = record
    paths: dict[int, Path] = {}

    def run(c: Candidate) -> dict[str, Any]:
        step = len(record["steps"])
        entry: dict[str, Any] = {"step": step, "stage": c.stage, "calibration": c.calibration,
                                 "activations": "int16" if c.activations == "int16" else ladder.eight_bit,
                                 "float_layers": [f"{r['layer']} ({r['op']})" for r in c.floats],
                                 "float_nodes": [n for r in c.floats for n in ladder.key(r)]}
        try:
            m = _measure(job, fmt, ladder, c, step)
        except Skip as e:
            entry["skipped"] = str(e)
            job.log(f"  --max-drop step {step} ({c.stage}, {c.calibration}, {entry['activations']}): skipped: {e}")
        else:
            paths[step] = m.pop("path")
            entry.update(m, within_bound=m["drop_pp"] <= bound)
            job.log(f"  --max-drop step {step} ({c.stage}, {c.calibration}, {entry['activations']}, "
                    f"{len(c.floats)} layer(s) in float): drop {m['drop_pp']:.2f} pp, "
                    f"{m['latency_ms_batch1_1thread']:.2f} ms, {m['size_bytes'] / 1e3:.0f} KB")
        record["steps"].append(entry)
        return entry

    def measured(stage: str | None = None) -> list[dict[str, Any]]:
        return [s for s in record["steps"] if "skipped" not in s and stage in (None, s["stage"])]

    for cal in ladder.calibrations:
        if run(Candidate("calibration", cal)).get("within_bound"):
            break
    else:
        best = min(measured("calibration"), key=lambda s: s["drop_pp"])["calibration"]  # first of equals
        run(Candidate("int16", best, "int16"))
        for k in range(1, min(MAX_STEPS, len(order)) + 1):
            if run(Candidate("float-fallback", best, floats=tuple(order[:k]))).get("within_bound"):
                break
    within = [s for s in measured() if s["within_bound"]]
    if not within:
        best = min(measured(), key=lambda s: s["drop_pp"])
        raise ValueError(
            f"--max-drop {bound:g} pp: no mix met it in {len(record['steps'])} step(s); the best was step "
            f"{best['step']} ({best['calibration']}, {best['activations']} activations, "
            f"{len(best['float_layers'])} layer(s) in float) at a drop of {best['drop_pp']:.2f} pp; "
            "see the row's max_drop steps in conversion.json (try QAT or a looser bound)")
    chosen = min(within, key=lambda s: (s["latency_ms_batch1_1thread"], s["step"]))
    record["chosen_step"] = chosen["step"]
    job.log(f"  --max-drop: chose step {chosen['step']} ({chosen['stage']}): drop {chosen['drop_pp']:.2f} pp "
            f"<= {bound:g}, {chosen['latency_ms_batch1_1thread']:.2f} ms")
    return paths[chosen["step"]], record


def apply_choice(info: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """The row's `quantization` metadata `info` updated with what `--max-drop` chose (returns `info`)."""
    chosen = record["steps"][record["chosen_step"]]
    info["max_drop"] = {"bound_pp": record["bound_pp"], "drop_pp": chosen["drop_pp"], "stage": chosen["stage"],
                        "calibration": chosen["calibration"], "activations": chosen["activations"],
                        "float_layers": chosen["float_layers"], "steps": len(record["steps"])}
    if chosen["activations"] == "int16":
        info["activations"] = "int16 (--max-drop)"
    elif chosen["float_layers"]:
        info["activations"] = (f"{info['activations']}, "
                               f"{len(chosen['float_layers'])} layer(s) kept in float (--max-drop)")
    if chosen["step"] > 0:
        info["calibration"] = chosen["calibration"]
        info["calibration_images"] = chosen.get("calibration_images", info.get("calibration_images"))
    return info


def _keras_accuracy(job: ExportJob) -> float | None:
    y = np.asarray(job.proof.y)
    known = y >= 0
    return float((job.keras_probs.argmax(1)[known] == y[known]).mean()) if known.any() else None
