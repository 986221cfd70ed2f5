"""Load what `python -m convert` exports: a run directory, a .keras file, a legacy Keras 2 .h5, or a SavedModel.

A run directory (from `python -m train`) carries everything: labels, the
preprocessing spec, the architecture preset (needed to build the tf-keras twin
for quantization-aware training) and the manifest whose training split feeds
calibration. A bare model file carries only the network, so `--labels` (and
`--calib`) supply the rest.

A bare model file whose input is not an image (e.g. the 2018 OCT write-up's
Keras head, 8x8x2048 InceptionV3 features -> 4 classes) is a features model
(`part` "head", with no named base): float rows are proven on random normal
inputs of its own shape, or on `--calib` (a feature store .h5 from
`python -m train oct extract`, or a .npy of inputs), which int8 rows need.

A TensorFlow SavedModel (a folder with saved_model.pb) is wrapped in a Keras
model through `keras.layers.TFSMLayer` on its `serving_default` signature:
the graph's TF ops run, no Python code from the folder does. Its one input must
have a fixed image shape and its one output the class probabilities.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_runtime.fileio import sha256_file
from edge_runtime.spec import MALARIA_SPEC, PreprocessSpec
from train import runs
from train.runs import RunConfig

KERAS_SUFFIXES = (".keras",)
PARTS = ("model", "head")
H5_SUFFIXES = (".h5", ".hdf5")


@dataclasses.dataclass(frozen=True)
class Source:
    """A loaded model and what is known about it.

    Attributes:
        path: the model file.
        name: model name used in artifact file names.
        labels: class names in output order.
        spec: preprocessing contract.
        task: e.g. "malaria"; "classification" when unknown.
        positive_label: class a screening flags, if known.
        sha256: hash of the model file.
        config: the run's config (config.json), when the source is a run.
        manifest: the run's manifest (training split for calibration), if any.
    """

    path: Path
    name: str
    labels: tuple[str, ...]
    spec: PreprocessSpec
    task: str
    positive_label: str | None
    sha256: str
    config: RunConfig | None = None
    manifest: Path | None = None
    part: str = "model"
    store: Path | None = None

    @property
    def feature_extractor(self) -> dict[str, Any]:
        """For a head: the base whose features it takes (from the OCT run config; a bare file names
        none, which the metadata says), else empty."""
        if self.part != "head":
            return {}
        if self.config is None or not self.config.store:
            return {"base": None, "layer": None,
                    "note": f"features of a base {self.path.name} does not name; preprocess does not apply"}
        from train.oct.models import FEATURE_LAYER  # loads TensorFlow: imported only when this runs

        return {"layer": FEATURE_LAYER, "base": self.config.base,
                "features_fingerprint": self.config.features_fingerprint}

    @property
    def resnet_config(self) -> dict[str, Any] | None:
        """The ResNet architecture of a malaria run (for the QAT twin), else None."""
        return ((self.config and self.config.preset) or {}).get("model")


def load_saved_model(path: Path):
    """A Keras model around a SavedModel's `serving_default` signature (one image input, one output).

    Raises:
        ValueError: no such signature, or not exactly one input and one output.
    """
    import keras  # TensorFlow: imported only when this runs
    import tensorflow as tf  # TensorFlow: imported only when this runs

    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as e:  # TF raises several types for unreadable folders
        raise ValueError(f"cannot load SavedModel {path}: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    sig = loaded.signatures.get("serving_default")
    if sig is None:
        raise ValueError(f"SavedModel {path} has no 'serving_default' signature (has {sorted(loaded.signatures)})")
    args, kwargs = sig.structured_input_signature
    inputs = list(args) + list(kwargs.values())
    outputs = sig.structured_outputs
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(f"SavedModel {path}: need one input and one output, found {len(inputs)} and {len(outputs)}")
    shape = tuple(inputs[0].shape[1:])
    if None in shape or len(shape) != 3:
        raise ValueError(f"SavedModel {path}: input shape {tuple(inputs[0].shape)} "
                         "is not (batch, H, W, C) with fixed H, W, C")
    inp = keras.Input(shape=shape, name="image")
    out = keras.layers.TFSMLayer(str(path), call_endpoint="serving_default", name="saved_model")(inp)
    if isinstance(out, dict):
        out = next(iter(out.values()))
    return keras.Model(inp, out, name=Path(path).name)


def is_image_shape(shape: Sequence[int]) -> bool:
    """(H, W, C) with 1 or 3 channels: what `PreprocessSpec` can describe."""
    return len(shape) == 3 and shape[2] in (1, 3)


def _run_dir_of(path: Path) -> Path | None:
    """The run directory of `path` (a run dir, or a model file inside one), else None."""
    d = path if path.is_dir() else path.parent
    return d if runs.is_run(d) else None


def _check_h5_is_model(path: Path) -> None:
    """Refuse an .h5 that holds no Keras model (e.g. a feature store given as the source), naming what it is."""
    import h5py  # optional: feature stores only

    try:
        with h5py.File(path, "r") as f:
            is_model = "model_config" in f.attrs
            is_store = "features" in f and "split" in f
    except OSError as e:
        raise ValueError(f"{path} is not an HDF5 file ({e})") from None
    if is_store:
        raise ValueError(f"{path} is a feature store, not a model: give it as --calib, and as the source the "
                         "head's .h5/.keras or the OCT run directory")
    if not is_model:
        raise ValueError(f"{path} holds no Keras model (no 'model_config'); weights-only .h5 files cannot be "
                         "converted: save the whole model (model.save)")


def load_keras_model(path: Path):
    """Load a .keras or Keras 2 .h5 model with safe mode on (a model file can carry no code that runs).

    Raises:
        ValueError: the file uses layers Keras does not know (custom or Lambda
            layers), naming them.
    """
    import keras  # TensorFlow: imported only when this runs

    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except (TypeError, ValueError) as e:
        msg = str(e)
        hint = ""
        if "Lambda" in msg or "safe_mode" in msg:
            hint = (" The model contains a Lambda layer (arbitrary code); safe mode refuses it. "
                    "Rebuild it without Lambda.")
        elif "Unknown layer" in msg or "Could not locate class" in msg:
            hint = " It uses a custom layer medge does not know; only built-in Keras layers can be converted."
        raise ValueError(f"cannot load {path}: {msg.splitlines()[0] if msg else type(e).__name__}.{hint}") from e


def load_source(
    source: Path,
    labels: Sequence[str] | None = None,
    name: str | None = None,
    spec: PreprocessSpec | None = None,
    part: str = "model",
):
    """(keras model, Source) from a run directory, a .keras file, a .h5/.hdf5 file or a SavedModel folder.

    Args:
        source: run directory, model file, or SavedModel folder.
        labels: class names, required when the source carries none; must
            match the run's labels when it does.
        name: model name for artifact files (default: run directory name or file stem).
        spec: preprocessing for a bare model file (default: the malaria spec, 64x64 RGB /255).
        part: "model" (the run's `model_file`, image -> classes: for OCT the fused
            base + head) or "head" (an OCT run's `head_file`, features -> classes,
            calibrated and proven on the run's feature store).

    Raises:
        FileNotFoundError, ValueError: with what was received and what is accepted.
    """
    source = Path(source)
    if part not in PARTS:
        raise ValueError(f"part {part!r} is not one of {PARTS}")
    if not source.exists():
        raise FileNotFoundError(f"source {source} does not exist; give a run directory, a .keras or a .h5 file")
    saved_model = source.is_dir() and (source / "saved_model.pb").is_file()
    run_dir = None if saved_model else _run_dir_of(source)
    cfg = runs.read_config(run_dir) if run_dir is not None else None
    if saved_model:
        model_path = source
    elif source.is_dir():
        if run_dir is None:
            raise FileNotFoundError(
                f"{source} is a directory without config.json or saved_model.pb; "
                "it is neither a medge run directory nor a SavedModel"
            )
        if part == "head":
            if not cfg.head_file or not cfg.store:
                raise ValueError("--part head needs an OCT head run (config.json with head_file and store); "
                                 f"{source} has none")
            model_path = source / cfg.head_file
        else:
            model_path = source / cfg.model_file
        if not model_path.is_file():
            raise FileNotFoundError(f"{source} holds no {model_path.name}; has training finished an epoch?")
    else:
        model_path = source
        if model_path.suffix.lower() not in KERAS_SUFFIXES + H5_SUFFIXES:
            raise ValueError(
                f"{source.name}: unsupported model file; expected one of {KERAS_SUFFIXES + H5_SUFFIXES} "
                "or a run directory"
            )

    if model_path.suffix.lower() in H5_SUFFIXES:
        _check_h5_is_model(model_path)
    manifest = Path(cfg.manifest) if cfg is not None and cfg.manifest else None
    model = load_saved_model(model_path) if saved_model else load_keras_model(model_path)

    run_labels = list(cfg.labels) if cfg is not None else None
    if labels is not None and run_labels is not None and list(labels) != run_labels:
        raise ValueError(f"--labels {list(labels)} differ from the run's labels {run_labels}; drop --labels")
    final_labels = run_labels or (list(labels) if labels else None)
    n_out = int(model.outputs[0].shape[-1])
    if final_labels is None:
        raise ValueError(
            f"{model_path.name} carries no class names; pass --labels with {n_out} comma-separated names "
            "in output order"
        )
    if len(final_labels) != n_out:
        raise ValueError(f"{len(final_labels)} labels {final_labels} for a model with {n_out} outputs")

    final_spec = cfg.preprocess if cfg is not None else (spec or MALARIA_SPEC)
    if len(model.inputs) != 1:
        raise ValueError(f"{model_path.name} has {len(model.inputs)} inputs; medge converts one-input classifiers")
    in_shape = tuple(model.inputs[0].shape[1:])
    if None in in_shape:
        raise ValueError(f"{model_path.name}: model input {in_shape} is not fixed; models need a fixed input size")
    if part == "model" and cfg is None and not saved_model and not is_image_shape(in_shape):
        part = "head"  # a bare features model (e.g. 8x8x2048 -> classes): no image preprocessing applies
    if part == "model" and in_shape != final_spec.input_shape:
        hint = ("" if cfg is not None else
                "; if it takes features rather than images, pass --part head to convert it as a features model")
        raise ValueError(
            f"{model_path.name}: model input {in_shape} does not match the preprocessing {final_spec.input_shape} "
            f"(height, width, channels){hint}"
        )
    if part == "head" and run_dir is not None:
        default_name = f"{run_dir.name}-head"
    elif run_dir is not None:
        default_name = run_dir.name if source.is_dir() or model_path.name == cfg.model_file else model_path.stem
    else:
        default_name = model_path.stem
    positive = cfg.positive_label if cfg is not None else None
    src = Source(
        path=model_path,
        name=name or default_name,
        labels=tuple(final_labels),
        spec=final_spec,
        task=cfg.task if cfg is not None else "classification",
        positive_label=positive if positive in final_labels else None,
        sha256=sha256_file(model_path),
        config=cfg,
        manifest=manifest,
        part=part,
        store=Path(cfg.store) if part == "head" and cfg is not None and cfg.store else None,
    )
    return model, src
