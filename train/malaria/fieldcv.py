"""`python -m train field-cv`: what fine-tuning on field crops changes, by leave-one-block-out cross-validation.

    python -m train field-crops --data ../shared/data/iml_malaria --out runs/field-crops
    python -m train field-cv --crops runs/field-crops --nih runs/release.csv --init releases/malaria/model.keras \\
        --data ../shared/data/iml_malaria --out runs/field-cv --epochs 3

The fields' slide blocks (the `patient` column of field-crops.csv) are the folds. For each block B:

1. **Fold manifest** (FOLD/manifest.csv): train = every NIH cell of `--nih` + the field crops of
   the *other* blocks: their Uninfected crops (at most `--uninfected-per-block` a block, a seeded
   sample) and their Parasitized crops repeated `--parasite-repeat` times (the oversampling: ~55
   parasite crops against thousands of cells; augmentation makes the repeats differ); test = the
   bundled NIH sample (`--sample`, 400 cells of unseen patients), which `python -m convert` uses as
   its proof set and which scores NIH accuracy.
2. **Fine-tune** (`python -m train malaria --init INIT --lr LR --epochs E --keep final`, the preset's
   optimizer, cosine schedule, augmentation and stain jitter), log in FOLD/train.log.
3. **Export** int8 TFLite with `python -m convert` (calibration: 300 cells of the fold's train split,
   the field crops among them), log in FOLD/convert.log.
4. **Measure** the held-out block's fields with that model, exactly as `python -m benchmarks smear
   --model M --threads 1` does (`train.annotations.measure_field`), and its accuracy on the NIH sample
   (float32 Keras through `train evaluate`, int8 through edge_runtime).

A block is never scored by a model fine-tuned on it. The per-field rows of the 4 folds are pooled
into one summary (the benchmark's metrics) beside the released model's on the same fields.
`--final` then fine-tunes once more on every block with the same settings (OUT/final): the model
to release, whose expected behaviour on an unseen slide the folds measured. Resumable: a fold with
FOLD/result.json is skipped; an interrupted training resumes from its last epoch. Writes
field-cv.json (with the threshold table of both models), field-cv.csv (one row per field and model)
and field-cv.md.

The recipe's other levers: `--shifted-per-block N` mixes in N uninfected crops a training block from the
shifted variants of its fields (`train field-crops --shifted K`: other stains, white balance, exposure,
blur, magnification, noise, JPEG) and every shifted parasitized crop (`--shifted-parasite-repeat` times);
`--nih-share` keeps a seeded share of the NIH cells (a third lab's palette); `--off-target-per-block N` mixes
in N of a training block's off-target crops (`train field-crops --off-target`: regions the device classifies
that are no annotated cell, as Uninfected); `--spanning-per-block N` likewise N of its spanning crops
(`train field-crops --spanning`: regions that merge or cut annotated cells and hold no parasite).
`--shift NAMES` measures each held-out block again under the domain-shift harness's transforms
(`python -m benchmarks smear --shift`, run as a command into FOLD/shift/) and pools them per transform into
the report: what each shift costs on slides the model never trained on.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import edge_runtime
from edge_runtime.fileio import atomic_write_text, write_json
from edge_runtime.model import DEFAULT_THRESHOLDS
from edge_runtime.smear import NORMALISATIONS
from train.annotations import (
    field_blocks,
    load_annotations,
    measure_field,
    rows_csv,
    summarise,
    threshold_markdown,
    threshold_table,
)
from train.metrics import artifact_metrics
from train.split import Record, discover, patient_id, read_manifest, write_manifest

RESULT = "result.json"
METRICS = (  # (summary key, table label, percent?)
    ("cell_recall", "cell recall", True),
    ("parasite_recall_called", "parasite cells found and called parasitized or uncertain", True),
    ("uninfected_false_positive_rate", "uninfected cells called parasitized (false positives)", True),
    ("uninfected_uncertain_rate", "uninfected cells called uncertain", True),
    ("field_sensitivity", "field sensitivity", False),
    ("count_error_mean_signed", "RBC count error per field, mean signed", False),
    ("count_error_mean_abs", "RBC count error per field, mean abs", False),
    ("total_ms_per_field", "ms per field (end to end, 1 thread)", False),
)


def add_parser(sub) -> None:
    f = sub.add_parser("field-cv", help="leave-one-block-out CV of fine-tuning on field crops (train, export, "
                                        "measure the held-out block)",
                       description=__doc__.split("\n\n")[0])
    f.add_argument("--crops", required=True, type=Path, help="a `train field-crops` folder")
    f.add_argument("--nih", required=True, type=Path, help="NIH manifest mixed into every fold (its train split)")
    f.add_argument("--init", required=True, type=Path,
                   help="Keras model to fine-tune (e.g. releases/malaria/model.keras)")
    f.add_argument("--data", required=True, type=Path, help="the annotated fields (fields/, annotations.json)")
    f.add_argument("--out", required=True, type=Path)
    f.add_argument("--preset", default="edge")
    f.add_argument("--epochs", type=int, default=3)
    f.add_argument("--lr", type=float, default=0.005, help="peak learning rate (the preset's schedule)")
    f.add_argument("--parasite-repeat", type=int, default=8, help="times each training Parasitized field crop appears")
    f.add_argument("--uninfected-per-block", type=int, default=400,
                   help="Uninfected field crops per training block (seeded sample; 0: all)")
    f.add_argument("--sample", type=Path,
                   default=Path(__file__).resolve().parents[2] / "tests" / "data" / "malaria_sample",
                   help="NIH cells of unseen patients: the convert proof set and the NIH accuracy check")
    f.add_argument("--release", default="malaria", help="the model to compare with (released name or artifact)")
    f.add_argument("--hue", type=float, help="override the preset's stain jitter (hue) while fine-tuning")
    f.add_argument("--saturation", type=float, help="override the preset's stain jitter (saturation)")
    f.add_argument("--resize-mix", type=float, metavar="SHARE",
                   help="override the preset's share of plain-bilinear resizes while fine-tuning (`train malaria "
                        "--resize-mix`)")
    f.add_argument("--shifted-per-block", type=int, default=0, metavar="N",
                   help="uninfected crops of the training blocks' shifted variants (`train field-crops --shifted`) "
                        "per block (seeded sample; 0: no shifted crops); every shifted parasitized crop comes too")
    f.add_argument("--shifted-parasite-repeat", type=int, default=1, metavar="R",
                   help="times each shifted parasitized crop appears (with --shifted-per-block)")
    f.add_argument("--off-target-per-block", type=int, default=0, metavar="N",
                   help="off-target crops (`train field-crops --off-target`: white-cell pieces, lysed cells, "
                        "deposits the device would classify) per training block, as Uninfected (seeded sample; "
                        "0: none)")
    f.add_argument("--spanning-per-block", type=int, default=0, metavar="N",
                   help="spanning crops (`train field-crops --spanning`: regions merging or cutting annotated cells, "
                        "holding no parasite) per training block, as Uninfected (seeded sample; 0: none)")
    f.add_argument("--nih-share", type=float, default=1.0,
                   help="share of the --nih training cells mixed in (seeded sample; 1: all)")
    f.add_argument("--shift", metavar="NAMES",
                   help="also measure each held-out block under these transforms of the domain-shift harness "
                        "(`python -m benchmarks smear --shift NAMES`, e.g. all or none,blue_grey,grey_stain)")
    f.add_argument("--threshold", type=float,
                   help="measure with this uncertain bar (a cell below it is uncertain; default: the model's, "
                        f"{DEFAULT_THRESHOLDS['malaria']:g}); a rerun with another bar measures the folds again")
    f.add_argument("--normalise", choices=NORMALISATIONS, metavar="MODE",
                   help="measure the folds' held-out fields (and harness) with `smear --normalise MODE`, for crops "
                        "cut with `train field-crops --normalise MODE` (default: off; the released model is "
                        "always measured without)")
    f.add_argument("--blocks", nargs="+", help="only these held-out blocks (default: every block)")
    f.add_argument("--final", action="store_true",
                   help="after the folds, fine-tune once more on every block with the same settings (OUT/final/run, "
                        "its int8 in OUT/final/export): the model to release, which the folds' figures describe")
    f.add_argument("--seed", type=int, default=42)
    f.add_argument("--threads", type=int, default=1, help="runtime threads when measuring")


def _py(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def _run_logged(argv: list[str], log: Path) -> None:
    """Run a command with its output appended to `log`; raise when it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(argv)}\n")
        fh.flush()
        rc = subprocess.call(argv, stdout=fh, stderr=subprocess.STDOUT, env=os.environ.copy())
    if rc != 0:
        raise RuntimeError(f"{' '.join(argv[2:4])} failed (exit {rc}); see {log}")


