"""The `tflite-qat-int8` row: quantization-aware fine-tuning, then full int8.

tensorflow-model-optimization (tfmot) works only with tf-keras and needs
`TF_USE_LEGACY_KERAS=1` before TensorFlow is first imported, while the rest of
medge uses Keras 3. So the fine-tuning runs in its own process:

    python -m convert.qat JOB.json      (started by `python -m convert`, not by hand)

The child builds a tf-keras twin of the run's ResNet with the same
architecture code (`train.models.build_resnet(..., keras_module=tf_keras)`),
copies the Keras 3 weights layer by layer, checks the twin reproduces the
Keras probabilities, annotates the model for quantization, fine-tunes on the
run's training split (training preprocessing, no augmentation: a short
fine-tune from trained weights), and converts to full int8 with the same real
calibration images as `tflite-int8`.

tfmot refuses a BatchNormalization that does not follow a convolution (the
pre-activation ResNet has one per module: input BN, pre-activation BNs after
each add, the head BN). Those are annotated with `BNOutputQuantizeConfig`,
which quantizes only their output; BNs after a convolution are left to tfmot,
which folds them into the convolution.

Activation quantizer ranges start from the calibration images (see
`init_ranges`) rather than tfmot's [-6, 6], which a short fine-tune on a
small training split would barely move.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

RESULT_TAG = "MEDGE_QAT_RESULT "
PROBE_TOLERANCE = 1e-4


# ---------------------------------------------------------------- parent side (Keras 3 process)


def export_qat_int8(job, fmt, dest: Path) -> dict[str, Any]:
    """Run the fine-tuning child on this job's model and data; it writes the .tflite to `dest`."""
    cfg = job.source.resnet_config
    if cfg is None:
        raise ValueError(
            "tflite-qat-int8 builds a tf-keras twin from the architecture code, which needs a medge run "
            "directory (its config.json names the ResNet preset); this source has none"
        )
    if not job.train_items:
        raise ValueError("tflite-qat-int8 fine-tunes on the training split: pass --calib MANIFEST with a train split")
    calib = job.calibration()
    work = job.workdir / "qat"
    work.mkdir(exist_ok=True)
    weights = {}
    for layer in job.model.layers:
        for i, w in enumerate(layer.get_weights()):
            weights[f"{layer.name}::{i}"] = w
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
        "resnet": cfg,
        "input_shape": list(spec.input_shape),
        "labels": list(job.source.labels),
        "name": job.model.name,
        "preprocess": spec.to_dict(),
        "train": [[p, order[l]] for p, l in job.train_items],
        "epochs": o.qat_epochs,
        "learning_rate": o.qat_learning_rate,
        "batch_size": o.qat_batch_size,
        "seed": o.seed,
        "int8_io": o.int8_io,
        "weights": str(work / "weights.npz"),
        "data": str(work / "data.npz"),
        "out": str(dest),
    }
    (work / "job.json").write_text(json.dumps(task))
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run([sys.executable, "-m", "convert.qat", str(work / "job.json")], env=env,
                          capture_output=True, text=True)
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
    if proc.returncode != 0 or result is None:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        raise RuntimeError(f"QAT process exited with {proc.returncode}: {tail}")
    return {
        "weights": "int8 per-channel",
        "activations": "int8",
        "io": "int8" if o.int8_io else "float32",
        "quantizer": "tensorflow-model-optimization QAT (tf-keras twin) + tf.lite.TFLiteConverter",
        "qat_epochs": o.qat_epochs,
        "qat_learning_rate": o.qat_learning_rate,
        "qat_train_images": len(job.train_items),
        "qat_history": result["history"],
        "twin_max_abs_diff": result["twin_max_abs_diff"],
        "activation_ranges_from_calibration": result["ranges_initialized"],
        "batchnorm_frozen": result["batchnorm_frozen"],
        "calibration_images": len(calib),
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


def quantize_model(model):
    """The tfmot QAT model of a tf-keras ResNet, standalone BNs annotated to quantize their output."""
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
        return qk.quantize_apply(annotated)


def init_ranges(qat, twin, calib: np.ndarray, batch: int = 32) -> int:
    """Start every activation quantizer at the range its tensor takes on the calibration images.

    tfmot starts activation ranges at [-6, 6] and moves them by an exponential
    moving average with decay 0.999, so a fine-tune of a few hundred steps
    would keep ranges close to that guess. Wrapper `quant_X` quantizes the
    output of twin layer `X`; `quantize_layer` quantizes the model input.
    Returns how many quantizers were set.
    """
    import tensorflow as tf
    import tf_keras

    names = [l.name for l in twin.layers if not isinstance(l, tf_keras.layers.InputLayer)]
    probe = tf_keras.Model(twin.inputs, [twin.get_layer(n).output for n in names])
    lo = {n: 0.0 for n in names}  # ranges always include 0, as tfmot's do
    hi = {n: 0.0 for n in names}
    for i in range(0, len(calib), batch):
        outs = probe(tf.constant(calib[i: i + batch]), training=False)
        for n, o in zip(names, outs):
            lo[n] = min(lo[n], float(tf.reduce_min(o)))
            hi[n] = max(hi[n], float(tf.reduce_max(o)))
    lo["quantize_layer"], hi["quantize_layer"] = min(0.0, float(calib.min())), max(0.0, float(calib.max()))
    done = 0
    for layer in qat.layers:
        src = layer.name if layer.name == "quantize_layer" else layer.name.removeprefix("quant_")
        if src not in lo:
            continue
        for w in layer.non_trainable_weights:
            short = w.name.split("/")[-1].split(":")[0]
            if short.startswith(("kernel", "depthwise_kernel", "bias")):
                continue  # weight quantizers take each step's weight range themselves
            if short.endswith("_min"):
                w.assign(tf.fill(w.shape, lo[src]))
                done += 1
            elif short.endswith("_max"):
                w.assign(tf.fill(w.shape, hi[src]))
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


def _child(job_path: Path) -> dict[str, Any]:
    if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        raise RuntimeError("convert.qat must run with TF_USE_LEGACY_KERAS=1 (python -m convert starts it so)")
    import tensorflow as tf
    import tf_keras

    from edge_runtime.spec import PreprocessSpec
    from train.models import build_resnet
    from train.presets import ResNetConfig

    job = json.loads(Path(job_path).read_text())
    tf.keras.utils.set_random_seed(job["seed"])
    cfg = ResNetConfig(**job["resnet"])
    twin = build_resnet(cfg, tuple(job["input_shape"]), len(job["labels"]), keras_module=tf_keras, name=job["name"])
    weights = np.load(job["weights"])
    used = set()
    for layer in twin.layers:
        if not layer.weights:
            continue
        keys = [f"{layer.name}::{i}" for i in range(len(layer.weights))]
        missing = [k for k in keys if k not in weights]
        if missing:
            raise ValueError(f"Keras model has no weights for twin layer {layer.name!r} ({missing[0]})")
        layer.set_weights([weights[k] for k in keys])
        used.update(keys)
    extra = sorted(set(weights.files) - used)
    if extra:
        raise ValueError(f"Keras weights not used by the twin (architecture mismatch?): {extra[:5]}")
    data = np.load(job["data"])
    diff = float(np.abs(twin.predict(data["probe"], verbose=0) - data["probe_probs"]).max())
    if diff > PROBE_TOLERANCE:
        raise ValueError(f"tf-keras twin differs from the Keras model by {diff:.2e} (> {PROBE_TOLERANCE}) on real images")

    qat = quantize_model(twin)
    ranges_set = init_ranges(qat, twin, data["calib"])
    frozen = freeze_batchnorm(qat)
    qat.compile(optimizer=tf_keras.optimizers.SGD(job["learning_rate"], momentum=0.9),
                loss="categorical_crossentropy", metrics=["accuracy"])
    spec = PreprocessSpec.from_dict(job["preprocess"])
    from train.data import decode_and_resize

    paths = [p for p, _ in job["train"]]
    y = np.array([t for _, t in job["train"]], dtype=np.int32)
    n_cls = len(job["labels"])
    ds = (tf.data.Dataset.from_tensor_slices((paths, y))
          .map(lambda p, t: (decode_and_resize(p, spec), tf.one_hot(t, n_cls)), num_parallel_calls=tf.data.AUTOTUNE)
          .cache()
          .shuffle(min(len(paths), 20_000), seed=job["seed"], reshuffle_each_iteration=True)
          .batch(job["batch_size"])
          .prefetch(tf.data.AUTOTUNE))
    hist = qat.fit(ds, epochs=job["epochs"], verbose=0)

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
    history = {k: [round(float(v), 5) for v in vals] for k, vals in hist.history.items()}
    return {"twin_max_abs_diff": diff, "history": history, "ranges_initialized": ranges_set, "batchnorm_frozen": frozen}


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
