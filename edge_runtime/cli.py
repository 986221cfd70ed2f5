"""`python -m edge_runtime`: classify images on the device, or describe an artifact.

    python -m edge_runtime predict MODEL INPUT... [--json|--csv] [--gradcam DIR] [--threads N] [--backend NAME]
    python -m edge_runtime predict export/malaria-edge_tflite-int8.tflite slides/C100P61/ --csv > C100P61.csv
    python -m edge_runtime predict export/oct_tflite-int8.tflite scan1.jpeg scan2.jpeg --gradcam maps/
    python -m edge_runtime info export/malaria-edge_tflite-int8.tflite [--json]
    python -m edge_runtime smear MODEL FIELD... [--out DIR] [--json] [--min-cells N] [--rbc-per-ul X]
                                 [--wbc-count N] [--normalise [MODE]] [--um-per-px X] [--false-call-rate R]
    python -m edge_runtime review DIR [--list] [--set FIELD:CELL=parasite|not_parasite|not_cell ...] [--stage ring]
                                  [--rest-not-parasites] [--wbc N] [--reviewed] --reviewer NAME    # a smear --out DIR
    python -m edge_runtime serve [--models NAME|PATH ...] [--host 127.0.0.1] [--port 8080] [--data DIR]
                                 [--access-code CODE] [--web-runtime DIR|off] [--min-cells N] [--false-call-rate R]
                                 [--https [--http-port PORT|off]]
    python -m edge_runtime models [--json] [--card NAME]
    python -m edge_runtime selftest MODEL [--json]     # the artifact's golden set on this device's runtime
    python -m edge_runtime predict malaria cells/          # a released model, by name
    python -m edge_runtime webruntime fetch [--dir DIR]    # LiteRT.js for the field app's on-phone inference

MODEL is an artifact file or the name of a model released with the package
(`models` lists them with version, sha256 and measured figures).

INPUT is an image file or a folder (its images, recursively, in name order).
A malaria model treats each folder as the cell crops of one slide and
prints a slide summary (cells, parasitized, parasitemia %, uncertain); an OCT
model gives each scan a referral level (urgent, routine, observation).
Answers below the confidence threshold are "uncertain — refer".
`smear` takes whole microscope field photos of one slide (files or folders),
finds and classifies every red cell and prints one slide report
(edge_runtime.smear) whose decision is "parasites seen", "cells to review"
(calls no more than the model makes on a slide without parasites), "no
parasites seen in N red cells" or "not enough evidence: photograph about K
more fields" (docs/slide-decision.md). Its exit codes: 0 a decision on
readable fields, 1 a decision, but some fields were refused (no cells, or the
quality gate: "can't read this field: retake (reason)"), 2 bad arguments or
unusable model, 3 not enough evidence (too few red cells, or no field
readable): photograph more fields, 4 cells to review: a person must check the
flagged cells (`review`); 3 and 4 are never read as negative.
`review` records a person's calls on the flagged cells of a `smear --out DIR`
folder (append-only, DIR/reviews.sqlite) and prints the slide result
recomputed from them beside the machine's (edge_runtime.smear.review); exit 0,
or 2 for bad input (the message names what is wrong).
`serve` runs the field app (edge_runtime.serve): a page and an HTTP API for
the phones around the device; it needs the `serve` extra (Starlette, uvicorn).

Exit codes: 0 every input classified, 1 some inputs rejected (each has an
error record; the rest were classified), 2 bad arguments or unusable model.
`selftest`: 0 the artifact gives the answers it gave right after conversion
(within its tolerance, same top class), 1 a byte changed since it was made (its
content hash; files made before medge recorded one are "not sealed") or drift
(the worst difference and its input are printed), 2 unusable file (missing,
truncated, unreadable metadata, no golden set).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_runtime import registry, webruntime
from edge_runtime.backends import BACKENDS, BackendError
from edge_runtime.clinical import is_malaria, is_oct, oct_summary, slide_summary
from edge_runtime.extras import message as extras_message
from edge_runtime.golden import GoldenMissing, read_golden, selftest
from edge_runtime.gradcam import GradCam
from edge_runtime.images import DEFAULT_MAX_PIXELS, ImageError, is_image_file
from edge_runtime.model import ModelChanged, ModelError, load
from edge_runtime.smear import NORMALISATIONS, analyse_slide, write_report
from edge_runtime.smear.decision import COUNTING_RULES, DEFAULT_RULE, FalseCalls, decision_lines
from edge_runtime.smear.report import field_entry
from edge_runtime.smear.review import STAGES, ReviewState
from edge_runtime.standard_metadata import format_lines
from edge_runtime.standard_metadata import read as read_standard_metadata

EXIT_OK, EXIT_REJECTED, EXIT_USAGE = 0, 1, 2
EXIT_MORE_FIELDS = 3  # smear: not enough evidence for a decision; photograph more fields
FALSE_CALL_RATE_HELP = (
    "the model's false parasitized calls per 1,000 red cells on slides without parasites, as measured at this "
    "site: a slide is 'parasites seen' only with more calls than that explains, else 'cells to review' (default: "
    "the rate the registry records for a released model; none for another file, and then any call is 'parasites "
    "seen')")
EXIT_REVIEW = 4  # smear: cells called parasitized, but no more than the model's false calls; a person checks them


def _threads(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"--threads must be >= 1, got {n}")
    return n


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return n


def _positive_float(text: str) -> float:
    v = float(text)
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return v


def _nonnegative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text}") from None
    if not (math.isfinite(v) and 0 <= v < 1000):
        raise argparse.ArgumentTypeError(f"expected a rate per 1,000 red cells, from 0 to below 1000; got {text}")
    return v


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1] (also used by `python -m convert`)."""
    v = float(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text}")
    return v


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's help ends with its default, unless the help already says it in words.

    argparse's ArgumentDefaultsHelpFormatter would print "(default: None)" for
    options whose default is decided later (the model's threshold, the
    runtime's threads): those say it in their help text, and
    test_every_option_s_help_gives_its_default keeps every option saying one.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.nargs == 0
                or action.default in (None, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)".lstrip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edge_runtime", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Exit codes: 0 all classified, 1 some inputs rejected, 2 usage or model error.")
    sub = p.add_subparsers(dest="command", required=True)

    def runtime_args(sp: argparse.ArgumentParser) -> None:
        g = sp.add_argument_group("runtime")
        g.add_argument("--backend", choices=list(BACKENDS),
                       help="force a runtime (default: by file suffix, LiteRT first)")
        g.add_argument("--threads", type=_threads, help="runtime threads (default: the runtime's choice)")

    pr = sub.add_parser("predict", help="classify images or folders of images")
    pr.add_argument("model", type=Path,
                    help=".tflite, .onnx or .ort artifact made by `python -m convert`, or a released name (`models`)")
    pr.add_argument("inputs", nargs="+", type=Path, help="image files and/or folders of images")
    out = pr.add_argument_group("output")
    fmt = out.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_const", const="json", dest="format", help="one JSON document")
    fmt.add_argument("--csv", action="store_const", const="csv", dest="format",
                     help="one CSV row per input (summaries go to stderr)")
    out.add_argument("--gradcam", type=Path, metavar="DIR",
                     help="OCT models: write a Grad-CAM overlay PNG per scan into DIR (default: none written)")
    out.add_argument("--head-weights", type=Path, metavar="NPZ",
                     help="Grad-CAM head weights (default: {model}_gradcam.npz next to the artifact)")
    out.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                     help="progress on stderr (auto: when stderr is a terminal)")
    d = pr.add_argument_group("decision")
    d.add_argument("--threshold", type=fraction,
                   help="confidence below which the answer is 'uncertain — refer' (default: from the model)")
    d.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="reject larger images (decompression-bomb guard)")
    runtime_args(pr)
    pr.set_defaults(format="table")

    ps = sub.add_parser("smear", help="field photos of one slide -> cells, verdicts, slide report")
    ps.add_argument("model", type=Path, help="malaria .tflite, .onnx or .ort artifact, or a released name")
    ps.add_argument("inputs", nargs="+", type=Path, metavar="field", help="field photos and/or folders of them")
    so = ps.add_argument_group("output")
    so.add_argument("--out", type=Path, metavar="DIR",
                    help="write overlays, cells.csv/json, summary.json and a contact sheet into DIR "
                         "(default: print only)")
    so.add_argument("--json", action="store_const", const="json", dest="format",
                    help="one JSON document: per field its cells, and the slide summary")
    sr = ps.add_argument_group("slide report")
    sr.add_argument("--counting-rule", choices=sorted(COUNTING_RULES), default=DEFAULT_RULE,
                    help="thin-film counting rule: red cells to count before a negative call; "
                         + "; ".join(f"{k}: {n:,} cells ({ref})" for k, (n, ref) in COUNTING_RULES.items()))
    sr.add_argument("--min-cells", type=_positive_int, metavar="N",
                    help="red cells needed before 'no parasites seen'; with fewer the report says 'not enough "
                         "evidence: photograph about K more fields' (default: the counting rule's)")
    sr.add_argument("--rbc-per-ul", type=_positive_float, metavar="X",
                    help="the patient's red cells per microlitre: parasites/uL = parasitemia x X "
                         "(default: none, no such count)")
    sr.add_argument("--wbc-count", type=_positive_int, metavar="N",
                    help="white cells counted over these fields: parasites/uL = parasitized / N x --wbc-per-ul "
                         "(default: none, no such count)")
    sr.add_argument("--wbc-per-ul", type=_positive_float, metavar="X",
                    help="the patient's measured white cells per microlitre, for --wbc-count "
                         "(default: none measured; WHO's assumed 8,000/uL is used and the report says so)")
    sr.add_argument("--false-call-rate", type=_nonnegative_float, metavar="R", help=FALSE_CALL_RATE_HELP)
    ps.add_argument("--threshold", type=fraction,
                    help="confidence below which a cell is uncertain "
                         "(default: the model's threshold, from its metadata)")
    ps.add_argument("--normalise", nargs="?", const="chroma", choices=NORMALISATIONS, metavar="MODE",
                    help="classify crops cut from the field normalised: chroma (mean cell hue half-way to the NIH "
                         "training crops') or background (blank glass to a fixed reference: exposure and white "
                         "balance; for a model trained on crops cut that way) (default: off; MODE chroma when "
                         "the flag is given alone)")
    ps.add_argument("--um-per-px", type=_positive_float, metavar="X",
                    help="the photos' micrometres per pixel, from a stage micrometer or the objective and camera "
                         "(about 0.1 for a 1280x960 photo through a 100x objective): red cells are then taken as "
                         "3.75 um in radius (default: none; each field's typical cell size is estimated from the "
                         "photo, which a crowded or pale field can get wrong)")
    runtime_args(ps)
    ps.set_defaults(format="table", max_pixels=DEFAULT_MAX_PIXELS)

    pe = sub.add_parser("review", help="a person's calls on a smear report folder's flagged cells, appended to "
                                       "DIR/reviews.sqlite; prints the reviewed slide result")
    pe.add_argument("folder", type=Path, metavar="DIR", help="a folder `smear MODEL FIELD... --out DIR` wrote")
    pe.add_argument("--list", action="store_true",
                    help="list the cells to review (parasitized first, most confident first) with their calls")
    pe.add_argument("--set", action="append", default=[], metavar="FIELD:CELL=CALL",
                    help="call one cell: FIELD is the field's file stem (as on the contact sheet) or its number "
                         "from 1, CELL its number on the overlay, CALL parasite, not_parasite or not_cell; "
                         "repeatable (default: no call)")
    pe.add_argument("--stage", choices=STAGES,
                    help="the stage of the cells called parasite in this run (default: none recorded)")
    pe.add_argument("--rest-not-parasites", action="store_true",
                    help="call every uncertain cell that has no call yet not_parasite (one row per cell)")
    pe.add_argument("--wbc", type=_positive_int, metavar="N",
                    help="white cells counted over the same fields: parasites/uL per white cell x WHO's 8,000/uL "
                         "(default: none; the density is then per red cell at an assumed 5,000,000/uL)")
    pe.add_argument("--reviewed", action="store_true",
                    help="mark the slide reviewed (refused while a cell to review has no call)")
    pe.add_argument("--reviewer", metavar="NAME",
                    help="who makes these calls; needed to record anything (default: none, read only)")
    pe.add_argument("--json", action="store_const", const="json", dest="format", default="table",
                    help="one JSON document: the review block and the rows written")

    pv = sub.add_parser("serve", help="the field app: a screening page and HTTP API for phones on the local network")
    pv.add_argument("--models", nargs="+", metavar="[TAB=]NAME|PATH",
                    help="models to serve, each a released name or an artifact path: an OCT model for the OCT tab, "
                         "malaria models for the Malaria tab (field photos) and the Cells tab (single-cell crops), "
                         "placed by what a released model was made for or by a prefix (malaria=..., cells=...); "
                         "one malaria model serves both (default: the released models: malaria-field for field "
                         "photos and malaria for cells, see `models`)")
    pv.add_argument("--min-cells", type=_positive_int, metavar="N",
                    help="red cells a malaria case needs before 'no parasites seen'; with fewer the page says 'not "
                         "enough evidence: photograph about K more fields' (default: the counting rule's, 2,000)")
    pv.add_argument("--false-call-rate", type=_nonnegative_float, metavar="R", help=FALSE_CALL_RATE_HELP)
    pv.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default loopback; 0.0.0.0 for phones, which requires an access code)")
    pv.add_argument("--port", type=int, help="TCP port to listen on (default 8080; 8443 with --https)")
    pv.add_argument("--data", type=Path, metavar="DIR",
                    help="where cases are kept (default: $XDG_DATA_HOME/medge/field-app)")
    pv.add_argument("--access-code", metavar="CODE",
                    help="code every API call needs (default: none on loopback, generated and printed otherwise)")
    pv.add_argument("--web-runtime", metavar="DIR|off",
                    help="where `webruntime fetch` put LiteRT.js, which lets phones run the malaria model themselves "
                         "(default: $MEDGE_WEB_RUNTIME, else ~/.cache/medge/web-runtime; off: always on this device)")
    sec = pv.add_argument_group("https (a secure context: the page works offline and opens the phone camera)")
    sec.add_argument("--https", action="store_true",
                     help="serve HTTPS on --port with a certificate made on this device at first start (kept in "
                          "DATA/tls, signed by the device's own CA, which phones trust once: GET /ca.crt)")
    sec.add_argument("--http-port", metavar="PORT|off", default="8080",
                     help="with --https, the same app in plain HTTP on this port too, for phones that do not trust "
                          "the CA yet and to download /ca.crt (default 8080; off: HTTPS only)")
    sec.add_argument("--tls-name", action="append", default=[], metavar="NAME|IP",
                     help="another DNS name or address the certificate must hold (repeatable; the host name, "
                          "NAME.local, localhost, loopback and this device's addresses are always in it)")
    lim = pv.add_argument_group("limits")
    lim.add_argument("--max-upload-mb", type=_positive_float, default=64.0, help="one case's upload (default 64)")
    lim.add_argument("--max-file-mb", type=_positive_float, default=20.0, help="one photo (default 20)")
    lim.add_argument("--max-files", type=_positive_int, default=12, help="photos per case (default 12)")
    lim.add_argument("--max-megapixels", type=_positive_float, default=40.0, help="one photo (default 40)")
    pv.add_argument("--workers", type=_positive_int,
                    help="analyses at once (default: one per CPU core; each model still runs one inference at a time)")
    pv.add_argument("--threads", type=_threads, help="runtime threads per model (default: the runtime's choice)")
    pv.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                    help="the web server's log level")

    pi = sub.add_parser("info", help="print an artifact's metadata and tensors")
    pi.add_argument("model", type=Path)
    pi.add_argument("--json", action="store_const", const="json", dest="format", default="table")
    runtime_args(pi)

    pt = sub.add_parser("selftest", help="run the artifact's golden inputs here and compare with its stored answers")
    pt.add_argument("model", type=Path, help=".tflite, .onnx or .ort artifact, or a released name")
    pt.add_argument("--json", action="store_const", const="json", dest="format", default="table")
    runtime_args(pt)

    pw = sub.add_parser("webruntime", help="fetch (pinned, verified) or check LiteRT.js, which the field app serves "
                                           "so phones run the malaria model themselves")
    webruntime.add_arguments(pw)

    pm = sub.add_parser("models", help="list the models released with the package")
    pm.add_argument("--json", action="store_const", const="json", dest="format", default="table")
    pm.add_argument("--card", metavar="NAME",
                    help="print the model card of this released model (default: none, list the models)")
    for sp in sub.choices.values():
        sp.formatter_class = _HelpFormatter
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


