"""`python -m convert`: export a Keras model to the format table's rows, or inspect an artifact.

    python -m convert SOURCE --out DIR [--formats all|name,name] [--calib MANIFEST|DIR] [--calib-n 300] [--force]
    python -m convert runs/malaria-edge --out runs/malaria-edge/export
    python -m convert model.h5 --labels Parasitized,Uninfected --calib runs/malaria.csv --out export
    python -m convert runs/malaria-edge --out export --bundle     # + export/malaria-edge_bundle/ and .zip
    python -m convert runs/oct-head --out export/oct              # OCT: image -> class (base + head fused)
    python -m convert runs/oct-head --out export/oct-head --part head   # OCT: the head alone (8x8x2048 features)
    python -m convert inspect export/malaria-edge_tflite-int8.tflite [--format table|json]
    python -m convert release runs/release-edge --name malaria --version 1.0.0 --sample tests/data/malaria_sample \
        --cv runs/cv-edge     # the package's released model: releases/malaria/ and edge_runtime/released/

SOURCE is a run directory (labels, preprocessing and calibration manifest come
from its config.json), a .keras file, a Keras 2 .h5/.hdf5 file, or a SavedModel
folder. Artifacts are named `{model}_{format}.{ext}` with a `{model}_{format}.json`
sidecar; `conversion.json` in DIR records every row's proof against Keras (one
model per DIR; exporting more formats of the same model later adds to it).

Exit codes: 0 every row passed (or was kept with --allow-drop), 1 some row
failed, 2 bad arguments or inputs (nothing exported).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from convert import layer_errors
from convert.converters import CALIBRATION_METHODS, OPSET
from convert.export import run_export
from convert.formats import FORMATS, parse_formats
from convert.job import DEFAULT_MIN_AGREEMENT, DEFAULT_QAT_MAX_DROP, Options
from convert.onnx_export import ACTIVATION_TYPES
from convert.release import release_parser, run_cli
from convert.report import ConversionRow, format_table, read_report, report_json, report_path
from edge_runtime import standard_metadata
from edge_runtime.cli import fraction
from edge_runtime.metadata import read_metadata


def _labels(text: str) -> list[str]:
    labels = [l.strip() for l in text.split(",") if l.strip()]
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise argparse.ArgumentTypeError(f"--labels needs 2+ distinct comma-separated names, got {text!r}")
    return labels


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m convert", description=__doc__.split("\n")[0],
        epilog=f"formats: {', '.join(FORMATS)}. `python -m convert inspect FILE` prints an artifact's metadata.",
    )
    p.add_argument("source", type=Path, help="run directory, .keras, Keras 2 .h5/.hdf5, or SavedModel folder")
    p.add_argument("--out", required=True, type=Path,
                   help="folder for the artifacts and conversion.json (one model per folder)")
    p.add_argument("--formats", default="all", help="'all' or comma-separated rows of the format table")
    p.add_argument("--name", help="model name in file names (default: run directory name or file stem)")
    p.add_argument("--part", choices=("model", "head"), default="model",
                   help="model: the run's image -> class model (OCT: base + head fused); head: an OCT run's head "
                        "alone (features -> class), calibrated and proven on the run's feature store")
    p.add_argument("--labels", type=_labels, help="class names in output order, for a source that has none")
    p.add_argument("--force", action="store_true", help="overwrite existing artifacts")
    p.add_argument("--bundle", action="store_true",
                   help="also write {model}_bundle/ and .zip: artifacts, labels.txt, manifest.json, INTEGRATION.md")
    out = p.add_argument_group("output")
    out.add_argument("--format", choices=("table", "json"), default="table", dest="report_format",
                     help="how to print the final report")
    d = p.add_argument_group("calibration and proof")
    d.add_argument("--calib", type=Path,
                   help="manifest CSV (train split calibrates, test split proves) or image folder "
                        "(default: the run's manifest)")
    d.add_argument("--calib-n", type=int, default=300, help="calibration images (warns below 100)")
    d.add_argument("--eval-n", type=int, default=1000, help="proof images compared with Keras (0: all)")
    p.add_argument("--threshold", type=fraction,
                   help="confidence below which a device answers 'uncertain — refer', stored in the metadata "
                        "(default: the task's, malaria 0.8, OCT 0.6)")
    p.add_argument("--model-version", default="", metavar="VERSION",
                   help="the release's version (e.g. 1.1.0), written into each file's metadata: medge's entry, "
                        "and the standard TFLite metadata's `version` (default: none; the standard entry then "
                        "gives the source model's sha256 prefix)")
    d.add_argument("--min-agreement", type=fraction, default=DEFAULT_MIN_AGREEMENT,
                   help="lowest top-1 agreement with Keras for a post-training quantized artifact "
                        "(QAT rows: --qat-max-drop)")
    d.add_argument("--qat-max-drop", type=float, default=DEFAULT_QAT_MAX_DROP, metavar="PP",
                   help="tflite-qat-int8 is a fine-tune, judged by accuracy: at most PP percentage points below "
                        "Keras' on the proof split (not by agreement; with unlabelled proof inputs, agreement)")
    d.add_argument("--allow-drop", action="store_true",
                   help="keep artifacts below the thresholds (flagged in the report; exit 0)")
    d.add_argument("--seed", type=int, default=0, help="seed of the calibration and proof samples")
    q = p.add_argument_group("quantization")
    q.add_argument("--calib-method", choices=CALIBRATION_METHODS, default="minmax",
                   help="onnx-int8 calibration (TFLite int8 always uses MinMax)")
    q.add_argument("--onnx-activations", choices=ACTIVATION_TYPES, default="auto",
                   help="onnx-int8 activation type; auto times uint8 and int8 here and keeps the faster")
    q.add_argument("--int8-io", action="store_true",
                   help="tflite int8 rows take int8 input and give int8 output (default float32 I/O)")
    q.add_argument("--int8-quantizer", choices=("converter", "litert-quantizer"), default="converter",
                   help="tflite-int8 quantizer: the TFLite converter, or LiteRT Quantizer (ai-edge-quantizer, "
                        "int8 I/O; measured slightly closer to Keras, needs that package)")
    q.add_argument("--layer-report-n", type=int, default=64, metavar="N",
                   help="int8 rows: per-layer float-vs-int8 error on N calibration images, in conversion.json "
                        "and {model}_{format}_layers.png (0: off)")
    d.add_argument("--golden-n", type=int, default=4, metavar="N",
                   help="proof inputs embedded in every artifact with its own outputs, for "
                        "`python -m edge_runtime selftest` on the device (1..32)")
    q.add_argument("--max-drop", type=float, metavar="PP",
                   help="tflite-int8, onnx-int8, ort-int8: at most PP percentage points of accuracy below Keras on "
                        "the proof split, measured through edge_runtime: tries the other calibrations, then int16 "
                        "activations, then keeps the worst layers (per-layer report) in float one at a time; keeps "
                        "the fastest step within PP (each step in conversion.json); fails when none is")
    q.add_argument("--opset", type=int, default=OPSET, help="ONNX opset")
    q.add_argument("--qat-epochs", type=int, default=2, help="quantization-aware fine-tuning epochs")
    q.add_argument("--qat-learning-rate", type=float, default=1e-3)
    q.add_argument("--qat-batch-size", type=int, default=32)
    return p


def inspect_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convert inspect",
                                description="print the metadata embedded in a .tflite, .onnx or .ort file")
    p.add_argument("file", type=Path)
    p.add_argument("--format", choices=("table", "json"), default="table")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "inspect":
        args = inspect_parser().parse_args(argv[1:])
        args.command = "inspect"
        return args
    if argv and argv[0] == "release":
        args = release_parser().parse_args(argv[1:])
        args.command, args.argv = "release", argv[1:]
        return args
    args = export_parser().parse_args(argv)
    args.command = "export"
    return args


def format_metadata(meta) -> str:
    """Human-readable metadata, one field a line."""
    d = meta.to_dict()
    lines = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            lines.append(f"{k}:")
            lines += [f"  {kk}: {json.dumps(vv) if isinstance(vv, (dict, list)) else vv}" for kk, vv in v.items()]
        else:
            lines.append(f"{k}: {json.dumps(v) if isinstance(v, (list, dict)) else v}")
    return "\n".join(lines)


def _inspect(args) -> int:
    meta = read_metadata(args.file)
    standard = None
    if args.file.suffix.lower() == ".tflite":
        standard = standard_metadata.read(args.file.read_bytes())
    if args.format == "json":
        d = meta.to_dict()
        if standard is not None:
            d["tflite_metadata"] = standard  # beside medge's keys; the sidecar .json holds medge's alone
        print(json.dumps(d, indent=2))
    else:
        print(f"{args.file} ({args.file.stat().st_size / 1e6:.3f} MB)")
        print(format_metadata(meta))
        if standard is not None:
            print("\nstandard TFLite metadata (TFLITE_METADATA; MediaPipe Tasks reads it):")
            print(standard_metadata.format_lines(standard))
        row = _row_beside(args.file)
        report = row.layer_errors if row is not None else None
        if report and "layers" in report:
            print(f"\nper-layer int8 error ({report['tool']}, {report['images']} calibration images; "
                  f"{report['metric']}; from {args.file.parent / 'conversion.json'}):")
            print(layer_errors.format_table(report))
            if report.get("png"):
                print(f"plot: {args.file.parent / report['png']}")
        elif report:
            print(f"\nper-layer int8 error: none ({report.get('error')})")
    return 0


def _row_beside(artifact: Path) -> ConversionRow | None:
    """The conversion.json row of `artifact` when that report lies beside it (and can be read)."""
    try:
        return read_report(report_path(artifact.parent)).row_for_file(artifact.name)
    except (FileNotFoundError, ValueError):
        return None


def _terminate(signum, frame):
    # Turn SIGTERM into an exception so the temp-file cleanup in `finally` blocks runs.
    raise KeyboardInterrupt(f"signal {signum}")


def _export(args) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    formats = parse_formats(args.formats)
    options = Options(
        calib=args.calib, calib_n=args.calib_n, eval_n=args.eval_n, min_agreement=args.min_agreement,
        allow_drop=args.allow_drop, force=args.force, calib_method=args.calib_method,
        onnx_activations=args.onnx_activations, int8_io=args.int8_io, int8_quantizer=args.int8_quantizer,
        opset=args.opset,
        qat_epochs=args.qat_epochs, qat_learning_rate=args.qat_learning_rate,
        qat_batch_size=args.qat_batch_size, seed=args.seed, bundle=args.bundle,
        layer_report_n=args.layer_report_n, golden_n=args.golden_n, max_drop=args.max_drop,
        threshold=args.threshold, model_version=args.model_version,
        qat_max_drop=args.qat_max_drop,
    )
    log = print if args.report_format == "table" else (lambda *a, **k: print(*a, file=sys.stderr, **k))
    report = run_export(args.source, args.out, formats, options, labels=args.labels, name=args.name, log=log,
                        part=args.part)
    if args.report_format == "json":
        print(report_json(report))
    else:
        print()
        print(format_table(report))
        if report.bundle:
            b = report.bundle
            print(f"\nbundle: {b['error']}" if "error" in b else f"\nbundle: {Path(args.out) / b['zip']}")
        print(f"\n{'all rows passed' if report.ok else 'SOME ROWS FAILED'}; "
              f"report in {report_path(args.out, report.source['name'])}")
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "release":
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
            return run_cli(args, args.argv)
        signal.signal(signal.SIGTERM, _terminate)
        return _export(args)
    except (FileNotFoundError, FileExistsError, ValueError, LookupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no partial artifact was left behind", file=sys.stderr)
        return 130
