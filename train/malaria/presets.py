"""Named training presets: the papers' settings, an `edge` size for 2 CPU cores, `tiny` for tests,
and a quantization-friendly family (`post-*`, `inv-*`) whose BatchNorms fold into convolutions.

Frozen dataclasses, saved as the resolved config of every run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

BLOCKS = ("preact", "post", "inverted")
HEADS = ("flatten", "gap")
ACTIVATIONS = ("relu", "relu6")
SCHEDULES = ("linear", "cosine")


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """A residual network; by default the source's pre-activation bottleneck ResNet ("DL4CV").

    `filters[0]` is the stem conv; stage i has `stages[i]` modules of
    `filters[i + 1]` output channels. Stage 0 keeps the resolution, the others
    halve it.

    `block`: "preact" (the source: input BN, BN-ReLU-conv bottlenecks; a BN
    before a conv cannot fold into it, so it stays as int8 MUL/ADD ops),
    "post" (the same bottleneck post-activation: 1x1 Conv-BN-ReLU (K/4), 3x3
    Conv-BN-ReLU (K/4, stride), 1x1 Conv-BN (K), add, ReLU; strided 1x1 Conv-BN
    projection) or "inverted" (MobileNetV2: 1x1 expand Conv-BN-act, 3x3
    depthwise Conv-BN-act with the stride, 1x1 linear project Conv-BN, added
    when shapes match). "post" and "inverted" start with a Conv-BN-act stem and
    no input BN (the preprocessing already scales to [0, 1]), so every BN
    follows a conv and folds into it.
    `head`: "flatten" (AvgPool(`pool`) + Flatten, the source) or "gap"
    (GlobalAveragePooling2D: no SHAPE/STRIDED_SLICE/PACK/RESHAPE ops in TFLite).
    `expansion`: the inverted block's expansion factor.
    `activation`: "relu" or "relu6" (both fuse into TFLite int8 convolutions).
    """

    stages: tuple[int, ...] = (3, 4, 6)
    filters: tuple[int, ...] = (64, 128, 256, 512)
    l2: float = 5e-4
    bn_epsilon: float = 2e-5
    bn_momentum: float = 0.9
    pool: int = 8
    block: str = "preact"
    head: str = "flatten"
    expansion: int = 6
    activation: str = "relu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        object.__setattr__(self, "filters", tuple(self.filters))
        if len(self.filters) != len(self.stages) + 1:
            raise ValueError(f"filters {self.filters} needs one more entry than stages {self.stages}")
        for field, value, allowed in (("block", self.block, BLOCKS), ("head", self.head, HEADS),
                                      ("activation", self.activation, ACTIVATIONS)):
            if value not in allowed:
                raise ValueError(f"ResNetConfig {field} {value!r} is not one of {allowed}")
        if not (isinstance(self.expansion, int) and self.expansion >= 1):
            raise ValueError(f"ResNetConfig expansion {self.expansion!r} must be an integer >= 1")
        if min(self.stages) < 1:
            raise ValueError(f"stages {self.stages} must each hold at least one module")
        # TF 2.21's oneDNN CPU kernels abort the process (double free) when training
        # a bottleneck of 2 channels; 4 and more were checked to train fine.
        if self.block in ("preact", "post") and min(self.filters[1:]) < 16:
            raise ValueError(f"stage filters {self.filters[1:]} must be >= 16 (bottleneck width K/4 >= 4)")
        if min(self.filters) < 4:
            raise ValueError(f"filters {self.filters} must be >= 4")


@dataclasses.dataclass(frozen=True)
class MalariaPreset:
    name: str
    model: ResNetConfig
    epochs: int
    batch_size: int  # global: split over replicas under tf.distribute
    learning_rate: float
    momentum: float = 0.9
    schedule: str = "linear"  # "linear": polynomial decay, power 1, to 0 over all epochs; "cosine": cosine decay to 0
    augment: bool = True
    label_smoothing: float = 0.0
    nesterov: bool = False
    hue: float = 0.0  # stain jitter (train.data.augmentation): hue rotation up to +-hue/2 of the circle
    saturation: float = 0.0  # and saturation factor 0.5 +- saturation (0.5: unchanged)
    # Share of training images resized to the input by plain bilinear sampling (no antialiasing: what most app
    # pipelines do, e.g. tflite-support's and MediaPipe's image processors) instead of the antialiased resize
    # edge_runtime uses; drawn per image and epoch (train.data.make_dataset). 0: always antialiased.
    resize_mix: float = 0.0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"preset {self.name!r}: schedule {self.schedule!r} is not one of {SCHEDULES}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"preset {self.name!r}: label_smoothing {self.label_smoothing} must be in [0, 1)")
        if not (0.0 <= self.hue <= 1.0 and 0.0 <= self.saturation < 0.5):
            raise ValueError(f"preset {self.name!r}: hue {self.hue} must be in [0, 1], saturation "
                             f"{self.saturation} in [0, 0.5)")
        if not 0.0 <= self.resize_mix <= 1.0:
            raise ValueError(f"preset {self.name!r}: resize_mix {self.resize_mix} must be in [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MalariaPreset:
        """From `to_dict()`; keys added since (e.g. `block`, `label_smoothing`) take their defaults."""
        d = dict(d)
        d["model"] = ResNetConfig(**d["model"])
        return cls(**d)


MALARIA_PRESETS: dict[str, MalariaPreset] = {
    # The source: ~2 M weights, ~0.9 GMAC at 64x64, SGD 0.1 momentum 0.9, linear decay, 50 epochs, batch 32.
    "paper": MalariaPreset("paper", ResNetConfig(), epochs=50, batch_size=32, learning_rate=0.1),
    # The first `edge`: the source's pre-activation network, narrowed; chosen by measurement against two larger
    # candidates on unseen patients (docs/training.md, "Earlier single-split results"). Its int8 file is only
    # 1.6x faster than its float.
    "preact-w16-d111-64": MalariaPreset(
        "preact-w16-d111-64", ResNetConfig(stages=(1, 1, 1), filters=(16, 32, 64, 128)), epochs=15, batch_size=64,
        learning_rate=0.05,
    ),
    # For tests: trains in seconds.
    "tiny": MalariaPreset(
        "tiny", ResNetConfig(stages=(1, 1), filters=(8, 16, 32), pool=4), epochs=1, batch_size=16,
        # 0.05 saturates this net's softmax within one epoch; 0.01 keeps probabilities graded.
        learning_rate=0.01, augment=True,
    ),
}


def _quant_friendly(name: str, block: str, filters: tuple[int, ...], stages: tuple[int, ...], **model) -> MalariaPreset:
    """A `post`/`inv` preset: BN folds into every conv, GAP head; `edge`'s schedule so only the network differs."""
    return MalariaPreset(
        name, ResNetConfig(stages=stages, filters=filters, block=block, head="gap", **model),
        epochs=15, batch_size=64, learning_rate=0.05,
    )