# ---------------------------------------------------------------- inputs


def expand_inputs(paths: Sequence[Path]) -> tuple[list[tuple[str, list[Path]]], list[Path]]:
    """([(group name, files)], skipped): a folder is one group (a slide) of its images; loose files form one group.

    A path given explicitly is always tried, whatever its suffix (so a wrong
    file gets an error record); inside folders only image suffixes count.
    """
    groups: list[tuple[str, list[Path]]] = []
    loose: list[Path] = []
    skipped: list[Path] = []
    for p in paths:
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file())
            images = [f for f in files if is_image_file(f)]
            skipped += [f for f in files if not is_image_file(f) and not f.name.startswith(".")]
            groups.append((str(p), images))
        else:
            loose.append(p)
    if loose:
        groups.insert(0, ("(files)", loose))
    return groups, skipped


class Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done, self.t0 = total, enabled, 0, time.perf_counter()

    def step(self) -> None:
        self.done += 1
        if self.enabled and (self.done % 25 == 0 or self.done == self.total):
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            print(f"\r{self.done}/{self.total} images ({rate:.0f}/s)", end="" if self.done < self.total else "\n",
                  file=sys.stderr, flush=True)


# ---------------------------------------------------------------- output


def _csv(model, preds) -> str:
    buf = io.StringIO()
    fields = ["source", "decision", "label", "confidence", "uncertain", "referral", "error",
              *[f"p_{l}" for l in model.labels], "preprocess_ms", "inference_ms"]
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for p in preds:
        row = {"source": p.source, "decision": p.decision, "label": p.label,
               "confidence": "" if p.confidence is None else f"{p.confidence:.6f}", "uncertain": int(p.uncertain),
               "referral": p.referral or "", "error": p.error or "",
               "preprocess_ms": p.timing.get("preprocess_ms", ""), "inference_ms": p.timing.get("inference_ms", "")}
        for l in model.labels:
            row[f"p_{l}"] = "" if p.probabilities is None else f"{p.probabilities[l]:.6f}"
        w.writerow(row)
    return buf.getvalue()


