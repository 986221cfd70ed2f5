"""Release a trained malaria run with the package: the Keras model, its int8 files for each runtime, a model card.

    python -m convert release runs/release-edge --name malaria --version 1.0.0 \\
        --sample tests/data/malaria_sample --cv runs/cv-edge
    python -m convert release runs/field-cv/final/run --name malaria-field --version 1.0.0 \\
        --sample tests/data/malaria_sample --field-cv runs/field-cv --copy-calib runs/field-crops
    python -m convert release releases/malaria --name malaria --version 1.1.0 --change "..."   # again

Writes
    releases/<name>/model.keras         the run's final weights, no optimizer state (the source of truth)
    releases/<name>/config.json         the run's config (preset, preprocessing, labels, seed, images)
    releases/<name>/calibration.csv     manifest: the calibration cells (train split, drawn from the
                                        run's training cells) and the bundled sample (test split, the proof)
    releases/<name>/calibration/        copies of the calibration cells found under --copy-calib (crops a
                                        run cut from field photos, which live in git-ignored runs/)
    releases/<name>/release.json        name, version, formats and the settings convert is given
    releases/<name>/conversion.json     the convert report of that conversion
    releases/<name>/MODEL_CARD.md
    edge_runtime/released/<name>.tflite the int8 LiteRT file, as package data (`edge_runtime.load("<name>")`)
    edge_runtime/released/<name>.onnx   the int8 (QDQ) ONNX file (`edge_runtime.load("<name>", runtime="onnxruntime")`)
    edge_runtime/released/<name>.ort    the same graph in ONNX Runtime's format (ONNX Runtime Mobile)
    edge_runtime/released/<name>.md     the model card again, for `python -m edge_runtime models --card`
    edge_runtime/released/models.json   the registry: version, files per runtime with sha256, measured
                                        figures, provenance

Every file carries the release's version in its metadata (medge's entry, and
the standard TFLite metadata's `version`), its golden set and its content
hash (`edge_runtime.content_hash`). The files are made by the ordinary
`python -m convert` path from the committed `model.keras` and
`calibration.csv` (see `reproduce_command`), so a test can make them again and
check the committed files are exactly what convert makes. The figures on the
sample are measured through `edge_runtime`, the way a device runs each file;
the cross-validation figures come from `python -m train cv` of the same preset
on the same developer patients (other model instances: they say how well this
recipe does on unseen patients).

The sample must hold patients the run never saw; the release checks it
against the run's training manifest and refuses otherwise. A release folder
given instead of a run is released again: its committed `model.keras`, as it
is, with its calibration cells and sample, and the figures its registry entry
holds, which must describe that model (same sha256); a model trained anew is
released from its run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shlex
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from convert.export import Options, run_export
from convert.formats import FORMATS, parse_formats
from edge_runtime import registry
from edge_runtime.fileio import atomic_write_bytes, atomic_write_text, sha256_file
from edge_runtime.metadata import read_metadata
from train import runs
from train.metrics import artifact_metrics
from train.split import build_split, read_manifest, write_manifest

FORMAT = "tflite-int8"
FLOAT = "tflite-float32"
# What a release ships, one int8 file per ecosystem: LiteRT (the device's default), ONNX Runtime (.onnx for the
# full runtime, .ort for ONNX Runtime Mobile and minimal builds). The float32 .tflite is made to score against.
SHIPPED = (FORMAT, "onnx-int8", "ort-int8")
# The ONNX activation type, fixed rather than timed (`--onnx-activations auto` keeps the faster on the machine that
# converts, so a rebuild elsewhere could choose the other). int8, TFLite's scheme (asymmetric int8 activations,
# symmetric per-channel int8 weights): on the 400 sample cells the `malaria` .onnx then agrees with its .tflite on
# 99.50% (max |dprob| 0.07) and with Keras on 99.75% (0.05). uint8 activations ran 2x faster on this AVX2 machine
# (no VNNI) but moved probabilities by up to 0.30 from Keras there (7-bit weights: 0.11), consistent with ONNX
# Runtime's u8s8 kernels saturating on such CPUs: answers that depend on the CPU, which a golden set made here
# would then refuse on another (docs/conversion.md, "The released ONNX files").
ONNX_ACTIVATIONS = "int8"
INTENDED_USE = (
    "A screening aid for thin blood smears: it sorts single red-blood-cell crops (one cell, black outside, as in "
    "the NIH set) into Parasitized or Uninfected, and says 'uncertain — refer' below its confidence threshold. "
    "It is not a diagnosis: a trained microscopist confirms every positive slide. It learned P. falciparum cells "
    "stained and photographed at one site (NIH/LHNCBC, Chittagong Medical College Hospital); other species, "
    "stains, microscopes or whole-field photos are a domain shift to measure before use."
)
FIELD_INTENDED_USE = (
    "A screening aid for whole microscope fields of thin blood smears (`python -m edge_runtime smear`): it sorts "
    "the red cells the smear pipeline finds and cuts into Parasitized or Uninfected, and says 'uncertain — refer' "
    "below its confidence threshold. It is the NIH-trained `malaria` model fine-tuned on cells cut from "
    "IML-Malaria field photos (P. vivax, Giemsa-stained thin smears, 1280x960 phone-microscope fields) besides "
    "the NIH cells. It is not a diagnosis: a trained microscopist confirms every positive slide. Other stains, "
    "microscopes and species than those it learned are a domain shift to measure before use."
)


def calibration_manifest(train_manifest: Path, sample: Path, dest: Path, n: int, seed: int,
                         copy_from: Path | Sequence[Path] | None = None) -> dict[str, Any]:
    """Write dest/calibration.csv: `n` seeded training cells (train split) and the sample's cells (test split).

    Calibration cells under `copy_from` (crops a run made, not a data set kept beside the repository) are
    copied into dest/calibration/<patient>/ and the manifest points at the copies, so the committed release
    can be converted again on a fresh clone.
    """
    from dataclasses import replace

    trained = read_manifest(train_manifest)
    trained_patients = {r.patient for r in trained if r.split in ("train", "val")}
    sample_records = build_split(sample, val=0.0, test=0.0, progress=False).records
    seen = sorted({r.patient for r in sample_records} & trained_patients)
    if seen:
        raise ValueError(f"the sample {sample} holds patients the run trained on ({', '.join(seen[:5])}); "
                         "a release is scored on unseen patients only")
    pool = sorted((r for r in trained if r.split == "train"), key=lambda r: r.path)
    calib = random.Random(seed).sample(pool, min(n, len(pool)))
    # one folder, or several (a site adaptation mixes its own crops with the shared ones)
    roots = [Path(c).resolve() for c in ([copy_from] if isinstance(copy_from, (str, Path)) else copy_from or ())]
    src_root = roots[0] if roots else None

    def made_by_a_run(path: str) -> bool:
        return any(Path(path).resolve().is_relative_to(root) for root in roots)

    copied = 0
    if src_root is not None:
        local = dest / "calibration"
        if local.exists():
            shutil.rmtree(local)
        for i, r in enumerate(calib):
            if made_by_a_run(r.path):
                target = local / r.patient / Path(r.path).name
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(r.path, target)
                    copied += 1
                calib[i] = replace(r, path=str(target.resolve()))
    records = [replace(r, split="train") for r in calib] + [replace(r, split="test") for r in sample_records]
    write_manifest(records, dest / "calibration.csv")
    kept = [r.path for r in trained if r.split in ("train", "val") and not made_by_a_run(r.path)]
    root = os.path.commonpath(kept)  # <data>/<class>/... -> <data>
    return {"data_root": os.path.relpath(root), "calibration_cells": len(calib), "copied_cells": copied,
            "sample_cells": len(sample_records),
            "sample_patients": len({r.patient for r in sample_records}),
            "trained_cells": sum(r.split in ("train", "val") for r in trained),
            "trained_patients": len(trained_patients)}


def reproduce_command(dest: Path, out: str = "OUT") -> list[str]:
    """The `python -m convert` call that makes the released files from the committed ones (`release.json`)."""
    settings = json.loads((dest / "release.json").read_text()) if (dest / "release.json").exists() else {}
    formats = settings.get("formats") or [FLOAT, FORMAT]  # a release before 1.1.0 shipped the .tflite alone
    argv = ["python", "-m", "convert", str(dest), "--out", out, "--formats", ",".join(formats),
            "--calib", str(dest / "calibration.csv"), "--eval-n", "0", "--force"]
    if settings.get("formats"):  # from 1.1.0 on, the files carry the release's name and version
        argv += ["--name", settings["name"], "--model-version", settings["version"]]
    for key in ("threshold", "min_agreement", "onnx_activations"):
        if settings.get(key) is not None:
            argv += [f"--{key.replace('_', '-')}", str(settings[key])]
    return argv


def _report_of(folder: Path, name: str, flag: str, command: str) -> dict[str, Any]:
    path = Path(folder) / name
    if not path.exists():
        raise FileNotFoundError(f"{flag} {folder}: no {name} (is `{command}` finished?)")
    return json.loads(path.read_text())


def cv_figures(cv_dir: Path | None, preset: str) -> dict[str, Any]:
    """The headline of `python -m train cv`'s cv.json; {} when none was given."""
    if cv_dir is None:
        return {}
    cv = _report_of(cv_dir, "cv.json", "--cv", "python -m train cv")
    if cv["preset"]["name"] != preset:
        raise ValueError(f"--cv {cv_dir} cross-validated preset {cv['preset']['name']!r}, the run is {preset!r}")
    s, p, ci = cv["summary"], cv["pooled"], cv["bootstrap"]["intervals"]
    out: dict[str, Any] = {"folds": cv["folds"], "cells": p["cells"], "patients": p["patients"],
                           "command": " ".join(cv["command"] or []),
                           "thresholds": threshold_table(Path(cv_dir) / "oof.csv", cv["positive_label"])}
    for m in ("accuracy", "sensitivity", "specificity", "roc_auc"):
        out[f"{m}_mean"], out[f"{m}_std"] = s[m]["mean"], s[m]["std"]
        out[f"{m}_pooled"], out[f"{m}_ci95"] = p[m], ci[m]
    return out


