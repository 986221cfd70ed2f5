"""Architecture sizes: MAC counting by hand, and the paper ResNet's published size."""

import pytest

keras = pytest.importorskip("keras")

from train.malaria.models import build_resnet, count_macs, describe  # noqa: E402
from train.malaria.presets import MALARIA_PRESETS, ResNetConfig  # noqa: E402


def test_count_macs_by_hand():
    i = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(i)  # 8*8 * 3*3*3*4 = 6912
    x = keras.layers.Conv2D(6, 1, strides=2)(x)  # 4*4 * 4*6 = 384
    x = keras.layers.Flatten()(x)
    o = keras.layers.Dense(2)(x)  # 96*2 = 192
    assert count_macs(keras.Model(i, o)) == 6912 + 384 + 192


def test_paper_resnet_matches_the_source_size():
    d = describe(build_resnet(MALARIA_PRESETS["paper"].model))
    # BRIEF: "about 2 M weights"; the count is exact for (3, 4, 6) x (64, 128, 256, 512).
    assert d["weights"] == 2_163_918
    # BRIEF says about 0.9 GMAC; counting every conv and dense multiply-accumulate gives 1.06 G.
    assert 0.9e9 <= d["macs"] <= 1.1e9


def test_bottleneck_too_narrow_is_refused():
    with pytest.raises(ValueError, match=">= 16"):
        ResNetConfig(stages=(1, 1), filters=(8, 8, 16))