def _table(model, preds) -> str:
    lines = []
    width = min(max([len(p.source) for p in preds] + [6]), 70)
    for p in preds:
        src = p.source if len(p.source) <= width else "..." + p.source[-(width - 3):]
        if p.error:
            lines.append(f"{src:<{width}}  REJECTED  {p.error}")
        else:
            extra = f"  referral: {p.referral}" if p.referral else ""
            lines.append(f"{src:<{width}}  {p.decision:<18}  {p.label} {p.confidence:.3f}{extra}")
    return "\n".join(lines)


def _parasitemia(s: dict[str, Any], digits: int) -> str:
    """"parasitemia 3.5% of the cells counted (16.0% if every uncertain cell were parasitized)".

    Over every counted cell, the uncertain ones as not parasitized (the thin film's denominator, as the smear
    decision and the field app give it), never over the confident cells alone.
    """
    lo, hi = s.get("parasitemia_min_percent"), s.get("parasitemia_max_percent")
    if lo is None:
        return "parasitemia n/a"
    return (f"parasitemia {lo:.{digits}f}% of the cells counted ({hi:.{digits}f}% if every uncertain cell were "
            "parasitized)")


def _summary_lines(summaries: list[dict[str, Any]]) -> list[str]:
    out = []
    for s in summaries:
        if "parasitemia_percent" in s:
            out.append(f"slide {s['slide']}: {s['cells']} cells, {s['parasitized']} parasitized, "
                       f"{s['uncertain']} uncertain, {s['rejected']} rejected; {_parasitemia(s, 1)}")
        else:
            out.append(f"{s['group']}: {s['scans']} scans: {s['urgent']} urgent, {s['routine']} routine, "
                       f"{s['observation']} observation, {s['specialist review']} specialist review (uncertain), "
                       f"{s['rejected']} rejected")
    return out