def sample_records(sample: Path) -> list[Record]:
    files, _ = discover(sample)
    return [Record(str(f.resolve()), label, patient_id(f.name) or f.stem, "test") for f, label, _ in files]


def fold_manifest(crops: list[dict[str, str]], crops_dir: Path, nih: list[Record], sample: list[Record],
                  held_out: str, repeat: int, per_block: int, seed: int, shifted_per_block: int = 0,
                  shifted_repeat: int = 1, off_target_per_block: int = 0,
                  spanning_per_block: int = 0) -> tuple[list[Record], dict[str, int]]:
    """The fold's records (train: NIH + other blocks' crops, parasites repeated; test: the NIH sample).

    A crop row's `variant` (absent or "0": the photo's own crop) says whether it was cut from a shifted variant
    of its field; those come in only with `shifted_per_block` > 0 (that many uninfected a block, every
    parasitized one `shifted_repeat` times). A row whose `region` is "off-target" comes in only with
    `off_target_per_block` > 0 (that many a block); one whose `region` is "spanning" only with `spanning_per_block`
    > 0."""
    rng = random.Random(seed)
    rng_shifted = random.Random(seed + 1)  # its own draws: the photos' own crops are the same with or without
    rng_off = random.Random(seed + 2)
    rng_span = random.Random(seed + 3)
    off_rows = [c for c in crops if c.get("region") == "off-target"]
    span_rows = [c for c in crops if c.get("region") == "spanning"]
    crops = [c for c in crops if c.get("region") not in ("off-target", "spanning")]
    field: list[Record] = []
    for block in sorted({c["patient"] for c in crops} - {held_out}):
        rows = [c for c in crops if c["patient"] == block]
        own = [c for c in rows if c.get("variant", "0") in ("", "0")]
        neg = [c for c in own if c["label"] == "Uninfected"]
        if per_block and len(neg) > per_block:
            neg = rng.sample(neg, per_block)
        pos = [c for c in own if c["label"] == "Parasitized"]
        chosen = neg + pos * repeat
        if shifted_per_block > 0:
            moved = [c for c in rows if c.get("variant", "0") not in ("", "0")]
            sneg = [c for c in moved if c["label"] == "Uninfected"]
            if len(sneg) > shifted_per_block:
                sneg = rng_shifted.sample(sneg, shifted_per_block)
            chosen += sneg + [c for c in moved if c["label"] == "Parasitized"] * shifted_repeat
        if off_target_per_block > 0:
            off = [c for c in off_rows if c["patient"] == block]
            chosen += rng_off.sample(off, off_target_per_block) if len(off) > off_target_per_block else off
        if spanning_per_block > 0:
            span = [c for c in span_rows if c["patient"] == block]
            chosen += rng_span.sample(span, spanning_per_block) if len(span) > spanning_per_block else span
        for c in chosen:
            field.append(Record(str((crops_dir / c["path"]).resolve()), c["label"], block, "train"))
    is_shifted = {str((crops_dir / c["path"]).resolve()) for c in crops if c.get("variant", "0") not in ("", "0")}
    is_off = {str((crops_dir / c["path"]).resolve()) for c in off_rows}
    is_span = {str((crops_dir / c["path"]).resolve()) for c in span_rows}
    own_par = sum(r.label == "Parasitized" and r.path not in is_shifted for r in field)
    counts = {"nih": len(nih),
              "field_uninfected": sum(r.label == "Uninfected" and r.path not in is_shifted and r.path not in is_off
                                      and r.path not in is_span for r in field),
              "field_parasitized_rows": own_par,
              "field_parasitized_crops": own_par // max(repeat, 1),
              "shifted_uninfected": sum(r.label == "Uninfected" and r.path in is_shifted for r in field),
              "shifted_parasitized_rows": sum(r.label == "Parasitized" and r.path in is_shifted for r in field),
              "test_sample": len(sample)}
    if off_target_per_block > 0:
        counts["off_target_uninfected"] = sum(r.path in is_off for r in field)
    if spanning_per_block > 0:
        counts["spanning_uninfected"] = sum(r.path in is_span for r in field)
    return [Record(r.path, r.label, r.patient, "train") for r in nih] + field + sample, counts


