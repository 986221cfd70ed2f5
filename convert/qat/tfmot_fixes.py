"""Every workaround medge needs in tensorflow-model-optimization (tfmot), and all its private-API use.

Child side only: importing this module imports TensorFlow and tfmot, so the
process must run with TF_USE_LEGACY_KERAS=1 (`convert.qat.child` checks). It
first checks the installed tfmot is the version these workarounds were
written against (pyproject pins the same range); the private paths below and
the transform list copied from tfmot may change in any other version.

Workarounds, each with its upstream issue:

- `quantize_model` drops tfmot's Concatenate transforms, which reorder a
  concat's inputs (tensorflow/model-optimization#1061, open);
- `BNOutputQuantizeConfig` / `standalone_bns`: tfmot has no quantize config
  for a BatchNormalization that does not follow a convolution and refuses the
  model (tensorflow/model-optimization#1099, open feature request; also #363);
- `init_ranges`: activation quantizers start at [-6, 6] by design, not a bug,
  so no upstream issue is filed; medge seeds them from calibration data;
- `keep_frozen`: `trainable = False` on a QuantizeWrapper leaves the wrapped
  kernel trainable (tensorflow/model-optimization#1067, open; also #881).
"""

from __future__ import annotations

import importlib.metadata as md
import inspect
import re
from typing import Any

import numpy as np

TFMOT = "tensorflow-model-optimization"
TFMOT_MIN, TFMOT_BELOW = (0, 8, 1), (0, 9)  # pyproject.toml: tensorflow-model-optimization>=0.8.1,<0.9
TFMOT_PIN = f">={'.'.join(map(str, TFMOT_MIN))},<{'.'.join(map(str, TFMOT_BELOW))}"


def check_tfmot_version(installed: str | None = None) -> str:
    """The installed tfmot version, if it is within the pin.

    Raises:
        RuntimeError: another version (the private modules and copied transform list below are tfmot 0.8's).
    """
    if installed is None:
        try:
            installed = md.version(TFMOT)
        except md.PackageNotFoundError:
            raise RuntimeError(f"tflite-qat-int8 needs {TFMOT}: pip install '{TFMOT}{TFMOT_PIN}'") from None
    release = tuple(int(x) for x in re.findall(r"\d+", installed.split("+")[0])[:3])
    if not TFMOT_MIN <= release < TFMOT_BELOW:
        raise RuntimeError(
            f"tflite-qat-int8 works around {TFMOT} {TFMOT_PIN} through its private modules "
            "(convert/qat/tfmot_fixes.py); "
            f"{installed} is installed: pip install '{TFMOT}{TFMOT_PIN}', or re-check the workarounds on {installed}"
        )
    return installed


check_tfmot_version()

import tensorflow as tf  # noqa: E402  (after the version check: the private paths below differ between versions)
import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras  # noqa: E402
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (  # noqa: E402
    default_8bit_quantize_layout_transform as _layout,
)
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (  # noqa: E402
    default_8bit_quantize_scheme as _scheme,
)
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (  # noqa: E402
    default_8bit_transforms as _transforms,
)
from tensorflow_model_optimization.python.core.quantization.keras.graph_transformations import (  # noqa: E402
    model_transformer as _model_transformer,
)

qk = tfmot.quantization.keras


# ---------------------------------------------------------------- standalone BatchNormalization (#1099)


class BNOutputQuantizeConfig(qk.QuantizeConfig):
    """Quantize a standalone BatchNormalization's output only (its scale/shift stay float, folded by the converter).

    tfmot's default registry knows BatchNormalization only after a Conv2D or
    Dense (folded into it) and refuses any other one
    (tensorflow/model-optimization#1099). The pre-activation ResNet has one per
    module (input BN, pre-activation BNs after each add, the head BN).
    """

    def get_weights_and_quantizers(self, layer):
        return []

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        pass

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return [qk.quantizers.MovingAverageQuantizer(num_bits=8, per_axis=False, symmetric=False,
                                                     narrow_range=False)]

    def get_config(self):
        return {}


def standalone_bns(model) -> set[str]:
    """Names of BatchNormalization layers whose input is not a convolution's output (tf-keras private
    `_inbound_nodes`: tf-keras has no public way to ask a layer of a functional model for its input layer)."""
    convs = (tf_keras.layers.Conv2D, tf_keras.layers.DepthwiseConv2D)
    out = set()
    for layer in model.layers:
        if not isinstance(layer, tf_keras.layers.BatchNormalization):
            continue
        inbound = layer._inbound_nodes[0].inbound_layers
        if isinstance(inbound, list):
            inbound = inbound[0] if len(inbound) == 1 else None
        if not isinstance(inbound, convs):
            out.add(layer.name)
    return out