def threshold_table(oof_csv: Path, positive: str, grid: Sequence[float] = (0.6, 0.7, 0.75, 0.8, 0.85, 0.9)
                    ) -> list[dict[str, float]]:
    """Per confidence threshold, on out-of-fold predictions: the share answered 'uncertain', and the accuracy
    and sensitivity on the cells answered (a binary model's confidence is max(p, 1 - p))."""
    import csv

    with open(oof_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    p = np.array([float(r[f"prob_{positive}"]) for r in rows])
    y = np.array([r["label"] == positive for r in rows])
    conf, pred = np.maximum(p, 1 - p), p >= 0.5
    out = []
    for t in grid:
        kept = conf >= t
        pos = kept & y
        out.append({"threshold": t, "uncertain": float(1 - kept.mean()),
                    "accuracy_answered": float((pred[kept] == y[kept]).mean()) if kept.any() else float("nan"),
                    "sensitivity_answered": float(pred[pos].mean()) if pos.any() else float("nan")})
    return out


def _replace_dir(new: Path, dest: Path) -> None:
    """Put the folder `new` where `dest` is (two renames in one parent; the old one is then removed)."""
    old = dest.parent / f".{dest.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        dest.rename(old)
    new.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


@dataclasses.dataclass
class _Prepared:
    """What a release stages before its conversion: the config, the calibration/sample counts, the figures it
    carries (cross-validation, field or site), its provenance so far, and the settings convert is given."""

    cfg: Any
    data: dict[str, Any]
    sample: Path
    metrics: dict[str, Any]
    trained: dict[str, Any]
    inputs: str
    threshold: float | None
    min_agreement: float | None
    calib_n: int


def release(
    run: Path,
    name: str,
    version: str,
    sample: Path | None = None,
    cv_dir: Path | None = None,
    dest: Path | None = None,
    package: Path | None = None,
    calib_n: int = 300,
    seed: int = 0,
    log: Callable[..., None] = print,
    command: Sequence[str] | None = None,
    threshold: float | None = None,
    field_cv: Path | None = None,
    copy_calib: Path | Sequence[Path] | None = None,
    min_agreement: float | None = None,
    notes: Sequence[str] = (),
    site: dict[str, Any] | None = None,
    changes: Sequence[str] = (),
    false_calls: Sequence[Path] = (),
    false_calls_what: str | None = None,
    replace_notes: bool = False,
) -> registry.Release:
    """Make the release of `run` (see the module docstring); returns its registry entry.

    `run` is a training run, or a release folder (`releases/NAME`, holding `release.json`): then its committed
    `model.keras` is released again under `version` with the same calibration cells, sample and measured
    figures (`release_again`). `field_cv`: the `train field-cv` folder whose `--final` run this is (a model
    fine-tuned on field crops): its leave-one-block-out figures go into the registry and the card.
    `copy_calib`: calibration cells under this folder (or these folders) are copied beside the card (see
    `calibration_manifest`). `site`: the report of `python -m train site-adapt` whose run this is (its
    before/after table on held-out site fields). `min_agreement`: the int8 files' lowest top-1 agreement with
    Keras on the sample (convert's `--min-agreement`), recorded with the release. `changes`: what changed
    since the previous version, for the card; `replace_notes`: a release folder's previous notes are dropped
    for `notes`. `false_calls`: `benchmarks smear` reports (smear.json) or
    `train field-cv` fold results (result.json) of models of this recipe on blocks they never saw: their false
    parasitized calls become the release's false-call rate (`false_call_figures`), which the slide decision
    weighs a slide's calls against; a release folder released again keeps its previous one unless given.

    Everything is made in a folder beside `dest` and renamed over it once the conversion passed: a failed or
    killed release leaves the previous one as it was.
    """
    run = Path(run)
    dest = Path(dest) if dest else Path("releases") / name
    package = Path(package) if package else registry.RELEASED_DIR
    again = (run / "release.json").is_file()
    this = (shlex.join(command) if command else site["command"] if site  # `train site-adapt` releases its run
            else f"python -m convert release {run} --name {name} --version {version}")
    if again:
        if dest.resolve() != run.resolve():  # its calibration.csv's paths are relative to where it lies
            raise ValueError(f"{run} is a release folder: it is released again where it is (--dest {run}), "
                             f"not into {dest}")
        previous = _previous_release(run, name, version, package)
    else:
        if sample is None:
            raise ValueError("--sample is needed to release a run (a class-folder tree of unseen patients)")
        cfg = runs.read_config(run)
        if cfg.task != "malaria" or not cfg.preset:
            raise ValueError(f"{run}: releases are made from malaria runs (task {cfg.task!r})")
        if not cfg.manifest or not Path(cfg.manifest).exists():
            raise FileNotFoundError(f"{run}: its training manifest {cfg.manifest} is gone; the calibration cells "
                                    "are drawn from it")
        fields = field_figures(field_cv, run)  # checked before anything is written
    rate = (false_call_figures(false_calls, name, false_calls_what) if false_calls  # checked before anything
            else None if again else field_cv_false_calls(fields, name))  # is written
    dest.parent.mkdir(parents=True, exist_ok=True)
    package.mkdir(parents=True, exist_ok=True)
    stage = dest.parent / f".{dest.name}.staging"  # a sibling: relative paths in calibration.csv stay right
    if stage.exists():
        shutil.rmtree(stage)  # what a killed release left
    stage.mkdir()
    try:
        if again:
            prep = _stage_again(run, stage, previous, this, threshold, min_agreement, notes, log, replace_notes)
        else:
            prep = _stage_run(run, stage, Path(sample), cfg, fields, cv_dir, site, calib_n, seed, copy_calib, this,
                              threshold, min_agreement, notes, log)
        atomic_write_text(stage / "release.json", json.dumps(  # what reproduce_command reads
            {"name": name, "version": version, "threshold": prep.threshold, "min_agreement": prep.min_agreement,
             "formats": [FLOAT, *SHIPPED], "onnx_activations": ONNX_ACTIVATIONS}, indent=2) + "\n")

        log(f"== 2/4 convert ({', '.join([FLOAT, *SHIPPED])}), calibrated on {prep.data['calibration_cells']} "
            f"training cells, proved on the {prep.data['sample_cells']} sample cells")
        with tempfile.TemporaryDirectory(prefix="medge-release-") as work:
            out = Path(work)
            options = Options(calib=stage / "calibration.csv", calib_n=prep.calib_n, eval_n=0, seed=0, force=True,
                              threshold=prep.threshold, onnx_activations=ONNX_ACTIVATIONS, model_version=version,
                              **({"min_agreement": prep.min_agreement} if prep.min_agreement is not None else {}))
            report = run_export(stage, out, parse_formats([FLOAT, *SHIPPED]), options, name=name, log=log)
            if not report.ok:
                failed = [r for r in report.rows if r.failed]
                raise ValueError(f"conversion failed: {failed[0].format}: {failed[0].error}")
            files = {r.format: out / r.file for r in report.rows}

            log("== 3/4 score on the sample through edge_runtime (every file)")
            held = read_manifest(stage / "calibration.csv", "test")
            labels = list(prep.cfg.labels)
            y = np.array([labels.index(r.label) for r in held])
            paths = [r.path for r in held]
            f32, p32 = artifact_metrics(files[FLOAT], paths, y, labels, prep.cfg.positive_label)
            q8, p8 = artifact_metrics(files[FORMAT], paths, y, labels, prep.cfg.positive_label)
            flips = p32.argmax(1) != p8.argmax(1)
            agree = float(1 - flips.mean())
            surest = np.maximum(p32.max(1), p8.max(1))[flips]  # of the cells int8 flips
            by_format = {}
            for fmt in SHIPPED[1:]:  # the ONNX Runtime files, beside the .tflite a device runs by default
                m, p = artifact_metrics(files[fmt], paths, y, labels, prep.cfg.positive_label)
                by_format[fmt] = {**m, "top1_agreement_with_tflite_int8": float(np.mean(p.argmax(1) == p8.argmax(1))),
                                  "max_abs_diff_to_tflite_int8": float(np.abs(p - p8).max())}
                log(f"   {fmt}: accuracy {_pct(m['accuracy'])}, top-1 agreement with {FORMAT} "
                    f"{_pct(by_format[fmt]['top1_agreement_with_tflite_int8'])}")

            log("== 4/4 package data, registry and model card")
            # Not the build machine's absolute path.
            report = dataclasses.replace(report, source={**report.source, "path": "model.keras"})
            atomic_write_text(stage / "conversion.json", json.dumps(report.to_dict(), indent=2) + "\n")
            shipped = []
            for fmt in SHIPPED:
                target = package / f"{name}{FORMATS[fmt].ext}"
                atomic_write_bytes(target, files[fmt].read_bytes())
                shipped.append(registry.ReleasedFile(format=fmt, file=target.name, runtime=FORMATS[fmt].runtime,
                                                     sha256=sha256_file(target), bytes=target.stat().st_size))
            threshold_used = read_metadata(files[FORMAT]).confidence_threshold
            _replace_dir(stage, dest)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)  # the previous release stays as it was
        raise

    main = shipped[0]
    entry = registry.Release(
        name=name, version=version, file=main.file, sha256=main.sha256, bytes=main.bytes, format=FORMAT,
        task=prep.cfg.task, labels=tuple(labels), card=f"{name}.md",
        metrics={
            "sample": {**q8, "patients": prep.data["sample_patients"]},
            "sample_float32": f32,
            "sample_by_format": by_format,
            "int8_drop_points": round(100 * (f32["accuracy"] - q8["accuracy"]), 2),
            "int8_float32_agreement": agree,
            "int8_flips": {"cells": int(flips.sum()), "max_confidence": float(surest.max()) if flips.any() else None},
            **prep.metrics,
            **({"false_calls": rate} if rate else {}),
        },
        trained={**prep.trained, "source_sha256": sha256_file(dest / "model.keras"), "threshold": threshold_used,
                 "min_agreement": prep.min_agreement},
        inputs=prep.inputs, files=tuple(shipped), changes=tuple(changes),
    )
    card = model_card(entry, dest, prep.sample, prep.cfg, prep.data)
    atomic_write_text(dest / "MODEL_CARD.md", card)
    atomic_write_text(package / entry.card, card)
    others = [r for r in registry.read_registry(package) if r.name != name]
    atomic_write_text(package / registry.REGISTRY, registry.registry_json([*others, entry]))
    return entry


