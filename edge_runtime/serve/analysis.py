"""What the field app does with an upload, with the same functions as the CLI: no web framework here.

    slots = load_models(["malaria_tflite-int8.tflite", "oct_tflite-int8.tflite"])
    images = [check_upload(name, data, limits) for name, data in uploads]   # UploadError: 413 / 415
    with store.stage() as st:
        case = analyse_malaria(slots["malaria"], images, st)                  # a Case; analyse_slide, as `smear`
        store.commit(st, case)

Malaria cases run `edge_runtime.smear.analyse_slide` (what `python -m edge_runtime
smear` runs) and draw the overlays and the contact sheet from the `SlideReport` it
returns, in memory (nothing is written to be read back); OCT cases run `EdgeModel.predict` and `GradCam.write_overlays`
(what `python -m edge_runtime predict --gradcam` runs). The app only adds the
parts a phone needs: per-cell crops from the photo, a one-line headline, and
the record that goes into the case store.

One interpreter is never run by two threads at once: each `ModelSlot` holds a
lock, and a malaria model is handed to `analyse_slide` wrapped in
`SerialModel`, whose `predict` takes the lock, so two slides can be segmented
(OpenCV, most of a field's time) in parallel while their cells are classified
one slide at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, UnidentifiedImageError

import edge_runtime
from edge_runtime import registry
from edge_runtime.clinical import is_malaria, is_oct
from edge_runtime.fileio import sha256_file, write_json
from edge_runtime.gradcam import GradCam, GradCamError
from edge_runtime.images import ImageError, load_image
from edge_runtime.serve import verdict
from edge_runtime.serve.case import Case
from edge_runtime.smear import VERDICT_COLOURS, analyse_slide, contact_sheet, render_overlay
from edge_runtime.smear.report import png_bytes

KINDS = ("malaria", "oct")
# Shown per case at most; a slide the model reads badly can flag hundreds of cells, and a phone must stay usable.
MAX_CROPS = 60
CROP_SIDE = 160  # pixels of a crop image; the page shows it 1:1 or larger, enough to see a ring stage
# Pillow formats accepted, and the file suffix they are stored under.
FORMAT_SUFFIX = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif", "GIF": "gif", "MPO": "jpg"}


@dataclasses.dataclass(frozen=True)
class Limits:
    """Upload limits; a request over one gets 413, a file that is not an image 415.

    Attributes:
        max_request_bytes: one whole upload (all files of a case and the form).
        max_file_bytes: one file.
        max_files: files per case (OCT cases take exactly one).
        max_pixels: width x height of one image (a 12 MP phone photo is 12,000,000).
    """

    max_request_bytes: int = 64 * 2**20
    max_file_bytes: int = 20 * 2**20
    max_files: int = 12
    max_pixels: int = 40_000_000

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class UploadError(ValueError):
    """An upload the app refuses; `status` is the HTTP status, the message is for a person."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def display_name(name: str | None, k: int) -> str:
    """The client's file name for display only (never a path here): last component, printable, <= 80 chars."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if c.isprintable()).strip()[:80]
    return base or f"photo {k + 1}"


@dataclasses.dataclass
class CheckedImage:
    """An upload Pillow decoded fully: its bytes, what to call it, and what it is."""

    name: str
    data: bytes
    format: str
    size: tuple[int, int]

    @property
    def suffix(self) -> str:
        return FORMAT_SUFFIX[self.format]

    @functools.cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def check_upload(name: str, data: bytes, limits: Limits) -> CheckedImage:
    """Accept only what Pillow decodes completely, within the limits, whatever the file name says.

    Raises:
        UploadError: 413 too many bytes or pixels; 415 not an image, an unsupported format, truncated data.
    """
    if len(data) > limits.max_file_bytes:
        raise UploadError(413, f"“{name}” is {len(data) / 2**20:.1f} MB; the limit is "
                               f"{limits.max_file_bytes / 2**20:.0f} MB per photo.")
    if not data:
        raise UploadError(415, f"“{name}” is empty (0 bytes).")
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format or ""
        w, h = img.size
    except Image.DecompressionBombError:
        raise UploadError(413, f"“{name}” has far too many pixels for this device.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise UploadError(415, f"“{name}” is not a photo this device can read (send a JPEG or PNG).") from None
    if fmt not in FORMAT_SUFFIX:
        raise UploadError(415, f"“{name}” is in {fmt or 'an unknown'} format; send a JPEG or PNG "
                               f"(accepted: {', '.join(sorted(set(FORMAT_SUFFIX) - {'MPO'}))}).")
    if w * h > limits.max_pixels:
        raise UploadError(413, f"“{name}” is {w}x{h} = {w * h / 1e6:.0f} megapixels; the limit is "
                               f"{limits.max_pixels / 1e6:.0f} megapixels.")
    try:
        img.load()  # decode every pixel: a truncated or corrupt file fails here, not in the analysis
    except Image.DecompressionBombError:
        raise UploadError(413, f"“{name}” has far too many pixels for this device.") from None
    except (OSError, SyntaxError, ValueError):
        raise UploadError(415, f"“{name}” is damaged or cut short: the photo cannot be read to the end.") from None
    return CheckedImage(name=name, data=data, format=fmt, size=(w, h))


# ---------------------------------------------------------------- models


class SerialModel:
    """An `EdgeModel` whose `predict` holds its slot's lock: one inference at a time on one interpreter."""

    def __init__(self, model, lock: threading.Lock):
        self._model, self._lock = model, lock

    def predict(self, *args, **kwargs):
        with self._lock:
            return self._model.predict(*args, **kwargs)

    def __getattr__(self, name):  # metadata, max_pixels, labels...: read-only attributes of the model
        return getattr(self._model, name)


