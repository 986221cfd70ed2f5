"""Named training presets: the papers' settings, an `edge` size for 2 CPU cores, `tiny` for tests.

Frozen dataclasses, saved as the resolved config of every run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """A pre-activation bottleneck ResNet (the source's "DL4CV" ResNet).

    `filters[0]` is the stem conv; stage i has `stages[i]` modules of
    `filters[i + 1]` output channels. Stage 0 keeps the resolution, the others
    halve it. `pool` is the final average-pooling window.
    """

    stages: tuple[int, ...] = (3, 4, 6)
    filters: tuple[int, ...] = (64, 128, 256, 512)
    l2: float = 5e-4
    bn_epsilon: float = 2e-5
    bn_momentum: float = 0.9
    pool: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        object.__setattr__(self, "filters", tuple(self.filters))
        if len(self.filters) != len(self.stages) + 1:
            raise ValueError(f"filters {self.filters} needs one more entry than stages {self.stages}")
        # TF 2.21's oneDNN CPU kernels abort the process (double free) when training
        # a bottleneck of 2 channels; 4 and more were checked to train fine.
        if min(self.filters[1:]) < 16:
            raise ValueError(f"stage filters {self.filters[1:]} must be >= 16 (bottleneck width K/4 >= 4)")


@dataclasses.dataclass(frozen=True)
class MalariaPreset:
    name: str
    model: ResNetConfig
    epochs: int
    batch_size: int  # global: split over replicas under tf.distribute
    learning_rate: float
    momentum: float = 0.9
    schedule: str = "linear"  # polynomial decay, power 1, to 0 over all epochs
    augment: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MalariaPreset":
        d = dict(d)
        d["model"] = ResNetConfig(**d["model"])
        return cls(**d)


MALARIA_PRESETS: dict[str, MalariaPreset] = {
    # The source: ~2 M weights, ~0.9 GMAC at 64x64, SGD 0.1 momentum 0.9, linear decay, 50 epochs, batch 32.
    "paper": MalariaPreset("paper", ResNetConfig(), epochs=50, batch_size=32, learning_rate=0.1),
    # Chosen by measurement against two larger candidates on unseen patients (README, "Malaria: results").
    "edge": MalariaPreset(
        "edge", ResNetConfig(stages=(1, 1, 1), filters=(16, 32, 64, 128)), epochs=15, batch_size=64,
        learning_rate=0.05,
    ),
    # For tests: trains in seconds.
    "tiny": MalariaPreset(
        "tiny", ResNetConfig(stages=(1, 1), filters=(8, 16, 32), pool=4), epochs=1, batch_size=16,
        # 0.05 saturates this net's softmax within one epoch; 0.01 keeps probabilities graded.
        learning_rate=0.01, augment=True,
    ),
}