# ---------------------------------------------------------------- commands


def _load(args):
    return load(args.model, backend=args.backend, threads=args.threads,
                threshold=getattr(args, "threshold", None), max_pixels=getattr(args, "max_pixels", DEFAULT_MAX_PIXELS))


def _standard_metadata(path: Path) -> dict[str, Any] | None:
    """The standard TFLite Model Metadata beside medge's entry (what MediaPipe Tasks reads), if the file has it."""
    if path.suffix.lower() != ".tflite":
        return None
    try:
        return read_standard_metadata(path.read_bytes())
    except ImportError:  # the standard entry is parsed with the `flatbuffers` package, which a bare Pi may lack
        return None


def cmd_info(args) -> int:
    model = _load(args)
    d = model.describe()
    standard = _standard_metadata(model.path)
    if args.format == "json":
        print(json.dumps({**d, "tflite_metadata": standard} if standard else d, indent=2))
    else:
        for k, v in d.items():
            print(f"{k:>16}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
        if standard is not None:
            print("\nstandard TFLite metadata (TFLITE_METADATA; MediaPipe Tasks reads it):")
            print(format_lines(standard))
    return EXIT_OK


def cmd_predict(args) -> int:
    t_start = time.perf_counter()
    model = _load(args)
    groups, skipped = expand_inputs(args.inputs)
    total = sum(len(files) for _, files in groups)
    for name, files in groups:
        if not files and name != "(files)":
            print(f"warning: no images in folder {name}", file=sys.stderr)
    if skipped:
        print(f"note: skipped {len(skipped)} non-image file(s) in folders, e.g. {skipped[0]}", file=sys.stderr)
    if total == 0:
        print("error: no images to classify", file=sys.stderr)
        return EXIT_USAGE
    cam = None
    if args.gradcam is not None:
        cam = GradCam(model, args.head_weights)  # refuses models it cannot explain, before any work
    progress = Progress(total, args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty()))
    preds, summaries, first_ms = [], [], None
    for name, files in groups:
        group_preds = []
        for p in model.iter_predict(files):
            group_preds.append(p)
            if first_ms is None:
                first_ms = (time.perf_counter() - t_start) * 1e3
            progress.step()
        preds += group_preds
        if is_malaria(model.metadata):
            summaries.append({"slide": name,
                              **slide_summary(group_preds, model.metadata.positive_label or "Parasitized")})
        elif is_oct(model.metadata):
            summaries.append({"group": name, **oct_summary(group_preds)})
    if cam is not None:
        written = cam.write_overlays([p for p in preds if p.ok], args.gradcam)
        print(f"Grad-CAM: {len(written)} overlay(s) in {args.gradcam}", file=sys.stderr)
    rejected = sum(not p.ok for p in preds)
    timed = [p.timing["inference_ms"] for p in preds if p.ok]
    stats = {
        "inputs": len(preds), "classified": len(preds) - rejected, "rejected": rejected,
        "uncertain": sum(p.uncertain for p in preds if p.ok),
        "load_ms": round(model.load_ms, 2), "warmup_ms": round(model.warmup_ms, 2),
        "first_result_ms": round(first_ms, 2) if first_ms is not None else None,
        "inference_ms_mean": round(sum(timed) / len(timed), 3) if timed else None,
        "total_s": round(time.perf_counter() - t_start, 3),
    }
    if args.format == "json":
        doc = {"model": {k: v for k, v in model.describe().items() if k in (
                   "file", "model", "task", "format", "precision", "backend", "runtime_version", "labels",
                   "threshold")},
               "results": [p.to_dict() for p in preds], "summaries": summaries, "stats": stats}
        print(json.dumps(doc, indent=2, ensure_ascii=False))
    elif args.format == "csv":
        sys.stdout.write(_csv(model, preds))
        for line in _summary_lines(summaries):
            print(line, file=sys.stderr)
    else:
        print(_table(model, preds))
        for line in _summary_lines(summaries):
            print(line)
        # Every input rejected: no inference ran, so there is no time per image to give (not "None ms").
        speed = f"{stats['inference_ms_mean']} ms per image" if timed else "no image reached the model"
        print(f"{stats['classified']}/{stats['inputs']} classified ({stats['uncertain']} uncertain, {rejected} "
              f"rejected) with {model.path.name} on {model.backend}; {speed}")
    return EXIT_REJECTED if rejected else EXIT_OK