def _stage_run(run: Path, stage: Path, sample: Path, cfg, fields: dict[str, Any], cv_dir: Path | None,
               site: dict[str, Any] | None, calib_n: int, seed: int, copy_calib, this: str,
               threshold: float | None, min_agreement: float | None, notes: Sequence[str], log) -> _Prepared:
    """A first release of a training run: its model, config and a calibration manifest drawn from its cells."""
    import keras  # TensorFlow: imported only when this runs

    from train.malaria.models import describe  # loads TensorFlow: imported only when this runs

    log(f"== 1/4 model: {runs.model_file(run)}, its config and calibration cells")
    model = keras.saving.load_model(runs.model_file(run), compile=False)
    model.save(stage / "model.keras")
    size = describe(model)
    released_cfg = runs.RunConfig.from_dict({**cfg.to_dict(), "model_file": "model.keras", "manifest": None,
                                             "init": os.path.relpath(cfg.init) if cfg.init else None})
    runs.write_config(stage, released_cfg)
    data = calibration_manifest(Path(cfg.manifest), sample, stage, calib_n, seed, copy_from=copy_calib)
    metrics = {"cv": cv_figures(cv_dir, cfg.preset["name"]), **({"field_cv": fields} if fields else {}),
               **({"site": site_figures(site)} if site else {})}
    trained = {
        "preset": cfg.preset["name"], "epochs": cfg.preset["epochs"], "seed": cfg.seed,
        "cells": data["trained_cells"], "patients": data["trained_patients"],
        "weights": size["weights"], "macs": size["macs"],
        "data": f"{data['data_root']}: every patient of the training manifest; none of {sample}'s"
                + (f"; and crops of {fields['pooled']['fine_tuned']['fields']} field photos "
                   f"({fields['settings']['data']})" if fields else "")
                + (f"; and crops of {len(site['adapt_fields'])} fields of site {site['site']}" if site else ""),
        "notes": list(notes), "created": cfg.created,
        "keep": "final" if cfg.model_file == "final.keras" else "best",
        "sample": str(sample),
        "commands": [*_training_commands(cfg, data, run, sample, metrics), this],
    }
    return _Prepared(cfg=released_cfg, data=data, sample=sample, metrics=metrics, trained=trained,
                     inputs="fields" if fields or site else "cells", threshold=threshold,
                     min_agreement=min_agreement, calib_n=calib_n)


def _previous_release(folder: Path, name: str, version: str, package: Path) -> registry.Release:
    """The registry entry a release folder was released as, checked to describe its committed model.keras."""
    try:
        previous = registry.get(name, package)
    except registry.ReleaseError:
        raise ValueError(f"{folder} is a release folder, but {package / registry.REGISTRY} has no release named "
                         f"{name!r} whose figures it could carry; release its training run instead") from None
    if version == previous.version:
        raise ValueError(f"{name} {version} is already released; give the new release a new version")
    source = sha256_file(folder / "model.keras")
    if previous.trained.get("source_sha256") != source:
        raise ValueError(
            f"{folder / 'model.keras'} (sha256 {source[:12]}...) is not the model {name} {previous.version} was "
            f"measured on ({str(previous.trained.get('source_sha256'))[:12]}...): its figures would not describe it. "
            "Release it from its training run (`python -m convert release RUN --name ... --sample ...` with its "
            "--cv or --field-cv)")
    return previous


