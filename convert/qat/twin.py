"""The tf-keras twin: the run's network rebuilt from medge's architecture code, with the Keras 3 weights.

`flat_weights` runs in the parent (on the Keras 3 model), `build_twin` and
`copy_weights` in the child (on tf-keras); the layer walk is the same on both
sides and on both Keras versions, so this module imports no Keras at the top.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from convert.qat.job import QatJob
from train.malaria.presets import ResNetConfig

PROBE_TOLERANCE = 1e-4  # max |dprob| between the twin and the Keras model on the probe batch


def _weighted_layers(model) -> list:
    """Layers that hold weights, in order, with nested models (the OCT base and head) flattened."""
    out = []
    for layer in model.layers:
        if getattr(layer, "layers", None):
            out += _weighted_layers(layer)
        elif layer.weights:
            out.append(layer)
    return out


def flat_weights(model) -> tuple[dict[str, np.ndarray], list[str]]:
    """({"i::j": weight j of weighted layer i}, layer names): what `copy_weights` sets into a twin."""
    weights, names = {}, []
    for i, layer in enumerate(_weighted_layers(model)):
        names.append(layer.name)
        for j, w in enumerate(layer.get_weights()):
            weights[f"{i}::{j}"] = w
    return weights, names


def copy_weights(twin, weights, names) -> None:
    """Set the twin's weighted layers, in order, to the Keras layers' weights (from `flat_weights`).

    Raises:
        ValueError: a different number of weighted layers, or a layer whose weight shapes differ.
    """
    layers = _weighted_layers(twin)
    if len(layers) != len(names):
        raise ValueError(f"the tf-keras twin has {len(layers)} layers with weights, the Keras model {len(names)} "
                         "(architecture mismatch)")
    for i, layer in enumerate(layers):
        arrays = []
        while f"{i}::{len(arrays)}" in weights:
            arrays.append(weights[f"{i}::{len(arrays)}"])
        want = [tuple(w.shape) for w in layer.weights]
        got = [a.shape for a in arrays]
        if want != got:
            raise ValueError(f"twin layer {layer.name!r} wants weights {want}; Keras layer {names[i]!r} has {got}")
        layer.set_weights(arrays)


def build_twin(job: QatJob):
    """The tf-keras network the job's architecture names, with random weights."""
    import tf_keras  # TensorFlow: imported only when this runs

    arch, n_cls = job.architecture, len(job.labels)
    if arch.kind == "resnet":
        from train.malaria.models import build_resnet  # loads TensorFlow: imported only when this runs

        return build_resnet(ResNetConfig(**arch.resnet), tuple(job.input_shape), n_cls,
                            keras_module=tf_keras, name=job.name)
    from train.oct.models import HEAD_BUILDERS, build_fused_flat  # loads TensorFlow: imported only when this runs

    if arch.kind == "oct-fused":
        return build_fused_flat(n_cls, arch.mode, keras_module=tf_keras, name=job.name)
    if arch.kind == "oct-head":
        return HEAD_BUILDERS[arch.mode](n_cls, keras_module=tf_keras, name=job.name)
    raise ValueError(f"no tf-keras twin for architecture {arch.kind!r}")


def twin_with_weights(job: QatJob, probe: np.ndarray, probe_probs: np.ndarray) -> tuple[Any, float]:
    """(the twin with the Keras weights, its max |dprob| from Keras on the probe batch).

    Raises:
        ValueError: the weights do not fit, or the twin answers differently (> PROBE_TOLERANCE).
    """
    twin = build_twin(job)
    copy_weights(twin, np.load(job.weights), job.layer_names)
    diff = float(np.abs(twin.predict(probe, verbose=0) - probe_probs).max())
    if diff > PROBE_TOLERANCE:
        raise ValueError(f"tf-keras twin differs from the Keras model by {diff:.2e} (> {PROBE_TOLERANCE}) on real data")
    return twin, diff
