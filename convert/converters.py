"""The converter primitives every exporter shares: Keras -> .tflite, Keras -> ONNX, ONNX -> QDQ int8.

The exporters (`convert.tflite`, `convert.onnx_export`, `convert.qat`), the
`--max-drop` search (`convert.bounded`) and the per-layer report
(`convert.layer_errors`) all call these, so they live below all of them
(no module here imports another of convert's). TensorFlow, tf2onnx and
onnxruntime are imported inside the functions: reading the format table or a
report must not load them.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.spec import CONTENT_HASH_KEY, METADATA_KEY

OPSET = 17
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


# ---------------------------------------------------------------- TFLite (LiteRT)


def representative(x: np.ndarray) -> Callable[[], Iterator[list[np.ndarray]]]:
    """The converter's representative dataset: one real image at a time."""

    def gen():
        for i in range(len(x)):
            yield [x[i: i + 1].astype(np.float32)]

    return gen


def export_saved_model(model, dest: Path) -> Path | None:
    """Write a Keras 3 functional (or sequential) model as the SavedModel `TFLiteConverter.from_keras_model` would.

    What that converter does first, on every call: an `ExportArchive` with one endpoint, the model's call with
    `training=False`, its input signature from the model's inputs. Written once, every TFLite variant of the
    model converts from it (`keras_converter(model, saved_model)`) instead of exporting it again each time (for
    the fused InceptionV3 about half of each variant's conversion time).

    Returns None for other models (tf-keras, subclassed): those convert with `from_keras_model` each time.
    """
    import functools

    import keras  # TensorFlow: imported only when this runs
    import tensorflow as tf  # TensorFlow: imported only when this runs

    if not isinstance(model, (keras.src.models.Functional, keras.src.models.Sequential)):
        return None
    archive = keras.export.ExportArchive()
    archive.track(model)
    signature = [tf.TensorSpec(x.shape, dtype=x.dtype, name=x.name) for x in model.inputs]
    if len(signature) > 1:  # as the converter does: several inputs are one structured argument
        signature = [signature]
    archive.add_endpoint("serve", functools.partial(model.__call__, training=False), signature)
    with contextlib.redirect_stdout(io.StringIO()):  # Keras lists every captured variable
        archive.write_out(str(dest), verbose=False)
    return Path(dest)


def keras_converter(model, saved_model: Path | None = None):
    """`tf.lite.TFLiteConverter.from_keras_model(model)`, starting from `saved_model` when one is given.

    The converter is still the Keras one, so the file records a Keras source and is the same bytes as without
    `saved_model` (tested); only its first step, writing the model out as a SavedModel into a temporary folder,
    is replaced by reading the one `export_saved_model` wrote. That step is a private method of LiteRT's
    converter (`_convert_keras_to_saved_model`); its second half, reproduced here, uses the converter's own
    module's names.
    """
    import tensorflow as tf  # TensorFlow: imported only when this runs

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if saved_model is None:
        return conv
    from tensorflow.lite.python import lite  # the converter's module, for the names its own method uses

    private = ("_tag_constants", "_signature_constants", "_load")
    if not (hasattr(conv, "_convert_keras_to_saved_model") and all(hasattr(lite, n) for n in private)):
        return conv  # another LiteRT whose converter is built otherwise: it exports the model itself, as before

    def from_written(output_dir):  # the converter's temporary folder: left empty
        conv.saved_model_dir = str(saved_model)
        conv._saved_model_tags = {lite._tag_constants.SERVING}
        conv._saved_model_exported_names = [lite._signature_constants.DEFAULT_SERVING_SIGNATURE_DEF_KEY]
        conv._parse_saved_model_args(always_enable_saved_model_import=conv.experimental_lower_to_saved_model)
        if not conv.saved_model_dir:
            return None, None, None
        graph_def, inputs, outputs = conv._load_saved_model(conv.saved_model_dir, conv._saved_model_tags)
        conv._trackable_obj = lite._load(conv.saved_model_dir, conv._saved_model_tags)
        return graph_def, inputs, outputs

    conv._convert_keras_to_saved_model = from_written
    return conv