def _smear_table(report, positive: str) -> str:
    lines = []
    for f in report.fields:
        if f.error:
            lines.append(f"{f.field}: REJECTED  {f.error}")
            continue
        rbc = [c for c in f.cells if c.kind == "rbc"]
        par = [c.index for c in rbc if c.verdict(positive) == "parasitized"]
        unc = sum(c.uncertain and c.counted for c in rbc)
        pieces = sum(c.uncertain and not c.counted for c in rbc)
        lines.append(f"{f.field}: {len(rbc) - pieces} red cells, {len(par)} parasitized {par if par else ''}, "
                     f"{unc} uncertain" + (f" (+{pieces} uncertain fragments, not counted)" if pieces else "")
                     + f"; {len(f.cells) - len(rbc)} other regions; "
                     f"{f.segment_ms:.0f} ms segmentation, {f.classify_ms:.0f} ms classification")
    s = report.summary.to_dict()
    # One parasitemia is reported (the decision's, over every counted cell, with its interval, below); this line
    # gives the same share and what the uncertain cells could make of it, never a share of the confident cells.
    lo, hi = s.get("parasitemia_min_percent"), s.get("parasitemia_max_percent")
    share = "" if lo is None else (f"; parasitized {lo:.2f}% of the cells counted (the reported parasitemia, "
                                   f"below), {hi:.2f}% if every uncertain cell were parasitized")
    lines.append(f"slide: {s['fields']} field(s), {s['cells']} red cells counted, {s['parasitized']} parasitized, "
                 f"{s['uncertain']} uncertain{share}")
    if s.get("cell_size"):
        lines.append(s["cell_size"]["says"])
    for f in report.fields:
        if f.error is None and not f.readable:
            lines.append(f"{f.field}: NOT COUNTED  {f.unreadable_reason}")
    lines += decision_lines(s["decision"])
    m = s.get("model")
    if m:
        lines.append(f"model: {m['name']} {m['version']} sha256 {m['sha256']}")
    if s.get("normalise"):
        lines.append(f"crops cut from {s['normalise']}-normalised fields (--normalise {s['normalise']})")
    refer = s["refer"]
    lines.append("REFER: " + "; ".join(s["refer_reasons"]) if refer
                 else "refer: undecided (not enough evidence)" if refer is None else "refer: no")
    return "\n".join(lines)


