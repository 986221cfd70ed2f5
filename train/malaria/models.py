"""Model architectures, written once for Keras 3 and tf-keras.

Every builder takes the Keras module to build with, so `convert` can build a
tf-keras twin of the very same network for quantization-aware training and copy
the weights over (tensorflow-model-optimization only supports tf-keras).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from train.malaria.presets import ResNetConfig
from train.training import keras_module as keras_module_of


def build_resnet(
    cfg: ResNetConfig,
    input_shape: tuple[int, int, int] = (64, 64, 3),
    num_classes: int = 2,
    keras_module: ModuleType | None = None,
    name: str = "resnet",
) -> Any:
    """The residual network `cfg` describes: stem, residual stages, head, dense softmax.

    `cfg.block` "preact" (the source): input BN, 3x3 stem conv, modules of
    BN-ReLU-1x1 conv (K/4), BN-ReLU-3x3 conv (K/4, stride), BN-ReLU-1x1 conv
    (K), added to the input; the first module of each stage projects the
    (activated) input with a strided 1x1 conv; BN-ReLU before the head.

    "post": 3x3 stem Conv-BN-act, then the source's bottleneck turned
    post-activation: 1x1 Conv-BN-act (K/4), 3x3 Conv-BN-act (K/4, stride), 1x1
    Conv-BN (K), add (a strided 1x1 Conv-BN projection when the shape changes),
    act. "inverted": the same stem, then MobileNetV2 blocks 1x1 expand
    Conv-BN-act (`expansion` x input channels), 3x3 DepthwiseConv-BN-act
    (stride), 1x1 linear project Conv-BN, added when stride 1 and channels match.

    `cfg.head` "flatten": AvgPool(`pool`) + Flatten; "gap": global average pooling.
    """
    k = keras_module_of(keras_module)
    L = k.layers
    reg = k.regularizers.l2(cfg.l2)
    bn_kw = dict(epsilon=cfg.bn_epsilon, momentum=cfg.bn_momentum)

    def conv(filters: int, size: int, stride: int, name: str):
        return L.Conv2D(filters, size, strides=stride, padding="same", use_bias=False,
                        kernel_regularizer=reg, name=name)

    def act(x, name: str):
        if cfg.activation == "relu6":  # a ReLU layer, not Activation("relu6"): tf-keras has no relu6 by name
            return L.ReLU(6.0, name=name)(x)
        return L.Activation("relu", name=name)(x)

    def bn(x, name: str):
        return L.BatchNormalization(**bn_kw, name=name)(x)

    def bn_relu(x, name: str):
        return act(bn(x, f"{name}_bn"), f"{name}_relu")

    def conv_bn(x, filters: int, size: int, stride: int, name: str):
        return bn(conv(filters, size, stride, f"{name}_conv")(x), f"{name}_bn")

    def preact(x, filters: int, stride: int, first: bool, name: str):
        a = bn_relu(x, f"{name}_pre")
        y = conv(filters // 4, 1, 1, f"{name}_conv1")(a)
        y = bn_relu(y, f"{name}_b2")
        y = conv(filters // 4, 3, stride, f"{name}_conv2")(y)
        y = bn_relu(y, f"{name}_b3")
        y = conv(filters, 1, 1, f"{name}_conv3")(y)
        # The first module of a stage always projects (the source), even at stride 1.
        shortcut = conv(filters, 1, stride, f"{name}_proj")(a) if first else x
        return L.Add(name=f"{name}_add")([y, shortcut])

    def post(x, filters: int, stride: int, first: bool, name: str):
        y = act(conv_bn(x, filters // 4, 1, 1, f"{name}_1"), f"{name}_1_relu")
        y = act(conv_bn(y, filters // 4, 3, stride, f"{name}_2"), f"{name}_2_relu")
        y = conv_bn(y, filters, 1, 1, f"{name}_3")
        shortcut = x
        if stride != 1 or x.shape[-1] != filters:
            shortcut = conv_bn(x, filters, 1, stride, f"{name}_proj")
        return act(L.Add(name=f"{name}_add")([y, shortcut]), f"{name}_relu")

    def inverted(x, filters: int, stride: int, first: bool, name: str):
        cin = int(x.shape[-1])
        y = act(conv_bn(x, cin * cfg.expansion, 1, 1, f"{name}_expand"), f"{name}_expand_relu")
        # Depthwise kernels are not L2-regularized (MobileNetV2's practice: they hold few weights each).
        y = L.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False, name=f"{name}_dw_conv")(y)
        y = act(bn(y, f"{name}_dw_bn"), f"{name}_dw_relu")
        y = conv_bn(y, filters, 1, 1, f"{name}_project")  # linear bottleneck: no activation
        if stride == 1 and cin == filters:
            y = L.Add(name=f"{name}_add")([y, x])
        return y

    block = {"preact": preact, "post": post, "inverted": inverted}[cfg.block]
    inputs = k.Input(shape=input_shape, name="image")
    if cfg.block == "preact":
        x = L.BatchNormalization(**bn_kw, name="input_bn")(inputs)
        x = conv(cfg.filters[0], 3, 1, "stem_conv")(x)
    else:
        x = act(conv_bn(inputs, cfg.filters[0], 3, 1, "stem"), "stem_relu")
    for i, n in enumerate(cfg.stages):
        for j in range(n):
            stride = (1 if i == 0 else 2) if j == 0 else 1
            x = block(x, cfg.filters[i + 1], stride, first=(j == 0), name=f"s{i + 1}m{j + 1}")
    if cfg.block == "preact":
        x = bn_relu(x, "head")
    if cfg.head == "gap":
        x = L.GlobalAveragePooling2D(name="gap")(x)
    else:
        x = L.AveragePooling2D(cfg.pool, name="avg_pool")(x)
        x = L.Flatten(name="flatten")(x)
    outputs = L.Dense(num_classes, activation="softmax", kernel_regularizer=reg, name="probs")(x)
    return k.Model(inputs, outputs, name=name)


def count_macs(model: Any) -> int:
    """Multiply-accumulates per image of Conv2D/DepthwiseConv2D/Dense layers (BN, adds, pools not counted)."""
    total = 0
    for layer in model.layers:
        kind = type(layer).__name__
        if kind not in ("Conv2D", "DepthwiseConv2D", "Dense"):
            continue
        kernel = layer.get_weights()[0]
        out_shape = tuple(layer.output.shape)[1:]
        spatial = 1
        for d in out_shape[:-1]:
            spatial *= int(d)
        # A kernel weight is used once per output position: kh*kw*cin*cout (conv), in*out (dense),
        # kh*kw*C*multiplier (depthwise: each channel sees only its own kernel).
        total += spatial * int(kernel.size)
    return total


def describe(model: Any) -> dict[str, int]:
    """Weights (all, trainable) and MACs per image, for the run config and the terminal."""
    import numpy as np

    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    total = int(sum(np.prod(w.shape) for w in model.weights))
    return {"weights": total, "trainable_weights": trainable, "macs": count_macs(model)}