# ---------------------------------------------------------------- concat order (#1061)

# Default8BitQuantizeLayoutTransform.apply's transforms (tfmot 0.8.1), in its order, minus the Concat ones.
KEPT_TRANSFORMS = (
    "InputLayerQuantize", "SeparableConv1DQuantize", "SeparableConvQuantize",
    "Conv2DReshapeBatchNormReLUQuantize", "Conv2DReshapeBatchNormActivationQuantize",
    "Conv2DBatchNormReLUQuantize", "Conv2DBatchNormActivationQuantize",
    "Conv2DReshapeBatchNormQuantize", "Conv2DBatchNormQuantize",
    "DenseBatchNormQuantize", "DenseBatchNormReLUQuantize", "DenseBatchNormActivationQuantize",
    "LayerReLUQuantize", "LayerReluActivationQuantize",
)


def upstream_transforms() -> list[str]:
    """The transform class names the installed tfmot's default 8-bit layout applies, in order (read from its source)."""
    src = inspect.getsource(_layout.Default8BitQuantizeLayoutTransform.apply)
    return re.findall(r"default_8bit_transforms\.(\w+)\(\)", src)


def check_kept_transforms() -> None:
    """Raises RuntimeError when the installed tfmot's transform list is not KEPT_TRANSFORMS plus Concat ones."""
    upstream = [t for t in upstream_transforms() if not t.startswith("Concat")]
    if upstream != list(KEPT_TRANSFORMS):
        raise RuntimeError(f"{TFMOT} {md.version(TFMOT)}'s default 8-bit transforms changed: {upstream}; "
                           f"convert/qat/tfmot_fixes.py copies {list(KEPT_TRANSFORMS)}")


class _LayoutKeepingConcatOrder(_layout.Default8BitQuantizeLayoutTransform):
    def apply(self, model, layer_quantize_map):
        transforms = [getattr(_transforms, name)() for name in KEPT_TRANSFORMS]
        return _model_transformer.ModelTransformer(
            model, transforms, set(layer_quantize_map.keys()), layer_quantize_map).transform()


class _SchemeKeepingConcatOrder(_scheme.Default8BitQuantizeScheme):
    def get_layout_transformer(self):
        return _LayoutKeepingConcatOrder()


def scheme_keeping_concat_order():
    """tfmot's default 8-bit scheme without its Concatenate transforms.

    Those transforms (which let a concat's inputs share its output quantizer)
    rebuild the concat with its inputs reordered when one input has no
    quantizer of its own (tensorflow/model-optimization#1061, open). Measured
    on InceptionV3: mixed3 and mixed8, whose third input is a max pool, came
    out as [pool, conv, conv], and the QAT model's answers had nothing to do
    with the float model's (correlation 0.02 at mixed3). Without them each
    concat input keeps its own output quantizer and the converter rescales; a
    small test model keeps its concat order with this scheme and loses it with
    the default one. Needs tfmot's private default_8bit modules: tfmot exports
    no way to drop one transform from a scheme.
    """
    check_kept_transforms()
    return _SchemeKeepingConcatOrder()


def quantize_model(model):
    """The tfmot QAT model of a tf-keras network: standalone BNs annotated to quantize their output, concat
    inputs kept in order (see `scheme_keeping_concat_order`)."""
    standalone = standalone_bns(model)

    def annotate(layer):
        if layer.name in standalone:
            return qk.quantize_annotate_layer(layer, quantize_config=BNOutputQuantizeConfig())
        return layer

    annotated = tf_keras.models.clone_model(model, clone_function=annotate)
    annotated.set_weights(model.get_weights())
    annotated = qk.quantize_annotate_model(annotated)
    with qk.quantize_scope({"BNOutputQuantizeConfig": BNOutputQuantizeConfig}):
        return qk.quantize_apply(annotated, scheme=scheme_keeping_concat_order())


# ---------------------------------------------------------------- quantizer ranges (no upstream issue: by design)