def cmd_smear(args) -> int:
    # OpenCV is the `smear` extra, not `edge`'s: one sentence before any model is loaded, not a traceback.
    lacking = extras_message("smear", "python -m edge_runtime smear")
    if lacking:
        print(lacking, file=sys.stderr)
        return EXIT_USAGE

    fields = [f for _, files in expand_inputs(args.inputs)[0] for f in files]
    if not fields:
        print("error: no field photos given", file=sys.stderr)
        return EXIT_USAGE
    model = _load(args)
    report = analyse_slide(model, fields, min_cells=args.min_cells, rbc_per_ul=args.rbc_per_ul,
                           wbc_count=args.wbc_count, wbc_per_ul=args.wbc_per_ul, normalise=args.normalise,
                           rule=args.counting_rule, um_per_px=args.um_per_px,
                           false_calls=None if args.false_call_rate is None else
                           FalseCalls.given(args.false_call_rate, "--false-call-rate"))
    written = write_report(report, args.out) if args.out is not None else []
    if args.format == "json":
        doc = {"model": {k: v for k, v in model.describe().items() if k in ("file", "model", "format", "backend",
                                                                             "labels", "threshold")},
               "fields": [field_entry(f) for f in report.fields], "summary": report.summary.to_dict(),
               "written": written}
        print(json.dumps(doc, indent=2, ensure_ascii=False))
    else:
        print(_smear_table(report, model.metadata.positive_label or "Parasitized"))
        if written:
            print(f"wrote {len(written)} file(s) into {args.out}")
    for f in report.fields:
        if not f.readable:
            print(f"warning: {f.field}: {f.error or f.unreadable_reason}", file=sys.stderr)
    if report.summary.decision["decision"] == "not enough evidence":
        return EXIT_MORE_FIELDS
    if report.summary.decision["decision"] == "cells to review":
        return EXIT_REVIEW
    return EXIT_REJECTED if any(not f.readable for f in report.fields) else EXIT_OK