def convert_keras(model, configure: Callable[[Any], None] | None = None, saved_model: Path | None = None) -> bytes:
    """Run `tf.lite.TFLiteConverter` on a Keras model, with `configure(converter)` applied first.

    `saved_model`: the model already written by `export_saved_model`; the converter starts from it
    (`keras_converter`), and the file is the same.

    Raises:
        ValueError: the converter refused the model; its message names the ops.
    """
    conv = keras_converter(model, saved_model)
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


def int8_config(calib: np.ndarray, int8_io: bool) -> Callable[[Any], None]:
    """Converter settings for full integer quantization calibrated on `calib`.

    Used by `tflite-int8` on the Keras 3 model and by the QAT child
    (`convert.qat.child`) on the fine-tuned tf-keras model: both go through
    `tf.lite.TFLiteConverter.from_keras_model`, so the settings are the same.
    """
    import tensorflow as tf  # TensorFlow: imported only when this runs

    def cfg(c):
        c.optimizations = [tf.lite.Optimize.DEFAULT]
        c.representative_dataset = representative(calib)
        # Fail rather than silently leave float ops in an "int8" model.
        c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io:
            c.inference_input_type = tf.int8
            c.inference_output_type = tf.int8

    return cfg



# ---------------------------------------------------------------- ONNX


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Environment variables set for the body, restored after."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def keras_to_onnx(model, input_shape: tuple[int, ...], opset: int = OPSET):
    """A Keras model as an ONNX ModelProto with input "image" (batch, *input_shape) and a named batch dim."""
    import tensorflow as tf  # TensorFlow: imported only when this runs
    import tf2onnx  # optional: only the ONNX rows need it

    spec = (tf.TensorSpec((None, *input_shape), tf.float32, name="image"),)
    # tf2onnx names the ops it inserts from a process-wide counter: start it afresh, so a model converts to the
    # same bytes whatever this process converted before (a release is rebuilt byte for byte; tests/test_release.py).
    # Its rewriters take a name from it when first imported: imported before the counter is set.
    import tf2onnx.tfonnx  # optional: only the ONNX rows need it

    tf2onnx.utils.INTERNAL_NAME = 1
    try:
        try:
            # tf2onnx deep-copies the whole graph (weights included) before each optimizer pass, so that a failing
            # pass can be skipped; the copies are cyclic garbage Python's collector rarely reaches in time. The
            # fused InceptionV3 (88 MB of weights) then peaked at 7.4 GB; without the copies 4.2 GB, the same file
            # (measured; on other models the names tf2onnx makes up for folded constants may come out in another
            # order). So: no copies first; only if a pass fails, tf2onnx's own way again (skipping the pass).
            with _env(TF2ONNX_CATCH_ERRORS=os.environ.get("TF2ONNX_CATCH_ERRORS", "FALSE")):  # a user's own wins
                proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)
        except Exception:
            if "TF2ONNX_CATCH_ERRORS" in os.environ:
                raise
            gc.collect()
            tf2onnx.utils.INTERNAL_NAME = 1  # the failed attempt advanced the counter: the retry starts afresh too
            proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)
    except Exception as e:  # tf2onnx raises plain exceptions naming the unsupported op
        raise ValueError(f"tf2onnx could not convert the model: {str(e).splitlines()[0]}") from e
    finally:
        gc.collect()  # tf2onnx's graphs are cycles: freed now, not at some later collection
    for v in (*proto.graph.input, *proto.graph.output):
        dims = v.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"
    proto.producer_name = "medge"
    canonical_constants(proto)
    return proto


_GENERATED = re.compile(r"__\d+$")  # what tf2onnx's counter appends to the names it makes