def _probe_tensors(twin) -> dict[str, Any]:
    """Symbolic tensors whose ranges seed the quantizers: each layer's output, under its name, and for a layer
    with a built-in non-linear activation (Dense + softmax) its pre-activation too, under "name::pre"."""
    tensors = {}
    for layer in twin.layers:
        if isinstance(layer, tf_keras.layers.InputLayer):
            continue
        tensors[layer.name] = layer.output
        act = getattr(layer, "activation", None)
        if act is not None and tf_keras.activations.serialize(act) not in ("linear", None):
            linear = layer.__class__.from_config({**layer.get_config(), "activation": "linear",
                                                  "name": f"{layer.name}_pre_probe"})
            pre = linear(layer.input)
            linear.set_weights(layer.get_weights())
            tensors[f"{layer.name}::pre"] = pre
    return tensors


def init_ranges(qat, twin, calib: np.ndarray, budget_bytes: int = 1 << 29) -> int:
    """Start every activation quantizer at the range its tensor takes on the calibration data.

    tfmot starts activation ranges at [-6, 6] and moves them by an exponential
    moving average with decay 0.999, so a fine-tune of a few hundred steps
    would keep ranges close to that guess (tfmot's design, no upstream issue).
    This relies on tfmot's private naming: wrapper `quant_X` quantizes the
    output of twin layer `X` (`output_*`, `post_activation_*`) or, for a
    softmax/sigmoid/tanh built into `X`, its input logits (`pre_activation_*`);
    `quantize_layer` quantizes the model input. Every probed tensor is held at
    once, so batches are sized to keep that under `budget_bytes` (InceptionV3
    at 299x299: ~0.1 GB per image). Weight quantizers get their weights' range
    (tfmot sets it only at the first training step). Returns how many
    activation quantizers were set.
    """
    tensors = _probe_tensors(twin)
    keys = list(tensors)
    probe = tf_keras.Model(twin.inputs, list(tensors.values()))
    lo = dict.fromkeys(keys, 0.0)  # ranges always include 0, as tfmot's do
    hi = dict.fromkeys(keys, 0.0)
    per_image = 4 * sum(int(np.prod(o.shape[1:])) for o in probe.outputs)
    batch = int(max(1, min(32, budget_bytes // per_image)))
    for i in range(0, len(calib), batch):
        outs = probe(tf.constant(calib[i: i + batch]), training=False)
        for k, o in zip(keys, outs):
            lo[k] = min(lo[k], float(tf.reduce_min(o)))
            hi[k] = max(hi[k], float(tf.reduce_max(o)))
    lo["quantize_layer"], hi["quantize_layer"] = min(0.0, float(calib.min())), max(0.0, float(calib.max()))
    done = 0
    for layer in qat.layers:
        src = layer.name if layer.name == "quantize_layer" else layer.name.removeprefix("quant_")
        if src not in lo:
            continue
        for w in layer.non_trainable_weights:
            short = w.name.split("/")[-1].split(":")[0]
            if short.startswith(("kernel", "depthwise_kernel")):
                # Recomputed from the weights at every training step; set now so the model is right before one.
                var = short.rsplit("_", 1)[0] + ":0"  # the wrapped layer's variable, not its quantized alias
                kernel = next(v for v in layer.weights if v.name.split("/")[-1] == var)
                axes = tuple(range(len(kernel.shape) - 1)) if w.shape.rank and w.shape[0] > 1 else None
                w.assign(tf.reshape((tf.reduce_min if short.endswith("_min") else tf.reduce_max)(kernel, axis=axes),
                                    w.shape))
                continue
            key = f"{src}::pre" if short.startswith("pre_activation") else src
            if key not in lo:
                raise ValueError(f"no probed range for quantizer {w.name} (pre-activation of a layer without one?)")
            if short.endswith("_min"):
                w.assign(tf.fill(w.shape, lo[key]))
                done += 1
            elif short.endswith("_max"):
                w.assign(tf.fill(w.shape, hi[key]))
    return done


# ---------------------------------------------------------------- frozen wrapped layers (#1067)


def keep_frozen(qat, twin) -> int:
    """Keep the layers the twin freezes (the OCT base) frozen in the QAT model; returns how many.

    tfmot's wrappers start trainable, and a wrapper holds its layer's kernel in
    its own trainable list, which `trainable = False` does not empty
    (tensorflow/model-optimization#1067, open; measured: 21.9 M trainable
    weights with the base "frozen"). So the kernel is moved to the wrapper's
    private non-trainable list, where the optimizer does not see it.
    """
    frozen = {l.name for l in twin.layers if not l.trainable}
    n = 0
    for layer in qat.layers:
        if layer.name.removeprefix("quant_") in frozen:
            layer.trainable = False
            if getattr(layer, "_trainable_weights", None):
                layer._non_trainable_weights = list(layer._non_trainable_weights) + list(layer._trainable_weights)
                layer._trainable_weights = []
            n += 1
    return n
