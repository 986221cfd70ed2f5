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
    """Pre-activation bottleneck ResNet: input BN, 3x3 stem, residual stages, BN-ReLU, avg pool, dense softmax.

    Each module is BN-ReLU-1x1 conv (K/4), BN-ReLU-3x3 conv (K/4, stride),
    BN-ReLU-1x1 conv (K), added to its input; the first module of each stage
    projects the (activated) input with a strided 1x1 conv.
    """
    k = keras_module_of(keras_module)
    L = k.layers
    reg = k.regularizers.l2(cfg.l2)
    bn_kw = dict(epsilon=cfg.bn_epsilon, momentum=cfg.bn_momentum)

    def conv(filters: int, size: int, stride: int, name: str):
        return L.Conv2D(filters, size, strides=stride, padding="same", use_bias=False,
                        kernel_regularizer=reg, name=name)

    def bn_relu(x, name: str):
        x = L.BatchNormalization(**bn_kw, name=f"{name}_bn")(x)
        return L.Activation("relu", name=f"{name}_relu")(x)

    def module(x, filters: int, stride: int, project: bool, name: str):
        act = bn_relu(x, f"{name}_pre")
        y = conv(filters // 4, 1, 1, f"{name}_conv1")(act)
        y = bn_relu(y, f"{name}_b2")
        y = conv(filters // 4, 3, stride, f"{name}_conv2")(y)
        y = bn_relu(y, f"{name}_b3")
        y = conv(filters, 1, 1, f"{name}_conv3")(y)
        shortcut = conv(filters, 1, stride, f"{name}_proj")(act) if project else x
        return L.Add(name=f"{name}_add")([y, shortcut])

    inputs = k.Input(shape=input_shape, name="image")
    x = L.BatchNormalization(**bn_kw, name="input_bn")(inputs)
    x = conv(cfg.filters[0], 3, 1, "stem_conv")(x)
    for i, n in enumerate(cfg.stages):
        for j in range(n):
            stride = (1 if i == 0 else 2) if j == 0 else 1
            x = module(x, cfg.filters[i + 1], stride, project=(j == 0), name=f"s{i + 1}m{j + 1}")
    x = bn_relu(x, "head")
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
        # A kernel weight is used once per output position: kh*kw*cin*cout (conv), in*out (dense).
        total += spatial * int(kernel.size)
    return total


def describe(model: Any) -> dict[str, int]:
    """Weights (all, trainable) and MACs per image, for the run config and the terminal."""
    import numpy as np

    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    total = int(sum(np.prod(w.shape) for w in model.weights))
    return {"weights": total, "trainable_weights": trainable, "macs": count_macs(model)}