def classify_cells(slot: ModelSlot, images: Sequence[CheckedImage]) -> list[dict[str, Any]]:
    """Single-cell crops -> one answer each, as `python -m edge_runtime predict` gives it (the page's fallback when
    the phone cannot run the model itself)."""
    pil = [Image.open(io.BytesIO(im.data)) for im in images]
    with slot.lock:
        preds = slot.model.predict(pil)
    return [{**p.to_dict(), "source": im.name} for p, im in zip(preds, images)]


def release_entry(path: Path, sha256: str) -> registry.Release | None:
    """The registry entry (`models.json` beside it) of a packaged model with this file name and sha256; None for
    any other file."""
    try:
        releases = registry.read_registry(Path(path).parent)
    except registry.ReleaseError:
        return None
    return next((r for r in releases if r.file == Path(path).name and r.sha256 == sha256), None)


def release_version(path: Path, sha256: str) -> str | None:
    """The release version of a packaged model (`release_entry`); None for any other file."""
    r = release_entry(path, sha256)
    return None if r is None else r.version


class ModelSlot:
    """One loaded model of one kind, its lock and what a case records about it."""

    def __init__(self, model, source: str, kind: str, gradcam=None, gradcam_error: str | None = None):
        self.model, self.source, self.kind = model, source, kind
        self.lock = threading.Lock()
        self.gradcam, self.gradcam_error = gradcam, gradcam_error
        meta = model.metadata
        sha = getattr(model, "sha256", None) or sha256_file(model.path)
        self.release = release_entry(model.path, sha)
        # A released model has a version of its own (its registry entry); an exported file has the toolchain's.
        version = (self.release.version if self.release else None) or getattr(model, "version", None) \
            or meta.medge_version or "unknown"
        self.info = {"name": meta.model, "kind": kind, "version": str(version), "format": meta.format,
                     "precision": meta.precision, "created": meta.created, "sha256": sha,
                     "file": model.path.name, "backend": model.backend, "labels": list(model.labels),
                     "threshold": model.threshold, "gradcam": gradcam is not None,
                     "inputs": self.release.inputs if self.release else None}


# The page's tabs that run a model: "malaria" (photos of whole smear fields, stored as cases), "cells" (photos of
# single red cells, classified and not stored) and "oct" (one scan, stored as a case).
SLOTS = ("malaria", "cells", "oct")


def _slot_and_spec(spec: str) -> tuple[str | None, str]:
    """ "cells=malaria" -> ("cells", "malaria"); a value without a slot prefix -> (None, value)."""
    head, sep, rest = spec.partition("=")
    return (head, rest) if sep and head in SLOTS and rest else (None, spec)