def nih_mix(nih: list[Record], share: float, seed: int) -> list[Record]:
    """A seeded share of the NIH training cells (all of them at 1)."""
    if not 0 < share <= 1:
        raise ValueError(f"--nih-share {share} must be in (0, 1]")
    if share == 1:
        return nih
    return random.Random(seed).sample(nih, round(share * len(nih)))


def measure(model_ref: str | Path, anns: list[dict[str, Any]], blocks: dict[str, str], threads: int,
            tag: str, threshold: float | None = None, normalise: str | None = None) -> list[dict[str, Any]]:
    """The per-field rows of `benchmarks smear` (`measure_field`) for these fields, each with its block;
    `threshold`: the uncertain bar (None: the model's); `normalise`: as `smear --normalise MODE`."""
    model = edge_runtime.load(model_ref, threads=threads, threshold=threshold)
    rows = []
    for ann in anns:
        r = measure_field(ann, model, normalise)
        r["block"] = blocks[ann["image"].name]
        rows.append(r)
        print(f"  [{tag}] {r['field']}: " + (r["error"] or
              f"{r['uninfected_called_parasitized']}/{r['uninfected_found']} uninfected called parasitized, "
              f"{r['uninfected_called_uncertain']} uncertain, {r['parasites_called']}/{r['annotated_parasites']} "
              f"parasites called"), flush=True)
    return rows


