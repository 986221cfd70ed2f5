"""The OCT networks: frozen InceptionV3 base, the source's two heads, the fused model.

Builders take the Keras module to build with (`keras_module`, default Keras 3)
like `train.malaria.models`, so `convert` can build a tf-keras twin of a head.

A base is named by `--base-weights`: `imagenet` (Keras' cached ImageNet
weights; offline machines need the file in ~/.keras/models), `none` (random
He-scaled weights drawn from `--base-seed`, for tests and for measuring the
pipeline)
or a path to a Keras weights file. Its fingerprint is a hash of the weights
themselves, so the same weights reached by two names agree, and a store or a
head never meets a base it was not made with.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from edge_runtime.fileio import sha256_text
from edge_runtime.spec import OCT_INCEPTION_SPEC, OCT_RESCALE_SPEC, PreprocessSpec
from train.training import keras_module as keras_module_of

FEATURE_SHAPE = (8, 8, 2048)  # InceptionV3's last mixed block at 299x299
FEATURE_LAYER = "mixed10"
PREPROCESS = {"inception": OCT_INCEPTION_SPEC, "rescale": OCT_RESCALE_SPEC}
IMAGENET_NOTOP = "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
BASE_NAME = "inception_v3"
HEAD_NAME = "head"
TOP_NAME = "top"
HEAD_CONV = "head_conv"



def preprocess_spec(name: str) -> PreprocessSpec:
    """`inception` ([-1, 1], what the ImageNet weights expect) or `rescale` (1/255, the source's)."""
    if name not in PREPROCESS:
        raise ValueError(f"--preprocess {name!r} is not one of {sorted(PREPROCESS)}")
    return PREPROCESS[name]


def preprocess_name(spec: PreprocessSpec) -> str:
    for name, s in PREPROCESS.items():
        if s == spec:
            return name
    return "custom"


def _imagenet_file() -> Path:
    home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    return home / "models" / IMAGENET_NOTOP


def build_base(weights: str = "imagenet", seed: int = 0) -> Any:
    """Frozen InceptionV3 without its top, 299x299x3 -> 8x8x2048.

    Args:
        weights: "imagenet", "none" or a path to a weights file of this network.
        seed: draws the random weights when `weights` is "none".

    Raises:
        FileNotFoundError: a weights path that does not exist.
        ValueError: ImageNet weights that cannot be loaded (offline, no cached file).
    """
    import keras  # TensorFlow: imported only when this runs

    kw = dict(include_top=False, input_shape=(299, 299, 3), name=BASE_NAME)
    if weights == "none":
        base = keras.applications.InceptionV3(weights=None, **kw)
        _random_he(base, seed)
    elif weights == "imagenet":
        cached = _imagenet_file()
        try:
            if cached.is_file():
                base = keras.applications.InceptionV3(weights=None, **kw)
                base.load_weights(cached)
            else:
                import socket

                old = socket.getdefaulttimeout()
                socket.setdefaulttimeout(30)
                try:
                    base = keras.applications.InceptionV3(weights="imagenet", **kw)
                finally:
                    socket.setdefaulttimeout(old)
        except Exception as e:  # the download's many failure types; re-raised with what to do
            raise ValueError(
                f"could not load the ImageNet InceptionV3 weights ({type(e).__name__}: {e}). Offline, put "
                f"{IMAGENET_NOTOP} in {cached.parent} or pass --base-weights PATH (or `none` to test the pipeline)"
            ) from None
    else:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(
                f"--base-weights {weights}: no such file; use imagenet, none or a path to InceptionV3 (no top) weights"
            )
        base = keras.applications.InceptionV3(weights=None, **kw)
        try:
            base.load_weights(path)
        except (ValueError, OSError) as e:
            raise ValueError(f"--base-weights {path} does not hold InceptionV3 (no top) weights: {e}") from None
    base.trainable = False
    return base


def _random_he(base: Any, seed: int) -> None:
    """Redraw every conv kernel He-normal from `seed` (numpy), in layer order.

    Keras' default Glorot init halves the signal at each of InceptionV3's ~94
    ReLU convs (its BNs have no scale and unit moving variance), so a random
    base's 8x8x2048 output comes out ~1e-3 and the head's batch norm needs
    thousands of steps before its moving statistics match. He scaling keeps
    the features O(1), which makes "random base" a fair pipeline baseline,
    and drawing from numpy makes it identical in every process.
    """
    import keras  # TensorFlow: imported only when this runs

    rng = np.random.default_rng(seed)
    for layer in base.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kh, kw, cin, _ = layer.kernel.shape
            std = np.float32(np.sqrt(2.0 / (kh * kw * cin)))
            layer.kernel.assign(rng.standard_normal(tuple(layer.kernel.shape), dtype=np.float32) * std)


def weights_fingerprint(model: Any) -> str:
    """sha256 over every weight's shape and bytes, in order (names depend on build order, so not used)."""
    import keras  # TensorFlow: imported only when this runs

    h = hashlib.sha256()
    for w in model.weights:
        a = np.ascontiguousarray(keras.ops.convert_to_numpy(w), dtype=np.float32)
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def features_fingerprint(base_sha: str, spec: PreprocessSpec) -> str:
    """What stored features depend on: the base's weights, its output layer and the preprocessing."""
    blob = json.dumps({"base": base_sha, "layer": FEATURE_LAYER, "preprocess": spec.to_dict()}, sort_keys=True)
    return sha256_text(blob)[:16]


def describe_base(weights: str, seed: int) -> str:
    return f"none (random, seed {seed})" if weights == "none" else weights


def _head_on(k: ModuleType, x: Any, num_classes: int) -> Any:
    """Approach B's head applied to the feature tensor `x`: 1x1 conv 64 (no bias), BN, ReLU, dropout 0.5, flatten,
    softmax."""
    L = k.layers
    x = L.Conv2D(64, 1, use_bias=False, name=HEAD_CONV)(x)
    x = L.BatchNormalization(name="head_bn")(x)
    x = L.Activation("relu", name="head_relu")(x)
    x = L.Dropout(0.5, name="head_dropout")(x)
    x = L.Flatten(name="head_flatten")(x)
    return L.Dense(num_classes, activation="softmax", name="head_probs")(x)


def _top_on(k: ModuleType, x: Any, num_classes: int) -> Any:
    """Approach A's top applied to the feature tensor `x`: global average pooling, dense 64 ReLU, dense softmax."""
    L = k.layers
    x = L.GlobalAveragePooling2D(name="top_gap")(x)
    x = L.Dense(64, activation="relu", name="top_dense")(x)
    return L.Dense(num_classes, activation="softmax", name="top_probs")(x)


def build_head(num_classes: int = 4, keras_module: ModuleType | None = None, name: str = HEAD_NAME) -> Any:
    """Approach B's head on 8x8x2048 features (see `_head_on`)."""
    k = keras_module_of(keras_module)
    inp = k.Input(FEATURE_SHAPE, name="features")
    return k.Model(inp, _head_on(k, inp, num_classes), name=name)


def build_top(num_classes: int = 4, keras_module: ModuleType | None = None, name: str = TOP_NAME) -> Any:
    """Approach A's top on 8x8x2048 features (see `_top_on`)."""
    k = keras_module_of(keras_module)
    inp = k.Input(FEATURE_SHAPE, name="features")
    return k.Model(inp, _top_on(k, inp, num_classes), name=name)


HEAD_BUILDERS = {"head": build_head, "end-to-end": build_top}  # run mode -> the head that mode trains
_HEADS_ON = {"head": _head_on, "end-to-end": _top_on}


def build_fused_flat(num_classes: int = 4, mode: str = "head", keras_module: ModuleType | None = None,
                     name: str = "oct_fused") -> Any:
    """The fused model as one flat graph: InceptionV3's layers (frozen), then the head's; no model nested in a model.

    tensorflow-model-optimization cannot quantize nested models, so the
    quantization-aware twin of `fuse(build_base(), HEAD_BUILDERS[mode]())` is
    built this way. Layers come in the same order as the nested model's, so
    weights can be copied layer by layer. Weights are left random.
    """
    if mode not in HEAD_BUILDERS:
        raise ValueError(f"OCT run mode {mode!r} is not one of {sorted(HEAD_BUILDERS)}")
    k = keras_module_of(keras_module)
    base = k.applications.InceptionV3(weights=None, include_top=False, input_shape=(299, 299, 3))
    base.trainable = False
    return k.Model(base.input, _HEADS_ON[mode](k, base.output, num_classes), name=name)


def fuse(base: Any, head: Any, name: str = "oct_fused") -> Any:
    """One model, preprocessed 299x299x3 image -> class probabilities (base, then head)."""
    import keras  # TensorFlow: imported only when this runs

    inp = keras.Input((299, 299, 3), name="image")
    return keras.Model(inp, head(base(inp, training=False)), name=name)


def check_head(head: Any, source: str, num_classes: int = 4) -> None:
    """Refuse a head whose input is not 8x8x2048 features or whose output is not `num_classes` probabilities."""
    shape = tuple(head.input_shape[1:]) if not isinstance(head.input_shape, list) else None
    if shape != FEATURE_SHAPE:
        raise ValueError(
            f"head {source} takes input {head.input_shape}, expected (None, 8, 8, 2048): InceptionV3's "
            f"{FEATURE_LAYER} features at 299x299"
        )
    out = tuple(head.output_shape[1:])
    if out != (num_classes,):
        raise ValueError(f"head {source} outputs {head.output_shape}, expected (None, {num_classes})")


def _load_h5_by_order(path: Path, num_classes: int) -> Any:
    """Our head architecture with weights read from a Keras 2 .h5 in layer order (when its config won't load)."""
    import h5py  # optional: feature stores only

    head = build_head(num_classes)
    with h5py.File(path, "r") as f:
        g = f["model_weights"] if "model_weights" in f else f
        names = [n.decode() if isinstance(n, bytes) else n for n in g.attrs["layer_names"]]
        arrays = []
        for n in names:
            wn = [w.decode() if isinstance(w, bytes) else w for w in g[n].attrs.get("weight_names", [])]
            if wn:
                arrays.append([np.asarray(g[n][w]) for w in wn])
    targets = [l for l in head.layers if l.weights]
    if len(arrays) != len(targets):
        raise ValueError(
            f"head {path} has {len(arrays)} layers with weights, expected {len(targets)} "
            "(1x1 conv 64, batch norm, dense)"
        )
    for layer, ws in zip(targets, arrays):
        want = [tuple(w.shape) for w in layer.weights]
        got = [a.shape for a in ws]
        if want != got:
            raise ValueError(f"head {path}: layer {layer.name} expects weights {want}, the file has {got}")
        layer.set_weights(ws)
    return head


def load_head(path: str | Path, num_classes: int = 4) -> Any:
    """A trained head: a Keras 3 `.keras` file or a Keras 2 `.h5`/`.hdf5` of shape 8x8x2048 -> `num_classes`.

    Keras 2 files load through Keras 3's legacy HDF5 reader; if their config is
    too old for it, the weights are read in layer order into `build_head`'s
    architecture. Either way the input and output shapes are checked.
    """
    import keras  # TensorFlow: imported only when this runs

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--head {path}: no such file; expected a .keras or Keras 2 .h5/.hdf5 head")
    suffix = path.suffix.lower()
    if suffix not in (".keras", ".h5", ".hdf5"):
        raise ValueError(f"--head {path}: unknown suffix {suffix!r}; expected .keras, .h5 or .hdf5")
    if suffix == ".keras":
        head = keras.saving.load_model(path, compile=False, safe_mode=True)
    else:
        try:
            head = keras.saving.load_model(path, compile=False, safe_mode=True)
        except (ValueError, TypeError, KeyError) as e:
            print(f"note: {path} config did not load in Keras 3 ({type(e).__name__}); "
                  "reading its weights by layer order")
            head = _load_h5_by_order(path, num_classes)
    check_head(head, str(path), num_classes)
    return head