def _stage_again(folder: Path, stage: Path, previous: registry.Release, this: str, threshold: float | None,
                 min_agreement: float | None, notes: Sequence[str], log, replace_notes: bool = False) -> _Prepared:
    """A release of a release folder's committed model.keras again: same calibration cells, sample and figures."""
    log(f"== 1/4 model: {folder / 'model.keras'} (released as {previous.name} {previous.version}), as committed")
    for item in ("model.keras", "config.json", "calibration.csv"):
        shutil.copyfile(folder / item, stage / item)
    if (folder / "calibration").is_dir():
        shutil.copytree(folder / "calibration", stage / "calibration")
    settings = json.loads((folder / "release.json").read_text())
    cfg = runs.read_config(stage)
    records = read_manifest(stage / "calibration.csv")
    calib = [r for r in records if r.split == "train"]
    held = [r for r in records if r.split == "test"]
    local = (stage / "calibration").resolve()
    t = dict(previous.trained)
    sample = Path(t.get("sample") or os.path.relpath(os.path.commonpath([r.path for r in held])))
    data = {"calibration_cells": len(calib), "copied_cells": sum(Path(r.path).is_relative_to(local) for r in calib),
            "sample_cells": len(held), "sample_patients": len({r.patient for r in held}),
            "trained_cells": t.get("cells"), "trained_patients": t.get("patients")}
    for key in ("source_sha256", "threshold", "min_agreement"):  # what this conversion records afresh
        t.pop(key, None)
    t["keep"] = t.get("keep") or ("final" if (cfg.images or {}).get("val") == 0 else "best")
    t["sample"] = str(sample)
    t["commands"] = [*(t.get("commands") or _card_commands(registry.card_text(previous), previous)), this]
    t["notes"] = [*(() if replace_notes else t.get("notes", ())), *notes]
    return _Prepared(
        cfg=cfg, data=data, sample=sample,
        metrics={k: v for k, v in previous.metrics.items() if k in ("cv", "field_cv", "site", "false_calls")},
        trained=t, inputs=previous.inputs,
        threshold=threshold if threshold is not None else settings.get("threshold"),
        min_agreement=min_agreement if min_agreement is not None else settings.get("min_agreement"),
        calib_n=len(calib))


def _card_commands(card: str, previous: registry.Release) -> list[str]:
    """The commands of a card's "How it was made" (registry entries before 1.1.0 did not record them)."""
    part = card.split("## How it was made", 1)[-1].split("```")
    if len(part) < 2 or not part[1].strip():
        raise ValueError(f"{previous.name} {previous.version}: neither its registry entry nor its card says how it "
                         "was made; release it from its training run")
    return [line for line in part[1].strip().splitlines() if line.strip()]


def _training_commands(cfg, data: dict[str, Any], run: Path, sample: Path, metrics: dict[str, Any]) -> list[str]:
    """The commands that made the model a first release ships (its own command follows them on the card)."""
    if metrics.get("site"):
        return []  # `train site-adapt` made it and releases it: its command is the release's
    if metrics.get("field_cv"):
        fc = metrics["field_cv"]
        return [f"python -m train field-crops --data {fc['settings']['data']} --out {fc['settings']['crops']}",
                fc["command"]]
    manifest = os.path.relpath(cfg.manifest)
    cv = metrics.get("cv")
    return [
        f"python -m train split --data {data['data_root']} --out {manifest} --val 0 --test 0 "
        f"--exclude-patients-of {sample}",
        f"python -m train malaria --manifest {manifest} --preset {cfg.preset['name']} --out {os.path.relpath(run)} "
        f"--keep {'final' if cfg.model_file == 'final.keras' else 'best'} --seed {cfg.seed}",
        *([cv["command"]] if cv else []),
    ]


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def _ci(v: Sequence[float] | None) -> str:
    return "" if not v else f" [{100 * v[0]:.2f}, {100 * v[1]:.2f}]"


BLOCK_NAMES = {"preact": "pre-activation residual", "post": "post-activation residual (BatchNorm folds into "
               "the convolutions)", "inverted": "inverted-residual (MobileNetV2)"}


def _jitter(preset: dict[str, Any]) -> str:
    parts = []
    if preset.get("hue"):
        parts.append(f"hue +-{preset['hue'] / 2:g} turn")
    if preset.get("saturation"):
        parts.append(f"saturation factor 0.5 +- {preset['saturation']:g}")
    return ", " + ", ".join(parts) if parts else ""


def _blocks(*names: str) -> str:
    """Slide blocks named once each: "PA171700, PA171790", or "both PA171700" when they are one."""
    return f"both {names[0]}" if len(set(names)) == 1 and len(names) == 2 else ", ".join(dict.fromkeys(names))


def _model_lines(r: registry.Release, cfg, data: dict[str, Any]) -> list[str]:
    """The card's title and its Model section."""
    t, net = r.trained, cfg.preset["model"]
    return [
        f"# Model card: `{r.name}` {r.version}",
        "",
        f"`edge_runtime.load(\"{r.name}\")` · {r.format} · {r.bytes / 1024:.0f} KB · `{r.file}` sha256 `{r.sha256}`",
        "",
        *_files_lines(r),
        *_changes_lines(r),
        "## Intended use",
        "",
        INTENDED_USE if not (r.metrics.get("field_cv") or r.metrics.get("site")) else FIELD_INTENDED_USE,
        "",
        "## Model",
        "",
        f"- Preset `{cfg.preset['name']}` (train/malaria/presets.py): {BLOCK_NAMES[net['block']]} network, "
        f"stem {net['filters'][0]} then stages of {', '.join(map(str, net['filters'][1:]))} channels, "
        f"{'/'.join(map(str, net['stages']))} modules, {net['head']} head; {t['weights']:,} weights, "
        f"{t['macs'] / 1e6:.1f} M MACs per image.",
        f"- Input: {cfg.preprocess.input_size[0]}x{cfg.preprocess.input_size[1]} RGB, bilinear resize, "
        f"pixel x {cfg.preprocess.scale:.6g} + {cfg.preprocess.offset:g}; output: softmax over "
        f"{', '.join(r.labels)}.",
        f"- int8: weights per channel, activations int8 (TFLite full-integer, float input and output), "
        f"calibrated on {data['calibration_cells']} training cells (min/max).",
        *([f"- ONNX int8: QDQ, weights int8 per channel, activations {ONNX_ACTIVATIONS} (onnxruntime "
           "`quantize_static`, min/max on the same cells: TFLite's scheme), float input and output; the `.ort` is "
           "that graph in ONNX Runtime's own format, optimized (all but the x86-only NCHWc layout)."]
          if any(f.runtime == "onnxruntime" for f in r.files) else []),
        "",
    ]


def _files_lines(r: registry.Release) -> list[str]:
    """The files of a release, per runtime, with size, sha256 and their agreement on the sample."""
    if not r.files:
        return []
    by_format = r.metrics.get("sample_by_format", {})
    rows = []
    for f in r.files:
        m = by_format.get(f.format, {})
        agree = m.get("top1_agreement_with_tflite_int8")
        rows.append(f"| `{f.file}` | {f.runtime} | {f.format} | {f.bytes / 1024:.0f} KB | "
                    f"{_pct(m.get('accuracy', r.metrics['sample']['accuracy'] if f.format == FORMAT else None))} | "
                    f"{'(itself)' if f.format == FORMAT else _pct(agree)} | `{f.sha256}` |")
    return [
        "## Files",
        "",
        f"| file | runtime | format | size | accuracy on the sample | top-1 agreement with `{r.file}` | sha256 |",
        "|---|---|---|---:|---:|---:|---|",
        *rows,
        "",
        f"`edge_runtime.load(\"{r.name}\")` opens the `.tflite`; `edge_runtime.load(\"{r.name}\", "
        "runtime=\"onnxruntime\")` the `.onnx` (the full onnxruntime optimizes it for the CPU it runs on); the "
        "`.ort` is for ONNX Runtime Mobile and minimal builds. Each file carries medge's metadata (labels, "
        "preprocessing, threshold, version; `metadata_props` in the ONNX files), its golden set for "
        "`python -m edge_runtime selftest`, and a content hash of its own bytes: `edge_runtime.load` and `selftest` "
        "refuse a copy with any byte changed. The `.tflite` also carries the standard TFLite metadata (version "
        f"{r.version}) that MediaPipe Tasks and tflite-support read.",
        "",
    ]


