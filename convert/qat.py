"""The `tflite-qat-int8` row: quantization-aware fine-tuning, then full int8.

tensorflow-model-optimization (tfmot) works only with tf-keras and needs
`TF_USE_LEGACY_KERAS=1` before TensorFlow is first imported, while the rest of
medge uses Keras 3. So the fine-tuning runs in its own process:

    python -m convert.qat JOB.json      (started by `python -m convert`, not by hand)

The child builds a tf-keras twin of the run's network with the same
architecture code, copies the Keras 3 weights layer by layer, checks the twin
reproduces the Keras probabilities, annotates the model for quantization,
fine-tunes it, and converts to full int8 with the same real calibration data
as `tflite-int8`. Twins (`architecture` in the job):

    resnet     a malaria run: `train.malaria.models.build_resnet(..., keras_module=tf_keras)`;
               fine-tuned on the run's training images (training
               preprocessing, no augmentation: a short fine-tune from trained weights)
    oct-fused  an OCT run's image -> class model: `train.oct.models.build_fused_flat`,
               InceptionV3 and the head in one flat graph (tfmot cannot quantize a
               nested model); the base stays frozen as in training, so the
               fine-tune adapts the head to quantization noise everywhere
    oct-head   an OCT run's head alone (`--part head`): fine-tuned on the
               training split of the run's feature store, read row by row

tfmot refuses a BatchNormalization that does not follow a convolution (the
pre-activation ResNet has one per module: input BN, pre-activation BNs after
each add, the head BN). Those are annotated with `BNOutputQuantizeConfig`,
which quantizes only their output; BNs after a convolution are left to tfmot,
which folds them into the convolution.

Activation quantizer ranges start from the calibration data (see
`init_ranges`) rather than tfmot's [-6, 6], which a short fine-tune on a
small training split would barely move.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULT_TAG = "MEDGE_QAT_RESULT "
PROGRESS_TAG = "MEDGE_QAT_PROGRESS "
PROBE_TOLERANCE = 1e-4


# ---------------------------------------------------------------- parent side (Keras 3 process)


def twin_architecture(source) -> dict[str, Any]:
    """What the child builds for `source`: {"kind": "resnet"|"oct-fused"|"oct-head", ...}.

    Raises:
        ValueError: a source medge has no architecture code for (a bare model file).
    """
    cfg = source.run_config or {}
    if source.resnet_config is not None:
        return {"kind": "resnet", "resnet": source.resnet_config}
    if cfg.get("task") == "oct" and cfg.get("mode") in ("head", "end-to-end"):
        return {"kind": "oct-head" if source.part == "head" else "oct-fused", "mode": cfg["mode"]}
    raise ValueError(
        "tflite-qat-int8 builds a tf-keras twin from the architecture code, which needs a medge run directory "
        "(a malaria ResNet run or an OCT run, whose config.json names the architecture); this source has none"
    )


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


def export_qat_int8(job, fmt, dest: Path) -> dict[str, Any]:
    """Run the fine-tuning child on this job's model and data; it writes the .tflite to `dest`."""
    arch = twin_architecture(job.source)
    head_part = arch["kind"] == "oct-head"
    if not head_part and not job.train_items:
        raise ValueError("tflite-qat-int8 fine-tunes on the training split: pass --calib MANIFEST with a train split")
    calib = job.calibration()
    work = job.workdir / "qat"
    work.mkdir(exist_ok=True)
    weights, names = flat_weights(job.model)
    np.savez(work / "weights.npz", **weights)
    probe = calib.x[:8]
    np.savez(work / "data.npz", calib=calib.x, probe=probe,
             probe_probs=job.model.predict(probe, verbose=0))
    spec = job.source.spec
    order = {l: i for i, l in enumerate(job.source.labels)}
    unknown = sorted({l for _, l in job.train_items} - set(order))
    if unknown:
        raise ValueError(f"training labels {unknown} are not among the model's labels {list(job.source.labels)}")
    o = job.options
    task = {
        "architecture": arch,
        "input_shape": [int(d) for d in job.model.inputs[0].shape[1:]],
        "labels": list(job.source.labels),
        "name": job.model.name,
        "preprocess": spec.to_dict(),
        "train": [[p, order[l]] for p, l in job.train_items],
        "store": str(job.source.store) if head_part else None,
        "epochs": o.qat_epochs,
        "learning_rate": o.qat_learning_rate,
        "batch_size": o.qat_batch_size,
        "seed": o.seed,
        "int8_io": o.int8_io,
        "weights": str(work / "weights.npz"),
        "layer_names": names,
        "data": str(work / "data.npz"),
        "out": str(dest),
    }
    (work / "job.json").write_text(json.dumps(task))
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])]))
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "convert.qat", str(work / "job.json")], env=env,
                                stdout=subprocess.PIPE, stderr=err, text=True)
        result = None
        try:
            for line in proc.stdout:  # the child's progress, shown as it comes
                if line.startswith(RESULT_TAG):
                    result = json.loads(line[len(RESULT_TAG):])
                elif line.startswith(PROGRESS_TAG):
                    job.log(f"[{fmt.name}] {line[len(PROGRESS_TAG):].rstrip()}")
            proc.wait()
        finally:  # interrupted (Ctrl-C, SIGTERM): the child goes too
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        stderr = err.read()
    if proc.returncode != 0 or result is None:
        tail = "\n".join(stderr.strip().splitlines()[-6:])
        raise RuntimeError(f"QAT process exited with {proc.returncode}: {tail}")
    return {
        "weights": "int8 per-channel",
        "activations": "int8",
        "io": "int8" if o.int8_io else "float32",
        "quantizer": "tensorflow-model-optimization QAT (tf-keras twin) + tf.lite.TFLiteConverter",
        "qat_epochs": o.qat_epochs,
        "qat_learning_rate": o.qat_learning_rate,
        "twin": arch["kind"],
        "qat_train_images": result["train_examples"],
        "qat_trainable_weights": result["trainable_weights"],
        "qat_history": result["history"],
        "qat_seconds": result["seconds"],
        "twin_max_abs_diff": result["twin_max_abs_diff"],
        "qat_start_max_abs_diff": result["start_max_abs_diff"],  # fake-quantized, before fine-tuning
        "activation_ranges_from_calibration": result["ranges_initialized"],
        "batchnorm_frozen": result["batchnorm_frozen"],
        "calibration_images": len(calib),  # images or feature maps
        "calibration_from": calib.origin,
    }


