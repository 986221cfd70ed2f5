"""Architecture sizes: MAC counting by hand, and the paper ResNet's published size."""

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from train.malaria.models import build_resnet, count_macs, describe  # noqa: E402
from train.malaria.presets import MALARIA_PRESETS, MalariaPreset, ResNetConfig  # noqa: E402


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


def test_depthwise_macs_are_per_channel():
    i = keras.Input((8, 8, 4))
    x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(i)  # 8*8 * 3*3*4 = 2304, not *4 again
    x = keras.layers.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2, use_bias=False)(x)  # 4*4*3*3*4*2
    assert count_macs(keras.Model(i, x)) == 2304 + 1152


def test_source_presets_keep_their_architecture():
    """The new block/head fields default to the source's network: sizes pinned (docs/training.md's preset table)."""
    sizes = {n: describe(build_resnet(MALARIA_PRESETS[n].model)) for n in ("paper", "preact-w16-d111-64", "tiny")}
    assert {n: s["weights"] for n, s in sizes.items()} == {"paper": 2_163_918, "preact-w16-d111-64": 33_790,
                                                           "tiny": 6_486}
    assert sizes["preact-w16-d111-64"]["macs"] == 23_004_160
    old = {"stages": [1, 1, 1], "filters": [16, 32, 64, 128], "l2": 5e-4, "bn_epsilon": 2e-5,
           "bn_momentum": 0.9, "pool": 8}  # a config.json written before the new fields
    preset = MalariaPreset.from_dict({"name": "preact-w16-d111-64", "model": old, "epochs": 15, "batch_size": 64,
                                      "learning_rate": 0.05, "momentum": 0.9, "schedule": "linear",
                                      "augment": True})
    assert preset == MALARIA_PRESETS["preact-w16-d111-64"]


# (weights, MACs) from count_macs, pinned so a change to the builder is seen.
QUANT_FRIENDLY = {
    "post-w16-d111-64": (33_906, 23_003_392),
    "post-w32-d111-64": (129_634, 88_474_112),
    "post-w32-d222-64": (223_714, 141_951_488),
    "inv-w32-d111-64": (413_218, 393_413_120),
    "tiny-post": (2_634, 4_292_672),
    "tiny-inv": (5_978, 12_091_456),
}


@pytest.mark.parametrize("name", [f"{n}-{w}w-{m / 1e6:.0f}MMAC" for n, (w, m) in QUANT_FRIENDLY.items()])
def test_quant_friendly_preset_builds_in_keras3_and_tf_keras(name):
    import numpy as np

    tf_keras = pytest.importorskip("tf_keras")
    from convert.qat.twin import copy_weights, flat_weights

    preset = MALARIA_PRESETS[name.rsplit("-", 2)[0]]
    model = build_resnet(preset.model)
    d = describe(model)
    assert (d["weights"], d["macs"]) == QUANT_FRIENDLY[preset.name]
    kinds = {type(layer).__name__ for layer in model.layers}
    assert "Flatten" not in kinds and "GlobalAveragePooling2D" in kinds
    assert "input_bn" not in {layer.name for layer in model.layers}
    # Every BN directly follows a conv (so it folds): its input layer is a Conv2D or DepthwiseConv2D.
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            src = layer._inbound_nodes[0].parent_nodes[0].operation
            assert type(src).__name__ in ("Conv2D", "DepthwiseConv2D"), layer.name

    twin = build_resnet(preset.model, keras_module=tf_keras)
    assert [layer.name for layer in twin.layers] == [layer.name for layer in model.layers]
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(0, 0.1, w.shape).astype("float32") + (1.0 if "variance" in w.path else 0.0)
                       for w in model.weights])
    weights, names = flat_weights(model)
    copy_weights(twin, weights, names)
    x = rng.uniform(0, 1, (2, 64, 64, 3)).astype("float32")
    assert np.abs(twin(x, training=False).numpy() - model(x, training=False).numpy()).max() < 1e-4


@pytest.mark.parametrize("field,value", [("block", "resnext"), ("head", "max"), ("activation", "gelu"),
                                         ("expansion", 0)])
def test_bad_config_values_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        ResNetConfig(**{field: value})


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-post", "tiny-inv"])
def test_int8_graph_has_folded_bn_and_no_reshape_ops(name, tmp_path):
    """BN folded into the convs (no MUL/ADD-as-scale), GAP head (no SHAPE/STRIDED_SLICE/PACK/RESHAPE)."""
    import numpy as np

    from convert.tflite import convert_keras, int8_config
    from edge_runtime.backends import open_session

    keras.utils.set_random_seed(0)
    model = build_resnet(MALARIA_PRESETS[name].model)
    calib = np.random.default_rng(0).uniform(0, 1, (8, 64, 64, 3)).astype("float32")
    path = tmp_path / f"{name}.tflite"
    path.write_bytes(convert_keras(model, int8_config(calib, False)))
    ops = [op.name for op in open_session(path, "litert").ops()]
    assert not {"MUL", "SHAPE", "STRIDED_SLICE", "PACK", "RESHAPE"} & set(ops), ops
    # Every residual add stays an ADD; nothing else adds: one ADD per add layer.
    assert ops.count("ADD") == sum(type(layer).__name__ == "Add" for layer in model.layers), ops
    assert "MEAN" in ops and ("DEPTHWISE_CONV_2D" in ops) == (name == "tiny-inv"), ops


def test_schedules_and_new_training_options_default_to_the_old_behaviour():
    from train.malaria.fit import learning_rate

    p = MALARIA_PRESETS["preact-w16-d111-64"]
    assert (p.schedule, p.label_smoothing, p.nesterov, p.hue, p.saturation) == ("linear", 0.0, False, 0.0, 0.0)
    assert float(learning_rate(p, 100)(50)) == pytest.approx(0.025)
    cos = learning_rate(MalariaPreset("c", p.model, 1, 8, 0.1, schedule="cosine"), 100)
    assert float(cos(0)) == pytest.approx(0.1) and float(cos(50)) == pytest.approx(0.05) and float(cos(100)) < 1e-7
    with pytest.raises(ValueError, match="schedule"):
        MalariaPreset("bad", p.model, 1, 8, 0.1, schedule="step")


def test_edge_is_the_int8_friendly_network_with_the_release_recipe():
    edge, net = MALARIA_PRESETS["edge"], MALARIA_PRESETS["post-w32-d111-64"]
    assert edge.model == net.model and (edge.epochs, edge.batch_size) == (net.epochs, net.batch_size)
    assert (edge.schedule, edge.nesterov, edge.label_smoothing) == ("cosine", True, 0.1)
    with pytest.raises(ValueError, match="saturation"):
        MalariaPreset("bad", edge.model, 1, 8, 0.1, saturation=0.5)


def test_stain_jitter_changes_colour_and_keeps_the_black_background():
    from train.data import augmentation

    rng = np.random.default_rng(0)
    x = np.zeros((8, 64, 64, 3), np.float32)
    x[:, 16:48, 16:48] = rng.uniform(0.3, 0.9, (8, 32, 32, 3))  # a "cell" on black, like the NIH crops
    plain = np.asarray(augmentation(seed=1)(x, training=True))
    jitter = np.asarray(augmentation(seed=1, hue=0.08, saturation=0.1)(x, training=True))
    assert np.abs(jitter - plain).max() > 0.01  # colours moved
    assert np.abs(jitter[:, :4, :4]).max() < 1e-6  # corners: black stays black under hue and saturation