def _review_lines(folder, block: dict[str, Any], listing: bool) -> list[str]:
    stems = [Path(f).stem for f in folder.fields]
    cells = block["cells"]
    lines = [f"report: {folder.path} ({len(folder.fields)} field(s))",
             f"cells to review: {len(cells)} ({sum(c['verdict'] == 'parasitized' for c in cells)} parasitized, "
             f"{sum(c['verdict'] == 'uncertain' for c in cells)} uncertain), {block['called']} called"]
    if listing:
        width = max([len(f"{stems[c['field']]}:{c['cell']}") for c in cells], default=0)
        for c in cells:
            call = (f"{c['call']}{' (' + c['stage'] + ')' if c['stage'] else ''} by {c['reviewer']} at {c['at']}"
                    if c["call"] else "no call yet")
            conf = "" if c["confidence"] is None else f" {c['confidence']:.2f}"
            machine = (f"uncertain ({c['model_label']}{conf})" if c["verdict"] == "uncertain"
                       else f"{c['verdict']}{conf}")
            lines.append(f"  {stems[c['field']] + ':' + str(c['cell']):<{width}} {machine:<28} -> {call}")
    lines.append("machine:  " + decision_lines(block["machine"])[0])
    lines += ["reviewed: " + decision_lines(block["result"])[0] if block["rows"] else "reviewed: no call yet",
              *decision_lines(block["result"])[1:]]
    if block["wbc_count"]:
        w = block["wbc_count"]
        lines.append(f"white cells counted: {w['value']} (by {w['reviewer']} at {w['at']})")
    if block["result"].get("density") is None:
        lines.append("parasites/uL: not given while the evidence is short (photograph more fields)")
    lines.append(f"status: {block['status']}")
    return lines


def cmd_review(args) -> int:
    from edge_runtime.reviewlog import ReviewLog, ReviewLogError
    from edge_runtime.smear.review import plan_rows, read_report_folder, reviewed_result, to_review

    folder = read_report_folder(args.folder)
    offered = to_review(folder.flagged)
    body: dict[str, Any] = {"reviewer": args.reviewer, "calls": []}
    for item in args.set:
        target, sep, call = item.rpartition("=")
        if not sep:
            raise ValueError(f"--set {item!r} is not FIELD:CELL=CALL (e.g. --set PA171700:12=not_parasite)")
        field, cell = folder.key(target)
        call = call.strip().replace("-", "_")
        body["calls"].append({"field": field, "cell": cell, "after": call,
                              "stage": args.stage if call == "parasite" else None})
    if args.stage and not any(c["after"] == "parasite" for c in body["calls"]):
        raise ValueError(f"--stage {args.stage} goes with a --set FIELD:CELL=parasite in the same run")
    body.update(rest="not_parasite" if args.rest_not_parasites else None, wbc_count=args.wbc,
                reviewed=True if args.reviewed else None)
    writes = bool(body["calls"] or args.rest_not_parasites or args.wbc is not None or args.reviewed)
    if writes and not args.reviewer:
        raise ValueError("--reviewer NAME is needed to record a call, a count or the reviewed mark (who reviewed)")
    try:
        log = ReviewLog(folder.path / "reviews.sqlite")
        written = []
        if writes:
            written = log.append("report", plan_rows(folder.summary, offered, log.rows("report"), body,
                                                     f"report {folder.path}"))
        block = reviewed_result(folder.summary, offered, ReviewState.from_rows(log.rows("report")))
    except ReviewLogError as e:
        raise ValueError(str(e)) from None
    if args.format == "json":
        print(json.dumps({"folder": str(folder.path), "written": [r.to_dict() for r in written], "review": block},
                         indent=2, ensure_ascii=False))
        return EXIT_OK
    for line in _review_lines(folder, block, args.list):
        print(line)
    if written:
        print(f"recorded {len(written)} row(s) in {folder.path / 'reviews.sqlite'}")
    return EXIT_OK


def cmd_serve(args) -> int:
    # Imported here: the plain device install (no `serve` extra) never imports the web framework.
    from edge_runtime.serve.server import run

    return run(args)


def _figure(metrics: dict, key: str) -> str:
    v = metrics.get(key)
    return f"{100 * v:.2f}%" if isinstance(v, (int, float)) else "-"


def cmd_webruntime(args) -> int:
    return webruntime.run(args)