# ---------------------------------------------------------------- child side (tf-keras process)


def _bn_output_config():
    import tensorflow_model_optimization as tfmot

    qk = tfmot.quantization.keras

    class BNOutputQuantizeConfig(qk.QuantizeConfig):
        """Quantize a standalone BatchNormalization's output only (its scale/shift stay float, folded by the converter)."""

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

    return BNOutputQuantizeConfig


def _standalone_bns(model) -> set[str]:
    """Names of BatchNormalization layers whose input is not a convolution's output."""
    import tf_keras

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


def _scheme_keeping_concat_order():
    """tfmot's default 8-bit scheme without its Concatenate transforms.

    Those transforms (which let a concat's inputs share its output quantizer)
    rebuild the concat with its inputs reordered when one input has no
    quantizer of its own (tensorflow/model-optimization#1061, open). Measured
    on InceptionV3: mixed3 and mixed8, whose third input is a max pool, came
    out as [pool, conv, conv], and the QAT model's answers had nothing to do
    with the float model's (correlation 0.02 at mixed3). Without them each
    concat input keeps its own output quantizer and the converter rescales; a
    small test model keeps its concat order with this scheme and loses it with
    the default one.
    """
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
        default_8bit_quantize_layout_transform as layout,
        default_8bit_quantize_scheme as scheme,
        default_8bit_transforms as T,
    )
    from tensorflow_model_optimization.python.core.quantization.keras.graph_transformations import model_transformer

    class Layout(layout.Default8BitQuantizeLayoutTransform):
        def apply(self, model, layer_quantize_map):
            transforms = [  # Default8BitQuantizeLayoutTransform.apply's list (tfmot 0.8.1) minus the Concat ones
                T.InputLayerQuantize(), T.SeparableConv1DQuantize(), T.SeparableConvQuantize(),
                T.Conv2DReshapeBatchNormReLUQuantize(), T.Conv2DReshapeBatchNormActivationQuantize(),
                T.Conv2DBatchNormReLUQuantize(), T.Conv2DBatchNormActivationQuantize(),
                T.Conv2DReshapeBatchNormQuantize(), T.Conv2DBatchNormQuantize(),
                T.DenseBatchNormQuantize(), T.DenseBatchNormReLUQuantize(), T.DenseBatchNormActivationQuantize(),
                T.LayerReLUQuantize(), T.LayerReluActivationQuantize(),
            ]
            return model_transformer.ModelTransformer(
                model, transforms, set(layer_quantize_map.keys()), layer_quantize_map).transform()

    class Scheme(scheme.Default8BitQuantizeScheme):
        def get_layout_transformer(self):
            return Layout()

    return Scheme()


