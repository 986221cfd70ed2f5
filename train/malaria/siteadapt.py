"""`python -m train site-adapt`: teach the released field model a clinic's own microscope, and keep it only if it helps.

    python -m train site-adapt --site kisumu --fields clinic/annotations.json \\
        --init releases/malaria-field/model.keras --nih runs/release.csv --shared-crops runs/field-crops \\
        --out runs/site-kisumu [--holdout-share 0.3 | --holdout-fields F ...] [--k N] [--preset edge]

Steps (each leaves its files in OUT, so a killed run starts again where it stopped):

1. **Plan** (OUT/plan.json): the site's annotated fields are split BY FIELD, never by cell (cells of one field
   share its stain, focus and light): `--holdout-fields`, else a seeded `--holdout-share` of them, are held out
   to judge; `--k N` adapts on N of the others (nested: the 5 of k=5 are among the 10 of k=10).
2. **Crops** (OUT/crops/<site>/, OUT/site-crops.csv): cut from the adaptation fields with the device's own
   pipeline (`train field-crops`' `cut`: `edge_runtime.smear` segmentation and crop, labelled by the
   annotation each region matches).
3. **Fine-tune** `--init` (the released field model's Keras file) on the site crops (parasites repeated, every
   uninfected crop) mixed with the NIH cells (`--nih`, a seeded share) and the shared field crops the release
   learned from (`--shared-crops`, a seeded sample a block), so it does not forget them; export int8 TFLite.
   This is `train field-cv`'s `fine_tune` (train's `--resume` when killed, `convert` for the int8 file).
4. **Measure** the released model (`--release`, before) and the site model (after) on the held-out site fields
   exactly as `python -m benchmarks smear` does (`measure_field`: parasites flagged = annotated parasites
   called parasitized or uncertain; false positives = uninfected cells called parasitized; uncertain share of
   the uninfected cells), and both int8 files on the bundled NIH sample (`--sample`).
5. **Judge** (`verdict`): the site model is kept only if, on the held-out site fields, parasites flagged do not
   fall, false positives do not rise, one of them improves, no field with parasites goes unflagged that was
   flagged (fewer uncertain cells can clear a field whose parasite is missed), the uncertain share rises by at most
   `--max-uncertain-rise` points (else calling every cell uncertain would "win"), and NIH sample accuracy drops
   by at most `--max-nih-drop` points. The table is printed either way with the model to keep.
6. **Release** (only when kept, unless `--no-release`): `python -m convert release` of the site run as
   `malaria-field-<site>` (int8 file, card with the site, fields and cells learned from, the before/after
   table and this command, registry entry: `edge_runtime.load("malaria-field-<site>")`).

Exit codes: 0 the site model helps (released, or would be with `--no-release`); 1 it does not: keep the
released model (nothing released); 2 bad input (a missing file, an unknown field, too few fields); 3 the
training or the export failed (its log is named; the same command resumes).

Inputs: `--fields` takes IML-Malaria-style annotations (a folder with annotations.json and fields/, or the
JSON file itself: a list of {image_name, objects: [{type, bbox: {x, y, w, h}}]}). Every source becomes the
same field record (`load_site_fields`: image, boxes, types); the field app's reviewed-case export (issue 24,
not built yet) is meant to be one more loader in `SOURCES` that turns reviewed cells into that record.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edge_runtime.fileio import atomic_write_text, write_json
from train import fieldcrops
from train.annotations import PARASITE_TYPES, load_annotations, summarise
from train.malaria.fieldcv import fine_tune, fold_manifest, measure, nih_int8, sample_records
from train.split import Record, read_manifest

PLAN, REPORT = "plan.json", "site-adapt.json"
SITE_CROPS = "site-crops.csv"


@dataclasses.dataclass(frozen=True)
class SitePreset:
    """How much to train and on what mix (the training preset itself is `train malaria`'s).

    Attributes:
        train_preset: `train malaria --preset` (the network must be the one of `--init`).
        epochs, lr: fine-tuning length and peak learning rate (the preset's cosine schedule).
        parasite_repeat: times each parasitized crop (site and shared) appears; augmentation makes them differ.
        shared_per_block: uninfected shared field crops kept per block (seeded sample; 0: all).
        nih_cells: NIH training cells kept (seeded sample; 0: all).
        hue, saturation: stain jitter, as the release was trained (None: the preset's).
    """

    name: str
    train_preset: str
    epochs: int
    lr: float
    parasite_repeat: int
    shared_per_block: int
    nih_cells: int
    hue: float | None = None
    saturation: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SITE_PRESETS = {
    # For tests: a `tiny` network, one epoch, a handful of NIH cells; checks the plumbing, not the figures.
    "tiny": SitePreset("tiny", "tiny", epochs=1, lr=0.005, parasite_repeat=2, shared_per_block=20, nih_cells=60),
    # This machine (2 shared cores): the `malaria-field` recipe (parasites x8, the same stain jitter) on a lighter
    # mix: 3,000 of the 5,471 NIH cells and 300 uninfected crops a shared block, 3 epochs; half the release's
    # learning rate: at 0.005 every run lost 1.25-3.25 points on the NIH sample (PA171740 from its fold model, k = 10:
    # -2.00), at 0.0025 -0.50 there with false positives 1.33% -> 0.44% (0.89% at 0.005) and +4.00 on PA171960,
    # where 0.005 gave +4.25; keeping all NIH cells lost 1.75 (docs/results/2026-12-06-site-adapt.md).
    "edge": SitePreset("edge", "edge", epochs=3, lr=0.0025, parasite_repeat=8, shared_per_block=300, nih_cells=3000,
                       hue=0.2, saturation=0.4),
}


# --- inputs -----------------------------------------------------------------------------------------------

def _iml_json(path: Path) -> list[dict[str, Any]]:
    """Fields of an IML-Malaria annotation file; images in fields/ beside it, else beside it."""
    if path.name == "annotations.json" and (path.parent / "fields").is_dir():
        return load_annotations(path.parent)
    try:
        entries = json.loads(path.read_text())
        out = []
        for e in entries:
            folder = path.parent / "fields" if (path.parent / "fields" / e["image_name"]).exists() else path.parent
            objs = [o for o in e["objects"] if o["type"] != "difficult"]
            out.append({"image": folder / e["image_name"],
                        "boxes": [[float(o["bbox"][k]) for k in "xywh"] for o in objs],
                        "types": [o["type"] for o in objs], "parasite": [o["type"] in PARASITE_TYPES for o in objs]})
        return out
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not IML-Malaria annotations (a list of {{image_name, objects: [{{type, bbox: "
                         f"{{x, y, w, h}}}}]}}): {e}") from None


def _iml(path: Path) -> list[dict[str, Any]]:
    if path.is_dir():
        if not (path / "annotations.json").is_file():
            raise FileNotFoundError(f"{path}: no annotations.json; give a folder with annotations.json and fields/, "
                                    "or the annotation file itself")
        return _iml_json(path / "annotations.json")
    return _iml_json(path)


# What a source is -> how to read its fields. A reviewed-case export of the field app (issue 24) will be a
# row here: a check on the path (e.g. a folder holding cases.json) and a loader that turns the reviewer's calls
# (parasite / not a parasite per cell box) into the same record, so everything downstream stays as it is.
SOURCES: dict[str, tuple[Callable[[Path], bool], Callable[[Path], list[dict[str, Any]]]]] = {
    "iml-annotations": (lambda p: p.is_dir() or p.suffix.lower() == ".json", _iml),
}


def load_site_fields(sources: Sequence[Path]) -> list[dict[str, Any]]:
    """Every annotated field of these sources as {"image", "boxes", "types", "parasite"}, checked to exist."""
    fields: dict[str, dict[str, Any]] = {}
    for src in map(Path, sources):
        if not src.exists():
            raise FileNotFoundError(f"--fields {src} does not exist")
        loader = next((load for ok, load in SOURCES.values() if ok(src)), None)
        if loader is None:
            raise ValueError(f"--fields {src}: not a known source ({', '.join(SOURCES)}): give a folder with "
                             "annotations.json and fields/, or an annotations .json file")
        for ann in loader(src):
            if not ann["image"].is_file():
                raise FileNotFoundError(f"{src}: annotated field {ann['image']} is not there")
            if ann["image"].name in fields:
                raise ValueError(f"field {ann['image'].name} is given twice (second time in {src})")
            fields[ann["image"].name] = ann
    if not fields:
        raise ValueError(f"no annotated fields in {', '.join(map(str, sources))}")
    return [fields[n] for n in sorted(fields)]


def split_fields(names: Sequence[str], share: float, held: Sequence[str] | None, k: int | None,
                 seed: int) -> tuple[list[str], list[str]]:
    """(adaptation fields, held-out fields), by field. Held out first, so every k shares one test; the k
    adaptation fields are the first k of one seeded order of the rest (k=5 within k=10)."""
    names = sorted(names)
    rng = random.Random(seed)
    if held:
        stems = {Path(n).stem: n for n in names}
        unknown = sorted({Path(h).stem for h in held} - set(stems))
        if unknown:
            raise ValueError(f"--holdout-fields {unknown} are not among the site's {len(names)} fields")
        out = sorted(stems[Path(h).stem] for h in held)
    else:
        if not 0 < share < 1:
            raise ValueError(f"--holdout-share {share}: give a share between 0 and 1 (e.g. 0.3)")
        order = names[:]
        rng.shuffle(order)
        out = sorted(order[:max(1, round(share * len(names)))])
    rest = [n for n in names if n not in out]
    rng.shuffle(rest)
    if k is not None:
        if not 0 < k <= len(rest):
            raise ValueError(f"--k {k}: {len(rest)} fields are left after holding out {len(out)}; give 1..{len(rest)}")
        rest = rest[:k]
    if not rest:
        raise ValueError(f"{len(names)} field(s): none left to adapt on after holding out {len(out)}")
    return sorted(rest), out


# --- the judgement -------------------------------------------------------------------------------------------

ROWS = (  # (summary key, table label)
    ("parasite_recall_called", "parasites flagged (called parasitized or uncertain)"),
    ("uninfected_false_positive_rate", "uninfected called parasitized (false positives)"),
    ("uninfected_uncertain_rate", "uninfected called uncertain"),
    ("field_sensitivity", "fields with parasites flagged"),
)


def verdict(before: dict[str, Any], after: dict[str, Any], nih_before: float, nih_after: float,
            max_nih_drop: float, max_uncertain_rise: float) -> tuple[bool, list[str]]:
    """Keep the site model? (yes/no, the reasons, each a sentence with the figures)."""
    pb, pa = before["parasite_recall_called"], after["parasite_recall_called"]
    fb, fa = before["uninfected_false_positive_rate"], after["uninfected_false_positive_rate"]
    ub, ua = before["uninfected_uncertain_rate"], after["uninfected_uncertain_rate"]
    drop = 100 * (nih_before - nih_after)
    why, ok = [], True
    if not before.get("annotated_parasites"):
        ok = False
        why.append("the held-out fields hold no annotated parasite: parasites flagged cannot be judged; hold out "
                   "fields with parasites (--holdout-fields)")
    elif pa < pb:
        ok = False
        why.append(f"parasites flagged fell: {100 * pb:.1f}% -> {100 * pa:.1f}%")
    if fa > fb:
        ok = False
        why.append(f"false positives rose: {100 * fb:.2f}% -> {100 * fa:.2f}%")
    sb, sa = before.get("field_sensitivity"), after.get("field_sensitivity")
    if sb is not None and sa is not None and sa < sb:  # fewer uncertain cells can turn a missed parasite's field green
        ok = False
        why.append(f"fields with parasites flagged fell: {sb:.2f} -> {sa:.2f}")
    if ok and pa == pb and fa == fb:
        ok = False
        why.append("neither parasites flagged nor false positives improved")
    if 100 * (ua - ub) > max_uncertain_rise:
        ok = False
        why.append(f"uncertain share rose {100 * (ua - ub):.1f} points (> {max_uncertain_rise:g})")
    if drop > max_nih_drop:
        ok = False
        why.append(f"NIH sample accuracy dropped {drop:.2f} points (> {max_nih_drop:g})")
    if ok:
        why.append(f"parasites flagged {100 * pb:.1f}% -> {100 * pa:.1f}%, false positives {100 * fb:.2f}% -> "
                   f"{100 * fa:.2f}%, uncertain {100 * ub:.1f}% -> {100 * ua:.1f}%, NIH sample accuracy "
                   f"{100 * nih_before:.2f}% -> {100 * nih_after:.2f}% (may drop {max_nih_drop:g} point"
                   f"{'' if max_nih_drop == 1 else 's'})")
    return ok, why


def table(report: dict[str, Any]) -> str:
    """The before/after Markdown table of a report."""
    b, a = report["before"], report["after"]
    h = report["held_out"]
    lines = [f"Site `{report['site']}`: adapted on {len(report['adapt_fields'])} fields "
             f"({report['site_crops']['Parasitized']} parasitized + {report['site_crops']['Uninfected']} uninfected "
             f"crops), judged on {len(h)} held-out fields ({b['annotated_cells']} annotated cells, "
             f"{b['annotated_parasites']} parasites).", "",
             f"| on the held-out site fields | before (`{report['release']}`) | after (site model) |",
             "|---|---:|---:|"]
    for key, label in ROWS:
        fmt = (lambda v: f"{v:.2f}") if key == "field_sensitivity" else (lambda v: f"{100 * v:.2f}%")
        lines.append(f"| {label} | {fmt(b[key])} | {fmt(a[key])} |")
    lines.append(f"| NIH sample accuracy, int8 ({report['nih_sample']['cells']} cells) | "
                 f"{100 * report['nih_sample']['before']:.2f}% | {100 * report['nih_sample']['after']:.2f}% |")
    lines += ["", f"Training {report['train_seconds'] / 60:.1f} min, export {report['convert_seconds'] / 60:.1f} min.",
              "", f"Keep: **{report['keep']}** ({'; '.join(report['reasons'])})."]
    return "\n".join(lines) + "\n"


# --- the command -----------------------------------------------------------------------------------------------

def add_parser(sub) -> None:
    s = sub.add_parser("site-adapt", help="fine-tune the field model on a site's annotated fields; keep it only if "
                                          "held-out site fields improve", description=__doc__.split("\n\n")[0])
    s.add_argument("--site", required=True, help="site name: the model is released as malaria-field-SITE")
    s.add_argument("--fields", required=True, nargs="+", type=Path, metavar="DIR_OR_JSON",
                   help="annotated fields (folder with annotations.json and fields/, or the .json file)")
    s.add_argument("--init", required=True, type=Path, help="Keras model to adapt: releases/malaria-field/model.keras")
    s.add_argument("--out", required=True, type=Path, help="working folder (resumable), e.g. runs/site-NAME")
    s.add_argument("--release", default="malaria-field", help="the model to beat (released name or .tflite)")
    s.add_argument("--nih", type=Path, help="NIH training manifest kept in the mix (its train split), e.g. "
                                            "runs/release.csv; without it the model may forget the NIH cells")
    s.add_argument("--shared-crops", type=Path, help="a `train field-crops` folder of the fields the release "
                                                     "learned from, kept in the mix")
    held = s.add_mutually_exclusive_group()
    held.add_argument("--holdout-share", type=float, default=0.3, help="share of the site's fields held out")
    held.add_argument("--holdout-fields", nargs="+", metavar="FIELD", help="hold out these fields (names or stems)")
    s.add_argument("--k", type=int, help="adapt on only K of the other fields (to measure how many are needed)")
    s.add_argument("--preset", choices=sorted(SITE_PRESETS), default="edge")
    s.add_argument("--lr", type=float, help="peak learning rate instead of the preset's (edge: 0.0025)")
    s.add_argument("--nih-cells", type=int, help="NIH training cells kept in the mix instead of the preset's "
                                                 "(edge: 3000; 0: all of --nih)")
    s.add_argument("--max-nih-drop", type=float, default=1.0, help="points of NIH sample accuracy the site model "
                                                                   "may lose")
    s.add_argument("--max-uncertain-rise", type=float, default=5.0,
                   help="points the uncertain share of held-out uninfected cells may rise")
    s.add_argument("--sample", type=Path,
                   default=Path(__file__).resolve().parents[2] / "tests" / "data" / "malaria_sample",
                   help="NIH cells of unseen patients: the NIH check and the int8 proof set")
    s.add_argument("--no-release", action="store_true", help="measure and judge only (exit 0/1 as if releasing)")
    s.add_argument("--version", default="1.0.0", help="version of the site release")
    s.add_argument("--dest", type=Path, help="release folder (default releases/malaria-field-SITE)")
    s.add_argument("--package", type=Path, help="registry folder (default: edge_runtime/released)")
    s.add_argument("--min-agreement", type=float, default=0.96,
                   help="lowest int8/Keras top-1 agreement on the sample for the release (as malaria-field's)")
    s.add_argument("--threshold", type=float,
                   help="uncertain bar both models are measured at, and the site release's (default: each model's "
                        "own, from its metadata; give the release's, e.g. 0.7 for malaria-field 1.3, when --release "
                        "is a file exported without it)")
    s.add_argument("--seed", type=int, default=42)
    s.add_argument("--threads", type=int, default=1, help="runtime threads when measuring")


def _plan(args: argparse.Namespace, anns: list[dict[str, Any]]) -> dict[str, Any]:
    adapt, held = split_fields([a["image"].name for a in anns], args.holdout_share, args.holdout_fields, args.k,
                               args.seed)
    plan = {"site": args.site, "adapt_fields": adapt, "held_out": held, "preset": args.preset, "seed": args.seed,
            "init": str(args.init.resolve()),
            # the bar the cached before/after rows were measured at, and the preset's values overridden (only
            # when given: older plans stay resumable)
            **{k: getattr(args, k) for k in ("threshold", "lr", "nih_cells") if getattr(args, k) is not None}}
    path = args.out / PLAN
    if path.exists():
        old = json.loads(path.read_text())
        if old != plan:
            diff = sorted(k for k in plan if old.get(k) != plan[k])
            raise ValueError(f"{args.out} holds a run with another plan ({', '.join(diff)} differ); resume it with "
                             "the same arguments or give a new --out")
    else:
        write_json(path, plan)
    return plan


def _records(args: argparse.Namespace, preset: SitePreset, site_rows: list[dict[str, str]],
             sample: list[Record]) -> tuple[list[Record], dict[str, int]]:
    """Training mix: the site crops (all uninfected, parasites repeated), shared crops and NIH cells (seeded
    samples), and the NIH sample as the test split (convert's proof set)."""
    rng = random.Random(args.seed)
    nih: list[Record] = []
    if args.nih:
        nih = [r for r in read_manifest(args.nih) if r.split == "train"]
        if preset.nih_cells and len(nih) > preset.nih_cells:
            nih = sorted(rng.sample(nih, preset.nih_cells), key=lambda r: r.path)
    shared: list[dict[str, str]] = []
    if args.shared_crops:
        path = args.shared_crops / "field-crops.csv"
        if not path.is_file():
            raise FileNotFoundError(f"--shared-crops: {path} not found; make it with `python -m train field-crops`")
        shared = [{**r, "path": str((args.shared_crops / r["path"]).resolve())}
                  for r in csv.DictReader(open(path, newline=""))]
        clash = {r["patient"] for r in shared} & {args.site}
        if clash:
            raise ValueError(f"--site {args.site} is also a block of --shared-crops; name the site otherwise")
    root = Path("/")  # rows carry absolute paths
    base, counts = fold_manifest(shared, root, nih, sample, "", preset.parasite_repeat, preset.shared_per_block,
                                 args.seed)
    site, c2 = fold_manifest(site_rows, root, [], [], "", preset.parasite_repeat, 0, args.seed)
    counts = {"nih": counts["nih"], "shared_uninfected": counts["field_uninfected"],
              "shared_parasitized_crops": counts["field_parasitized_crops"],
              "site_uninfected": c2["field_uninfected"], "site_parasitized_crops": c2["field_parasitized_crops"],
              "parasite_repeat": preset.parasite_repeat, "test_sample": len(sample)}
    return base + site, counts


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    t_start = time.time()
    preset = SITE_PRESETS[args.preset]
    overrides = {k: getattr(args, k) for k in ("lr", "nih_cells") if getattr(args, k) is not None}
    if not overrides.get("lr", 1) > 0 or overrides.get("nih_cells", 0) < 0:
        raise ValueError(f"--lr must be above 0 and --nih-cells 0 or more (got {args.lr}, {args.nih_cells})")
    preset = dataclasses.replace(preset, **overrides)
    if not args.init.exists():
        raise FileNotFoundError(f"--init {args.init} not found (the released field model is "
                                "releases/malaria-field/model.keras)")
    if args.nih and not args.nih.is_file():
        raise FileNotFoundError(f"--nih {args.nih} not found; make it with `python -m train split --data "
                                "../shared/data/malaria --out runs/release.csv --val 0 --test 0 "
                                "--exclude-patients-of tests/data/malaria_sample`")
    anns = load_site_fields(args.fields)
    args.out.mkdir(parents=True, exist_ok=True)
    plan = _plan(args, anns)
    by_name = {a["image"].name: a for a in anns}
    block = dict.fromkeys(by_name, args.site)
    print(f"site {args.site}: {len(anns)} fields; adapting on {len(plan['adapt_fields'])}, holding out "
          f"{len(plan['held_out'])} ({', '.join(plan['held_out'])})", flush=True)

    # 2. crops of the adaptation fields only: a held-out field never reaches training.
    crops_csv = args.out / SITE_CROPS
    if not crops_csv.exists():
        rows, per_field, failed = fieldcrops.cut([by_name[n] for n in plan["adapt_fields"]], args.out, block)
        write_json(args.out / "site-crops.json", {"fields": per_field, "failed": failed})
        fieldcrops.write_rows(rows, crops_csv)
    site_rows = [{**r, "path": str((args.out / r["path"]).resolve())} for r in csv.DictReader(open(crops_csv))]
    if not site_rows:
        raise ValueError(f"the {len(plan['adapt_fields'])} adaptation fields gave no crops (see "
                         f"{args.out / 'site-crops.json'})")

    # 3. fine-tune (train's --resume when a run is there) and export int8.
    sample = sample_records(args.sample)
    records, counts = _records(args, preset, site_rows, sample)
    ft = argparse.Namespace(preset=preset.train_preset, seed=args.seed, init=args.init, lr=preset.lr,
                            epochs=preset.epochs, hue=preset.hue, saturation=preset.saturation)
    try:
        run_dir, tfl, train_s, convert_s = fine_tune(ft, args.out, records, counts, f"site {args.site}")
    except RuntimeError as e:  # training or export failed: not a verdict on the site model (exit 1 is)
        print(f"error: {e}; run the same command again to resume", file=sys.stderr)
        return 3

    # 4. before and after on the held-out fields and on the NIH sample (cached: measuring is minutes).
    held = [by_name[n] for n in plan["held_out"]]
    measured = {}
    for tag, model in (("before", args.release), ("after", tfl)):
        path = args.out / f"{tag}.json"
        if not path.exists():
            rows = measure(model, held, block, args.threads, tag, args.threshold)
            write_json(path, {"model": str(model), "rows": rows, "nih_sample_int8": nih_int8(model, sample)})
        measured[tag] = json.loads(path.read_text())
    before, after = (summarise(measured[t]["rows"], True) for t in ("before", "after"))
    nb, na = (measured[t]["nih_sample_int8"]["accuracy"] for t in ("before", "after"))

    # 5. judge.
    ok, reasons = verdict(before, after, nb, na, args.max_nih_drop, args.max_uncertain_rise)
    name = f"malaria-field-{args.site}"
    site_counts = {k: sum(r["label"] == k for r in site_rows) for k in ("Parasitized", "Uninfected")}
    report: dict[str, Any] = {
        "site": args.site, "name": name, "release": str(args.release), "command": "python -m train " + " ".join(argv),
        "preset": preset.to_dict(), "adapt_fields": plan["adapt_fields"], "held_out": plan["held_out"],
        "site_crops": site_counts, "counts": counts, "before": before, "after": after,
        "nih_sample": {"cells": len(sample), "before": nb, "after": na, "max_drop_points": args.max_nih_drop},
        "max_uncertain_rise_points": args.max_uncertain_rise, "threshold": args.threshold,
        "train_seconds": train_s, "convert_seconds": round(convert_s, 1),
        "keep": name if ok else str(args.release), "reasons": reasons, "artifact": str(tfl), "run": str(run_dir),
    }
    md = table(report)
    # the before/after rows alone, for the model card (`convert release` renders no train report itself)
    report["table"] = md.split("\n\nTraining")[0].split("\n\n", 1)[1]
    write_json(args.out / REPORT, report)
    atomic_write_text(args.out / "site-adapt.md", md)
    print(md)
    if not ok:
        print(f"keep {args.release}: the site model did not help on the held-out fields; nothing released")
        return 1
    if args.no_release:
        print(f"--no-release: {name} would be released ({tfl})")
        return 0

    # 6. release: a release like the others (card, registry, int8 remade by `python -m convert`).
    from convert.release import release  # Keras and the converters: only when a model is released

    crops_dirs = [args.out / "crops"] + ([args.shared_crops] if args.shared_crops else [])
    # Its false-call rate (what the slide decision weighs calls against) from the held-out site fields it never
    # trained on: this microscope's own, not the shared blocks'.
    entry = release(run_dir, name, args.version, args.sample, dest=args.dest, package=args.package,
                    copy_calib=crops_dirs, min_agreement=args.min_agreement, site=report, threshold=args.threshold,
                    command=["python", "-m", "train", *argv], false_calls=[args.out / "after.json"],
                    false_calls_what=f"{name}: the {len(held)} held-out fields of site {args.site} "
                                     f"({', '.join(plan['held_out'])}), scored by this model, which never trained "
                                     "on them")
    print(f"released {entry.name} {entry.version} ({entry.bytes / 1024:.0f} KB, sha256 {entry.sha256[:12]}): "
          f"edge_runtime.load({entry.name!r}); {time.time() - t_start:.0f} s in all")
    return 0