def _changes_lines(r: registry.Release) -> list[str]:
    return [f"## Changes in {r.version}", "", *[f"- {c}" for c in r.changes], ""] if r.changes else []


def _shown_path(path: str | os.PathLike) -> str:
    """A path as a card shows it, as a reader of a clone would type it: relative to the project; else, for a run
    made from a snapshot or a scratch folder (`/tmp/code-abc1234`, `/work/wt/field/runs/...`), from its `runs/`
    folder (where the commands write) or its `releases/` folder on, and the shared data set beside the clone as
    `../shared/data/...`; any other path as it is."""
    rel = os.path.relpath(os.path.abspath(path), Path(__file__).resolve().parents[1])
    if not rel.startswith(".."):
        return rel
    parts = Path(path).parts
    for marker in ("runs", "releases"):
        if marker in parts:
            return "/".join(parts[len(parts) - 1 - parts[::-1].index(marker):])
    if "shared" in parts and parts[parts.index("shared") + 1:parts.index("shared") + 2] == ("data",):
        return "/".join(["..", *parts[parts.index("shared"):]])
    return str(path)


# An absolute path in a card's text (a recorded command, a data folder): not after a word, a dot, a colon or a slash,
# so fractions ("1/1/1") and addresses ("https://...") are not paths.
_ABSOLUTE = re.compile(r"(?<![\w.:/])/(?:[\w.@+-]+/)*[\w.@+-]+/?")


def shown_paths(text: str) -> str:
    """A card's text with every absolute path shown as `_shown_path` shows one (a trailing slash kept).

    Commands are recorded as run, and runs are made from snapshots and scratch folders that mean nothing to a
    reader (issue 27: the card "names a developer data path"). The registry keeps the commands exactly as they ran.
    """
    return _ABSOLUTE.sub(lambda m: _shown_path(m.group(0)) + "/" * m.group(0).endswith("/"), text)


def _recipe(r: registry.Release, cfg) -> str:
    preset, final = cfg.preset, r.trained.get("keep") == "final"
    start = f"fine-tuned from `{_shown_path(cfg.init)}`, " if cfg.init else ""
    return (f"Recipe: {start}{preset['epochs']} epochs, batch {preset['batch_size']}, SGD lr {preset['learning_rate']} "
            f"(momentum {preset['momentum']}{', Nesterov' if preset.get('nesterov') else ''}, {preset['schedule']} "
            f"decay), label smoothing {preset.get('label_smoothing', 0)}, augmentation: rotation, zoom, shift, shear, "
            f"flip{_jitter(preset)}; seed {r.trained['seed']}; "
            + ("final-epoch weights (no checkpoint picked on a validation split)." if final
               else "the epoch with the best validation accuracy."))


def _sample_lines(r: registry.Release, sample: Path) -> list[str]:
    """The bundled NIH sample's table, the int8 drop and the threshold."""
    m = r.metrics
    s, f = m["sample"], m["sample_float32"]
    lines = [
        f"**The bundled sample** ({s['cells']} NIH cells of {s['patients']} unseen patients, `{sample}`), "
        "through edge_runtime:",
        "",
        "| artifact | accuracy | sensitivity | specificity | ROC AUC | uncertain |",
        "|---|---:|---:|---:|---:|---:|",
        f"| {FLOAT} | {_pct(f['accuracy'])} | {_pct(f['sensitivity'])} | {_pct(f['specificity'])} | "
        f"{f['roc_auc']:.4f} | {_pct(f['uncertain'])} |",
        f"| {FORMAT} (released) | {_pct(s['accuracy'])} | {_pct(s['sensitivity'])} | {_pct(s['specificity'])} | "
        f"{s['roc_auc']:.4f} | {_pct(s['uncertain'])} |",
        *[f"| {fmt} (released) | {_pct(o['accuracy'])} | {_pct(o['sensitivity'])} | {_pct(o['specificity'])} | "
          f"{o['roc_auc']:.4f} | {_pct(o['uncertain'])} |" for fmt, o in m.get("sample_by_format", {}).items()],
        "",
        f"int8 accuracy drop: {m['int8_drop_points']:+.2f} points; int8 and float32 agree on "
        f"{_pct(m['int8_float32_agreement'])} of the cells. {s['cells']} cells of {s['patients']} patients is a small "
        "test: a 95% interval on it is several points wide. Speed: `python -m benchmarks` and the README's Pareto "
        "table.",
        "",
    ]
    flips, bound = m.get("int8_flips") or {}, r.trained.get("min_agreement")
    if flips.get("cells"):
        either_way = flips["max_confidence"] < r.trained["threshold"]
        lines += [f"int8 changes the top-1 class of {flips['cells']} of the {s['cells']} cells; the surest of them "
                  f"at {flips['max_confidence']:.2f} (float32 or int8)"
                  + (", below the threshold: each of them is 'uncertain' either way." if either_way else "."), ""]
    if bound is not None:
        lines += [f"Released with `--min-agreement {bound:g}` (convert's default is stricter): its int8 file "
                  "agrees less with Keras on these NIH cells than the default asks.", ""]
    return lines + [f"Confidence threshold: {r.trained['threshold']:g}; below it the answer is 'uncertain — refer'.",
                    ""]


def _made_lines(r: registry.Release, dest: Path) -> list[str]:
    """How it was made: the commands (training, then each release of it, this one last), then the one that
    remakes the released files from the committed ones."""
    return [
        "## How it was made",
        "",
        "```",
        *r.trained["commands"],
        "```",
        "",
        "The released files are what this makes from the committed `model.keras` (a test checks it):",
        "",
        "```",
        " ".join(reproduce_command(dest)),
        "```",
        "",
        # Both named: a reader checking the file they were handed expects the shipped file's hash first.
        f"sha256 of the shipped `{r.file}`: `{r.sha256}`; of the Keras model it is made from (`model.keras`): "
        f"`{r.trained['source_sha256']}`. Trained {r.trained['created']}.",
        "",
    ]