# Names say block, stem/stage widths (w32: 32, 64, 128, 256), modules per stage (d111) and input size (64x64,
# the malaria preprocessing). Not yet measured on unseen patients (project issue 11).
for _name, _block, _w, _d in (
    ("post-w16-d111-64", "post", 16, (1, 1, 1)),
    ("post-w32-d111-64", "post", 32, (1, 1, 1)),
    ("post-w32-d222-64", "post", 32, (2, 2, 2)),
    ("inv-w32-d111-64", "inverted", 32, (1, 1, 1)),
):
    # The inverted block is MobileNetV2's, with its ReLU6.
    MALARIA_PRESETS[_name] = _quant_friendly(_name, _block, tuple(_w * 2**i for i in range(4)), _d,
                                             activation="relu6" if _block == "inverted" else "relu")
# The released model's preset, chosen from docs/training.md's Pareto table by the rule written there: of the networks
# whose int8 file meets the device targets (>= 2x its float32, p50 <= 1 ms, <= 300 KB), the most accurate; then
# the recipe: SGD with Nesterov momentum and cosine decay, label smoothing 0.1, stain jitter.
MALARIA_PRESETS["edge"] = dataclasses.replace(
    MALARIA_PRESETS["post-w32-d111-64"], name="edge", schedule="cosine", nesterov=True, label_smoothing=0.1,
    hue=0.08, saturation=0.1,
)
# For tests: the two new blocks at `tiny` size and schedule.
for _name, _block in (("tiny-post", "post"), ("tiny-inv", "inverted")):
    MALARIA_PRESETS[_name] = dataclasses.replace(
        MALARIA_PRESETS["tiny"], name=_name,
        model=ResNetConfig(stages=(1, 1), filters=(8, 16, 32), block=_block, head="gap", expansion=4,
                           activation="relu6" if _block == "inverted" else "relu"),
    )
