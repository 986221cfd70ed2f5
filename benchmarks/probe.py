"""A fresh process that loads one model, classifies one image and reports its peak memory and timings.

    python -m benchmarks.probe export/malaria-edge_tflite-int8.tflite --threads 2 --image cell.png

What a device pays on first use: interpreter start, imports, model load and
the first result. The parent (`benchmarks.run`) notes the wall-clock time
before it starts this process; this process prints, as one JSON line, the
wall-clock time of its first result and its own peak resident memory
(`resource.getrusage`, no extra dependency). `.keras` files are loaded with
Keras (the reference row); everything else with `edge_runtime`, which never
imports TensorFlow.

`first_use` holds what the device sees first, in order: the load (`init_ms`:
open the runtime session, read the metadata), the first image end to end
(`first_e2e_ms`: decode + preprocess + the first inference, `first_infer_ms`
of it). With `--time` follow the warm-up calls (each timed) and the steady
state (`time_fn`) of inference alone (`latency`) and end to end through
`EdgeModel.predict` on the image file (`e2e`), each with its process CPU time
per image over all threads and, where powercap/RAPL is readable, its energy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.probe", description=__doc__.split("\n")[0])
    p.add_argument("model", help=".tflite, .onnx, .ort (edge_runtime) or .keras (Keras)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--image", help="image to classify (default: a zero input of the model's shape)")
    p.add_argument("--time", action="store_true", help="after the first result, time batch 1 and --batch")
    p.add_argument("--batch", type=int, default=16, help="batch for the throughput measurement")
    p.add_argument("--min-seconds", type=float, default=1.0, help="timed seconds per measurement (at least)")
    p.add_argument("--max-seconds", type=float, default=10.0, help="timed seconds per measurement (at most)")
    return p.parse_args(argv)


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB.

    Linux: VmHWM of /proc/self/status, which starts afresh at exec
    (`ru_maxrss` can carry the parent's figure from before the fork).
    Elsewhere `resource.getrusage` (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e6 if sys.platform == "darwin" else rss * 1024 / 1e6


def _keras_first_result(path: str, threads: int | None, image: str | None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras

    t0 = time.perf_counter()
    model = keras.saving.load_model(path, compile=False, safe_mode=True)
    t_loaded = time.time()
    first = {"init_ms": (time.perf_counter() - t0) * 1e3, "first_e2e_ms": None, "e2e_input": None}
    shape = tuple(int(d) for d in model.inputs[0].shape[1:])
    x = np.zeros((1, *shape), np.float32)
    if image and len(shape) == 3 and shape[-1] in (1, 3):
        from edge_runtime.images import load_and_preprocess  # first use counts this import, as a device pays it
        from train import runs  # first use counts this import

        run = Path(path).parent
        if runs.is_run(run):
            x = load_and_preprocess(image, runs.read_config(run).preprocess)[None]
    t0 = time.perf_counter()
    y = np.asarray(model(x, training=False))
    first["first_infer_ms"] = (time.perf_counter() - t0) * 1e3
    return t_loaded, y.reshape(-1), _KerasTimer(model, x), first


def _edge_first_result(path: str, threads: int | None, image: str | None):
    import numpy as np

    import edge_runtime  # first use counts this import, as a device pays it

    model = edge_runtime.load(path, threads=threads, warmup=False)
    t_loaded = time.time()
    first: dict = {"init_ms": model.load_ms}
    if image:
        t0 = time.perf_counter()
        pred = model.predict([image])[0]
        first["first_e2e_ms"] = (time.perf_counter() - t0) * 1e3
        if not pred.ok:
            raise ValueError(f"{image}: {pred.error}")
        first["first_infer_ms"] = pred.timing["inference_ms"]
        first["e2e_input"] = f"image file ({Path(image).suffix.lstrip('.') or 'no suffix'})"
        probs = np.array(list(pred.probabilities.values()))
        x = model.preprocess(image)[None]
        item = [image]
    else:  # no image (the OCT head takes features): `predict` on the array, which skips decoding
        x = np.zeros((1, *model.input_shape), np.float32)
        t0 = time.perf_counter()
        probs = model.run(x)[0]
        first.update(first_infer_ms=(time.perf_counter() - t0) * 1e3, first_e2e_ms=None,
                     e2e_input="features array" if model.metadata.part == "head" else "preprocessed array")
        item = x
    return t_loaded, probs, _EdgeTimer(model, x, threads, item), first


class _KerasTimer:
    """Batch-1 and batched calls of a Keras model through `predict_on_batch` (a compiled tf.function, no tf.data)."""

    def __init__(self, model, x):
        self.model, self.x = model, x

    def one(self):
        return lambda: self.model.predict_on_batch(self.x)

    def e2e(self):
        return None  # the reference is not a device path: no end-to-end figure

    def batched(self, n: int):
        import numpy as np

        xb = np.repeat(self.x, n, axis=0)
        return lambda: self.model.predict_on_batch(xb), "batched"


class _EdgeTimer:
    """Batch-1 calls through `EdgeModel.run` (quantize, runtime, dequantize), and batched calls when the runtime allows.

    Batched: one runtime call per batch, through a backend session that takes
    the whole batch (onnxruntime with a dynamic batch: the model's own
    session; LiteRT: a second session opened at that batch). A graph with a
    fixed batch of 1 is looped instead, and the row says so.
    """

    def __init__(self, model, x, threads, item):
        self.model, self.x, self.threads, self.item = model, x, threads, item

    def one(self):
        return lambda: self.model.run(self.x)

    def e2e(self):
        """One input through `predict`, as a device classifies it (an image file: decode, preprocess, infer)."""
        return lambda: self.model.predict(self.item)

    def batched(self, n: int):
        import numpy as np

        from edge_runtime.backends import open_session  # imported after the first result
        from edge_runtime.model import quantize  # imported after the first result

        spec = self.model.session.input
        xb = np.repeat(self.x, n, axis=0)
        xb = quantize(xb, spec) if spec.quantized else xb.astype(spec.dtype)
        try:
            sess = self.model.session
            if sess.batch not in (None, n):
                sess = open_session(self.model.path, self.model.backend, self.threads, batch=n)
            if sess.batch not in (None, n):
                raise ValueError(f"fixed batch {sess.batch}")
            sess.run_batch(xb)
            return (lambda: sess.run_batch(xb)), "batched"
        except Exception:  # a graph with a fixed batch of 1: loop over the batch instead (said in the row)
            pass
        xs = np.repeat(self.x, n, axis=0)
        return (lambda: self.model.run(xs)), "looped"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runner = _keras_first_result if args.model.endswith(".keras") else _edge_first_result
        t_loaded, probs, timer, first = runner(args.model, args.threads, args.image)
        t_first = time.time()
        out = {"t_loaded": t_loaded, "t_first_result": t_first, "peak_rss_mb": peak_rss_mb(),
               "probabilities": [float(v) for v in probs], "first_use": first}
        if args.time:
            from convert.timing import EnergyCounter, time_fn  # only with --time, after the first result

            limits = dict(min_seconds=args.min_seconds, max_seconds=args.max_seconds)
            energy = EnergyCounter()
            out["energy"] = energy.describe()
            # Fast models get hundreds of runs from min_seconds; min_runs only matters for slow ones (InceptionV3).
            out["latency"] = time_fn(timer.one(), warmup=5, min_runs=20, energy=energy, **limits)
            e2e = timer.e2e()
            if e2e is not None:
                out["e2e"] = time_fn(e2e, warmup=2, min_runs=20, energy=energy, **limits)
            fn, mode = timer.batched(args.batch)
            # One batch call of a slow model (the fused InceptionV3: 16 images, seconds) already averages its
            # images: after its warm-up call it is timed for --min-seconds, at least once (it was 3 calls).
            out["throughput"] = time_fn(fn, warmup=1, min_runs=1, **limits) | {"batch": args.batch, "mode": mode}
            out["peak_rss_after_timing_mb"] = peak_rss_mb()
    except Exception as e:  # reported to the parent as the row's error
        from edge_runtime.model import first_line  # only on failure

        print(json.dumps({"error": first_line(e)}))
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