def model_card(r: registry.Release, dest: Path, sample: Path, cfg, data: dict[str, Any]) -> str:
    """The model card (Markdown): what it is for, what it learned from, how well it does, how it was made."""
    if r.metrics.get("site"):
        return shown_paths(site_card(r, dest, sample, cfg, data))
    if r.metrics.get("field_cv"):
        return shown_paths(field_card(r, dest, sample, cfg, data))
    m, t = r.metrics, r.trained
    cv = m.get("cv") or {}
    threshold_lines: list[str] = []
    if cv and cv.get("thresholds"):
        threshold_lines = [
            "How the threshold trades answers for accuracy, on the cross-validation's out-of-fold cells "
            "(float32; each fold's model on its unseen patients):", "",
            "| threshold | answered 'uncertain' | accuracy of the cells answered | sensitivity of those |",
            "|---:|---:|---:|---:|",
            *[f"| {t['threshold']:g} | {_pct(t['uncertain'])} | {_pct(t['accuracy_answered'])} | "
              f"{_pct(t['sensitivity_answered'])} |" for t in cv["thresholds"]],
            "",
        ]
    lines = [
        *_model_lines(r, cfg, data),
        "## Training data",
        "",
        f"NIH malaria cell images (U.S. National Library of Medicine, LHNCBC; Rajaraman et al., PeerJ 6:e4568, 2018): "
        f"{t['cells']:,} cells of {t['patients']} patients; the {m['sample']['patients']} "
        f"patients of the sample it is scored on (`{sample}`) are not among them.",
        "",
        _recipe(r, cfg),
        "",
        "## Measured",
        "",
    ]
    if cv:
        lines += [
            f"**Unseen patients, {cv['folds']}-fold patient-grouped cross-validation** of the same preset on the "
            f"same {cv['patients']} patients ({cv['cells']:,} cells; each fold a new model, float32 Keras; "
            "mean +- std over folds, pooled out-of-fold with a 95% patient-bootstrap interval):",
            "",
            "| metric | mean +- std | pooled [95% CI] |",
            "|---|---:|---:|",
        ]
        for k in ("accuracy", "sensitivity", "specificity"):
            mean, std = cv[f"{k}_mean"], cv[f"{k}_std"]
            lines.append(f"| {k} | {_pct(mean)} +- {100 * std:.2f} | "
                         f"{_pct(cv[f'{k}_pooled'])}{_ci(cv[f'{k}_ci95'])} |")
        lo, hi = cv["roc_auc_ci95"] or (float("nan"), float("nan"))
        lines.append(f"| ROC AUC | {cv['roc_auc_mean']:.4f} +- {cv['roc_auc_std']:.4f} | "
                     f"{cv['roc_auc_pooled']:.4f} [{lo:.4f}, {hi:.4f}] |")
        lines += ["", f"`{cv['command']}`", ""]
    else:
        lines += ["No cross-validation was given to the release (`--cv`).", ""]
    lines += [
        *_sample_lines(r, sample),
        *threshold_lines,
        "## Limitations",
        "",
        "- Sensitivity is what a screen lives by: a missed parasitized cell is the costly error. Answers below the "
        "confidence threshold are 'uncertain — refer'; treat them as positives.",
        "- The NIH labels hold known mistakes (cells labelled Uninfected with visible parasites and the reverse).",
        "- On whole-field photos of P. vivax from another microscope (IML-Malaria, `python -m edge_runtime smear`) "
        "the NIH-trained model calls many uninfected cells parasitized: measure before trusting it there "
        "(`malaria-field` is the model fine-tuned for them).",
        *[f"- {n}" for n in t.get("notes", ())],
        "",
    ]
    return shown_paths("\n".join(lines + _made_lines(r, dest)))


