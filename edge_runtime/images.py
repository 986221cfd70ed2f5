"""Image reading shared by training-side checks and the device.

Everything here uses Pillow and numpy only. Bad files raise `ImageError`, which
names the file and what is wrong, so that a caller looping over thousands of
images can record the error and go on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edge_runtime.spec import PreprocessSpec

PathLike = str | os.PathLike

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# Far above any microscope crop or OCT B-scan, far below a decompression bomb.
DEFAULT_MAX_PIXELS = 64_000_000

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "bicubic": Image.Resampling.BICUBIC,
}


class ImageError(ValueError):
    """An input that is not a usable image; `path` and `reason` say why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def is_image_file(path: PathLike) -> bool:
    """True when the name has an image suffix and is not a hidden/system file."""
    name = os.path.basename(os.fspath(path))
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and float single-channel images to 8-bit by their high byte / range."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.uint32 if img.mode == "I" else np.uint16)
        if img.mode == "I" and arr.max(initial=0) <= 255:
            arr8 = arr.astype(np.uint8)
        else:
            arr8 = (arr >> 8).astype(np.uint8)  # what TF's decode_png(dtype=uint8) keeps
        return Image.fromarray(arr8, mode="L")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        hi = float(arr.max(initial=0.0))
        arr8 = np.clip(arr if hi > 1.0 else arr * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr8, mode="L")
    return img


def convert_mode(img: Image.Image, color_mode: str) -> Image.Image:
    """To "RGB" or "L" the way TensorFlow's decoders do: alpha is dropped, not blended."""
    img = _to_8bit(img)
    target = "RGB" if color_mode == "rgb" else "L"
    if img.mode == target:
        return img
    # Pillow's convert() drops alpha without blending, like tf.io.decode_png(channels=3).
    return img.convert(target)


def load_image(
    source: PathLike | BinaryIO | Image.Image,
    color_mode: str = "rgb",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Read an image fully, apply its EXIF orientation, convert to `color_mode`.

    Args:
        source: a path, a binary file object or an already opened PIL image.
        color_mode: "rgb" or "grayscale".
        max_pixels: refuse images larger than this (decompression-bomb guard).

    Raises:
        ImageError: for missing, empty, truncated, corrupt, non-image or huge files.
    """
    if isinstance(source, Image.Image):
        name = getattr(source, "filename", "") or "<PIL image>"
        img = source
    else:
        name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else getattr(source, "name", "<stream>")
        if isinstance(source, (str, os.PathLike)):
            p = Path(source)
            if not p.exists():
                raise ImageError(name, "file not found")
            if p.is_dir():
                raise ImageError(name, "is a directory, not an image")
            if p.stat().st_size == 0:
                raise ImageError(name, "empty file (0 bytes)")
        try:
            img = Image.open(source)
        except UnidentifiedImageError:
            raise ImageError(name, "not an image Pillow can read (unknown or corrupt format)") from None
        except Image.DecompressionBombError as e:
            raise ImageError(name, f"image too large: {e}") from None
        except OSError as e:
            raise ImageError(name, f"cannot open: {e}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError(name, f"image too large: {w}x{h} = {w * h} pixels > limit {max_pixels}")
    if w == 0 or h == 0:
        raise ImageError(name, f"image has no pixels ({w}x{h})")
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        return convert_mode(img, color_mode)
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(name, f"truncated or corrupt image data: {e}") from None


def preprocess(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """One image (already loaded by `load_image`) -> float32 HxWxC model input."""
    img = convert_mode(img, spec.color_mode)
    h, w = spec.input_size
    if img.size != (w, h):
        img = img.resize((w, h), resample=_RESAMPLE[spec.resize_method])
    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr * np.float32(spec.scale) + np.float32(spec.offset)


def load_and_preprocess(path: PathLike, spec: PreprocessSpec, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """`load_image` then `preprocess`."""
    return preprocess(load_image(path, spec.color_mode, max_pixels), spec)
