"""How an int8 malaria file's answers move with the resize an app uses, on the bundled NIH sample (issue 27).

    python docs/results/2026-12-08-resize-mix/probe.py FILE.tflite ... [--tflite-support PYTHON]   # repo root

Per file: top-1 agreement and probability change between the antialiased resize edge_runtime feeds (TensorFlow's
`antialias=True`, as in training) and plain bilinear sampling (`antialias=False`, what app pipelines do), both
through edge_runtime's interpreter; how many cells sit within 0.1 of the 0.5 boundary; and, with
`--tflite-support` (a Python with tflite-support 0.4.4, `tests/tflite_support_client.py`), top-1 agreement between
edge_runtime on the file and tflite-support's Task `ImageClassifier` on the raw cells, and both accuracies.
"""

import argparse
import json
import os
import subprocess
from pathlib import Path

import numpy as np

import edge_runtime
from edge_runtime.spec import MALARIA_SPEC

CELLS = sorted(str(p) for p in Path("tests/data/malaria_sample").rglob("*.png"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--tflite-support", metavar="PYTHON")
    args = ap.parse_args()
    import tensorflow as tf  # the training pipeline's two resizes

    from train.data import decode_and_resize
    truth = [Path(c).parent.name for c in CELLS]
    aa = np.stack([decode_and_resize(tf.constant(c), MALARIA_SPEC).numpy() for c in CELLS])
    plain = np.stack([decode_and_resize(tf.constant(c), MALARIA_SPEC, antialias=False).numpy() for c in CELLS])
    print("| file | top-1 antialiased vs plain | mean / max abs dprob | cells within 0.1 of 0.5 "
          "| edge_runtime vs tflite-support | accuracy edge_runtime / tflite-support |\n|---|---:|---:|---:|---:|---:|")
    for path in args.files:
        m = edge_runtime.load(path, warmup=False)
        pa = np.concatenate([m.run(aa[i:i + 1]) for i in range(len(CELLS))])
        pp = np.concatenate([m.run(plain[i:i + 1]) for i in range(len(CELLS))])
        near = int((np.abs(pa.max(axis=1) - 0.5) < 0.1).sum())
        tfls = acc = "-"
        if args.tflite_support:
            proc = subprocess.run([args.tflite_support, "tests/tflite_support_client.py", str(path), *CELLS],
                                  capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": ""})
            other = [r["categories"][0]["label"] for r in json.loads(proc.stdout)["images"]]
            mine = [p.label for p in m.predict(CELLS)]
            tfls = f"{np.mean([a == b for a, b in zip(mine, other)]):.2%}"
            acc = (f"{np.mean([a == t for a, t in zip(mine, truth)]):.2%} / "
                   f"{np.mean([a == t for a, t in zip(other, truth)]):.2%}")
        print(f"| {path.name} | {np.mean(pa.argmax(1) == pp.argmax(1)):.2%} | {np.abs(pa - pp).mean():.4f} / "
              f"{np.abs(pa - pp).max():.3f} | {near} | {tfls} | {acc} |")


if __name__ == "__main__":
    main()
