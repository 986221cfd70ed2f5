"""`python -m train oct <command>`: the retinal OCT pipeline (parsing only; work is imported lazily).

    python -m train oct synth --out data/oct-synth --per-class 40 --patients 8
    python -m train oct extract --manifest runs/oct.csv --base-weights imagenet --out runs/oct-features.h5
    python -m train oct head --store runs/oct-features.h5 --out runs/oct-head [--mode end-to-end]
    python -m train oct fuse --head keras2_head.h5 --base-weights imagenet --out runs/oct-imported
    python -m train oct gradcam runs/oct-head [IMAGE...] --out DIR [--misclassified MANIFEST]
    python -m train oct predict runs/oct-head IMAGE_OR_URL...
"""

from __future__ import annotations

import argparse
from pathlib import Path

from train.oct import gradcam, predict

BASE_HELP = "imagenet (Keras' cached ImageNet weights), none (random, for tests) or a weights file PATH"


def _base_args(p: argparse.ArgumentParser, default: str | None = "imagenet") -> None:
    g = p.add_argument_group("base network")
    g.add_argument("--base-weights", default=default, metavar="imagenet|none|PATH", help=BASE_HELP)
    g.add_argument("--base-seed", type=int, default=None if default is None else 0,
                   help="seed of the random base when --base-weights none")
    g.add_argument("--preprocess", choices=("inception", "rescale"), default=None if default is None else "inception",
                   help="inception: [-1, 1] as the ImageNet weights expect (default); rescale: 1/255 as the source")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("targets", nargs="*", metavar="RUN IMAGE",
                   help="OCT run directory, then image paths or http(s) URLs (with --head: images only)")
    p.add_argument("--head", type=Path, help="a head trained elsewhere (.keras, or Keras 2 .h5/.hdf5, 8x8x2048 -> 4)")
    _base_args(p)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the `oct` command group to the top-level parser."""
    o = sub.add_parser("oct", help="retinal OCT: synthetic data, bottleneck store, head, Grad-CAM, prediction")
    osub = o.add_subparsers(dest="oct_command", required=True)

    s = osub.add_parser("synth", help="write OCT2017-style synthetic B-scans (marked synthetic)")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--per-class", type=int, default=40, help="train images per class")
    s.add_argument("--patients", type=int, default=8, help="train patients per class")
    s.add_argument("--test-per-class", type=int, help="test images per class (default per-class/4)")
    s.add_argument("--test-patients", type=int,
                   help="test patients per class, disjoint from train (default patients/4)")
    s.add_argument("--seed", type=int, default=0)

    e = osub.add_parser("extract", help="manifest -> HDF5 store of InceptionV3 features (resumable)")
    e.add_argument("--manifest", required=True, type=Path)
    e.add_argument("--out", required=True, type=Path, help="store .h5 (an existing partial store is resumed)")
    _base_args(e)
    e.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="feature storage type")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--splits", nargs="+", choices=("train", "val", "test"), help="only these splits (default all)")

    h = osub.add_parser("head", help="train the shallow head on a store (or --mode end-to-end)")
    h.add_argument("--store", type=Path, help="store from `oct extract` (not needed with --resume)")
    h.add_argument("--out", required=True, type=Path, help="run directory")
    h.add_argument("--mode", choices=("head", "end-to-end"), default="head")
    h.add_argument("--epochs", type=int, default=100)
    h.add_argument("--batch-size", type=int, default=32)
    h.add_argument("--seed", type=int, default=42)
    h.add_argument("--resume", action="store_true")
    h.add_argument("--quiet", action="store_true", help="one line per epoch")
    _base_args(h, default=None)

    f = osub.add_parser("fuse", help="make a run (fused model) from a head trained elsewhere")
    f.add_argument("--head", required=True, type=Path)
    f.add_argument("--out", required=True, type=Path)
    f.add_argument("--store", type=Path, help="check the base and preprocessing against this store")
    f.add_argument("--labels", nargs="+", help="class order of the head (default CNV DME DRUSEN NORMAL)")
    _base_args(f)

    g = osub.add_parser("gradcam", help="Grad-CAM overlays (PNG per image)")
    _model_args(g)
    g.add_argument("--out", required=True, type=Path)
    g.add_argument("--misclassified", type=Path, metavar="MANIFEST", help="a map for every wrong prediction of --split")
    g.add_argument("--split", default="test", choices=("train", "val", "test"))

    p = osub.add_parser("predict", help="classify images from paths or URLs")
    _model_args(p)
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per URL")
    p.add_argument("--max-bytes", type=int, default=20 * 2**20, help="largest download accepted")


def run(args: argparse.Namespace) -> int:
    """Dispatch a parsed `oct` command; FileNotFoundError/ValueError reach the caller (exit 2)."""
    c = args.oct_command
    if c == "synth":
        from train.oct import synth  # loads scipy: imported only when this runs

        return synth.run(args.out, args.per_class, args.patients, args.test_per_class, args.test_patients,
                             args.seed)
    if c == "extract":
        from train.oct import store  # loads TensorFlow: imported only when this runs

        return store.run(args.manifest, args.out, args.base_weights, args.base_seed, args.preprocess,
                             args.dtype, args.batch_size, args.splits)
    if c == "head":
        from train.oct import fit  # loads TensorFlow: imported only when this runs

        if args.store is None and not args.resume:
            raise ValueError("--store is required (except with --resume)")
        fit.train(args.store, args.out, args.mode, args.epochs, args.batch_size, args.seed,
                        args.base_weights, args.base_seed, args.preprocess, resume=args.resume,
                        verbose=2 if args.quiet else 1)
        return 0
    if c == "fuse":
        from train.oct import fit  # loads TensorFlow: imported only when this runs

        fit.import_head(args.head, args.out, args.base_weights, args.base_seed, args.preprocess,
                              args.labels, args.store)
        return 0
    if c in ("gradcam", "predict"):
        if args.head is not None:
            run_dir, images = None, list(args.targets)
        elif args.targets:
            run_dir, images = Path(args.targets[0]), list(args.targets[1:])
        else:
            raise ValueError(f"oct {c} needs a run directory (first argument) or --head PATH")
        if c == "predict" and not images:
            raise ValueError("oct predict needs at least one image path or http(s) URL")
        if c == "gradcam":
            return gradcam.run(run_dir, images, args.out, args.head, args.base_weights, args.base_seed,
                                   args.preprocess, args.misclassified, args.split)

        return predict.run(run_dir, images, args.head, args.base_weights, args.base_seed,
                               args.preprocess, args.format, args.timeout, args.max_bytes)
    raise AssertionError(c)
