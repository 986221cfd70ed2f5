"""Child side of QAT (a tf-keras process): twin, quantization annotation, fine-tune, full-integer conversion.

    python -m convert.qat.child JOB.json     (started by `python -m convert`, not by hand)

Prints `PROGRESS_TAG` lines as stages end and one `RESULT_TAG` line with a
`QatResult` at the end; the .tflite goes to `QatJob.out`. The conversion is
`convert.converters.int8_config`, the same settings as `tflite-int8`, on the
fine-tuned model and the same calibration data.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from convert.converters import convert_keras, int8_config
from convert.qat.job import PROGRESS_TAG, QatJob, QatResult
from convert.qat.twin import twin_with_weights
from edge_runtime.spec import PreprocessSpec


def progress(text: str) -> None:
    print(f"{PROGRESS_TAG}{text}", flush=True)


def training_data(job: QatJob):
    """(batches of (input, one-hot), number of examples): training images, or the store's train features.

    Image paths are shuffled before decoding and nothing is cached, so a
    training split of 299x299 scans never has to fit in memory; features are
    read from the store per batch, as head training reads them.
    """
    import tensorflow as tf  # TensorFlow: imported only when this runs

    n_cls, seed, batch = len(job.labels), job.seed, job.batch_size
    if job.store:
        import tf_keras  # TensorFlow: imported only when this runs

        from train.oct.store import make_sequence  # loads TensorFlow: imported only when this runs

        seq = make_sequence(job.store, "train", batch, shuffle=True, seed=seed, keras_module=tf_keras)
        return seq, len(seq.index)

    from train.data import decode_and_resize  # loads TensorFlow: imported only when this runs

    spec = PreprocessSpec.from_dict(job.preprocess)
    paths = [p for p, _ in job.train]
    y = np.array([t for _, t in job.train], dtype=np.int32)
    ds = (tf.data.Dataset.from_tensor_slices((paths, y))
          .shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
          .map(lambda p, t: (decode_and_resize(p, spec), tf.one_hot(t, n_cls)), num_parallel_calls=tf.data.AUTOTUNE)
          .batch(batch)
          .prefetch(tf.data.AUTOTUNE))
    return ds, len(paths)


def freeze_batchnorm(qat) -> int:
    """Keep every BatchNormalization in inference mode (moving statistics, no updates) while fine-tuning.

    Measured on a briefly trained model: letting the fine-tune re-estimate BN
    statistics from its batches alone (learning rate 0) moved top-1 agreement
    with Keras from 1.0 to 0.77; frozen, the fine-tune adapts only the weights
    to quantization noise, which is what QAT is for.
    """
    import tf_keras  # TensorFlow: imported only when this runs

    n = 0
    for layer in qat.layers:
        if isinstance(getattr(layer, "layer", layer), tf_keras.layers.BatchNormalization):
            layer.trainable = False
            n += 1
    return n


def run(job: QatJob) -> QatResult:
    """Do the job; returns what the parent records (raises on any failure, writing nothing to `job.out`)."""
    if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        raise RuntimeError("convert.qat.child must run with TF_USE_LEGACY_KERAS=1 (python -m convert starts it so)")
    import tensorflow as tf  # TensorFlow: imported only when this runs
    import tf_keras  # TensorFlow: imported only when this runs

    from convert.qat import tfmot_fixes  # loads TensorFlow: imported only when this runs

    tf.keras.utils.set_random_seed(job.seed)
    seconds: dict[str, float] = {}
    clock = [time.perf_counter()]

    def stage(name: str, next_step: str | None = None) -> None:
        now = time.perf_counter()
        seconds[name] = round(now - clock[0], 1)
        clock[0] = now
        if next_step:
            progress(f"{name} done in {seconds[name]} s; {next_step} ...")

    data = np.load(job.data)
    twin, diff = twin_with_weights(job, data["probe"], data["probe_probs"])
    stage("twin", f"twin equals Keras (max |dprob| {diff:.1e}); annotating for quantization")

    qat = tfmot_fixes.quantize_model(twin)
    ranges_set = tfmot_fixes.init_ranges(qat, twin, data["calib"])
    start_diff = float(np.abs(qat.predict(data["probe"], verbose=0) - data["probe_probs"]).max())
    frozen = freeze_batchnorm(qat)
    tfmot_fixes.keep_frozen(qat, twin)
    qat.compile(optimizer=tf_keras.optimizers.SGD(job.learning_rate, momentum=0.9),
                loss="categorical_crossentropy", metrics=["accuracy"])
    ds, n_train = training_data(job)
    trainable = int(sum(int(np.prod(w.shape)) for w in qat.trainable_weights))
    stage("annotate", f"quantized model before fine-tuning: max |dprob| {start_diff:.3f} from Keras; "
                      f"fine-tuning {trainable:,} weights for {job.epochs} epoch(s) on {n_train} examples")

    class EpochLine(tf_keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            progress(f"epoch {epoch + 1}/{job.epochs}: loss {logs.get('loss', float('nan')):.4f}, "
                     f"accuracy {logs.get('accuracy', float('nan')):.4f}")

    hist = qat.fit(ds, epochs=job.epochs, verbose=0, callbacks=[EpochLine()])
    stage("fine_tune", "converting to full integer")

    # tf.lite.TFLiteConverter.from_keras_model takes the tf-keras QAT model as it takes a Keras 3 one.
    Path(job.out).write_bytes(convert_keras(qat, int8_config(data["calib"], job.int8_io)))
    stage("convert")
    history = {k: [round(float(v), 5) for v in vals] for k, vals in hist.history.items()}
    return QatResult(twin_max_abs_diff=diff, history=history, ranges_initialized=ranges_set,
                     batchnorm_frozen=frozen, train_examples=n_train, trainable_weights=trainable,
                     start_max_abs_diff=start_diff, seconds=seconds)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m convert.qat.child JOB.json (started by python -m convert)", file=sys.stderr)
        return 2
    print(run(QatJob.read(Path(argv[0]))).line(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