def load_models(specs: Sequence[str], threads: int | None = None, log=print) -> dict[str, ModelSlot]:
    """slot -> ModelSlot (`SLOTS`) for each `--models` value (a name or a path, passed to `edge_runtime.load`).

    An OCT model serves the OCT tab. A malaria model serves the Malaria tab (field photos) or the Cells tab
    (single-cell crops): by a prefix when given (`cells=malaria`, `malaria=export/m.tflite`), else by what a released
    model was made for (its registry entry's `inputs`: "fields" or "cells"), else the Malaria tab. One malaria
    model alone serves both tabs; a note says when the one serving a tab was made for the other's photos.

    Raises:
        ValueError: a model that is neither malaria nor OCT, a prefix that does not fit the model, or two models
            for one tab.
        ModelError / BackendError: from `edge_runtime.load`.
    """
    slots: dict[str, ModelSlot] = {}
    for value in specs:
        want, spec = _slot_and_spec(value)
        model = edge_runtime.load(spec, threads=threads)
        meta = model.metadata
        kind = "malaria" if is_malaria(meta) else "oct" if is_oct(meta) else None
        if kind is None:
            raise ValueError(f"{spec}: a {meta.task!r} model with labels {list(meta.labels)}; the field app serves "
                             "malaria (Parasitized/Uninfected) and OCT (CNV/DME/DRUSEN/NORMAL) models")
        cam, cam_error = None, None
        if kind == "oct":
            try:
                cam = GradCam(model)
            except (GradCamError, FileNotFoundError, ValueError) as e:
                cam_error = str(e)
                log(f"note: {spec}: no Grad-CAM overlays ({cam_error})")
        slot = ModelSlot(model, spec, kind, cam, cam_error)
        if (want == "oct") != (kind == "oct") and want is not None:
            raise ValueError(f"{value}: a {kind} model cannot serve the {want} tab")
        tab = "oct" if kind == "oct" else want or ("cells" if slot.info["inputs"] == "cells" else "malaria")
        if tab in slots:
            raise ValueError(f"{value}: a second model for the {tab} tab (already serving {slots[tab].source}); give "
                             f"one per tab, prefixed when two are malaria models: --models malaria=FIELDS cells=CELLS")
        slots[tab] = slot
    # One malaria model serves both malaria tabs.
    if "malaria" in slots and "cells" not in slots:
        slots["cells"] = slots["malaria"]
    elif "cells" in slots and "malaria" not in slots:
        slots["malaria"] = slots["cells"]
    for tab, made_for, other in (("cells", "fields", "whole smear fields"), ("malaria", "cells", "single-cell crops")):
        s = slots.get(tab)
        if s is not None and s.info["inputs"] == made_for:
            log(f"note: the {tab} tab runs {s.info['name']} {s.info['version']}, made for {other}; name a model for "
                f"{'single cells' if tab == 'cells' else 'field photos'} too (--models {tab}=NAME|PATH ...)")
    return {tab: slots[tab] for tab in SLOTS if tab in slots}


# ---------------------------------------------------------------- malaria


def _write(st, name: str, data: bytes) -> str:
    st.path(name).write_bytes(data)
    return name


def _jpeg(img: Image.Image) -> bytes:
    """What the phone downloads: JPEG quality 90 (a 1280x960 overlay: 0.15 MB in 4 ms, against 1.3 MB as a PNG)."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _cell_crop(photo: Image.Image, bbox: Sequence[int], colour: tuple[int, int, int]) -> Image.Image:
    """The cell with a margin of half its size, from the photo itself (colours as the camera saw them), scaled up,
    its box drawn in the verdict's colour so the cell meant is plain among its neighbours."""
    x, y, w, h = bbox
    m = max(w, h) // 2
    box = (max(0, x - m), max(0, y - m), min(photo.width, x + w + m), min(photo.height, y + h + m))
    tile = photo.crop(box)
    f = CROP_SIDE / max(tile.size)
    tile = tile.resize((max(1, round(tile.width * f)), max(1, round(tile.height * f))), Image.Resampling.LANCZOS)
    x0, y0 = (x - box[0]) * f, (y - box[1]) * f
    ImageDraw.Draw(tile).rectangle((x0 - 2, y0 - 2, x0 + w * f + 2, y0 + h * f + 2), outline=colour, width=2)
    return tile


def malaria_headline(summary: dict[str, Any], unread: int = 0) -> str:
    """One sentence a health worker reads first (`verdict.headline`): never "no parasites" on too little evidence
    (the slide decision, `edge_runtime.smear.decision`, says how many more fields to photograph instead)."""
    return verdict.headline(summary, unread)


def malaria_state(summary: dict[str, Any], unread: int | None = None) -> str:
    """The headline's colour: "refer" (red), "ok" (green, only a negative on enough red cells with every field
    read) or "amber" (not enough evidence, or fields that could not be read: retake before anyone relies on it)."""
    if unread is None:
        unread = len(summary.get("fields_unreadable") or [])
    return verdict.verdict(summary, unread)["state"]