def quantize_model(model):
    """The tfmot QAT model of a tf-keras network: standalone BNs annotated to quantize their output, concat
    inputs kept in order (see `_scheme_keeping_concat_order`)."""
    import tensorflow_model_optimization as tfmot
    import tf_keras

    qk = tfmot.quantization.keras
    config_cls = _bn_output_config()
    standalone = _standalone_bns(model)

    def annotate(layer):
        if layer.name in standalone:
            return qk.quantize_annotate_layer(layer, quantize_config=config_cls())
        return layer

    annotated = tf_keras.models.clone_model(model, clone_function=annotate)
    annotated.set_weights(model.get_weights())
    annotated = qk.quantize_annotate_model(annotated)
    with qk.quantize_scope({"BNOutputQuantizeConfig": config_cls}):
        return qk.quantize_apply(annotated, scheme=_scheme_keeping_concat_order())


def _probe_tensors(twin) -> dict[str, Any]:
    """Symbolic tensors whose ranges seed the quantizers: each layer's output, under its name, and for a layer
    with a built-in non-linear activation (Dense + softmax) its pre-activation too, under "name::pre"."""
    import tf_keras

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
    would keep ranges close to that guess. Wrapper `quant_X` quantizes the
    output of twin layer `X` (`output_*`, `post_activation_*`) or, for a
    softmax/sigmoid/tanh built into `X`, its input logits (`pre_activation_*`);
    `quantize_layer` quantizes the model input. Every probed tensor is held at
    once, so batches are sized to keep that under `budget_bytes` (InceptionV3
    at 299x299: ~0.1 GB per image). Weight quantizers get their weights' range
    (tfmot sets it only at the first training step). Returns how many
    activation quantizers were set.
    """
    import tensorflow as tf
    import tf_keras

    tensors = _probe_tensors(twin)
    keys = list(tensors)
    probe = tf_keras.Model(twin.inputs, list(tensors.values()))
    lo = {k: 0.0 for k in keys}  # ranges always include 0, as tfmot's do
    hi = {k: 0.0 for k in keys}
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


def freeze_batchnorm(qat) -> int:
    """Keep every BatchNormalization in inference mode (moving statistics, no updates) while fine-tuning.

    Measured on a briefly trained model: letting the fine-tune re-estimate BN
    statistics from its batches alone (learning rate 0) moved top-1 agreement
    with Keras from 1.0 to 0.77; frozen, the fine-tune adapts only the weights
    to quantization noise, which is what QAT is for.
    """
    import tf_keras

    n = 0
    for layer in qat.layers:
        if isinstance(getattr(layer, "layer", layer), tf_keras.layers.BatchNormalization):
            layer.trainable = False
            n += 1
    return n


def build_twin(job: dict[str, Any]):
    """The tf-keras network the job's architecture names, with random weights."""
    import tf_keras

    arch, n_cls = job["architecture"], len(job["labels"])
    if arch["kind"] == "resnet":
        from train.malaria.models import build_resnet
        from train.malaria.presets import ResNetConfig

        return build_resnet(ResNetConfig(**arch["resnet"]), tuple(job["input_shape"]), n_cls,
                            keras_module=tf_keras, name=job["name"])
    from train.oct.models import HEAD_BUILDERS, build_fused_flat

    if arch["kind"] == "oct-fused":
        return build_fused_flat(n_cls, arch["mode"], keras_module=tf_keras, name=job["name"])
    if arch["kind"] == "oct-head":
        return HEAD_BUILDERS[arch["mode"]](n_cls, keras_module=tf_keras, name=job["name"])
    raise ValueError(f"no tf-keras twin for architecture {arch['kind']!r}")


def copy_weights(twin, weights, names: list[str]) -> None:
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


def training_data(job: dict[str, Any]):
    """(batches of (input, one-hot), number of examples): training images, or the store's train features.

    Image paths are shuffled before decoding and nothing is cached, so a
    training split of 299x299 scans never has to fit in memory; features are
    read from the store per batch, as head training reads them.
    """
    import tensorflow as tf

    n_cls, seed, batch = len(job["labels"]), job["seed"], job["batch_size"]
    if job["store"]:
        import tf_keras

        from train.oct.store import make_sequence

        seq = make_sequence(job["store"], "train", batch, shuffle=True, seed=seed, keras_module=tf_keras)
        return seq, len(seq.index)

    from edge_runtime.spec import PreprocessSpec
    from train.data import decode_and_resize

    spec = PreprocessSpec.from_dict(job["preprocess"])
    paths = [p for p, _ in job["train"]]
    y = np.array([t for _, t in job["train"]], dtype=np.int32)
    ds = (tf.data.Dataset.from_tensor_slices((paths, y))
          .shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
          .map(lambda p, t: (decode_and_resize(p, spec), tf.one_hot(t, n_cls)), num_parallel_calls=tf.data.AUTOTUNE)
          .batch(batch)
          .prefetch(tf.data.AUTOTUNE))
    return ds, len(paths)