def cmd_models(args) -> int:
    releases = registry.read_registry()
    if args.card:
        text = registry.card_text(registry.get(args.card))
        if not text:
            raise ValueError(f"released model {args.card!r} has no model card in this install")
        print(text, end="")
        return EXIT_OK
    if args.format == "json":
        print(json.dumps([dict(r.to_dict(), path=str(r.path), intact=_intact(r)) for r in releases], indent=2))
        return EXIT_OK
    if not releases:
        print("no models are released with this install")
        return EXIT_OK
    head = ("name", "version", "for", "format", "runtime", "KB", "sample acc", "CV acc", "sha256", "file")
    rows = []
    for r in releases:
        sample, cv = r.metrics.get("sample", {}), r.metrics.get("cv", {})
        for i, f in enumerate(r.all_files):  # one line per file; the release's figures on its first (.tflite)
            rows.append((r.name if i == 0 else "", r.version if i == 0 else "", r.inputs if i == 0 else "",
                         f.format, f.runtime, f"{f.bytes / 1024:.0f}",
                         _figure(sample, "accuracy") if i == 0 else "", _figure(cv, "accuracy_mean") if i == 0 else "",
                         f.sha256[:12] + ("" if _file_intact(f) else " ALTERED"), str(f.path)))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for row in (head, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())
    print("\nmodel cards: python -m edge_runtime models --card NAME; "
          "by runtime: edge_runtime.load(NAME, runtime=\"onnxruntime\") or predict NAME --backend onnxruntime")
    return EXIT_OK


def _file_intact(f) -> bool:
    return f.path.is_file() and registry.sha256_file(f.path) == f.sha256


def _intact(release) -> bool:
    return all(_file_intact(f) for f in release.all_files)


def cmd_selftest(args) -> int:
    """Exit 0 same answers, 1 drift or a changed byte (content hash), 2 unusable file (raised to `main`)."""
    # A recorded content hash is the first line (`load` checks it before a runtime opens the file): one changed
    # byte anywhere is refused, where golden answers see only what moves them past their tolerance (issue 27).
    # Files made before it carry none ("not sealed"): their golden answers are the only line.
    try:
        model = _load(args)
    except ModelChanged as e:
        if args.format == "json":
            print(json.dumps({"file": str(args.model), "ok": False, "content_hash": "changed", "reason": str(e)},
                             indent=2))
        else:
            print(f"selftest FAILED: {e}")
        return EXIT_REJECTED
    sealed = (f"content hash {model.content_hash[:12]}... verified" if model.content_hash
              else "not sealed (no content hash recorded: made before medge wrote one), golden answers only")
    try:
        golden = read_golden(model)
    except GoldenMissing as e:
        raise ModelError(str(e)) from None
    except ImportError as e:  # tflite-runtime alone has no flatbuffer schema to read entries with
        raise ModelError(f"{model.path}: cannot read its golden set on this install ({e})") from None
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise ModelError(f"{model.path}: its golden set is unreadable ({e})") from None
    result = selftest(model, golden)
    doc = {"file": str(model.path), "format": model.metadata.format, "backend": model.backend,
           "runtime_version": model.session.runtime_version(), "made_on": dict(golden.made_on),
           "content_hash": model.content_hash or "not sealed", **result}
    if args.format == "json":
        print(json.dumps(doc, indent=2))
    else:
        where = f"{model.backend} {doc['runtime_version']}"
        if result["ok"]:
            print(f"selftest passed: {model.path.name} gives its {result['inputs']} golden answers on {where} "
                  f"(max |dprob| {result['max_abs_diff']:.3g}, tolerance {result['atol']:g}); {sealed}")
        else:
            worst = result["worst_input"]
            print(f"selftest FAILED: {model.path.name} on {where}: {result['reason']} ({sealed})")
            if worst is not None:
                print(f"worst: golden input {worst} ({result['worst_source'] or 'unnamed'}): "
                      f"|dprob| {result['per_input_max_abs_diff'][worst]:.4g}: stored "
                      f"{[round(v, 4) for v in result['worst_expected']]}, "
                      f"now {[round(v, 4) for v in result['worst_got']]}")
            print(f"golden answers were computed on {golden.made_on.get('runtime', '?')} "
                  f"{golden.made_on.get('runtime_version', '')} ({golden.made_on.get('machine', '?')}); "
                  "the file was altered, or this runtime computes differently: do not use it for decisions")
    return EXIT_OK if result["ok"] else EXIT_REJECTED


COMMANDS = {"info": cmd_info, "selftest": cmd_selftest, "predict": cmd_predict, "smear": cmd_smear,
            "review": cmd_review, "models": cmd_models, "serve": cmd_serve, "webruntime": cmd_webruntime}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse: --help exits 0, bad usage 2
        return int(e.code or 0)
    try:
        return COMMANDS[args.command](args)
    except (ModelError, BackendError, ImageError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