def dedupe(images: Sequence[CheckedImage]) -> tuple[list[CheckedImage], list[dict[str, Any]]]:
    """The uploads with each photo once, by content (sha256 of the bytes, whatever the file is called), and the
    copies left out: [{"name", "same_as", "sha256"}] (`same_as`: the name of the first upload with those bytes)."""
    seen: dict[str, CheckedImage] = {}
    unique, copies = [], []
    for im in images:
        first = seen.setdefault(im.sha256, im)
        if first is im:
            unique.append(im)
        else:
            copies.append({"name": im.name, "same_as": first.name, "sha256": im.sha256})
    return unique, copies


def analyse_malaria(slot: ModelSlot, images: Sequence[CheckedImage], st, subject: str = "", note: str = "",
                    min_cells: int | None = None, retake_of: str | None = None, false_calls=None) -> Case:
    """One slide: `analyse_slide` over the uploaded fields, each photo once (`dedupe`), its pictures drawn from the
    returned report into the staging folder; returns the case.

    Args:
        min_cells: red cells needed before a negative call (None: the counting rule's, 2,000).
        retake_of: the case this one retakes (some of its fields photographed again), recorded in the result.
        false_calls: the site's false-call rate (`smear.decision.FalseCalls`; None: the released model's own).

    Raises:
        UploadError: 422 when no field holds cells (nothing is stored then).
    """
    t0 = time.perf_counter()
    model = slot.model
    images, copies = dedupe(images)
    # Paths, not decoded photos: analyse_slide reads one field at a time, so a 12-photo slide never holds
    # twelve decoded 12 MP images at once on a Pi (the report keeps each field's working-scale photo only).
    paths = [st.path(_write(st, f"field_{k:02d}.{im.suffix}", im.data)) for k, im in enumerate(images)]
    report = analyse_slide(SerialModel(model, slot.lock), paths, min_cells=min_cells, false_calls=false_calls)
    if len(report.rejected) == len(images):
        reasons = "; ".join(f"“{im.name}”: {f.error}" for im, f in zip(images, report.fields))
        lead = "This photo has no cells we can find." if len(images) == 1 else \
            "None of these photos has cells we can find."
        raise UploadError(422, f"{lead} Photograph a thin, stained smear through the microscope, in focus. "
                               f"({reasons})")
    positive = report.positive_label
    fields, flagged = [], []
    for k, (im, f) in enumerate(zip(images, report.fields)):
        entry: dict[str, Any] = {"name": im.name, "photo": paths[k].name, "error": f.error, "overlay": None,
                                 "size": list(im.size), "sha256": im.sha256}
        overlay = render_overlay(f, positive)
        if overlay is not None:
            entry["overlay"] = _write(st, f"overlay_{k:02d}.jpg", _jpeg(overlay))
        rbc = [c for c in f.cells if c.kind == "rbc"]
        counted = [c for c in rbc if c.counted]  # an uncertain fragment is neither a red cell nor uncertain
        entry.update(readable=f.readable, unreadable_reason=f.unreadable_reason, red_cells=len(counted),
                     parasitized=sum(c.verdict(positive) == "parasitized" for c in counted),
                     uncertain=sum(c.uncertain for c in counted), other_regions=len(f.cells) - len(rbc),
                     segment_ms=f.segment_ms, classify_ms=f.classify_ms)
        fields.append(entry)
        flagged += [(k, c) for c in counted if c.verdict(positive) in ("parasitized", "uncertain")]
    # Parasitized first, most confident first: the cells that decide the referral.
    flagged.sort(key=lambda kc: (kc[1].verdict(positive) != "parasitized", -(kc[1].confidence or 0)))
    shown = flagged[:MAX_CROPS]
    crops: list[dict[str, Any]] = [{}] * len(shown)
    for k in sorted({k for k, _ in shown}):  # one decoded photo at a time
        try:
            photo = load_image(paths[k], "rgb", model.max_pixels)  # as analyse_slide read it (EXIF-rotated)
        except ImageError as e:
            raise UploadError(415, f"“{images[k].name}” cannot be read: {e.reason}.") from None
        for n, (kk, c) in enumerate(shown):
            if kk == k:
                tile = _cell_crop(photo, c.bbox, VERDICT_COLOURS[c.verdict(positive)])
                crops[n] = {"image": _write(st, f"crop_{n:03d}.jpg", _jpeg(tile)), "field": k, "cell": c.index,
                            "verdict": c.verdict(positive), "label": c.label, "confidence": c.confidence,
                            "bbox": list(c.bbox),
                            # under half a typical cell: the review leaves it out when uncertain (serve.review)
                            "fragment": c.fragment}
    summary = report.summary.to_dict()
    write_json(st.path("summary.json"), summary)
    sheet = contact_sheet(report)
    if sheet is not None:
        _write(st, "contact_sheet.png", png_bytes(sheet))
    # Every region of every field, for the per-case CSV (field: upload index; field_name: the client's name).
    cells = [{"field": k, "field_name": images[k].name, **{key: c.to_dict()[key] for key in
              ("index", "bbox", "kind", "area", "label", "confidence", "uncertain")}, "verdict": c.verdict(positive)}
             for k, f in enumerate(report.fields) for c in f.cells]
    _write(st, "cells.json", _json_bytes(cells))
    unread = len(summary["fields_unreadable"])
    result: dict[str, Any] = {"summary": summary, "state": malaria_state(summary, unread), "fields": fields,
                              "crops": crops, "crops_total": len(flagged), "positive_label": positive,
                              "cells": "cells.json",
                              "contact_sheet": "contact_sheet.png" if sheet is not None else None,
                              "duplicates": copies}
    if retake_of is not None:
        result["retake_of"] = retake_of
    return Case(kind="malaria", subject=subject, note=note, model=slot.info,
                headline=malaria_headline(summary, unread),
                # None (undecided) while the evidence is short, never False on it.
                refer=None if summary["refer"] is None else bool(summary["refer"]), result=result,
                analysis_ms=round((time.perf_counter() - t0) * 1e3, 1))


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, ensure_ascii=False) + "\n").encode("utf-8")