def keep_frozen(qat, twin) -> int:
    """Keep the layers the twin freezes (the OCT base) frozen in the QAT model; returns how many.

    tfmot's wrappers start trainable, and a wrapper holds its layer's kernel in
    its own trainable list, which `trainable = False` does not empty (measured:
    21.9 M trainable weights with the base "frozen"). So the kernel is moved to
    the non-trainable list, where the optimizer does not see it.
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


def _child(job_path: Path) -> dict[str, Any]:
    if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        raise RuntimeError("convert.qat must run with TF_USE_LEGACY_KERAS=1 (python -m convert starts it so)")
    import tensorflow as tf
    import tf_keras

    job = json.loads(Path(job_path).read_text())
    tf.keras.utils.set_random_seed(job["seed"])
    seconds: dict[str, float] = {}
    clock = [time.perf_counter()]

    def stage(name: str, next_step: str | None = None) -> None:
        now = time.perf_counter()
        seconds[name] = round(now - clock[0], 1)
        clock[0] = now
        if next_step:
            print(f"{PROGRESS_TAG}{name} done in {seconds[name]} s; {next_step} ...", flush=True)

    twin = build_twin(job)
    copy_weights(twin, np.load(job["weights"]), job["layer_names"])
    data = np.load(job["data"])
    diff = float(np.abs(twin.predict(data["probe"], verbose=0) - data["probe_probs"]).max())
    if diff > PROBE_TOLERANCE:
        raise ValueError(f"tf-keras twin differs from the Keras model by {diff:.2e} (> {PROBE_TOLERANCE}) on real data")
    stage("twin", f"twin equals Keras (max |dprob| {diff:.1e}); annotating for quantization")

    qat = quantize_model(twin)
    ranges_set = init_ranges(qat, twin, data["calib"])
    start_diff = float(np.abs(qat.predict(data["probe"], verbose=0) - data["probe_probs"]).max())
    frozen = freeze_batchnorm(qat)
    keep_frozen(qat, twin)
    qat.compile(optimizer=tf_keras.optimizers.SGD(job["learning_rate"], momentum=0.9),
                loss="categorical_crossentropy", metrics=["accuracy"])
    ds, n_train = training_data(job)
    trainable = int(sum(int(np.prod(w.shape)) for w in qat.trainable_weights))
    stage("annotate", f"quantized model before fine-tuning: max |dprob| {start_diff:.3f} from Keras; "
                      f"fine-tuning {trainable:,} weights for {job['epochs']} epoch(s) on {n_train} examples")

    class EpochLine(tf_keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            print(f"{PROGRESS_TAG}epoch {epoch + 1}/{job['epochs']}: loss {logs.get('loss', float('nan')):.4f}, "
                  f"accuracy {logs.get('accuracy', float('nan')):.4f}", flush=True)

    hist = qat.fit(ds, epochs=job["epochs"], verbose=0, callbacks=[EpochLine()])
    stage("fine_tune", "converting to full integer")

    conv = tf.lite.TFLiteConverter.from_keras_model(qat)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    calib = data["calib"]

    def rep():
        for i in range(len(calib)):
            yield [calib[i: i + 1].astype(np.float32)]

    conv.representative_dataset = rep
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if job["int8_io"]:
        conv.inference_input_type = tf.int8
        conv.inference_output_type = tf.int8
    Path(job["out"]).write_bytes(conv.convert())
    stage("convert")
    history = {k: [round(float(v), 5) for v in vals] for k, vals in hist.history.items()}
    return {"twin_max_abs_diff": diff, "history": history, "ranges_initialized": ranges_set,
            "batchnorm_frozen": frozen, "train_examples": n_train, "trainable_weights": trainable,
            "start_max_abs_diff": start_diff,
            "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m convert.qat JOB.json (started by python -m convert)", file=sys.stderr)
        return 2
    result = _child(Path(argv[0]))
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
