"""`python -m train <command>`: split, malaria, cv, evaluate, demo, oct.

    python -m train split --data DIR --out MANIFEST.csv [--mode patient|random]
    python -m train malaria --manifest MANIFEST.csv --preset edge --out RUN
    python -m train cv --manifest MANIFEST.csv --preset edge --folds 5 --out DIR
    python -m train evaluate RUN --manifest MANIFEST.csv --split test --out RUN/eval
    python -m train demo [--out runs/demo]
    python -m train field-crops --data ../shared/data/iml_malaria --out runs/field-crops
    python -m train field-cv --crops runs/field-crops --nih runs/release.csv --init releases/malaria/model.keras \
        --data ../shared/data/iml_malaria --out runs/field-cv --epochs 3
    python -m train site-adapt --site NAME --fields DIR_OR_JSON --init releases/malaria-field/model.keras \
        --nih runs/release.csv --shared-crops runs/field-crops --out runs/site-NAME
    python -m train oct synth|extract|head|fuse|gradcam|predict ...   (see train/oct/cli.py)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge_runtime.smear import NORMALISATIONS
from train import evaluate, fieldcrops, split
from train.malaria import cv, fieldcv, review, siteadapt
from train.malaria.presets import MALARIA_PRESETS
from train.oct import cli as oct_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("split", help="class-folder tree -> train/val/test manifest CSV")
    s.add_argument("--data", required=True, type=Path, help="<root>/<class>/<images> or <root>/train|test/<class>/")
    s.add_argument("--out", required=True, type=Path, help="manifest CSV to write")
    s.add_argument("--mode", choices=("patient", "random"), default="patient")
    s.add_argument("--seed", type=int, default=42)
    s.add_argument("--val", type=float, default=0.1, help="share of the non-test images for validation")
    s.add_argument("--test", type=float, default=0.2, help="share of all images for test")
    s.add_argument("--exclude-patients-of", type=Path, metavar="TREE",
                   help="leave out every patient with an image under this class-folder tree (e.g. the bundled "
                        "sample, so it stays unseen)")

    m = sub.add_parser("malaria", help="train the malaria cell ResNet")
    m.add_argument("--manifest", required=True, type=Path)
    m.add_argument("--preset", choices=sorted(MALARIA_PRESETS), default="edge")
    m.add_argument("--epochs", type=int, help="override the preset's epochs")
    m.add_argument("--batch-size", type=int, help="override the preset's global batch size")
    m.add_argument("--out", required=True, type=Path, help="run directory")
    m.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    m.add_argument("--seed", type=int, default=42)
    m.add_argument("--quiet", action="store_true", help="no per-batch progress bar (per-epoch lines only)")
    m.add_argument("--init", type=Path, metavar="KERAS",
                   help="fine-tune: start from this trained Keras model (.keras or a run directory), e.g. "
                        "releases/malaria/model.keras, with the preset's optimizer and schedule")
    m.add_argument("--lr", type=float, help="override the preset's peak learning rate (e.g. 0.005 to fine-tune)")
    m.add_argument("--hue", type=float, help="override the preset's stain jitter: hue rotation up to +-HUE/2 of the "
                                             "colour circle")
    m.add_argument("--saturation", type=float, help="override the preset's stain jitter: saturation factor "
                                                    "0.5 +- SATURATION")
    m.add_argument("--resize-mix", type=float, metavar="SHARE",
                   help="override the preset's share of training images shrunk by plain bilinear sampling instead "
                        "of the antialiased resize (0-1; the presets' default: 0), so an app that resizes without "
                        "antialiasing gets the same answers")
    m.add_argument("--keep", choices=("best", "final"), default="best",
                   help="best: the epoch with the best val accuracy (needs a val split); final: the last epoch "
                        "(a fixed schedule, e.g. a release trained on every developer patient)")

    c = sub.add_parser(
        "cv", help="patient-grouped k-fold cross-validation of a malaria preset",
        description="Pools ALL records of the manifest (train, val and test splits alike, unless --exclude-split), "
                    "deals whole patients to class-stratified folds, trains the preset on k-1 folds with its fixed "
                    "schedule (final epoch kept, no checkpoint selection) and predicts the held-out fold. Writes "
                    "cv.json, cv.csv, cv.md and oof.csv (out-of-fold predictions) into --out.",
    )
    c.add_argument("--manifest", required=True, type=Path)
    c.add_argument("--preset", choices=sorted(MALARIA_PRESETS), required=True)
    c.add_argument("--folds", type=int, default=5)
    c.add_argument("--out", required=True, type=Path, help="cross-validation folder (one run dir per fold)")
    c.add_argument("--seed", type=int, default=42, help="fold assignment, training and bootstrap seed")
    c.add_argument("--epochs", type=int, help="override the preset's epochs")
    c.add_argument("--batch-size", type=int, help="override the preset's global batch size")
    c.add_argument("--resume", action="store_true",
                   help="continue a killed cross-validation: finished folds are skipped, an unfinished one resumes")
    c.add_argument("--bootstrap", type=int, default=2000, help="patient-level bootstrap draws for the 95%% intervals")
    c.add_argument("--exclude-split", choices=("train", "val", "test"),
                   help="keep this split of the manifest out of the cross-validation (e.g. a held-out test split)")

    r = sub.add_parser(
        "review", help="which labels to doubt: cleanlab on a cross-validation's out-of-fold predictions",
        description="Flags the cells whose given label disagrees with their out-of-fold prediction (cleanlab's "
                    "confident learning), estimates the share of wrong labels, and writes label_issues.csv, "
                    "summary.json/.md and a contact sheet per label for a person to review. Changes nothing.",
    )
    r.add_argument("cv", type=Path, help="a `train cv` folder (its oof.csv is read)")
    r.add_argument("--out", type=Path, help="output folder (default: CV/review)")
    r.add_argument("--top", type=int, default=48, help="cells per contact sheet (default 48)")

    e = sub.add_parser("evaluate", help="evaluate a run on a manifest split or a class-folder tree")
    e.add_argument("run", type=Path, help="run directory (or a .keras file inside one)")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", type=Path)
    src.add_argument("--data", type=Path, help="evaluate every image of a class-folder tree instead")
    e.add_argument("--split", default="test", choices=("train", "val", "test"))
    e.add_argument("--out", type=Path, help="report folder (default RUN/eval-<split>)")
    e.add_argument("--batch-size", type=int, default=64)

    d = sub.add_parser("demo", help="split the bundled sample, train `edge` briefly, evaluate, print the report")
    d.add_argument("--data", type=Path, default=Path(__file__).resolve().parent.parent / "tests/data/malaria_sample")
    d.add_argument("--out", type=Path, default=Path("runs/demo"))
    d.add_argument("--epochs", type=int, default=8)

    fc = sub.add_parser("field-crops", help="labelled training crops cut from annotated field photos (the runtime's "
                                          "segmentation and crop)")
    fc.add_argument("--data", required=True, type=Path, help="folder with fields/ and annotations.json (IML-Malaria)")
    fc.add_argument("--out", required=True, type=Path, help="folder for crops/, field-crops.csv and field-crops.json")
    fc.add_argument("--fields", nargs="+", metavar="NAME", help="only these fields (file names or stems)")
    fc.add_argument("--shifted", type=int, default=0, metavar="K",
                    help="also K shifted variants of every field (another stain, white balance, exposure, blur, "
                         "magnification, noise, JPEG at random: train/fieldaug.py), segmented and cut the same way")
    fc.add_argument("--shifted-uninfected", type=int, default=15, metavar="N",
                    help="uninfected crops kept per shifted variant (seeded sample; every parasitized one is kept)")
    fc.add_argument("--seed", type=int, default=0, help="seed of the shifts and samples")
    fc.add_argument("--off-target", action="store_true",
                    help="also cut, as Uninfected, every region the runtime would classify that overlaps no annotated "
                         "object (IoU < 0.1 with every box: white-cell pieces, lysed cells, deposits); rows marked "
                         "region=off-target (default: off)")
    fc.add_argument("--spanning", action="store_true",
                    help="also cut, as Uninfected, every unmatched region the runtime would classify that spans "
                         "annotated cells (best IoU 0.1-0.5: merged overlapping cells, a cell with a piece of its "
                         "neighbour) and holds under 10%% of any parasite's box; rows marked region=spanning "
                         "(default: off)")
    fc.add_argument("--normalise", choices=NORMALISATIONS, metavar="MODE",
                    help="cut every crop (shifted ones after their shift) from the field normalised as "
                         "`python -m edge_runtime smear --normalise MODE` does: chroma or background "
                         "(default: off, the photo's own colours)")

    fieldcv.add_parser(sub)
    siteadapt.add_parser(sub)
    oct_cli.add_parser(sub)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "split":
            return split.run(args.data, args.out, args.mode, args.seed, args.val, args.test, args.exclude_patients_of)
        if args.command == "malaria":
            from train.malaria import fit  # loads TensorFlow: imported only when this runs

            fit.train_malaria(
                args.manifest, args.preset, args.out, epochs=args.epochs, batch_size=args.batch_size,
                resume=args.resume, seed=args.seed, verbose=1 if not args.quiet else 2,
                select_best=args.keep == "best", init=args.init, lr=args.lr, hue=args.hue,
                saturation=args.saturation, resize_mix=args.resize_mix,
            )
            return 0
        if args.command == "cv":
            return cv.run(args, sys.argv[1:] if argv is None else argv)
        if args.command == "review":
            return review.run(args.cv, args.out, args.top)
        if args.command == "evaluate":
            report = evaluate.evaluate_run(
                args.run, manifest=args.manifest, data=args.data, split=args.split, out=args.out,
                batch_size=args.batch_size,
            )
            print(evaluate.format_report(report))
            return 0
        if args.command == "demo":
            from train.malaria import demo  # loads TensorFlow: imported only when this runs

            return demo.run(args.data, args.out, args.epochs)
        if args.command == "field-crops":
            return fieldcrops.run(args.data, args.out, args.fields, args.shifted, args.shifted_uninfected, args.seed,
                                   args.off_target, args.spanning, args.normalise)
        if args.command == "field-cv":
            return fieldcv.run(args, sys.argv[1:] if argv is None else argv)
        if args.command == "site-adapt":
            return siteadapt.run(args, sys.argv[1:] if argv is None else argv)
        if args.command == "oct":
            return oct_cli.run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    raise AssertionError(args.command)
