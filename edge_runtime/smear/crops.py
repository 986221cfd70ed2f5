"""Cutting cell crops the NIH way (what the malaria model was trained on), and the optional stain normalisation.

Crops are cut at the membrane: the threshold sits at the foot of a cell's
edge, so a region also holds a rim of bright background that the NIH crops
do not have; `crop` keeps the pixels at least half-way from the threshold to
the field's typical cell darkness (pale centres filled back in).

Optional normalisations (`smear --normalise MODE`), both off by default:
- `chroma` (`normalise_stain`): the field's mean cell hue (CIELAB a, b) moved
  half-way to the NIH crops'. With the 1.0 model it separated parasitized from
  uninfected vivax cells better but left most of them uncertain (README "Smear
  fields"); with the stain-trained 1.2 recipe it raised false positives from
  0.98% to 1.59% (docs/results/2026-12-07-stain-normalise.md).
- `background` (`normalise_background`): each channel scaled so the field's
  blank glass matches a fixed reference (exposure and white balance, not hue).
  It only helps a model whose training crops were cut the same way
  (`train field-crops --normalise background`).
"""

from __future__ import annotations

import numpy as np

from edge_runtime.smear.cells import Cell, Segmentation, _cv2, _holes


def crop(seg: Segmentation, cell: Cell, image: np.ndarray | None = None) -> np.ndarray:
    """The cell cut the NIH way: its mask applied, black outside, tight box with a small black margin.

    The mask is cut at the cell's membrane (`Segmentation.core`, pale centres kept) rather than at the
    threshold, whose rim of bright background the NIH crops do not have: on the 44 IML fields with the
    released model that took the uninfected cells called parasitized from 23.6% to 16.7% (README "Smear
    fields"). `image` (same shape as `seg.image`, e.g. from `normalise_stain`) is cut instead of the photo.
    """
    x, y, w, h = cell.box
    src = seg.image if image is None else image
    mask = cell.mask
    own = seg.labels[y:y + h, x:x + w] == cell.index
    if own.any() and not own[mask].all():
        # A cell completed over its overlapping neighbours (`_complete_overlapped`) is cut to its own part
        # of the split: the lens two cells share is darker (two layers); with it in the crops, uninfected
        # cells called parasitized were 18.7% against 16.7% without (44 IML fields, released model).
        ys, xs = np.nonzero(own & mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        mask = (own & mask)[y0:y1, x0:x1]
        x, y, w, h = x + x0, y + y0, x1 - x0, y1 - y0
    if seg.core is not None:
        core = (mask & seg.core[y:y + h, x:x + w]).astype(np.uint8)
        core = (core | _holes(core)).astype(bool) & mask  # a pale centre is inside the membrane
        if core.sum() >= 0.5 * mask.sum():  # a pale cell's core may be a fragment: keep the region then
            mask = core
    m = max(2, int(round(0.08 * seg.radius)))
    out = np.zeros((h + 2 * m, w + 2 * m, 3), np.uint8)
    out[m:m + h, m:m + w][mask] = src[y:y + h, x:x + w][mask]
    return out


# Colour statistics of the NIH training crops, CIELAB as OpenCV encodes it for 8-bit RGB
# (L 0..255, a and b offset by 128): mean and standard deviation over every non-black pixel (the
# cells; the background is exactly black) of the 400 crops of tests/data/malaria_sample (200
# Parasitized, 200 Uninfected, 5.23 M pixels). tests/test_smear.py recomputes them from the sample.
NIH_LAB_MEAN = (172.01, 143.77, 129.98)
NIH_LAB_STD = (14.00, 8.29, 10.53)


# How far `normalise_stain` moves a field's mean chroma toward the NIH crops'. Chosen on the
# even-numbered IML fields among 0 / 0.25 / 0.5 / 0.75 / 1 by how well the released model then ranks
# parasitized above uninfected cells (AUC 0.957 / 0.981 / 0.990 / 0.963 / 0.818); odd fields: 0.897
# without, 0.966 with 0.5. A full shift also moves the cell's pale centre and its parasites' purple.
CHROMA_SHIFT = 0.5


# The blank glass `normalise_background` moves every field to: the median background (unlabelled pixels) of the
# 48 fields of blocks PA171790, PA171830, PA171880 and PA171990 (docs/results/2026-12-07-stain-normalise.md).
BACKGROUND_REF = (199.5, 225.5, 205.5)
# Fewer unlabelled pixels than this (a field packed edge to edge): the background is the 95th percentile instead.
_MIN_BACKGROUND_PX = 1000


def normalise_background(seg: Segmentation) -> np.ndarray:
    """Each channel scaled so the field's blank glass (median of its unlabelled pixels) is BACKGROUND_REF.

    The light through empty glass is what a microscope's lamp, camera exposure and white balance give every
    pixel of the photo: dividing it out (a per-channel gain, as a flat-field correction does) leaves the stain.
    Returns an RGB uint8 array like `seg.image`.
    """
    img = np.asarray(seg.image, np.float32)
    blank = np.asarray(seg.labels) == 0
    bg = (np.median(img[blank], axis=0) if blank.sum() >= _MIN_BACKGROUND_PX
          else np.percentile(img.reshape(-1, 3), 95, axis=0))
    gain = np.asarray(BACKGROUND_REF, np.float32) / np.maximum(bg, 1.0)
    return np.clip(img * gain + 0.5, 0, 255).astype(np.uint8)


def normalise_stain(seg: Segmentation) -> np.ndarray:
    """The field's stain moved half-way toward the NIH crops' hue (CIELAB a and b; lightness and contrast kept).

    The field's mean is taken over all its red cells together, not cell by cell: a stain shifts every
    cell of a slide alike, while a parasite's own colour is what the model must still see. Matching
    lightness and spread as well (Reinhard) was measured worse (README "Smear fields").
    Returns an RGB uint8 array like `seg.image` (background pixels are moved too; crops black them).
    """
    cv2 = _cv2()
    index = np.zeros(len(seg.cells) + 1, bool)
    index[[c.index for c in seg.cells if c.kind == "rbc"]] = True
    rbc = index[seg.labels]
    if seg.core is not None:
        rbc &= seg.core  # what the crops keep: the bright rim outside the membrane would pull the mean to grey
    if rbc.sum() < 100:
        return seg.image
    lab = cv2.cvtColor(np.ascontiguousarray(seg.image), cv2.COLOR_RGB2LAB).astype(np.float32)
    shift = CHROMA_SHIFT * (np.asarray(NIH_LAB_MEAN[1:], np.float32) - lab[rbc][:, 1:].mean(axis=0))
    lab[:, :, 1:] += shift
    return cv2.cvtColor(np.clip(lab + 0.5, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)


_NORMALISERS = {"chroma": normalise_stain, "background": normalise_background}
NORMALISATIONS = tuple(_NORMALISERS)  # the modes of `smear --normalise MODE` (and of train and benchmarks)


def normalised(seg: Segmentation, mode: str | None) -> np.ndarray | None:
    """The image crops are cut from under `mode` (None: the photo itself, returned as None)."""
    if mode is None:
        return None
    if mode not in _NORMALISERS:
        raise ValueError(f"unknown normalisation {mode!r}: one of {', '.join(NORMALISATIONS)}")
    return _NORMALISERS[mode](seg)
