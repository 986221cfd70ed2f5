"""Whole field photos as another lab, microscope or camera would take them: the image operations the
domain-shift harness (`benchmarks/shift.py`, fixed sizes) and the field crops' shifted variants
(`python -m train field-crops --shifted K`, random sizes) share.

Why whole fields and not the 64x64 crops: a stain, a blur, a magnification or a JPEG changes what the
cell finder finds and where it cuts, and the crop the model sees is cut by `edge_runtime.smear` from the
shifted photo. A shifted variant of a field is segmented, matched to its (scaled) annotation and cut
exactly like the photo itself, so the model learns the crops a blue-grey, soft or small field really
gives, labels included.

`draw_shift(rng)` is the training distribution. Every variant changes the stain (a CIELAB chroma rotation
about the background, as a stain from pink to blue-grey does, or nearly no colour at all); each of white
balance, exposure, blur or defocus, magnification, sensor noise and JPEG is added with some probability.
The sizes bracket what a person would still photograph and the harness's fixed points (its table is in
`benchmarks/shift.py`); the harness then measures slides the model did not train on, under shifts of a
kind it trained on. Nothing here was sized on a held-out block: see docs/results/2026-12-06-field-recipe.md.
"""

from __future__ import annotations

import dataclasses
import io
import math
import random
from typing import Any

import numpy as np


def _cv2():
    import cv2

    return cv2


def lab_chroma(rgb: np.ndarray, angle_deg: float, chroma: float, lightness: float = 1.0) -> np.ndarray:
    """CIELAB chroma (a, b) relative to the background rotated by `angle_deg` and scaled by `chroma`; L scaled
    around the background's by `lightness`.

    Relative to the background (the median of the brightest fifth of the pixels): the stain's colour
    changes and the lamp's does not, as with another stain under the same microscope (a rotation about
    neutral grey, or a hue shift in HSV, turned the IML fields' greenish background pink).
    """
    cv2 = _cv2()
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
    bright = lab[:, :, 0] >= np.percentile(lab[:, :, 0], 80)
    bl, ba, bb = (float(np.median(lab[:, :, k][bright])) for k in range(3))
    a, b = lab[:, :, 1] - ba, lab[:, :, 2] - bb
    t = np.deg2rad(angle_deg)
    c, s = np.cos(t), np.sin(t)
    lab[:, :, 1] = ba + chroma * (c * a - s * b)
    lab[:, :, 2] = bb + chroma * (s * a + c * b)
    lab[:, :, 0] = bl - lightness * (bl - lab[:, :, 0])
    return cv2.cvtColor(np.clip(lab + 0.5, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)


def gains(rgb: np.ndarray, r: float, g: float, b: float) -> np.ndarray:
    """Per-channel gains (a camera's white balance or a lamp's colour)."""
    return np.clip(rgb.astype(np.float32) * np.array([r, g, b], np.float32) + 0.5, 0, 255).astype(np.uint8)


def contrast(rgb: np.ndarray, factor: float, brightness: float) -> np.ndarray:
    """Contrast around mid-grey, then a brightness offset (grey levels)."""
    out = (rgb.astype(np.float32) - 128.0) * factor + 128.0 + brightness
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def gaussian_blur(rgb: np.ndarray, sigma: float) -> np.ndarray:
    return _cv2().GaussianBlur(rgb, (0, 0), sigma)


def defocus(rgb: np.ndarray, radius: int) -> np.ndarray:
    """Out of focus: a uniform disc kernel (the lens's circle of confusion), not a Gaussian."""
    cv2 = _cv2()
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1)).astype(np.float32)
    return cv2.filter2D(rgb, -1, k / k.sum(), borderType=cv2.BORDER_REFLECT)


def jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    """Recompressed as a phone or a messaging app would (4:2:0 chroma, low quality)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def noise(rgb: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """Sensor noise: Gaussian, signal-dependent (shot noise grows as the square root of the level)."""
    rng = np.random.default_rng(seed)
    x = rgb.astype(np.float32)
    std = sigma * np.sqrt(np.maximum(x, 1.0) / 128.0)
    return np.clip(x + rng.standard_normal(x.shape).astype(np.float32) * std + 0.5, 0, 255).astype(np.uint8)


def rescale(rgb: np.ndarray, f: float) -> np.ndarray:
    cv2 = _cv2()
    h, w = rgb.shape[:2]
    interp = cv2.INTER_AREA if f < 1 else cv2.INTER_CUBIC
    return cv2.resize(rgb, (max(1, round(w * f)), max(1, round(h * f))), interpolation=interp)


@dataclasses.dataclass(frozen=True)
class FieldShift:
    """One random shift of a whole field, applied in the order light meets it: stain, lamp and white
    balance, exposure, optics (blur or defocus), magnification, sensor noise, compression. Neutral values
    (0, 1 or None) skip a step. `scale` also multiplies the annotated boxes."""

    hue_deg: float = 0.0
    chroma: float = 1.0
    lightness: float = 1.0
    wb: tuple[float, float, float] | None = None
    contrast: float = 1.0
    brightness: float = 0.0
    blur_sigma: float = 0.0
    defocus_px: int = 0
    scale: float = 1.0
    noise_sigma: float = 0.0
    jpeg_quality: int | None = None

    def apply(self, rgb: np.ndarray, seed: int) -> np.ndarray:
        out = np.ascontiguousarray(rgb)
        if self.hue_deg or self.chroma != 1.0 or self.lightness != 1.0:
            out = lab_chroma(out, self.hue_deg, self.chroma, self.lightness)
        if self.wb is not None:
            out = gains(out, *self.wb)
        if self.contrast != 1.0 or self.brightness:
            out = contrast(out, self.contrast, self.brightness)
        if self.blur_sigma:
            out = gaussian_blur(out, self.blur_sigma)
        if self.defocus_px:
            out = defocus(out, self.defocus_px)
        if self.scale != 1.0:
            out = rescale(out, self.scale)
        if self.noise_sigma:
            out = noise(out, self.noise_sigma, seed)
        if self.jpeg_quality is not None:
            out = jpeg(out, self.jpeg_quality)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items()
                if v != FieldShift.__dataclass_fields__[k].default}

    def describe(self) -> str:
        d = self.to_dict()
        return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items()) or "none"


# The training distribution (the recipe's "shift" part). Probabilities and ranges, with the reason:
GREY_SHARE = 0.15  # nearly colourless stains (old or over-diluted Giemsa, a monochrome camera): chroma x0.05-0.3
HUE_RANGE = (-100.0, 40.0)  # pink -> purple -> blue-grey is negative (the harness's blue-grey: -75); a little warmer
CHROMA_RANGE = (0.3, 1.6)  # log-uniform: washed out to deeply stained
LIGHTNESS_RANGE = (0.75, 1.35)  # cells paler or darker against the same background
WB_SHARE, WB_RANGE = 0.5, (0.7, 1.05)  # per-channel gains, the largest scaled to 1 (a lamp or white balance)
EXPOSURE_SHARE = 0.4
CONTRAST_RANGE, BRIGHTNESS_RANGE = (0.6, 1.25), (-40.0, 25.0)
BLUR_SHARE = 0.45  # half Gaussian (sigma 0.5-2.5 px), half defocus (disc of 2-5 px)
SCALE_SHARE, SCALE_RANGE = 0.5, (0.6, 1.5)  # log-uniform: other objectives, eyepieces and sensors
NOISE_SHARE, NOISE_RANGE = 0.3, (2.0, 10.0)
JPEG_SHARE, JPEG_RANGE = 0.5, (25, 90)


def _log_uniform(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def draw_shift(rng: random.Random) -> FieldShift:
    """A random field shift from the training distribution above."""
    if rng.random() < GREY_SHARE:
        hue, chroma = rng.uniform(-180.0, 180.0), rng.uniform(0.05, 0.3)
    else:
        hue, chroma = rng.uniform(*HUE_RANGE), _log_uniform(rng, *CHROMA_RANGE)
    kw: dict[str, Any] = {"hue_deg": round(hue, 1), "chroma": round(chroma, 3),
                          "lightness": round(rng.uniform(*LIGHTNESS_RANGE), 3)}
    if rng.random() < WB_SHARE:
        g = [rng.uniform(*WB_RANGE) for _ in range(3)]
        kw["wb"] = tuple(round(v / max(g), 3) for v in g)
    if rng.random() < EXPOSURE_SHARE:
        kw["contrast"] = round(rng.uniform(*CONTRAST_RANGE), 3)
        kw["brightness"] = round(rng.uniform(*BRIGHTNESS_RANGE), 1)
    if rng.random() < BLUR_SHARE:
        if rng.random() < 0.5:
            kw["blur_sigma"] = round(rng.uniform(0.5, 2.5), 2)
        else:
            kw["defocus_px"] = rng.randint(2, 5)
    if rng.random() < SCALE_SHARE:
        kw["scale"] = round(_log_uniform(rng, *SCALE_RANGE), 3)
    if rng.random() < NOISE_SHARE:
        kw["noise_sigma"] = round(rng.uniform(*NOISE_RANGE), 2)
    if rng.random() < JPEG_SHARE:
        kw["jpeg_quality"] = rng.randint(*JPEG_RANGE)
    return FieldShift(**kw)
