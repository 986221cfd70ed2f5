"""Export one model to every requested row of the format table and prove each artifact against Keras.

    python -m convert runs/malaria-edge --out runs/malaria-edge/export --formats all

For each row: export to a hidden temp file in the output folder, embed the
metadata, open the file with `edge_runtime.load` exactly as a device does
(which reads the metadata back and checks it against the tensors), run it on
the proof batch one input per call with the device's defaults (threads: the
runtime's choice), compare with Keras, and only then rename those same bytes
into place (atomic: a killed export leaves no half file). The golden set and
the file's content hash (`edge_runtime.content_hash`) are its last entries. A row that fails is
recorded with its error and the others go on. `conversion.json` holds every
row; the exit code is non-zero when any row failed.

One output folder holds one model (`benchmarks` reads `conversion.json` per
folder). Exporting more formats of the same model (same name and source
sha256) into it later needs no --force and keeps the earlier rows whose files
still exist, marked `carried_over`, so the report lists what the folder holds.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import edge_runtime
from convert import verify
from convert.bundle import write_bundle
from convert.calibration import load_feature_sets, load_sets
from convert.embedding import embed
from convert.formats import FORMATS, Format
from convert.gradcam_export import write_for_export
from convert.job import DEFAULT_MIN_AGREEMENT, DEFAULT_QAT_MAX_DROP, ExportJob, Options, medge_version, tool_versions  # noqa: F401  (DEFAULT_*: the names `convert.cli` and the tests know them by)
from convert.layer_errors import layer_png_name, plot_png
from convert.report import (  # noqa: F401  (format_table, report_json: what `convert.export` offered before)
    FAILED,
    FLAGGED,
    OK,
    ConversionReport,
    ConversionRow,
    Proof,
    format_table,
    read_report,
    report_json,
    report_path,
    write_report,
)
from convert.sources import Source, load_source
from edge_runtime import backends, compat
from edge_runtime import golden as g
from edge_runtime.fileio import atomic_write_bytes, atomic_write_text, publish
from edge_runtime.golden import GoldenSet, compare, selftest
from edge_runtime.metadata import sidecar_path
from edge_runtime.model import EdgeModel


def _prior_report(out: Path) -> ConversionReport | None:
    """The report already in `out`; None when there is none or it cannot be read (then only --force replaces it)."""
    try:
        return read_report(report_path(out))
    except (FileNotFoundError, ValueError):
        return None


def resolve_exporter(fmt: Format):
    module, func = fmt.exporter.split(":")
    return getattr(importlib.import_module(module), func)


# Self-test tolerance by precision: the largest |probability difference| another device (another CPU,
# another build of the same runtime) may show on the golden inputs. Float kernels differ by op order
# (~1e-6); int8 kernels may round an intermediate differently (one output step is 1/256).
GOLDEN_ATOL = {"float32": 1e-4, "float16": 1e-3, "dynamic-int8": 0.02, "int8": 0.03}


def make_golden(device: EdgeModel, job: ExportJob, fmt: Format, proof_probs: np.ndarray) -> GoldenSet:
    """The artifact's golden set: up to `--golden-n` proof inputs, as stored, and what `device` answers on them.

    Picked per predicted class among inputs whose top two probabilities are
    more than twice the tolerance apart (`edge_runtime.golden.pick`), so a
    legitimate difference cannot change their class. A model whose every
    proof answer is a near-tie (a head at chance) still gets a golden set, of
    its least tied inputs: `golden.compare` then holds those to the
    probability tolerance only, since a legitimate difference may flip a tie.
    """
    atol = GOLDEN_ATOL[fmt.precision]
    floor = 2 * atol
    n = job.options.golden_n
    if not 1 <= n <= 32:
        raise ValueError(f"--golden-n {n}: give 1..32 golden inputs")
    candidates = g.pick(proof_probs, 3 * n, floor + 0.01) or g.pick(proof_probs, 3 * n, g.ANY_MARGIN)
    spec = job.source.spec
    # Images are stored as the uint8 pixels the preprocessing scales; a head's feature maps by their own range.
    image = device.metadata.part == "model"
    codes, scales, offsets = g.encode_inputs(job.proof.x[candidates], spec.scale if image else None,
                                             spec.offset if image else None)
    x = g.decode_inputs(codes, scales, offsets)
    out = device.run(x)
    keep = g.pick(out, n, floor) or g.pick(out, n, g.ANY_MARGIN)
    return GoldenSet(codes=codes[keep], scales=tuple(scales[i] for i in keep), offsets=tuple(offsets[i] for i in keep),
                     outputs=out[keep], atol=atol,
                     sources=tuple(Path(job.proof.paths[candidates[i]]).name for i in keep),
                     made_on=g.made_on(device.session))


def runtime_record(job: ExportJob, fmt: Format, path: Path, device: EdgeModel, golden: GoldenSet) -> dict[str, Any]:
    """The artifact's `runtimes` metadata (`edge_runtime.compat`): what it requires of a runtime, and the
    runtimes it ran on here: the proof's, then every other installed runtime for its suffix, each given the
    golden inputs and held to the golden tolerance (a failure is recorded, not raised).
    """
    if fmt.ext == ".tflite":
        requires = compat.tflite_requirements(Path(path).read_bytes())
    else:
        import onnx  # optional: only the ONNX rows need it

        src = job.ort_source if fmt.ext == ".ort" else path  # an .ort keeps its .onnx's opsets
        requires = compat.onnx_requirements(onnx.load(str(src), load_external_data=False))
    proven = [{"runtime": device.backend, "version": device.session.runtime_version(), "ok": True,
               "how": f"{len(job.proof)} proof inputs vs Keras", "machine": platform.machine()}]
    for b in backends.BACKENDS.values():
        if fmt.ext not in b.suffixes or b.name == device.backend or not b.installed():
            continue
        entry: dict[str, Any] = {"runtime": b.name, "machine": platform.machine(),
                                 "how": f"{len(golden)} golden inputs within {golden.atol:g}"}
        try:
            other = edge_runtime.load(path, backend=b.name, warmup=False)
            entry["version"] = other.session.runtime_version()
            check = compare(golden, other.run(golden.inputs))
            entry["ok"] = bool(check["ok"])
            if not check["ok"]:
                entry["error"] = check["reason"]
            del other
        except Exception as e:  # a runtime that cannot run the file is the finding, not a failed export
            entry.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        proven.append(entry)
    return {"requires": requires, "proven_on": proven}


def _temp_path(out: Path, fmt: Format, model: str) -> Path:
    # Keeps the real suffix: onnxruntime recognises .ort files by it.
    fd, tmp = tempfile.mkstemp(prefix=f".{model}_{fmt.name}.tmp-", suffix=fmt.ext, dir=out)
    os.close(fd)
    return Path(tmp)


def _stale_temps(out: Path, model: str) -> list[Path]:
    return [Path(p) for p in glob.glob(str(out / f".{glob.escape(model)}_*.tmp-*"))]


def criterion(fmt: Format, proof: dict[str, Any], options: Options, bounded: bool = False) -> dict[str, Any]:
    """How a row is judged, by what it is, with the measured value and whether it passes.

    - float rows: max |prob - Keras prob| <= the row's `max_abs_diff` (a copy must answer like Keras);
    - QAT rows: a fine-tune, not a copy: accuracy on the proof split at most `--qat-max-drop`
      points below Keras' (agreement is only reported; with no labelled proof inputs, agreement);
    - `--max-drop` rows (`bounded`): chosen by accuracy drop, so held to it;
    - other quantized rows: top-1 agreement with Keras >= `--min-agreement`.

    Returns {"metric", "value", "bound", "passed", "text"}, plus "why" when the usual metric could not apply.
    """
    labelled = proof.get("keras_accuracy") is not None and proof.get("accuracy") is not None
    if fmt.is_float:
        c = {"metric": "max_abs_diff", "value": proof["max_abs_diff"], "bound": fmt.max_abs_diff,
             "passed": proof["max_abs_diff"] <= fmt.max_abs_diff}
        c["text"] = f"|dp| {c['value']:.1e}<={c['bound']:.0e}"
        return c
    drop_bound = options.qat_max_drop if fmt.needs_training_data else (options.max_drop if bounded else None)
    if drop_bound is not None and labelled:
        drop = round(100 * (proof["keras_accuracy"] - proof["accuracy"]), 6)  # rounding: 0.1 + 0.2 != 0.3
        return {"metric": "accuracy_drop_pp", "value": drop, "bound": float(drop_bound), "passed": drop <= drop_bound,
                "text": f"drop {drop:.2f}<={drop_bound:g}pp"}
    c = {"metric": "top1_agreement", "value": proof["top1_agreement"], "bound": options.min_agreement,
         "passed": proof["top1_agreement"] >= options.min_agreement}
    c["text"] = f"agree {c['value']:.4f}>={c['bound']:g}"
    if drop_bound is not None:
        c["why"] = "no labelled proof inputs to measure the accuracy drop"
    return c


def judge(fmt: Format, proof: dict[str, Any], options: Options, bounded: bool = False) -> str | None:
    """None when the artifact passes its `criterion`, else why not."""
    c = criterion(fmt, proof, options, bounded)
    if c["passed"]:
        return None
    if c["metric"] == "max_abs_diff":
        return f"float artifact differs from Keras: max |dprob| {c['value']:.2e} > {c['bound']:.0e}"
    if c["metric"] == "accuracy_drop_pp":
        flag = "--qat-max-drop" if fmt.needs_training_data else "--max-drop"
        return (f"accuracy {proof['accuracy']:.4f} is {c['value']:.2f} points below Keras' "
                f"{proof['keras_accuracy']:.4f} > {flag} {c['bound']:g}")
    return f"top-1 agreement {c['value']:.4f} < --min-agreement {c['bound']}"


def prove(path: Path, fmt: Format) -> EdgeModel:
    """The artifact opened as a device opens it (`edge_runtime.load` with its format's runtime).

    Raises ModelError when a device would refuse it: no readable embedded
    metadata (the temp file has no sidecar), or metadata that does not match
    the tensors.
    """
    model = edge_runtime.load(path, backend=fmt.runtime, warmup=False)
    if model.metadata_source != "embedded":
        raise RuntimeError(f"{path.name}: the device read its metadata from {model.metadata_source}, not the file")
    return model


def export_row(job: ExportJob, fmt: Format, out: Path, keras_probs: np.ndarray) -> ConversionRow:
    """Export, embed, load as a device, prove and place one artifact; returns its row (raises on export errors)."""
    final = out / fmt.filename(job.source.name)
    tmp = _temp_path(out, fmt, job.source.name)
    try:
        quantization = resolve_exporter(fmt)(job, fmt, tmp)
        written = None
        if fmt.ext != ".ort":  # .ort: embedded before conversion by the exporter
            written = job.metadata(fmt, tmp, quantization)
            embed(fmt, tmp, written)
        device = prove(tmp, fmt)
        meta = device.metadata
        if written is not None and meta.to_dict() != written.to_dict():
            raise RuntimeError("metadata read back from the artifact differs from what was written")
        probs = device.run(job.proof.x)
        golden = make_golden(device, job, fmt, probs)
        meta = dataclasses.replace(meta, runtimes=runtime_record(job, fmt, tmp, device, golden))
        del device  # release the runtime before the file is rewritten
        # The last change to the file: its content hash is written with the golden set (`content_hash`).
        embed(fmt, tmp, meta, golden, job.ort_source, seal=True)
        device = prove(tmp, fmt)  # the bytes that are published below (load checks their content hash)
        if device.content_hash is None:
            raise RuntimeError("the artifact carries no content hash after sealing")
        if device.metadata.to_dict() != meta.to_dict():
            raise RuntimeError("metadata read back after embedding the golden set differs from what was written")
        check = selftest(device)  # the published file answers its own golden set on this machine
        if not check["ok"]:
            raise RuntimeError(f"the artifact does not reproduce its own golden outputs right after conversion "
                               f"({check['reason']}): its runtime is not deterministic here")
        del device  # release the runtime before the file is renamed
        proof = verify.compare(keras_probs, probs, job.proof.y)
        bounded = job.max_drop.get(fmt.name, {}).get("chosen_step") is not None
        reason = judge(fmt, proof, job.options, bounded)
        row = ConversionRow(
            format=fmt.name, file=final.name, runtime=fmt.runtime, precision=fmt.precision,
            status=OK if reason is None else FLAGGED, error=reason,
            selftest={"inputs": check["inputs"], "atol": check["atol"], "max_abs_diff": check["max_abs_diff"],
                      "golden_bytes": len(golden.to_json())},
            runtimes=json.loads(json.dumps(meta.runtimes)), size_bytes=tmp.stat().st_size,
            quantization=meta.quantization, io={"input": meta.input.to_dict(), "output": meta.output.to_dict()},
            proof=Proof.from_dict(proof), criterion=criterion(fmt, proof, job.options, bounded))
        if reason is not None and not job.options.allow_drop:
            return dataclasses.replace(row, status=FAILED, file=None)
        publish(tmp, final)
        atomic_write_text(sidecar_path(final), meta.to_json())
        layer_report = job.layer_reports.get(fmt.name)
        return dataclasses.replace(
            row, max_drop=job.max_drop.get(fmt.name),
            layer_errors=(write_layer_report(out, job.source.name, fmt, layer_report)
                          if layer_report is not None else None))
    finally:
        tmp.unlink(missing_ok=True)


def write_layer_report(out: Path, model: str, fmt: Format, report: dict[str, Any]) -> dict[str, Any]:
    """The row's `layer_errors` record, with its PNG written beside the artifact (atomically)."""
    if "layers" not in report:
        return dict(report)
    png = out / layer_png_name(model, fmt.name)
    try:
        atomic_write_bytes(png, plot_png(report, f"{model} {fmt.name}"))
    except ImportError as e:  # matplotlib is optional for conversion; the table is in the report either way
        return {**report, "png": None, "png_error": str(e)}
    return {**report, "png": png.name}


def _same_model(prior: ConversionReport | None, src: Source) -> bool:
    return prior is not None and prior.source.get("sha256") == src.sha256 and prior.source.get("name") == src.name


def _with_earlier_rows(out: Path, src: Source, formats: Sequence[Format],
                       rows: list[ConversionRow]) -> tuple[ConversionRow, ...]:
    """This run's rows plus the earlier report's rows for other formats of the same source, in table order."""
    prior = _prior_report(out)
    carried = []
    if prior is not None and _same_model(prior, src):
        names = {f.name for f in formats}
        for r in prior.rows:
            if r.format not in names and r.file and (out / r.file).is_file():
                carried.append(dataclasses.replace(r, carried_over=r.carried_over or prior.created))
    order = {name: i for i, name in enumerate(FORMATS)}
    return tuple(sorted(carried + rows, key=lambda r: order.get(r.format, len(order))))


def outputs_of(out: Path, model: str, formats: Sequence[Format], bundle: bool = False) -> list[Path]:
    paths = []
    if bundle:
        paths += [out / f"{model}_bundle", out / f"{model}_bundle.zip"]
    for f in formats:
        paths += [out / f.filename(model), sidecar_path(out / f.filename(model))]
        if f.calibrated:
            paths.append(out / layer_png_name(model, f.name))
    return paths + [out / f"{model}_gradcam.npz"]  # OCT runs only


DEFAULT_OPTIONS = Options()  # frozen: one shared default, as the default argument it replaces was


def run_export(
    source: Path,
    out: Path,
    formats: Sequence[Format],
    options: Options = DEFAULT_OPTIONS,
    labels: Sequence[str] | None = None,
    name: str | None = None,
    log=print,
    part: str = "model",
) -> ConversionReport:
    """Export `source` to `formats` in `out`; returns the conversion report (also written to conversion.json).

    Raises:
        FileExistsError: outputs exist and `options.force` is off (nothing is written).
        FileNotFoundError, ValueError: bad source or image set, before any row runs.
    """
    out = Path(out)
    t_start = time.perf_counter()
    model, src = load_source(source, labels=labels, name=name, part=part)
    existing = [p for p in outputs_of(out, src.name, formats, options.bundle) if p.exists()]
    if report_path(out).is_file() and not _same_model(_prior_report(out), src):
        existing.insert(0, report_path(out))  # another model's report: overwriting it needs --force
    if existing and not options.force:
        raise FileExistsError(
            f"{len(existing)} output file(s) already exist in {out}, e.g. {existing[0].name}; "
            "pass --force to overwrite or choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    for p in _stale_temps(out, src.name):  # left by a killed earlier export
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)

    need_calib = any(f.calibrated for f in formats)
    calib_src = options.calib or src.manifest
    if src.part == "head":  # features in: an OCT run's feature store, or a bare model's --calib / random inputs
        calib, proof = load_feature_sets(options.calib or src.store, src.labels,
                                         tuple(int(d) for d in model.inputs[0].shape[1:]), options.calib_n,
                                         options.eval_n, options.seed, need_calib=need_calib or src.store is not None)
        train_items: list[tuple[str, str]] = []
    else:
        calib, proof, train_items = load_sets(calib_src, src.labels, src.spec, options.calib_n, options.eval_n,
                                              options.seed, need_calib=need_calib)
    kind = "" if src.part == "model" else f", takes features {tuple(proof.x.shape[1:])}"
    log(f"source {src.path} ({src.name}, {len(src.labels)} classes{kind}); proof batch {len(proof)} inputs from "
        f"{proof.origin}" + (f"; calibration {len(calib)} inputs from {calib.origin}" if calib else ""))
    keras_probs = model.predict(proof.x, batch_size=64, verbose=0)

    rows = []
    with tempfile.TemporaryDirectory(prefix="medge-convert-") as work:
        job = ExportJob(model, src, options, Path(work), calib, proof, train_items, log=log)
        job.keras_probs = keras_probs
        for fmt in formats:
            t0 = time.perf_counter()
            log(f"[{fmt.name}] exporting ...")
            try:
                row = export_row(job, fmt, out, keras_probs)
            except Exception as e:  # one row's failure must not stop the others
                row = ConversionRow(format=fmt.name, file=None, runtime=fmt.runtime, precision=fmt.precision,
                                    status=FAILED, error=f"{type(e).__name__}: {e}",
                                    max_drop=job.max_drop.get(fmt.name))  # the steps tried before no mix met the bound
            row = dataclasses.replace(row, seconds=round(time.perf_counter() - t0, 2))
            rows.append(row)
            log(f"[{fmt.name}] {row.status}" + (f": {row.error}" if row.error else "") + f" ({row.seconds} s)")

    report = ConversionReport(
        source={"path": str(src.path.resolve()), "name": src.name, "sha256": src.sha256, "task": src.task,
                "part": src.part, "labels": list(src.labels), "preprocess": src.spec.to_dict()},
        options=options.to_dict(),
        calibration=calib.describe() if calib else None,
        proof=proof.describe(),
        thresholds={
            "min_agreement": options.min_agreement,
            "qat_max_drop_pp": options.qat_max_drop,
            "max_drop_pp": options.max_drop,
            "float_max_abs_diff": {f.name: f.max_abs_diff for f in formats if f.is_float},
        },
        rows=_with_earlier_rows(out, src, formats, rows),
        ok=all(r.status != FAILED for r in rows),
        seconds=round(time.perf_counter() - t_start, 1),
        machine={"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count()},
        versions={"python": platform.python_version(), "medge": medge_version(), **tool_versions()},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    if src.part == "model":  # OCT: the head's weights for on-device Grad-CAM (edge_runtime.gradcam)
        npz = write_for_export(model, src, out, log=log)
        report = dataclasses.replace(report, gradcam_weights=npz.name if npz else None)
    if options.bundle:
        try:
            folder, zpath = write_bundle(out, src.name, report)
            report = dataclasses.replace(report, bundle={"folder": folder.name, "zip": zpath.name})
        except (OSError, ValueError) as e:
            report = dataclasses.replace(report, bundle={"error": f"{type(e).__name__}: {e}"}, ok=False)
    write_report(out, report)
    return report