def with_cells(rows: list[dict[str, Any]], model_ref: str | Path, anns: list[dict[str, Any]], blocks: dict[str, str],
               threads: int, tag: str, threshold: float | None = None, normalise: str | None = None) -> bool:
    """Give rows measured before the per-cell probabilities were kept (`matched_cells`) theirs, measured again
    with the same model and normalisation (the counts are the same; the timings are the first run's). True when
    any changed."""
    todo = [r for r in rows if r["error"] is None and "matched_cells" not in r]
    if not todo:
        return False
    by_name = {a["image"].name: a for a in anns}
    again = {r["field"]: r for r in measure(model_ref, [by_name[r["field"]] for r in todo], blocks, threads, tag,
                                            threshold, normalise)}
    for r in todo:
        r["matched_cells"] = again[r["field"]]["matched_cells"]
    return True


def nih_int8(path: Path, sample: list[Record]) -> dict[str, Any]:
    import numpy as np

    labels = ["Parasitized", "Uninfected"]
    y = np.array([labels.index(r.label) for r in sample])
    return artifact_metrics(path, [r.path for r in sample], y, labels, "Parasitized")[0]


def fine_tune(args: argparse.Namespace, fold: Path, records: list[Record], counts: dict[str, int],
              tag: str) -> tuple[Path, Path, float, float]:
    """Train (or resume) FOLD/run on these records and export its int8 TFLite; (run, artifact, train s, convert s)."""
    run_dir = fold / "run"
    manifest = fold / "manifest.csv"
    if not manifest.exists():
        write_manifest(records, manifest)
    t0 = time.time()
    trained = fold / "trained.json"
    if not trained.exists():
        resume = (run_dir / "config.json").exists()
        argv = _py("train", "malaria", "--manifest", str(manifest), "--preset", args.preset, "--out", str(run_dir),
                   "--keep", "final", "--quiet", "--seed", str(args.seed))
        if resume:
            argv += ["--resume"]
        else:
            argv += ["--init", str(args.init), "--lr", str(args.lr), "--epochs", str(args.epochs)]
            argv += [a for k in ("hue", "saturation", "resize_mix") if getattr(args, k, None) is not None
                     for a in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
        print(f"{tag}: fine-tuning on {counts} ({'resumed' if resume else 'new'}), log {fold / 'train.log'}",
              flush=True)
        _run_logged(argv, fold / "train.log")
        write_json(trained, {"seconds": round(time.time() - t0, 1)})
    train_s = json.loads(trained.read_text())["seconds"]
    export = fold / "export"
    name = fold.name
    tfl = export / f"{name}_tflite-int8.tflite"
    t1 = time.time()
    if not tfl.exists():
        print(f"{tag}: export int8, log {fold / 'convert.log'}", flush=True)
        _run_logged(_py("convert", str(run_dir), "--out", str(export), "--name", name, "--formats", "tflite-int8",
                        "--calib", str(manifest), "--eval-n", "0", "--allow-drop", "--force"), fold / "convert.log")
    return run_dir, tfl, train_s, time.time() - t1


def run_fold(args: argparse.Namespace, block: str, crops: list[dict[str, str]], nih: list[Record],
             sample: list[Record], anns: list[dict[str, Any]], blocks: dict[str, str]) -> dict[str, Any]:
    fold = args.out / f"fold-{block}"
    records, counts = fold_manifest(crops, args.crops, nih, sample, block, args.parasite_repeat,
                                    args.uninfected_per_block, args.seed, args.shifted_per_block,
                                    args.shifted_parasite_repeat, args.off_target_per_block,
                                    args.spanning_per_block)
    run_dir, tfl, train_s, convert_s = fine_tune(args, fold, records, counts, f"fold {block}")
    eval_dir = fold / "eval-sample"
    if not (eval_dir / "report.json").exists():
        _run_logged(_py("train", "evaluate", str(run_dir), "--data", str(args.sample), "--out", str(eval_dir)),
                    fold / "evaluate.log")
    rep = json.loads((eval_dir / "report.json").read_text())
    held = [a for a in anns if blocks[a["image"].name] == block]
    print(f"fold {block}: measuring {len(held)} held-out fields", flush=True)
    rows = measure(tfl, held, blocks, args.threads, f"fold {block}", args.threshold, args.normalise)
    history = list(csv.DictReader(open(run_dir / "history.csv")))
    result = {
        "block": block, "fields": [a["image"].name for a in held], "counts": counts,
        "epochs": len(history), "train_seconds": train_s, "convert_seconds": round(convert_s, 1),
        "epoch_seconds": [float(h["seconds"]) for h in history if h.get("seconds")],
        "train_accuracy_last_epoch": float(history[-1]["accuracy"]) if history else None,
        "artifact": str(tfl),
        "nih_sample_float32": {k: rep.get(k) for k in ("accuracy", "sensitivity", "specificity", "roc_auc")},
        "nih_sample_int8": nih_int8(tfl, sample),
        "threshold": args.threshold,
        "normalise": args.normalise,
        "rows": rows,
    }
    if args.shift:
        result.update(shift_fold(args, fold, tfl, result["fields"]))
    write_json(fold / RESULT, result)
    return result


def shift_fold(args: argparse.Namespace, fold: Path, tfl: Path | str, fields: list[str]) -> dict[str, Any]:
    """The held-out fields under the harness's transforms: `python -m benchmarks smear --shift` run as a
    command (train does not import benchmarks) into FOLD/shift/; {"shift_spec", "shift": [per transform]}."""
    out = fold / "shift"
    rep_path = out / "smear.json"
    rep = json.loads(rep_path.read_text()) if rep_path.exists() else None
    spec = shift_spec(args)
    if rep is None or rep.get("shift_spec") != spec:
        print(f"{fold.name}: measuring {len(fields)} held-out fields under --shift {args.shift}, log "
              f"{fold / 'shift.log'}", flush=True)
        _run_logged(_py("benchmarks", "smear", "--data", str(args.data), "--model", str(tfl), "--threads",
                        str(args.threads), "--fields", *[Path(f).stem for f in fields], "--shift", args.shift,
                        *(["--threshold", str(args.threshold)] if args.threshold is not None else []),
                        *(["--normalise", args.normalise] if args.normalise else []),
                        "--out", str(out)), fold / "shift.log")
        rep = json.loads(rep_path.read_text())
        rep["shift_spec"] = spec
        write_json(rep_path, rep)
    return {"shift_spec": spec,
            "shift": [{"transform": t["transform"], "what": t["what"], "fields": t["fields"]} for t in rep["shift"]]}


def shift_spec(args: argparse.Namespace) -> str:
    """What a fold's harness rows were measured with (transforms and uncertain bar): a change measures again."""
    return (args.shift + ("" if args.threshold is None else f" @ threshold {args.threshold:g}")
            + (f", normalise {args.normalise}" if args.normalise else ""))


def shift_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """`summarise` of one transform's rows, and recall over every field (a refused field finds nothing)."""
    ann, par = sum(r["annotated"] for r in rows), sum(r["annotated_parasites"] for r in rows)
    return {**summarise(rows, True),
            "cell_recall_all_fields": sum(r.get("found", 0) for r in rows) / max(ann, 1),
            "parasite_recall_called_all_fields": sum(r.get("parasites_called", 0) for r in rows) / max(par, 1)}


def pool_shift(folds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per transform, the folds' held-out rows pooled (and per block)."""
    done = [f for f in folds if f.get("shift")]
    if not done:
        return []
    out = []
    for i, t in enumerate(done[0]["shift"]):
        per = {f["block"]: f["shift"][i]["fields"] for f in done if len(f["shift"]) > i
               and f["shift"][i]["transform"] == t["transform"]}
        rows = [r for v in per.values() for r in v]
        out.append({"transform": t["transform"], "what": t["what"], "blocks": sorted(per),
                    "summary": shift_summary(rows), "per_block": {b: shift_summary(v) for b, v in per.items()}})
    return out


SHIFT_COLUMNS = (("cell_recall_all_fields", "cell recall"),
                 ("parasite_recall_called_all_fields", "parasites flagged"),
                 ("uninfected_false_positive_rate", "uninfected called parasitized"),
                 ("uninfected_uncertain_rate", "uninfected uncertain"))


def shift_markdown(shift: list[dict[str, Any]]) -> str:
    """One row per transform: the pooled held-out figures (a refused field counts as nothing found)."""
    lines = ["| transform | " + " | ".join(h for _, h in SHIFT_COLUMNS) + " | fields refused |",
             "|---|" + "---:|" * (len(SHIFT_COLUMNS) + 1)]
    for t in shift:
        s = t["summary"]
        lines.append(f"| {t['transform']} | " + " | ".join(_fmt(k, s.get(k), True) for k, _ in SHIFT_COLUMNS)
                     + f" | {s['fields_failed']} of {s['fields']} |")
    return "\n".join(lines) + "\n"


def _fmt(key: str, v: Any, pct: bool) -> str:
    if v is None:
        return "-"
    if pct:
        return f"{100 * v:.1f}%"
    return f"{v:.2f}" if key == "field_sensitivity" else f"{v:+.1f}" if "signed" in key else f"{v:.1f}"


def markdown(report: dict[str, Any]) -> str:
    pooled = report["pooled"]
    lines = [f"Leave-one-block-out: {len(report['folds'])} folds, {pooled['fine_tuned']['fields']} held-out fields "
             f"({pooled['fine_tuned']['annotated_cells']} annotated cells, "
             f"{pooled['fine_tuned']['annotated_parasites']} parasites); every field scored by a model that never "
             "saw its block.", "",
             "| metric (pooled over the held-out fields) | released model | fine-tuned (per fold) |",
             "|---|---:|---:|"]
    for key, label, pct in METRICS:
        lines.append(f"| {label} | {_fmt(key, pooled['release'].get(key), pct)} | "
                     f"{_fmt(key, pooled['fine_tuned'].get(key), pct)} |")
    lines += ["", "| held-out block | fields | parasites | FP released | FP fine-tuned | uncertain released | "
              "uncertain fine-tuned | parasites called released | fine-tuned |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for b, d in report["per_block"].items():
        r, f = d["release"], d["fine_tuned"]
        lines.append(f"| {b} | {f['fields']} | {f['annotated_parasites']} | "
                     f"{_fmt('', r['uninfected_false_positive_rate'], True)} | "
                     f"{_fmt('', f['uninfected_false_positive_rate'], True)} | "
                     f"{_fmt('', r['uninfected_uncertain_rate'], True)} | "
                     f"{_fmt('', f['uninfected_uncertain_rate'], True)} | "
                     f"{_fmt('', r['parasite_recall_called'], True)} | {_fmt('', f['parasite_recall_called'], True)} |")
    lines += ["", "| model | NIH sample accuracy, float32 | int8 | int8 sensitivity | int8 specificity | int8 ROC AUC |"
              " epochs | training min |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    rel = report.get("release_nih_sample_int8")
    if rel:
        lines.append(f"| released | - | {100 * rel['accuracy']:.2f}% | {100 * rel['sensitivity']:.2f}% | "
                     f"{100 * rel['specificity']:.2f}% | {rel['roc_auc']:.4f} | - | - |")
    for f in report["folds"]:
        a, q = f["nih_sample_float32"], f["nih_sample_int8"]
        lines.append(f"| fold {f['block']} held out | {100 * a['accuracy']:.2f}% | {100 * q['accuracy']:.2f}% | "
                     f"{100 * q['sensitivity']:.2f}% | {100 * q['specificity']:.2f}% | {q['roc_auc']:.4f} | "
                     f"{f['epochs']} | {f['train_seconds'] / 60:.1f} |")
    if report.get("shift"):
        lines += ["", f"Under the domain-shift harness (`benchmarks smear --shift`), the held-out blocks "
                  f"{', '.join(report['shift'][0]['blocks'])} pooled, each scored by its fold's model:", "",
                  shift_markdown(report["shift"]).rstrip("\n")]
    if report.get("thresholds"):
        lines += ["", "What the uncertain bar trades on the held-out fields (a cell is uncertain when its top "
                  f"probability is below it; the models' bar is {DEFAULT_THRESHOLDS['malaria']:g}):", "",
                  threshold_markdown({"released": report["thresholds"]["release"],
                                      "fine-tuned": report["thresholds"]["fine_tuned"]}).rstrip("\n")]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    crops_csv = args.crops / "field-crops.csv"
    if not crops_csv.is_file():
        raise FileNotFoundError(f"{crops_csv} not found; make it with `python -m train field-crops`")
    crops = list(csv.DictReader(open(crops_csv, newline="")))
    nih = nih_mix([r for r in read_manifest(args.nih) if r.split == "train"], args.nih_share, args.seed)
    sample = sample_records(args.sample)
    all_anns = load_annotations(args.data)
    blocks = field_blocks([a["image"].name for a in all_anns])
    crop_blocks = sorted({c["patient"] for c in crops})
    unknown = sorted(set(crop_blocks) - set(blocks.values()))
    if unknown:
        raise ValueError(f"crop blocks {unknown} are not blocks of {args.data}'s fields")
    todo = args.blocks or crop_blocks
    anns = [a for a in all_anns if blocks[a["image"].name] in todo]

    rel_path = args.out / "release.json"
    release = json.loads(rel_path.read_text()) if rel_path.exists() else {"model": str(args.release), "rows": []}
    if release.get("threshold") != args.threshold:  # measured with another bar: measure again
        release.update(rows=[], threshold=args.threshold)
    have = {r["field"] for r in release["rows"]}
    missing = [a for a in anns if a["image"].name not in have]
    if missing:  # a first run, or a later one with more --blocks
        print(f"released model {args.release}: measuring {len(missing)} fields", flush=True)
        release["rows"] += measure(args.release, missing, blocks, args.threads, "release", args.threshold)
    if "nih_sample_int8" not in release:
        release["nih_sample_int8"] = nih_int8(args.release, sample)
    if with_cells(release["rows"], args.release, all_anns, blocks, args.threads, "release", args.threshold) \
            or missing or not rel_path.exists():
        write_json(rel_path, release)

    folds = []
    for block in todo:
        res_path = args.out / f"fold-{block}" / RESULT
        if res_path.exists():
            print(f"fold {block}: done, skipped", flush=True)
            done = json.loads(res_path.read_text())
            changed = with_cells(done["rows"], done["artifact"], all_anns, blocks, args.threads, f"fold {block}",
                                 args.threshold, done.get("normalise"))
            if (done.get("threshold"), done.get("normalise")) != (args.threshold, args.normalise):
                # another uncertain bar or normalisation: the held-out fields again
                held = [a for a in anns if a["image"].name in done["fields"]]
                done.update(rows=measure(done["artifact"], held, blocks, args.threads, f"fold {block}",
                                         args.threshold, args.normalise), threshold=args.threshold,
                            normalise=args.normalise)
                changed = True
            if args.shift and done.get("shift_spec") != shift_spec(args):  # a harness asked for after the fold ran
                done.update(shift_fold(args, res_path.parent, done["artifact"], done["fields"]))
                changed = True
            if changed:
                write_json(res_path, done)
            folds.append(done)
            continue
        folds.append(run_fold(args, block, crops, nih, sample, anns, blocks))

    final = None
    if args.final:  # every block in training: nothing left to score it on here; the folds describe it
        records, counts = fold_manifest(crops, args.crops, nih, sample, "", args.parasite_repeat,
                                        args.uninfected_per_block, args.seed, args.shifted_per_block,
                                        args.shifted_parasite_repeat, args.off_target_per_block,
                                        args.spanning_per_block)
        run_dir, tfl, train_s, _ = fine_tune(args, args.out / "final", records, counts, "final (every block)")
        final = {"run": str(run_dir), "artifact": str(tfl), "counts": counts, "train_seconds": train_s,
                 "nih_sample_int8": nih_int8(tfl, sample), "blocks": crop_blocks,
                 "fields": len({c["field"] for c in crops if c.get("field")}) or None}

    ft_rows = [r for f in folds for r in f["rows"]]
    done = {r["field"] for r in ft_rows}
    rel_rows = [r for r in release["rows"] if r["field"] in done]
    report: dict[str, Any] = {
        "command": "python -m train " + " ".join(argv),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "command"},
        "pooled": {"release": summarise(rel_rows, True), "fine_tuned": summarise(ft_rows, True)},
        "per_block": {f["block"]: {"release": summarise([r for r in rel_rows if r["block"] == f["block"]], True),
                                   "fine_tuned": summarise(f["rows"], True)} for f in folds},
        "thresholds": {"release": threshold_table(rel_rows), "fine_tuned": threshold_table(ft_rows)},
        "release_nih_sample_int8": release.get("nih_sample_int8"),
        "shift": pool_shift(folds),
        "folds": [{k: v for k, v in f.items() if k not in ("rows", "shift")} for f in folds],
        "final": final,
    }
    write_json(args.out / "field-cv.json", report)
    rows = [{"model": "release", **r} for r in rel_rows] + [{"model": "fine-tuned", **r} for r in ft_rows]
    atomic_write_text(args.out / "field-cv.csv", rows_csv(rows))
    md = markdown(report)
    atomic_write_text(args.out / "field-cv.md", md)
    print(md)
    print(f"wrote {args.out / 'field-cv.json'}, field-cv.csv, field-cv.md")
    return 0
