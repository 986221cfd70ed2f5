"""TFLite (LiteRT) exporters: float32, float16, dynamic-range int8, full int8.

Each writes the raw flatbuffer to `dest` and returns what it did to the
numbers (the `quantization` field of the artifact metadata).
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from convert.layer_errors import tflite_layer_errors


def representative(x: np.ndarray) -> Callable[[], Iterator[list[np.ndarray]]]:
    """The converter's representative dataset: one real image at a time."""

    def gen():
        for i in range(len(x)):
            yield [x[i: i + 1].astype(np.float32)]

    return gen


def convert_keras(model, configure: Callable[[Any], None] | None = None) -> bytes:
    """Run `tf.lite.TFLiteConverter` on a Keras model, with `configure(converter)` applied first.

    Raises:
        ValueError: the converter refused the model; its message names the ops.
    """
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if configure is not None:
        configure(conv)
    # Keras 3's export path prints every captured variable; keep the terminal for results.
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            return conv.convert()
    except Exception as e:  # the converter raises ConverterError and friends
        msg = str(e)
        found = re.findall(r"'tf\.(\w+)' op is neither", msg)
        found += [o for group in re.findall(r"TF Select ops: ([\w, ]+)", msg) for o in group.split(",")]
        ops = sorted({o.strip() for o in found if o.strip()})
        if ops:
            raise ValueError(
                f"TFLite converter failed: TensorFlow op(s) {', '.join(ops)} are not in LiteRT's builtin op set, "
                "which medge targets (no TF Select/Flex kernels on devices); replace the layer that uses them"
            ) from e
        detail = msg.splitlines()[0] if msg else type(e).__name__
        raise ValueError(f"TFLite converter failed: {detail}") from e


def _write(dest: Path, data: bytes) -> None:
    Path(dest).write_bytes(data)


def export_float32(job, fmt, dest: Path) -> dict[str, Any]:
    _write(dest, convert_keras(job.model))
    return {}


def export_float16(job, fmt, dest: Path) -> dict[str, Any]:
    import tensorflow as tf

    def cfg(c):
        c.optimizations = [tf.lite.Optimize.DEFAULT]
        c.target_spec.supported_types = [tf.float16]

    _write(dest, convert_keras(job.model, cfg))
    return {"weights": "float16", "activations": "float32"}


def export_dynamic(job, fmt, dest: Path) -> dict[str, Any]:
    import tensorflow as tf

    def cfg(c):
        c.optimizations = [tf.lite.Optimize.DEFAULT]

    _write(dest, convert_keras(job.model, cfg))
    return {"weights": "int8 per-channel", "activations": "float32 (quantized on the fly by hybrid kernels)"}


def int8_config(calib: np.ndarray, int8_io: bool) -> Callable[[Any], None]:
    """Converter settings for full integer quantization calibrated on `calib`.

    Used by `tflite-int8` on the Keras 3 model and by the QAT child
    (`convert.qat.child`) on the fine-tuned tf-keras model: both go through
    `tf.lite.TFLiteConverter.from_keras_model`, so the settings are the same.
    """
    import tensorflow as tf

    def cfg(c):
        c.optimizations = [tf.lite.Optimize.DEFAULT]
        c.representative_dataset = representative(calib)
        # Fail rather than silently leave float ops in an "int8" model.
        c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io:
            c.inference_input_type = tf.int8
            c.inference_output_type = tf.int8

    return cfg


INT8_QUANTIZERS = ("converter", "litert-quantizer")
LITERT_QUANTIZER_INSTALL = "pip install 'ai-edge-quantizer>=0.10,<0.11'"


def signatures(model: bytes) -> dict[str, list[str]]:
    """Signature key -> its input names, read from the .tflite flatbuffer (no interpreter needed)."""
    from ai_edge_litert import schema_py_generated as schema

    m = schema.Model.GetRootAs(model, 0)
    out = {}
    for i in range(m.SignatureDefsLength()):
        sd = m.SignatureDefs(i)
        out[sd.SignatureKey().decode()] = [sd.Inputs(j).Name().decode() for j in range(sd.InputsLength())]
    return out