def false_call_figures(paths: Sequence[Path], name: str, what: str | None = None) -> dict[str, Any]:
    """The false-call rate a release records (`metrics["false_calls"]`, read by
    `edge_runtime.smear.decision.model_false_calls`): counted parasitized calls on no annotated parasite
    (`calls_off_parasites`) among the red cells counted, pooled over the readable fields of `paths`.

    Each path is a `benchmarks smear` report (smear.json, its "fields") or a `train field-cv` fold's result.json
    (its "rows"), of a model of this recipe on fields it never saw; one held-out block each is the usual case.
    `what` names those fields in the recorded source (default: held-out blocks of leave-one-block-out).
    """
    calls = red = fields = 0
    blocks, commands = [], []
    for path in paths:
        path = Path(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--false-calls {path}: unreadable ({e})") from None
        rows = doc.get("fields") or doc.get("rows") if isinstance(doc, dict) else None
        if not rows:
            raise ValueError(f"--false-calls {path}: neither a `benchmarks smear` report (smear.json) nor a `train "
                             "field-cv` fold result (result.json) with per-field rows")
        read = [r for r in rows if r.get("error") is None and r.get("readable", True)]
        lacking = [r["field"] for r in read if "calls_off_parasites" not in r]
        if lacking:
            raise ValueError(f"--false-calls {path}: {len(lacking)} field rows lack calls_off_parasites (measured "
                             "before it was counted); measure them again with `python -m benchmarks smear --model "
                             "FOLD_MODEL --fields ...`")
        calls += sum(r["calls_off_parasites"] for r in read)
        red += sum(r.get("red_cells", 0) for r in read)
        fields += len(read)
        blocks.append(min(Path(r["field"]).stem for r in rows))
        commands.append(doc.get("command") or str(path))
    if not red:
        raise ValueError(f"--false-calls: no red cell counted in {', '.join(map(str, paths))}")
    from edge_runtime.smear.decision import FalseCalls

    what = what or (f"{name}'s recipe, leave-one-block-out: {fields} readable fields of the held-out blocks "
                    f"{', '.join(sorted(blocks))}, each scored by a model of the recipe that never saw it")
    rate = FalseCalls(calls, red, what)
    return {**rate.to_dict(), "fields": fields, "blocks": sorted(blocks), "commands": commands}


def field_cv_false_calls(fields: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The false-call rate of a `train field-cv` run's folds (each block scored by a model that never saw it),
    when its figures count `calls_off_parasites` (runs before that did not: give `--false-calls` instead)."""
    ft = (fields.get("pooled") or {}).get("fine_tuned") or {}
    if not ft.get("red_cells_read") or ft.get("calls_off_parasites") is None:
        return None
    from edge_runtime.smear.decision import FalseCalls

    blocks = sorted(fields["per_block"])
    rate = FalseCalls(ft["calls_off_parasites"], ft["red_cells_read"],
                      f"{name}'s recipe, leave-one-block-out (`train field-cv`): the held-out blocks "
                      f"{', '.join(blocks)}, each scored by a model of the recipe that never saw it")
    return {**rate.to_dict(), "fields": ft["fields"], "blocks": blocks, "commands": [fields["command"]]}


def _false_call_lines(r: registry.Release) -> list[str]:
    """What a field card says of the release's false-call rate and what the slide decision does with it."""
    fc = r.metrics.get("false_calls")
    if not fc:
        return []
    from edge_runtime.smear.decision import FalseCalls

    rate = FalseCalls.from_dict(fc)
    return [
        f"**False parasitized calls** (what a slide without parasites shows: uninfected cells, pieces of them and "
        f"regions that are no cell, called parasitized): {fc['calls']} among {fc['red_cells']:,} red cells counted, "
        f"{rate.per_1000:.1f} per 1,000 (one-sided 95% upper bound {rate.upper_per_1000:.1f}); "
        f"{fc['source']}. The slide report weighs every slide's calls against it (`smear`): with 2,000 red cells, "
        f"up to {rate.limit(2000)} calls read \"cells to review\" (a person checks them), more read \"parasites "
        "seen\". Counted per held-out field by `python -m benchmarks smear` (`calls_off_parasites`); the "
        "registry keeps each measurement's command.",
        "",
    ]


def field_figures(field_cv: Path | None, run: Path) -> dict[str, Any]:
    """What `train field-cv` measured (pooled and per held-out block), checked to describe `run`: its `--final`."""
    if field_cv is None:
        return {}
    fcv = _report_of(field_cv, "field-cv.json", "--field-cv", "python -m train field-cv")
    final = fcv.get("final")
    if not final or Path(final["run"]).resolve() != Path(run).resolve():
        raise ValueError(f"--field-cv {field_cv} describes the run {final and final['run']!r}, not {run}: release "
                         "the run its `--final` trained, whose settings the folds measured")
    keys = ("fields", "annotated_cells", "annotated_parasites", "cell_recall", "parasite_recall_called",
            "uninfected_false_positive_rate", "uninfected_uncertain_rate", "field_sensitivity",
            "count_error_mean_signed", "total_ms_per_field", "false_calls_per_1000_red_cells",
            "calls_off_parasites", "red_cells_read")

    def pick(summary: dict[str, Any]) -> dict[str, Any]:
        return {k: summary.get(k) for k in keys}

    return {"command": fcv["command"], "settings": fcv["settings"], "counts": final["counts"],
            "pooled": {m: pick(v) for m, v in fcv["pooled"].items()},
            "per_block": {b: {m: pick(v) for m, v in d.items()} for b, d in fcv["per_block"].items()},
            "folds_nih_sample_int8": {f["block"]: f["nih_sample_int8"]["accuracy"] for f in fcv["folds"]},
            "release_nih_sample_int8": (fcv.get("release_nih_sample_int8") or {}).get("accuracy"),
            "thresholds": (fcv.get("thresholds") or {}).get("fine_tuned"),
            "training_blocks": final.get("blocks"), "training_fields": final.get("fields"),
            "threshold": fcv["settings"].get("threshold"),
            "shift": [{"transform": t["transform"], "what": t["what"], "blocks": t["blocks"],
                       "summary": {k: t["summary"].get(k) for k in SHIFT_KEYS}} for t in fcv.get("shift") or ()]}


# What the card keeps of each harness transform (`train field-cv --shift`), pooled over the held-out blocks.
SHIFT_KEYS = ("fields", "fields_failed", "cell_recall_all_fields", "parasite_recall_called_all_fields",
              "uninfected_false_positive_rate", "uninfected_uncertain_rate")


def _field_shift_lines(fc: dict[str, Any]) -> list[str]:
    """The harness table of a field card: each transform on the held-out blocks, scored by their folds' models."""
    if not fc.get("shift"):
        return []
    return [
        f"Under the domain-shift harness (`benchmarks smear --shift`: the held-out blocks "
        f"{', '.join(fc['shift'][0]['blocks'])} photographed as another lab would; a refused field flags nothing):",
        "",
        "| transform | cell recall | parasites flagged | uninfected called parasitized | uninfected uncertain |",
        "|---|---:|---:|---:|---:|",
        *[f"| {t['transform']} | {_pct(t['summary']['cell_recall_all_fields'])} | "
          f"{_pct(t['summary']['parasite_recall_called_all_fields'])} | "
          f"{_pct(t['summary']['uninfected_false_positive_rate'])} | "
          f"{_pct(t['summary']['uninfected_uncertain_rate'])} |" for t in fc["shift"]],
        "",
    ]


def field_card(r: registry.Release, dest: Path, sample: Path, cfg, data: dict[str, Any]) -> str:
    """The card of a model fine-tuned on field crops: its figures are leave-one-block-out ones."""
    fc = r.metrics["field_cv"]
    c, st, pooled = fc["counts"], fc["settings"], fc["pooled"]
    rel, ft = pooled["release"], pooled["fine_tuned"]
    per = {b: d["fine_tuned"] for b, d in fc["per_block"].items()}
    worst = max(((b, d["uninfected_false_positive_rate"]) for b, d in per.items()), key=lambda t: t[1])
    unsure = max(((b, d["uninfected_uncertain_rate"]) for b, d in per.items()), key=lambda t: t[1])
    trained = fc.get("training_blocks") or sorted(per)  # older reports: the folds were every block
    n_blocks = len(trained)
    n_fields = fc.get("training_fields") or ft["fields"]
    held = sorted(per)
    which = ("each slide block" if len(held) == n_blocks else
             f"each of the held-out blocks {', '.join(held)} (of the {n_blocks} it learned from)")
    shifted = (f" and {c['shifted_uninfected']:,} uninfected + {c['shifted_parasitized_rows']:,} parasitized rows cut "
               "the same way from shifted copies of the fields (`train field-crops --shifted`: other stains, white "
               "balance, exposure, blur, magnification, noise, JPEG)" if c.get("shifted_uninfected") else "")
    lines = [
        *_model_lines(r, cfg, data),
        "## Training data",
        "",
        f"- The released `malaria` model's {c['nih']:,} NIH training cells (U.S. National Library of Medicine, "
        f"LHNCBC; Rajaraman et al., PeerJ 6:e4568, 2018; P. falciparum).",
        f"- Crops cut from the {n_fields} IML-Malaria field photos (P. vivax, another microscope and stain; "
        f"Q. Ammar et al., 2022; {n_blocks} slide blocks) by `edge_runtime.smear` itself and labelled by the "
        f"annotation they match at IoU >= 0.5: {c['field_uninfected']:,} uninfected crops "
        f"({st['uninfected_per_block']} a block, a seeded sample) and every one of the {c['field_parasitized_crops']} "
        f"parasitized crops, each {st['parasite_repeat']} times (augmentation makes the repeats differ){shifted}.",
        f"- {data['copied_cells']} of the calibration cells are such crops, committed beside this card "
        "(`calibration/`) so the artifact can be made again.",
        "",
        _recipe(r, cfg),
        "",
        "## Measured",
        "",
        f"This model has seen all {n_fields} fields: figures on them would be in-sample. What it should do on "
        f"a slide it has not seen is measured by leave-one-block-out cross-validation (`train field-cv`): {which} "
        f"is scored by a model fine-tuned in exactly this way on the other {n_blocks - 1}, through the whole "
        f"smear pipeline (cells found, cut, classified in int8 on 1 thread), {ft['annotated_cells']:,} annotated "
        f"cells and {ft['annotated_parasites']} parasites, greedy IoU >= 0.5 matching. Beside it, the NIH-only "
        "`malaria` model on the same fields:",
        "",
        "| metric (every field scored by a model that never saw its block) | `malaria` (NIH only) | fine-tuned |",
        "|---|---:|---:|",
        f"| parasite cells found and called parasitized or uncertain | {_pct(rel['parasite_recall_called'])} | "
        f"{_pct(ft['parasite_recall_called'])} |",
        f"| uninfected cells called parasitized (false positives) | {_pct(rel['uninfected_false_positive_rate'])} | "
        f"{_pct(ft['uninfected_false_positive_rate'])} |",
        f"| uninfected cells called uncertain | {_pct(rel['uninfected_uncertain_rate'])} | "
        f"{_pct(ft['uninfected_uncertain_rate'])} |",
        f"| field sensitivity (a parasite field flagged) | {rel['field_sensitivity']:.2f} | "
        f"{ft['field_sensitivity']:.2f} |",
        *([f"| false parasitized calls per 1,000 red cells (uninfected cells and regions that are no annotated cell "
           f"called parasitized: what a slide without parasites would show) | "
           f"{rel['false_calls_per_1000_red_cells']:.1f} | {ft['false_calls_per_1000_red_cells']:.1f} |"]
          if "false_calls_per_1000_red_cells" in ft and "false_calls_per_1000_red_cells" in rel else []),
        "",
        "| held-out block | false positives, `malaria` -> fine-tuned | uncertain | NIH sample int8 accuracy |",
        "|---|---:|---:|---:|",
        *[f"| {b} | {_pct(d['release']['uninfected_false_positive_rate'])} -> "
          f"{_pct(d['fine_tuned']['uninfected_false_positive_rate'])} | "
          f"{_pct(d['release']['uninfected_uncertain_rate'])} -> {_pct(d['fine_tuned']['uninfected_uncertain_rate'])}"
          f" | {_pct(fc['folds_nih_sample_int8'].get(b))} |" for b, d in fc["per_block"].items()],
        "",
        f"`{fc['command']}`",
        "",
        *_false_call_lines(r),
        *_field_shift_lines(fc),
    ]
    if fc.get("thresholds"):
        lines += [
            "How the confidence threshold trades answers for false positives on those held-out fields (a cell is "
            "'uncertain' when its top probability is below it; `--threshold` of `smear`, or a release's):",
            "",
            "| threshold | false positives | uninfected called uncertain | parasites called parasitized or uncertain |",
            "|---:|---:|---:|---:|",
            *[f"| {t['threshold']:g} | {_pct(t['false_positive_rate'])} | {_pct(t['uncertain_rate'])} | "
              f"{_pct(t['parasite_recall_called'])} |" for t in fc["thresholds"]],
            "",
        ]
    lines += [
        *_sample_lines(r, sample),
        "## Limitations",
        "",
        f"- {n_blocks} slide blocks of one laboratory and microscope. Held out, each block's stain was new to the "
        f"model scored on it; the worst block had {_pct(worst[1])} false positives and the most uncertain one "
        f"{_pct(unsure[1])} of its uninfected cells uncertain ({_blocks(worst[0], unsure[0])}). Stains, "
        "microscopes, focus and species beyond these slides are untested: check a new site's slides against a "
        "microscopist first.",
        "- Uncertain cells are 'refer': a slide with many of them is referred, not cleared.",
        "- The annotations are one team's; not every cell at a border or in a clump has a box.",
        f"- Fine-tuning costs a little on the NIH falciparum cells: on the bundled sample, int8 accuracy "
        f"{_pct(fc['release_nih_sample_int8'])} for `{st['release']}`, {_pct(r.metrics['sample']['accuracy'])} for "
        "this model.",
        *[f"- {n}" for n in r.trained.get("notes", ())],
        "",
    ]
    return "\n".join(lines + _made_lines(r, dest))


def site_figures(report: dict[str, Any]) -> dict[str, Any]:
    """What the registry keeps of a `train site-adapt` report (the table, not the per-field rows)."""
    keys = ("fields", "annotated_cells", "annotated_parasites", "parasite_recall_called",
            "uninfected_false_positive_rate", "uninfected_uncertain_rate", "field_sensitivity")
    return {"site": report["site"], "adapt_fields": report["adapt_fields"], "held_out": report["held_out"],
            "site_crops": report["site_crops"], "counts": report["counts"], "release": report["release"],
            "before": {k: report["before"].get(k) for k in keys}, "after": {k: report["after"].get(k) for k in keys},
            "nih_sample": report["nih_sample"], "reasons": report["reasons"], "command": report["command"],
            "train_seconds": report["train_seconds"], "table": report["table"]}


def site_card(r: registry.Release, dest: Path, sample: Path, cfg, data: dict[str, Any]) -> str:
    """The card of a site model (`train site-adapt`): judged before/after on the site's held-out fields."""
    s = r.metrics["site"]
    c = s["counts"]
    lines = [
        *_model_lines(r, cfg, data),
        f"**Site `{s['site']}`**: the field model adapted to this clinic's microscope, camera and stain.",
        "",
        "## Training data",
        "",
        f"- {len(s['adapt_fields'])} annotated fields of site `{s['site']}` "
        f"({', '.join(Path(f).stem for f in s['adapt_fields'])}): {c['site_uninfected']:,} uninfected and "
        f"{c['site_parasitized_crops']} parasitized crops cut by `edge_runtime.smear` itself (the parasitized ones "
        f"{c['parasite_repeat']} times each).",
        f"- Kept in the mix so it does not forget: {c['nih']:,} NIH training cells (U.S. National Library of "
        f"Medicine, LHNCBC; Rajaraman et al., PeerJ 6:e4568, 2018) and {c['shared_uninfected']:,} uninfected + "
        f"{c['shared_parasitized_crops']} parasitized crops of the IML-Malaria fields `{s['release']}` learned from "
        "(Q. Ammar et al., 2022).",
        "",
        _recipe(r, cfg),
        "",
        "## Measured",
        "",
        f"On {len(s['held_out'])} fields of the site it never saw ({', '.join(Path(f).stem for f in s['held_out'])}; "
        "held out by field), through the whole smear pipeline in int8, as `python -m benchmarks smear` measures:",
        "",
        s["table"],  # made by train site-adapt (convert imports nothing of train's commands)
        "",
        f"Released because: {'; '.join(s['reasons'])}.",
        "",
        *_false_call_lines(r),
        *_sample_lines(r, sample),
        "## Limitations",
        "",
        f"- Judged on {len(s['held_out'])} held-out fields of one site: a few fields are a small test.",
        "- Another microscope, camera or stain than this site's is a new domain: adapt again.",
        "- Uncertain cells are 'refer': a slide with many of them is referred, not cleared.",
        *[f"- {n}" for n in r.trained.get("notes", ())],
        "",
    ]
    return "\n".join(lines + _made_lines(r, dest))


def release_parser():
    import argparse

    p = argparse.ArgumentParser(prog="python -m convert release",
                                description="release a trained malaria run with the package (int8 .tflite, .onnx "
                                            "and .ort, card, registry), or a release folder again")
    p.add_argument("run", type=Path,
                   help="run directory (python -m train malaria ... --keep final), or a release folder "
                        "(releases/NAME): its committed model.keras released again under --version, with the same "
                        "calibration cells, sample and measured figures")
    p.add_argument("--name", required=True, help="released name, e.g. malaria (edge_runtime.load(NAME))")
    p.add_argument("--version", required=True, help="release version, e.g. 1.1.0 (written into every file)")
    p.add_argument("--sample", type=Path,
                   help="class-folder tree of unseen patients to score on (e.g. tests/data/malaria_sample); needed "
                        "for a run, not for a release folder (its calibration.csv holds it)")
    p.add_argument("--cv", type=Path, help="folder of `python -m train cv` of the same preset (its cv.json)")
    p.add_argument("--field-cv", type=Path, help="folder of `python -m train field-cv ... --final` whose final run "
                                                  "this is: its leave-one-block-out figures describe the model")
    p.add_argument("--copy-calib", type=Path, metavar="DIR",
                   help="copy the calibration cells found under DIR (e.g. runs/field-crops) beside the card, so "
                        "the committed release does not point into a git-ignored folder")
    p.add_argument("--dest", type=Path, help="repository folder for model.keras and the card (default releases/NAME)")
    p.add_argument("--calib-n", type=int, default=300, help="calibration cells drawn from the run's training cells")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draw")
    p.add_argument("--threshold", type=float,
                   help="confidence below which the device answers 'uncertain — refer' (default: the task's, or "
                        "the release folder's); the card tabulates the choices on the cross-validation's "
                        "out-of-fold cells")
    p.add_argument("--note", action="append", default=[], metavar="TEXT",
                   help="a limitation the card lists besides the generated ones (repeatable)")
    p.add_argument("--replace-notes", action="store_true",
                   help="a release folder released again: its --note texts replace the previous version's notes "
                        "instead of adding to them (for a limitation the new version no longer has)")
    p.add_argument("--change", action="append", default=[], metavar="TEXT",
                   help="what changed since the previous version, listed on the card (repeatable)")
    p.add_argument("--false-calls", nargs="+", type=Path, default=[], metavar="JSON",
                   help="`benchmarks smear` reports (smear.json) or `train field-cv` fold results (result.json) of "
                        "models of this recipe on blocks they never saw: their false parasitized calls per red cell "
                        "become the release's false-call rate, which the slide decision weighs calls against "
                        "(default: none for a run; a release folder keeps its previous one)")
    p.add_argument("--min-agreement", type=float,
                   help="lowest top-1 agreement of the int8 files with Keras on the sample (default: convert's, or "
                        "the release folder's); recorded in release.json, so the command that remakes them uses "
                        "it too")
    return p


def run_cli(args, argv: Sequence[str]) -> int:
    """CLI body of `python -m convert release` (`argv`: its arguments, recorded in the model card; the texts of
    `--change`, which the card lists under its Changes, as "...")."""
    shown = [a if i == 0 or argv[i - 1] != "--change" else "..." for i, a in enumerate(argv)]
    entry = release(args.run, args.name, args.version, args.sample, cv_dir=args.cv, dest=args.dest,
                    calib_n=args.calib_n, seed=args.seed, threshold=args.threshold, field_cv=args.field_cv,
                    copy_calib=args.copy_calib, min_agreement=args.min_agreement, notes=args.note,
                    replace_notes=args.replace_notes,
                    changes=args.change, false_calls=args.false_calls,
                    command=["python", "-m", "convert", "release", *shown])
    s, cv = entry.metrics["sample"], entry.metrics.get("cv")
    print(f"\nreleased {entry.name} {entry.version}:")
    for f in entry.all_files:
        print(f"  {registry.RELEASED_DIR / f.file} ({f.runtime}, {f.bytes / 1024:.0f} KB, sha256 {f.sha256[:12]})")
    print(f"sample ({s['cells']} cells, {s['patients']} patients): int8 accuracy {_pct(s['accuracy'])}, "
          f"drop {entry.metrics['int8_drop_points']:+.2f} points"
          + (f"; CV accuracy {_pct(cv['accuracy_mean'])} +- {100 * cv['accuracy_std']:.2f}" if cv else ""))
    for fmt, m in entry.metrics.get("sample_by_format", {}).items():
        print(f"{fmt}: accuracy {_pct(m['accuracy'])}, top-1 agreement with {FORMAT} "
              f"{_pct(m['top1_agreement_with_tflite_int8'])}")
    return 0