# ---------------------------------------------------------------- OCT

# OCT2017 B-scans are 384-1536 pixels wide; far smaller is a thumbnail or another picture, not a scan to read.
MIN_OCT_SIDE = 128
REFERRAL_TEXT = {"urgent": "Urgent referral", "routine": "Routine referral", "observation": "Observation",
                 "specialist review": "Uncertain: specialist review"}


def analyse_oct(slot: ModelSlot, image: CheckedImage, st, subject: str = "", note: str = "") -> Case:
    """One scan: `model.predict`, then the Grad-CAM overlay the CLI's `--gradcam` writes; returns the case record.

    Raises:
        UploadError: 415 when the model cannot read the image.
    """
    if min(image.size) < MIN_OCT_SIDE:
        raise UploadError(422, f"“{image.name}” is {image.size[0]}x{image.size[1]} pixels: too small to be an OCT "
                               f"scan (at least {MIN_OCT_SIDE} pixels a side). Send the scan as the device saved it.")
    t0 = time.perf_counter()
    scan = _write(st, f"scan.{image.suffix}", image.data)
    model = slot.model
    gradcam = None
    with slot.lock:  # the prediction and Grad-CAM's feature tap: both interpreters of this model, one at a time
        pred = model.predict([st.path(scan)])[0]
        if not pred.ok:
            raise UploadError(415, f"“{image.name}” cannot be read: {pred.error}.")
        if slot.gradcam is not None:
            written = slot.gradcam.write_overlays([pred], st.dir / "gradcam")
            if written:
                gradcam = _write(st, "gradcam.png", Path(written[0]).read_bytes())
    if (st.dir / "gradcam").is_dir():
        shutil.rmtree(st.dir / "gradcam")
    level = pred.referral or "specialist review"
    headline = (f"{REFERRAL_TEXT.get(level, level)}: {pred.label} ({pred.confidence:.0%})" if not pred.uncertain
                else f"{REFERRAL_TEXT['specialist review']} (best guess {pred.label}, {pred.confidence:.0%})")
    return Case(kind="oct", subject=subject, note=note, model=slot.info, headline=headline,
                refer=level in ("urgent", "routine", "specialist review"),
                result={"name": image.name, "scan": scan, "size": list(image.size), "label": pred.label,
                        "decision": pred.decision, "confidence": pred.confidence, "uncertain": pred.uncertain,
                        "referral": level, "probabilities": pred.probabilities, "gradcam": gradcam,
                        "gradcam_unavailable": None if gradcam else (slot.gradcam_error
                                                                     or "no Grad-CAM for this model"),
                        "timing": pred.timing},
                analysis_ms=round((time.perf_counter() - t0) * 1e3, 1))


def cpu_workers() -> int:
    """Default analyses at once: one per core (segmentation is the heavy part and runs in parallel)."""
    return max(1, os.cpu_count() or 1)
