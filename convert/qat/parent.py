"""Parent side of QAT (the Keras 3 `python -m convert` process): write the job, run the child, read its result.

The child is `python -m convert.qat.child JOB.json` with TF_USE_LEGACY_KERAS=1.
Its progress lines are passed to the export log as they come; if the parent
is interrupted (Ctrl-C, or SIGTERM, which `convert.cli` turns into
KeyboardInterrupt) the child is killed before the exception goes on, so the
export's own cleanup leaves no half-written artifact.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from convert.qat.job import PROGRESS_TAG, RESULT_TAG, Architecture, QatJob, QatResult
from convert.qat.twin import flat_weights

# The folder holding the `convert` package, put on the child's PYTHONPATH.
ROOT = Path(__file__).resolve().parents[2]


def twin_architecture(source) -> Architecture:
    """What the child builds for `source`.

    Raises:
        ValueError: a source medge has no architecture code for (a bare model file).
    """
    cfg = source.config
    if source.resnet_config is not None:
        return Architecture("resnet", resnet=source.resnet_config)
    if cfg is not None and cfg.task == "oct" and cfg.mode in ("head", "end-to-end"):
        return Architecture("oct-head" if source.part == "head" else "oct-fused", mode=cfg.mode)
    raise ValueError(
        "tflite-qat-int8 builds a tf-keras twin from the architecture code, which needs a medge run directory "
        "(a malaria ResNet run or an OCT run, whose config.json names the architecture); this source has none"
    )


def child_env() -> dict[str, str]:
    """The child's environment: tf-keras behind `tf.keras`, quiet TensorFlow, this checkout importable."""
    return dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3",
                PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))


def run_child(job_path: Path, progress: Callable[[str], None]) -> QatResult:
    """Run the child on `job_path`, passing each progress line to `progress`; returns its result.

    Raises:
        RuntimeError: the child failed (the message ends with its stderr's last lines).
    """
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "convert.qat.child", str(job_path)], env=child_env(),
                                stdout=subprocess.PIPE, stderr=err, text=True)
        result = None
        try:
            for line in proc.stdout:  # the child's progress, shown as it comes
                if line.startswith(RESULT_TAG):
                    result = QatResult.from_line(line)
                elif line.startswith(PROGRESS_TAG):
                    progress(line[len(PROGRESS_TAG):].rstrip())
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
    return result


def make_job(job, dest: Path, work: Path) -> QatJob:
    """The child's job for an export job (`convert.export.ExportJob`); writes the arrays it points to into `work`."""
    arch = twin_architecture(job.source)
    head_part = arch.kind == "oct-head"
    if not head_part and not job.train_items:
        raise ValueError("tflite-qat-int8 fine-tunes on the training split: pass --calib MANIFEST with a train split")
    calib = job.calibration()
    weights, names = flat_weights(job.model)
    np.savez(work / "weights.npz", **weights)
    probe = calib.x[:8]
    np.savez(work / "data.npz", calib=calib.x, probe=probe,
             probe_probs=job.model.predict(probe, verbose=0))
    order = {l: i for i, l in enumerate(job.source.labels)}
    unknown = sorted({l for _, l in job.train_items} - set(order))
    if unknown:
        raise ValueError(f"training labels {unknown} are not among the model's labels {list(job.source.labels)}")
    o = job.options
    return QatJob(
        architecture=arch,
        input_shape=tuple(int(d) for d in job.model.inputs[0].shape[1:]),
        labels=tuple(job.source.labels),
        name=job.model.name,
        preprocess=job.source.spec.to_dict(),
        train=tuple((p, order[l]) for p, l in job.train_items),
        store=str(job.source.store) if head_part else None,
        epochs=o.qat_epochs,
        learning_rate=o.qat_learning_rate,
        batch_size=o.qat_batch_size,
        seed=o.seed,
        int8_io=o.int8_io,
        weights=str(work / "weights.npz"),
        layer_names=tuple(names),
        data=str(work / "data.npz"),
        out=str(dest),
    )


def export_qat_int8(job, fmt, dest: Path) -> dict[str, Any]:
    """The `tflite-qat-int8` exporter: run the fine-tuning child on this job's model and data; it writes `dest`."""
    work = job.workdir / "qat"
    work.mkdir(exist_ok=True)
    qjob = make_job(job, dest, work)
    result = run_child(qjob.write(work / "job.json"), lambda line: job.log(f"[{fmt.name}] {line}"))
    o, calib = job.options, job.calibration()
    return {
        "weights": "int8 per-channel",
        "activations": "int8",
        "io": "int8" if o.int8_io else "float32",
        "quantizer": "tensorflow-model-optimization QAT (tf-keras twin) + tf.lite.TFLiteConverter",
        "qat_epochs": o.qat_epochs,
        "qat_learning_rate": o.qat_learning_rate,
        "twin": qjob.architecture.kind,
        "qat_train_images": result.train_examples,
        "qat_trainable_weights": result.trainable_weights,
        "qat_history": result.history,
        "qat_seconds": result.seconds,
        "twin_max_abs_diff": result.twin_max_abs_diff,
        "qat_start_max_abs_diff": result.start_max_abs_diff,  # fake-quantized, before fine-tuning
        "activation_ranges_from_calibration": result.ranges_initialized,
        "batchnorm_frozen": result.batchnorm_frozen,
        "calibration_images": len(calib),  # images or feature maps
        "calibration_from": calib.origin,
    }