def canonical_constants(proto) -> None:
    """Name the constants tf2onnx made by their content and sort them, in place.

    Its optimizers fold and merge constants in the order of sets of Python
    objects, so which counter number (or which of two equal constants) a
    folded weight gets, and the initializers' order, change from run to run
    while the graph stays the same. Named `const__<sha256 of dtype, shape and
    bytes>` (a second constant of the same content gets `_2`, in the order the
    nodes use them) and sorted, they are the same in every run: a release is
    rebuilt byte for byte. Initializers named after Keras layers keep their names.
    """
    import hashlib

    from onnx import numpy_helper  # optional: only the ONNX rows need it

    g = proto.graph
    uses = {}
    for node in g.node:
        for i, name in enumerate(node.input):
            uses.setdefault(name, (len(uses), i))
    rename, taken = {}, set()
    for init in sorted((i for i in g.initializer if _GENERATED.search(i.name)),
                       key=lambda i: uses.get(i.name, (len(uses), 0))):
        a = numpy_helper.to_array(init)
        h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).hexdigest()[:16]
        name, n = f"const__{h}", 1
        while name in taken:
            n += 1
            name = f"const__{h}_{n}"
        taken.add(name)
        rename[init.name] = name
    for init in g.initializer:
        init.name = rename.get(init.name, init.name)
    for node in g.node:
        node.input[:] = [rename.get(x, x) for x in node.input]
    for v in (*g.output, *g.value_info):
        v.name = rename.get(v.name, v.name)
    ordered = sorted(g.initializer, key=lambda i: i.name)
    copies = [type(i)() for i in ordered]
    for c, i in zip(copies, ordered):
        c.CopyFrom(i)
    del g.initializer[:]
    g.initializer.extend(copies)


def set_metadata(proto, text: str, extra: Mapping[str, str] | None = None) -> None:
    """Put the medge JSON in `metadata_props` (replacing an older entry), plus `extra` key/values
    (e.g. the golden set). An old content hash record goes (an edit voids it) unless `extra` writes one."""
    new = {METADATA_KEY: text, **dict(extra or {})}
    keep = [(p.key, p.value) for p in proto.metadata_props if p.key not in new and p.key != CONTENT_HASH_KEY]
    del proto.metadata_props[:]
    for k, v in keep + list(new.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v


class CalibrationReader:
    """onnxruntime CalibrationDataReader over preprocessed images, one per call."""

    def __init__(self, x: np.ndarray, name: str):
        self.x, self.name, self.i = x, name, 0

    def get_next(self):
        if self.i >= len(self.x):
            return None
        self.i += 1
        return {self.name: self.x[self.i - 1: self.i].astype(np.float32)}

    def rewind(self):
        self.i = 0


def quantize_qdq(src: Path, dest: Path, calib: np.ndarray, activations: str, method: str,
                 exclude: Sequence[str] = (), cache: Path | None = None) -> None:
    """QDQ, int8 per-channel weights; `activations` uint8, int8 or int16 (QDQ at opset 21); `exclude`: nodes left
    in float (`--max-drop`).

    With uint8 activations the weights are quantized to 7 bits (`reduce_range`): ONNX Runtime runs u8 x s8 with
    VPMADDUBSW on x86 CPUs without VNNI, whose 16-bit pair sums saturate with full-range weights. Measured on an
    AVX2 machine (no VNNI), a tiny malaria model's uint8 file moved probabilities by up to 0.23 from the same QDQ
    graph run in float (13 of 200 cells flipped); with 7-bit weights 0.008 (0 flipped), as with int8 activations.
    A file whose answers depend on the CPU it lands on would fail its own golden set elsewhere.

    `cache`: onnxruntime's calibration cache (the tensor ranges, JSON): written by the first call, read by the
    next one with the same model, calibration images, method and `exclude` instead of running the calibration
    again (the ranges do not depend on the activation type). The caller keys it by those.
    """
    # optional runtime: imported only when this runs
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8, "int16": QuantType.QInt16}
    with contextlib.redirect_stdout(io.StringIO()):  # Entropy and Percentile print progress; stdout is the report's
        quantize_static(
            str(src), str(dest), CalibrationReader(calib, "image"),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=types[activations],
            weight_type=QuantType.QInt8,
            reduce_range=activations == "uint8",
            calibrate_method=methods[method],
            nodes_to_exclude=list(exclude) or None,
            **({"calibration_cache_path": str(cache)} if cache is not None else {}),
        )