def litert_quantize_int8(float_model: bytes, calib: np.ndarray, work: Path) -> bytes:
    """Full int8 (int8 weights and activations, recipe static_wi8_ai8) with LiteRT Quantizer (ai-edge-quantizer).

    Its recipe also makes the model's input and output int8. Measured on the
    malaria edge model (1413 held-out cells): agreement with Keras 0.9965 vs
    0.9936 for the converter, mean |dprob| 0.0073 vs 0.0110, same size and speed.
    """
    try:
        from ai_edge_quantizer import quantizer, recipe
    except ImportError:
        raise ImportError(f"--int8-quantizer litert-quantizer needs ai-edge-quantizer: {LITERT_QUANTIZER_INSTALL}") from None
    src = Path(work) / "float32_for_quantizer.tflite"
    src.write_bytes(float_model)
    sigs = signatures(float_model)
    if len(sigs) != 1:
        raise ValueError(f"LiteRT Quantizer needs one signature, the float model has {sorted(sigs)}")
    key = next(iter(sigs))
    name = sigs[key][0]
    qt = quantizer.Quantizer(str(src))
    qt.load_quantization_recipe(recipe.static_wi8_ai8())
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):  # progress bars
        result = qt.calibrate({key: [{name: calib[i: i + 1].astype(np.float32)} for i in range(len(calib))]},
                              num_threads=2)
        out = qt.quantize(result, enable_progress_report=False)
    dest = Path(work) / "int8_litert_quantizer.tflite"
    out.export_model(str(dest), overwrite=True)
    return dest.read_bytes()


def export_int8(job, fmt, dest: Path) -> dict[str, Any]:
    calib = job.calibration()
    which = job.options.int8_quantizer
    if which not in INT8_QUANTIZERS:
        raise ValueError(f"--int8-quantizer {which!r} is not one of {INT8_QUANTIZERS}")
    if which == "litert-quantizer":
        if "float32_tflite" not in job.cache:
            job.cache["float32_tflite"] = convert_keras(job.model)
        _write(dest, litert_quantize_int8(job.cache["float32_tflite"], calib.x, job.workdir))
        name = "LiteRT Quantizer (ai-edge-quantizer, recipe static_wi8_ai8)"
        io_type = "int8"
    else:
        _write(dest, convert_keras(job.model, int8_config(calib.x, job.options.int8_io)))
        name = "tf.lite.TFLiteConverter (post-training, MinMax calibration)"
        io_type = "int8" if job.options.int8_io else "float32"
    info = {
        "weights": "int8 per-channel",
        "activations": "int8",
        "io": io_type,
        "quantizer": name,
        "calibration_images": len(calib),
        "calibration_from": calib.origin,
    }
    if which == "converter":
        info.update(job.layer_report(fmt.name, lambda x: tflite_layer_errors(job.model, x, job.options.int8_io)))
        if job.options.max_drop is not None:
            from convert.bounded import TfliteLadder, apply_choice, bounded_search

            report = job.cache.get(("layer_errors", fmt.name), {})
            chosen, record = bounded_search(job, fmt, TfliteLadder(job, Path(dest).read_bytes()), report)
            shutil.copyfile(chosen, dest)  # the measured bytes, without the metadata the row embeds
            apply_choice(info, record)
            if record["chosen_step"] > 0:
                info["quantizer"] += " + --max-drop search (calibration, 16x8, QuantizationDebugger denylisted_nodes)"
    elif job.options.max_drop is not None:
        raise ValueError("--max-drop on tflite-int8 needs --int8-quantizer converter")
    elif job.options.layer_report_n > 0:
        job.cache[("layer_errors", fmt.name)] = {"error": "the per-layer report needs --int8-quantizer converter"}
    return info
