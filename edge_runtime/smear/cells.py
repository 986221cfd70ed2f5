"""Finding the cells of a field photo: segmentation, splitting touching cells, typing the regions.

A field photo holds ~100 cells, many touching; `segment` finds them with classical image processing
(OpenCV) and types every region (red cell, white cell, platelet, clump, edge, debris).

Segmentation, and why each step:
1. Background flattening: the lamp and the camera make the field brighter in
   the middle; dividing each channel by its background (a large grey closing,
   computed on a 1/8 image) puts the background at 1.0 everywhere, whatever
   the lamp colour and the stain.
2. Foreground: darkness along the field's own stain direction in optical
   density (`stain_darkness`: OD = -log10(channel / background) is additive in
   stain, the cells' median OD vector is the direction, darkness is
   1 - 10^-(OD . u)). On the pink IML fields that is nearly 1 - green/background,
   as before; on a blue-grey stain it follows red too (green alone: 0% of the
   cells once the stain was rotated, benchmarks/shift.py). No hue is assumed
   anywhere. The threshold is the lower of Otsu's (between the
   two modes) and the background mode plus 6 noise sigmas (robust, from the
   median absolute deviation): pale, parasitized cells are faint and Otsu
   alone cuts them.
3. Clean-up: holes are filled (pale centres, ring stages), a small opening
   removes specks and thin bridges between cells.
4. Cell size from the image itself: an isolated cell is a convex blob, so the
   median equivalent radius of the convex components (area >= 0.92 of their
   hull) is the typical cell radius r (a first guess, the median of the
   components' deepest distance-transform points, only sets a lower bound:
   alone it was pulled down by fragments, and two fields had every cell
   called a clump). Nothing depends on a magnification constant.
5. Splitting touching cells: a marker per cell centre, then every foreground
   pixel goes to its nearest marker within its own blob, which cuts touching
   cells of one size along their neck (and overlapping ones along their
   common chord). A centre is where the score "distance transform + circle-
   centre votes" peaks (maxima at least 0.4 r apart and 0.4 r high): each
   pixel of the mask's outline votes along its inward normal, 0.75 to 1.25 r
   in, so the arcs of two overlapping cells still point at two centres where
   the distance transform of their one blob has a single ridge (a gradient
   Hough transform for circles on the mask; the votes are scaled by what an
   isolated cell of the field gets, so both cues weigh alike at any
   magnification). Distance transform alone: 90.9% cell recall; with the
   votes 94.0%. (OpenCV's watershed on the photo's colour edges followed pale
   centres and stain specks: 87.2%.) Two touching pieces whose union is
   still one convex cell-sized shape are merged.
   Overlapping cells: the split gives each cell only its visible part, so
   the middle cell of a chain of three keeps a strip whose box falls short
   of the cell. A red cell cut from a neighbour is completed to the circle
   through its own outline (the arc facing the background), within the
   foreground: its mask and box are the whole disc, masks of overlapping
   cells overlap, and the count is unchanged (`_complete_overlapped`; cell
   recall 93.9% -> 94.9%, 5112 -> 5168 of 5443, every block of the 44 fields
   up). Its crop is cut to its own part of the split (the shared lens is
   darker).
6. Kinds, by size relative to the typical cell area A = pi r^2 and by stain:
   "debris" below 0.2 A, "platelet" below 0.2 A and stained purple, "wbc" when
   the region holds part of a dark-purple mass of at least 0.25 A (a white
   cell's nucleus is about a red cell's size, a parasite's chromatin a fraction
   of its host; a white cell is often cut into several regions), "edge" when it
   touches the photo's border with less than 0.75 A visible (the annotators box
   nearly whole border cells only; a partial crop cannot be judged), "clump"
   above 2.2 A (several cells not split), else "rbc". Nothing is dropped: every
   region is reported with its kind; only "rbc" is classified and counted.
   "Dark purple" is `chromatin`: far darker than the cells and off their OD
   direction (no hue). A region that is mostly black print (a burned-in label
   or scale bar, `INK_LEVEL`) is "debris".
   Parasites where cells are not split well: a parasite-sized chromatin spot
   inside a clump, white-cell or edge region gives a candidate red cell (a
   disc of the typical radius around it, `_chromatin_candidates`), classified
   and counted like the others.
   Cell size: estimated as above, or RBC_RADIUS_UM / `um_per_px` when the
   user gives the photo's scale (`segment(um_per_px=...)`).
7. Not a smear: a greyscale photo, nothing cell-sized standing out, or a
   foreground that is not of one stain's colour (the OD of a smear's cells all
   points one way, whatever the hue; a landscape's trees, house and sun do
   not: `STAIN_COHERENCE`) is "no cells found". The release asked the cells to
   pass red better than green, which refused blue-grey fields.

Library: OpenCV's headless build (`opencv-python-headless` 5.0, numpy its only
dependency). Measured here on a 1280x960 field (PA171704), same mask and
markers (before the nearest-marker split and the centre votes): distance
transform + marker watershed took 4.6 + 36.7 ms with OpenCV against 62.9 +
166.2 ms with scipy's EDT + scikit-image's watershed (5.5x); installed, OpenCV is 153 MB against 199 MB
for scikit-image + scipy + networkx + imageio/tifffile. Quality with scikit-image was not measured on the 44 fields
(its watershed floods the inverted distance transform, OpenCV's the photo's
gradient, so results would differ). Whole-pipeline figures: README, "Smear fields";
under domain shift (benchmarks/shift.py) and why each step: docs/smear-segmentation.md.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

# Fields larger than this (longest side, pixels) are segmented on a downscaled copy: a
# 1280x960 microscope photo is kept as is, a 12 MP phone photo is halved twice.
MAX_SIDE = 2048
BACKGROUND_SIGMAS = 6.0  # foreground = darker than background by this many noise sigmas (or Otsu, the lower)
DEBRIS_AREA, CLUMP_AREA = 0.2, 2.2  # x typical cell area
WBC_NUCLEUS_AREA = 0.25  # x typical cell area: one dark-purple mass at least this large is a white cell's nucleus
WBC_PART_AREA = 0.03  # x typical cell area of such a nucleus inside a region makes the region (part of) a white cell
# x typical radius. The spacing trades split clumps against over-split cells: 0.4 was chosen on the
# even-numbered fields of the 44 (0.3/0.4/0.5/0.6: cell recall 91.4/90.9/90.1/88.9%, count error
# rising as it falls) and holds on the odd ones (README "Smear fields").
MARKER_SPACING, MARKER_DEPTH = 0.4, 0.4
VOTE_RADII = (0.75, 1.25)  # x typical radius: how far in from the outline a boundary pixel votes for a centre
# Print (labels, scale bars): every channel below this share of the background. The IML fields' darkest
# cell pixels (nuclei, deep-purple and under-exposed variants of benchmarks/shift.py) stay above it; their
# burned-in black scale bar is at 0.004-0.009.
INK_LEVEL = 0.25
INK_SHARE = 0.1  # a region with more of its pixels print (or next to it) than this is not a cell
# Micrometres: a normal red cell is 7-8 um across on a thin film (Bain, "Blood cells", 2015); the radius
# `segment(um_per_px=...)` takes for the typical cell.
RBC_RADIUS_UM = 3.75
# Where a field's typical cell radius came from (`Segmentation.radius_source`), as the report names it.
RADIUS_SOURCES = {
    "user": "the user's scale (micrometres per pixel): a 3.75 um red-cell radius",
    "isolated cells": "estimated from the field's isolated cells",
    "cell centres": "estimated from the centres of touching cells (a crowded field)",
    "blob depths": "estimated from the deepest points of the field's blobs (few isolated cells)",
}
# x typical cell area: a chromatin spot this size (ring to schizont; a white cell's nucleus is larger,
# WBC_NUCLEUS_AREA) inside a clump or a white cell's region gives a candidate red cell to classify.
CANDIDATE_SPOT = (0.004, 0.2)
# Cosine between a pixel's OD and the cells' stain direction under which a very dark pixel is another
# dye (nuclear / chromatin stain): on PA171704 its nuclear-dark pixels have median 0.92, its cells 0.998;
# 0.97 keeps 85% of them where the release's purple rule kept 86%.
CHROMATIN_COSINE = 0.97
# 10th percentile, over the foreground, of the cosine between a pixel's optical density (RGB) and the
# field's stain direction: 0.90-1.00 on IML fields as they are, stain rotated to blue-grey or greyed, JPEG
# 30 or noisy (4 fields x 5 transforms of benchmarks/shift.py); 0.70 on a drawn landscape. No hue is
# assumed (the release's "redder than green" gate refused blue-grey fields: 30 of a second lab's 52).
STAIN_COHERENCE = 0.8
MIN_RADIUS = 4.0  # pixels: below this the "cells" are noise, not cells
SINGLE_SOLIDITY = 0.92  # area / convex hull area at or above which a region is one cell, not touching ones
MERGE_AREA = 1.5  # x typical cell area: two pieces are merged back into one cell only below this
MIN_SINGLE_CELLS = 5  # isolated convex cells needed to trust their size over the distance-transform estimate
EDGE_AREA = 0.75  # x typical cell area: a region cut by the photo's border with less visible is "edge"
# A red cell cut from overlapping neighbours is completed to the circle through its own outline (the arc
# facing the background) when that arc is at least this share of a typical cell's circumference and the
# circle's radius is within these bounds (x typical radius): a shorter arc or another size is not one cell's.
ARC_SHARE, ARC_RADII = 0.35, (0.7, 1.4)
KINDS = ("rbc", "wbc", "platelet", "clump", "edge", "debris")


class SmearError(ValueError):
    """A field that cannot be analysed (no cells found, unusable image); `path` and `reason` say why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def _cv2():
    """OpenCV, imported on first use with the install command when it is missing."""
    try:  # inside: OpenCV is the `smear` extra; `import edge_runtime` and the other commands work without it
        import cv2
    except ImportError:
        raise ImportError("smear analysis needs OpenCV: pip install \"medge[smear]\" "
                          "(or opencv-python-headless)") from None
    return cv2


@dataclasses.dataclass
class Cell:
    """One region found in a field.

    Attributes:
        index: 1-based number within its field (overlays and contact sheets use it).
        bbox: [x, y, w, h] in the original photo's pixels.
        area: pixels of the region (original photo's scale).
        kind: "rbc", "wbc", "platelet", "clump" or "debris".
        mask: bool array over `bbox` at the working scale (see `Segmentation.scale`). A red cell cut from
            overlapping neighbours is completed to its whole disc, so masks may overlap; the split that
            gives each pixel one cell is `Segmentation.labels`.
        box: (x, y, w, h) of `mask` at the working scale.
    """

    index: int
    bbox: list[int]
    area: int
    kind: str
    mask: np.ndarray = dataclasses.field(repr=False)
    box: tuple[int, int, int, int] = dataclasses.field(repr=False)


@dataclasses.dataclass
class Segmentation:
    """The cells of one field and what was measured on the way.

    Attributes:
        cells: every region, in reading order (top to bottom, left to right).
        image: the RGB uint8 array the cells were found in (working scale).
        scale: original pixels per working pixel (1.0 unless the photo was larger than MAX_SIDE).
        radius: the estimated typical cell radius, working pixels.
        threshold: the darkness threshold used.
        labels: int32 label image (0 background, i = cells[i-1]).
        core: bool image of the pixels at least half-way from the threshold to the typical cell's
            darkness: a cell's outline at half its edge (what `crop` keeps).
        radius_source: where `radius` came from (RADIUS_SOURCES): "user" (`um_per_px`), or estimated from
            the field's "isolated cells", its touching "cell centres" (a crowded field) or its "blob depths".
    """

    cells: list[Cell]
    image: np.ndarray = dataclasses.field(repr=False)
    scale: float
    radius: float
    threshold: float
    labels: np.ndarray = dataclasses.field(repr=False)
    core: np.ndarray | None = dataclasses.field(default=None, repr=False)
    radius_source: str = "isolated cells"

    def counts(self) -> dict[str, int]:
        return {k: sum(c.kind == k for c in self.cells) for k in KINDS}


def _array_image(arr: np.ndarray, name: str) -> Image.Image:
    """An RGB PIL image from an HxW, HxWx3 or HxWx4 array (uint8, or 16-bit/float scaled to 8 bits)."""
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)) or arr.size == 0:
        raise SmearError(name, f"not an image array: shape {arr.shape} (expected HxW, HxWx3 or HxWx4)")
    if arr.dtype != np.uint8:
        a = np.nan_to_num(arr.astype(np.float64))
        top = 1.0 if a.max() <= 1.0 and arr.dtype.kind == "f" else (65535.0 if a.max() > 255 else 255.0)
        arr = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    return Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")


def _working_image(img: Image.Image) -> tuple[np.ndarray, float]:
    """RGB uint8 array no larger than MAX_SIDE, and the scale back to the original."""
    img = img.convert("RGB")
    side = max(img.size)
    if side <= MAX_SIDE:
        return np.asarray(img), 1.0
    f = MAX_SIDE / side
    small = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.Resampling.BILINEAR)
    return np.asarray(small), img.width / small.width


def flatten_background(rgb: np.ndarray) -> np.ndarray:
    """Each channel divided by its background (float32, background ~1.0, cells < 1)."""
    cv2 = _cv2()
    h, w = rgb.shape[:2]
    f = 8
    small = cv2.resize(rgb, (max(1, w // f), max(1, h // f)), interpolation=cv2.INTER_AREA)
    # The closing must be wider than a cell so none survives it: a tenth of the short side
    # (a cell is about 1/15 of a 960-pixel field at 100x).
    k = max(3, (min(small.shape[:2]) // 10) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    bg = cv2.morphologyEx(small, cv2.MORPH_CLOSE, kernel)
    bg = cv2.dilate(bg, kernel)  # the closing leaves cell-sized dips inside clumps; a max fills them
    bg = cv2.GaussianBlur(bg, (0, 0), k / 2)
    bg = cv2.resize(bg, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    return rgb.astype(np.float32) / np.maximum(bg, 1.0)


def stain_darkness(norm: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Darkness along the field's own stain colour, and the cells' median optical density per channel.

    Optical density (OD = -log10 of the background-relative intensity) is additive in stain amount, so
    every stained pixel of one field lies near one direction in OD space, whatever that stain's hue:
    green for pink IML cells, red and green for blue-grey ones. The direction is the median OD of the
    pixels Otsu finds darker than the background (on the OD sum), and darkness is 1 - 10^-(OD . u):
    on a pink field that is close to 1 - green, what this module used before, and on a blue-grey one it
    follows red as well (green alone lost the cells when the stain turned: benchmarks/shift.py).
    """
    cv2 = _cv2()
    od = -np.log10(np.clip(norm, 1e-3, 1.0))
    total = od.sum(axis=2)
    t8 = np.clip(total * (255.0 / 1.5), 0, 255).astype(np.uint8)  # OD sums above 1.5 are black anyway
    otsu, _ = cv2.threshold(t8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    fg = t8 > otsu
    if fg.sum() < 100:
        return np.clip(1.0 - norm[:, :, 1], 0.0, 1.0), None
    cells = np.median(od[fg], axis=0)
    u = cells / max(float(np.linalg.norm(cells)), 1e-6)
    proj = od @ u.astype(np.float32)
    return np.clip(1.0 - np.power(10.0, -proj), 0.0, 1.0).astype(np.float32), cells


def _stain_coherence(norm: np.ndarray, fg: np.ndarray, od_cells: np.ndarray) -> float:
    """10th percentile over `fg` of the cosine between each pixel's OD and the cells' median OD.

    On every 8th foreground pixel: a percentile of ~70,000 pixels is as good as of 600,000, and all of
    them cost 0.15 s of a field's 0.6 s budget (1 core).
    """
    idx = np.flatnonzero(fg)[::8]
    if idx.size < 100:
        return 1.0
    v = -np.log10(np.clip(norm.reshape(-1, 3)[idx], 1e-3, 1.0))
    u = od_cells / max(float(np.linalg.norm(od_cells)), 1e-6)
    cos = (v @ u.astype(np.float32)) / np.maximum(np.linalg.norm(v, axis=1), 1e-6)
    return float(np.percentile(cos, 10))


def _threshold(dark: np.ndarray) -> tuple[float, float, float]:
    """(threshold, background mode, noise sigma): the lower of Otsu's and mode + BACKGROUND_SIGMAS sigmas."""
    cv2 = _cv2()
    d8 = np.clip(dark * 255.0, 0, 255).astype(np.uint8)
    otsu, _ = cv2.threshold(d8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    below = dark[d8 < otsu]  # mostly background
    if below.size < 100:
        return otsu / 255.0, 0.0, 1.0 / 255.0
    mode = float(np.median(below))
    sigma = max(1.4826 * float(np.median(np.abs(below - mode))), 1.0 / 255.0)
    return min(otsu / 255.0, mode + BACKGROUND_SIGMAS * sigma), mode, sigma


def _holes(mask: np.ndarray) -> np.ndarray:
    """Background pixels not connected to the border (uint8 0/1)."""
    cv2 = _cv2()
    h, w = mask.shape
    pad = np.zeros((h + 2, w + 2), np.uint8)
    pad[1:-1, 1:-1] = mask
    cv2.floodFill(pad, np.zeros((h + 4, w + 4), np.uint8), (0, 0), 1)
    return (1 - pad)[1:-1, 1:-1]


def _fill_cell_holes(mask: np.ndarray, dark: np.ndarray, typical: float, stained: float) -> np.ndarray:
    """Fill the holes that are a cell's pale centre, not the gaps between touching cells.

    A pale centre (or a ring-stage vacuole) is smaller than half a cell and still
    a little stained; a gap enclosed by a ring of cells is background-bright.
    """
    cv2 = _cv2()
    n, lab, stats, _ = cv2.connectedComponentsWithStats(_holes(mask), connectivity=4)
    if n <= 1:
        return mask
    sums = np.bincount(lab.ravel(), weights=dark.ravel(), minlength=n)
    area = stats[:, cv2.CC_STAT_AREA]
    keep = (area < 0.5 * typical) & (sums / np.maximum(area, 1) > stained)
    keep[0] = False
    return (mask | keep[lab]).astype(np.uint8)


def _estimate_radius(mask: np.ndarray, dist: np.ndarray) -> float:
    """Median over connected components of their largest distance-transform value."""
    cv2 = _cv2()
    n, lab = cv2.connectedComponents(mask, connectivity=8)
    if n <= 1:
        return 0.0
    peaks = np.zeros(n, np.float32)
    np.maximum.at(peaks, lab.ravel(), dist.ravel())
    peaks = peaks[1:]
    peaks = peaks[peaks >= MIN_RADIUS]
    return float(np.median(peaks)) if peaks.size else 0.0


def _centre_votes(mask: np.ndarray, radius: float) -> np.ndarray:
    """Circle-centre votes (float32 image): each boundary pixel votes along its inward normal, VOTE_RADII x radius in.

    A red cell is a disc, so every piece of its outline, even the arc left visible where it overlaps a
    neighbour, points at its centre from about one radius away. Two overlapping cells make one blob
    whose distance transform has a single ridge (one marker), while their two arcs still vote for two
    centres (a gradient Hough transform for circles, restricted to the cell mask's outline).
    """
    cv2 = _cv2()
    h, w = mask.shape
    smooth = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), max(1.0, radius / 10))
    gx = cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=3)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return np.zeros((h, w), np.float32)
    pts = np.concatenate([c[:, 0, :] for c in contours])
    x, y = pts[:, 0], pts[:, 1]
    nx, ny = gx[y, x], gy[y, x]  # the mask rises inward: its gradient is the inward normal
    norm = np.hypot(nx, ny)
    ok = norm > 1e-6
    x, y, nx, ny = x[ok], y[ok], nx[ok] / norm[ok], ny[ok] / norm[ok]
    steps = np.arange(VOTE_RADII[0] * radius, VOTE_RADII[1] * radius, 1.0, dtype=np.float32)[:, None]
    cx = np.rint(x + steps * nx).astype(np.int64).ravel()
    cy = np.rint(y + steps * ny).astype(np.int64).ravel()
    inside = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)
    acc = np.bincount(cy[inside] * w + cx[inside], minlength=h * w).astype(np.float32).reshape(h, w)
    return cv2.GaussianBlur(acc, (0, 0), max(1.0, 0.12 * radius))


def _marker_score(mask: np.ndarray, dist: np.ndarray, radius: float) -> np.ndarray:
    """Distance transform plus centre votes, both in radii: a cell's centre is deep in the mask and voted for.

    The votes are scaled by what an isolated cell of this field gets (the median over the cell-sized
    components of their highest vote), so the two cues weigh alike whatever the magnification.
    """
    cv2 = _cv2()
    votes = _centre_votes(mask, radius)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    typical = math.pi * radius * radius
    area = stats[:, cv2.CC_STAT_AREA]
    top = []
    for i in np.nonzero((area > 0.6 * typical) & (area < 1.4 * typical))[0]:
        if i == 0:
            continue
        x, y, w, h = stats[i, :4]
        top.append(float(votes[y:y + h, x:x + w][lab[y:y + h, x:x + w] == i].max()))
    ref = float(np.median(top)) if top else float(votes.max())
    return dist + (radius / max(ref, 1e-6)) * votes


def _markers(mask: np.ndarray, dist: np.ndarray, radius: float) -> np.ndarray:
    """int32 markers at the maxima of `_marker_score`, >= MARKER_SPACING radius apart and MARKER_DEPTH radius high.

    Maxima of a score blurred over radius/8 need no full resolution: with cells of 16 pixels' radius or
    more they are found on a half-size copy (the wide dilation and the votes were most of the time) and
    placed back by nearest pixel.
    """
    cv2 = _cv2()
    h, w = mask.shape
    if radius >= 16:
        small = (w // 2, h // 2)
        mask = cv2.resize(mask, small, interpolation=cv2.INTER_NEAREST)
        dist = cv2.resize(dist, small, interpolation=cv2.INTER_AREA) / 2
        radius /= 2
    score = _marker_score(mask, dist, radius)
    r = max(1, int(round(MARKER_SPACING * radius)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    smooth = cv2.GaussianBlur(score, (0, 0), max(1.0, radius / 8))
    peaks = (smooth >= cv2.dilate(smooth, kernel) - 1e-3) & (score >= MARKER_DEPTH * radius)
    # Plateau maxima are several pixels: merge those closer than the spacing into one marker.
    peaks = cv2.dilate(peaks.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (r | 1, r | 1)))
    _, markers = cv2.connectedComponents(peaks, connectivity=8)
    if markers.shape != (h, w):
        markers = cv2.resize(markers, (w, h), interpolation=cv2.INTER_NEAREST)
    return markers.astype(np.int32)


def _centre_depth(filled: np.ndarray) -> float:
    """Median distance-transform value at its local maxima (15x15, at least MIN_RADIUS deep): cell centres."""
    cv2 = _cv2()
    dist = cv2.distanceTransform(filled, cv2.DIST_L2, 5)
    peaks = (dist >= cv2.dilate(dist, np.ones((15, 15), np.uint8))) & (dist >= MIN_RADIUS)
    n, _, _, centres = cv2.connectedComponentsWithStats(peaks.astype(np.uint8), connectivity=8)
    if n <= 1:
        return 0.0
    xy = np.rint(centres[1:]).astype(np.int64)
    return float(np.median(dist[xy[:, 1], xy[:, 0]]))


def _convex_radius(mask: np.ndarray, at_least: float) -> tuple[float, int]:
    """Median equivalent radius of the convex (single-cell) components at least `at_least` in radius, and how many."""
    cv2 = _cv2()
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    radii = []
    for c in contours:
        a = cv2.contourArea(c)
        if a >= math.pi * at_least * at_least and a >= SINGLE_SOLIDITY * cv2.contourArea(cv2.convexHull(c)):
            radii.append(math.sqrt(a / math.pi))
    return (float(np.median(radii)) if radii else 0.0), len(radii)


def _nearest_marker(markers: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """int32 labels: each foreground pixel goes to its nearest marker within its own connected component.

    For touching cells of one size the nearest-centre split is the line through the neck, wherever the
    photo shows the membrane or not (a watershed on the photo's edges followed pale centres and stain
    specks instead: measured, README "Smear fields").
    """
    cv2 = _cv2()
    _, near = cv2.distanceTransformWithLabels((markers == 0).astype(np.uint8), cv2.DIST_L2, 5,
                                              labelType=cv2.DIST_LABEL_CCOMP)
    ids = np.zeros(int(near.max()) + 1, np.int64)
    ids[near[markers > 0]] = markers[markers > 0]
    n, comp = cv2.connectedComponents(mask, connectivity=8)
    # A pixel whose nearest marker lies in another component (a small blob without its own marker) keeps
    # its component: the key pairs the two, so regions never span a gap.
    key = comp.astype(np.int64) * (int(markers.max()) + 1) + ids[near]
    key[mask == 0] = 0
    # Dense renumbering through a lookup table (no sort: this runs on every pixel).
    used = np.zeros(int(key.max()) + 1, np.int32)
    used[key.ravel()] = 1
    used[0] = 0
    return np.cumsum(used, dtype=np.int32)[key]


def _label_pixels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ys, xs, bounds): the labelled pixels sorted by label; label i's are [bounds[i-1], bounds[i])."""
    n = int(labels.max())
    ys, xs = np.nonzero(labels > 0)
    vals = labels[ys, xs]
    order = np.argsort(vals.astype(np.uint16) if n < 65536 else vals, kind="stable")  # uint16: radix sort
    ys, xs, vals = ys[order], xs[order], vals[order]
    return ys, xs, np.searchsorted(vals, np.arange(1, n + 2))


def _label_boxes(ys: np.ndarray, xs: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """int array (n + 1, 4) of x0, y0, x1, y1 per label (row 0 and empty labels: zeros) from `_label_pixels`."""
    n = len(bounds) - 1
    boxes = np.zeros((n + 1, 4), np.int64)
    full = np.nonzero(bounds[1:] > bounds[:-1])[0]
    if full.size:
        starts = bounds[full]
        boxes[full + 1] = np.stack([np.minimum.reduceat(xs, starts), np.minimum.reduceat(ys, starts),
                                    np.maximum.reduceat(xs, starts) + 1, np.maximum.reduceat(ys, starts) + 1], 1)
    return boxes


def _merge_oversplit(labels: np.ndarray, radius: float) -> np.ndarray:
    """Merge two touching regions when together they are still one convex cell-sized shape.

    Two touching cells meet at a neck, so their union is not convex; one irregular cell cut in two by
    a spurious marker is. Pairs are merged greedily, the most convex union first.
    """
    cv2 = _cv2()
    typical = math.pi * radius * radius
    a, b = labels[:, :-1].ravel(), labels[:, 1:].ravel()
    c, d = labels[:-1, :].ravel(), labels[1:, :].ravel()
    u = np.concatenate([a, c])
    v = np.concatenate([b, d])
    keep = (u > 0) & (v > 0) & (u != v)
    n = int(labels.max()) + 1
    lo, hi = np.minimum(u[keep], v[keep]).astype(np.int64), np.maximum(u[keep], v[keep]).astype(np.int64)
    pairs = [divmod(int(k), n) for k in np.unique(lo * n + hi)]
    if not pairs:
        return labels
    area = np.bincount(labels.ravel(), minlength=n)
    candidates = []
    for i, j in pairs:
        if area[i] + area[j] > MERGE_AREA * typical:
            continue
        candidates.append((int(i), int(j)))
    if not candidates:
        return labels
    # Bounding boxes of every label, to cut a small window per pair.
    x0, y0, x1, y1 = _label_boxes(*_label_pixels(labels)).T
    scored = []
    for i, j in candidates:
        bx0, by0 = min(x0[i], x0[j]), min(y0[i], y0[j])
        bx1, by1 = max(x1[i], x1[j]), max(y1[i], y1[j])
        win = labels[by0:by1, bx0:bx1]
        union = ((win == i) | (win == j)).astype(np.uint8)
        contours, _ = cv2.findContours(union, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        if len(contours) != 1:
            continue
        hull = cv2.contourArea(cv2.convexHull(contours[0]))
        solidity = float(union.sum()) / max(hull, 1.0)
        if solidity >= SINGLE_SOLIDITY:
            scored.append((solidity, i, j))
    parent = np.arange(n)
    merged = set()
    for _, i, j in sorted(scored, reverse=True):
        if i in merged or j in merged:  # one merge per region: chains of merges would rebuild clumps
            continue
        parent[j] = i
        merged.update((i, j))
    return parent[labels].astype(np.int32)


def _fit_circle(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(cx, cy, r) of the least-squares circle through the points (the algebraic, Kasa, fit)."""
    mx, my = float(x.mean()), float(y.mean())
    u, v = x - mx, y - my
    suu, svv, suv = float(u @ u), float(v @ v), float(u @ v)
    b1 = 0.5 * float(u @ (u * u + v * v))
    b2 = 0.5 * float(v @ (u * u + v * v))
    det = suu * svv - suv * suv
    if abs(det) < 1e-9:
        return mx, my, 0.0
    uc, vc = (b1 * svv - b2 * suv) / det, (suu * b2 - suv * b1) / det
    return mx + uc, my + vc, math.sqrt(uc * uc + vc * vc + (suu + svv) / len(x))


def _complete_overlapped(cells: list[Cell], labels: np.ndarray, mask: np.ndarray, radius: float,
                         scale: float) -> None:
    """Give each red cell cut from overlapping neighbours the part of the foreground they share with it.

    The nearest-marker split hands the lens where two cells overlap half to each, so a cell overlapped on
    both sides (the middle of a chain) keeps only its visible part, and its box falls short of the cell
    (the annotators box the whole disc). The cell's own outline, the pixels that face the background, is
    an arc of its membrane: the circle through it is the whole cell, and the foreground inside that circle
    (of the cell's own connected blob) joins the cell's mask. Masks of overlapping cells then overlap, as
    the cells do (`Segmentation.labels` keeps the split). Cells without a neighbour, with too short an arc
    or with a circle not of a cell's size are left as they are. Changes `cells` in place (mask, box, bbox,
    area; not the kind).
    """
    cv2 = _cv2()
    h, w = mask.shape
    outline = (mask > 0) & (cv2.erode(mask, np.ones((3, 3), np.uint8)) == 0)  # foreground next to background
    # Regions that meet another region (4-neighbours): where the split cut a cell from its neighbour.
    across = (labels[:, 1:] != labels[:, :-1]) & (labels[:, 1:] > 0) & (labels[:, :-1] > 0)
    down = (labels[1:, :] != labels[:-1, :]) & (labels[1:, :] > 0) & (labels[:-1, :] > 0)
    cut = np.zeros(int(labels.max()) + 1, bool)
    cut[labels[:, 1:][across]] = cut[labels[:, :-1][across]] = True
    cut[labels[1:, :][down]] = cut[labels[:-1, :][down]] = True
    # Each region's outline pixels, grouped by label.
    oy, ox = np.nonzero(outline)
    olab = labels[oy, ox]
    order = np.argsort(olab, kind="stable")
    oy, ox, olab = oy[order], ox[order], olab[order]
    bounds = np.searchsorted(olab, np.arange(len(cut) + 1))
    _, comp = cv2.connectedComponents(mask, connectivity=8)  # a cell grows within its own blob only
    min_arc = ARC_SHARE * 2 * math.pi * radius
    for c in cells:
        if c.kind != "rbc":
            continue
        x, y, bw, bh = c.box
        first = int(np.argmax(c.mask))
        lab = int(labels[y + first // bw, x + first % bw])
        a, z = bounds[lab], bounds[lab + 1]
        if not cut[lab] or z - a < min_arc:
            continue
        ex, ey = ox[a:z], oy[a:z]
        cx, cy, r = _fit_circle(ex.astype(np.float64), ey.astype(np.float64))
        if not ARC_RADII[0] * radius <= r <= ARC_RADII[1] * radius:
            continue
        r += 1.0
        nx0, ny0 = min(x, max(0, int(cx - r))), min(y, max(0, int(cy - r)))
        nx1, ny1 = max(x + bw, min(w, int(cx + r) + 2)), max(y + bh, min(h, int(cy + r) + 2))
        yy, xx = np.ogrid[ny0:ny1, nx0:nx1]
        blob = comp[ny0:ny1, nx0:nx1] == comp[y + first // bw, x + first % bw]
        new = ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r) & blob
        new[y - ny0:y - ny0 + bh, x - nx0:x - nx0 + bw] |= c.mask
        rows, cols = np.flatnonzero(new.any(axis=1)), np.flatnonzero(new.any(axis=0))
        bx0, by0, bx1, by1 = int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
        c.mask = new[by0:by1, bx0:bx1]
        c.box = (nx0 + bx0, ny0 + by0, bx1 - bx0, by1 - by0)
        c.bbox = [int(round(v * scale)) for v in c.box]
        c.area = int(round(int(c.mask.sum()) * scale * scale))


def _chromatin_candidates(cells: list[Cell], labels: np.ndarray, purple: np.ndarray, mask: np.ndarray,
                          dist: np.ndarray, radius: float, scale: float) -> list[Cell]:
    """A red cell ("rbc", classified and counted) around each parasite-sized chromatin spot in a region that is not one.

    Of the parasites the release missed on unseen IML fields, about 40% were never found as a cell and
    25% sat in regions typed clump, white cell or edge, which are not classified. Chromatin is what a
    microscopist looks for, so it is looked for directly: a spot of nuclear stain between CANDIDATE_SPOT
    areas (x typical cell area; a white cell's nucleus is larger), inside a clump or touching a white
    cell's region, and not part of a nucleus (further than a fifth of a radius from one), gives a disc of
    one typical radius, within the foreground, centred where the cell around the spot is deepest (the
    distance transform's highest point within 0.8 radius of the spot): its host cell, as the classifier
    sees cells. The clump stays as it was; the candidate is added after it (its own index) and takes its
    disc in `labels` (changed in place).
    """
    cv2 = _cv2()
    typical = math.pi * radius * radius
    kinds = {c.index: c.kind for c in cells}
    lo, hi = CANDIDATE_SPOT
    n, lab, stats, cents = cv2.connectedComponentsWithStats(purple.astype(np.uint8), connectivity=8)
    area = stats[:, cv2.CC_STAT_AREA]
    nucleus = (area >= WBC_NUCLEUS_AREA * typical)
    nucleus[0] = False
    near_nucleus = None
    if nucleus.any():
        k = max(3, int(round(0.4 * radius)) | 1)
        near_nucleus = cv2.dilate(nucleus[lab].astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    h, w = mask.shape
    out: list[Cell] = []
    taken = np.zeros((h, w), bool)
    index = len(cells)
    reach = int(math.ceil(0.8 * radius))
    for i in np.nonzero((area >= lo * typical) & (area <= hi * typical))[0]:
        if i == 0:
            continue
        cx, cy = int(round(cents[i][0])), int(round(cents[i][1]))
        if near_nucleus is not None and near_nucleus[cy, cx]:
            continue
        host = int(labels[cy, cx])
        if not mask[cy, cx] or taken[cy, cx] or kinds.get(host, "rbc") in ("rbc", "debris", "platelet"):
            continue
        y0, y1, x0, x1 = max(0, cy - reach), min(h, cy + reach + 1), max(0, cx - reach), min(w, cx + reach + 1)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        win = np.where((xx - cx) ** 2 + (yy - cy) ** 2 <= reach * reach, np.minimum(dist[y0:y1, x0:x1], radius), -1)
        py, px = np.unravel_index(int(np.argmax(win)), win.shape)
        py, px = py + y0, px + x0
        r = radius
        by0, by1 = max(0, int(py - r)), min(h, int(py + r) + 1)
        bx0, bx1 = max(0, int(px - r)), min(w, int(px + r) + 1)
        yy, xx = np.ogrid[by0:by1, bx0:bx1]
        disc = ((xx - px) ** 2 + (yy - py) ** 2 <= r * r) & (mask[by0:by1, bx0:bx1] > 0)
        if disc.sum() < 0.5 * typical:
            continue
        rows, cols = np.flatnonzero(disc.any(axis=1)), np.flatnonzero(disc.any(axis=0))
        m = disc[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        box = (bx0 + int(cols[0]), by0 + int(rows[0]), m.shape[1], m.shape[0])
        taken[by0:by1, bx0:bx1] |= disc
        index += 1
        labels[by0:by1, bx0:bx1][disc] = index  # the split gives the candidate its disc (crops cut to it)
        out.append(Cell(index=index, bbox=[int(round(v * scale)) for v in box],
                        area=int(round(m.sum() * scale * scale)), kind="rbc", mask=m, box=box))
    return out


def _kind(area_px: float, typical: float, nucleus_px: int, purple_share: float, on_edge: bool = False) -> str:
    if area_px < DEBRIS_AREA * typical:
        return "platelet" if purple_share > 0.3 else "debris"
    if nucleus_px > WBC_PART_AREA * typical:
        return "wbc"
    if on_edge and area_px < EDGE_AREA * typical:
        return "edge"
    if area_px > CLUMP_AREA * typical:
        return "clump"
    return "rbc"


def segment(image: Image.Image | np.ndarray, name: str = "field", um_per_px: float | None = None) -> Segmentation:
    """Find the cells of one field photo.

    Args:
        image: a PIL image (already loaded, e.g. by `edge_runtime.load_image`) or an RGB uint8 array.
        name: what errors call it.
        um_per_px: the photo's micrometres per pixel, when the user knows it (a stage micrometer, the
            objective and camera): the typical red cell's radius is then RBC_RADIUS_UM / um_per_px instead
            of being estimated from the photo.

    Raises:
        SmearError: no cells found (a blank, black or non-smear photo).
        ValueError: `um_per_px` not a positive number.
    """
    if um_per_px is not None and not (isinstance(um_per_px, (int, float)) and math.isfinite(um_per_px)
                                      and um_per_px > 0):
        raise ValueError(f"{name}: um_per_px must be a positive number of micrometres per pixel (about 0.1 for "
                         f"the IML fields: 1280x960, 100x objective), got {um_per_px!r}")
    cv2 = _cv2()
    if isinstance(image, np.ndarray):
        image = _array_image(image, name)
    if min(image.size) < 8 * MIN_RADIUS:
        raise SmearError(name, f"no cells found (a {image.width}x{image.height} image is too small for a field)")
    rgb, scale = _working_image(image)
    # Giemsa stains cells pink to purple: a photo without colour (an OCT scan, any greyscale
    # picture) cannot be a stained smear, whatever shapes it shows.
    spread = rgb.max(axis=2).astype(np.int16) - rgb.min(axis=2)
    if np.percentile(spread, 90) < 4:
        raise SmearError(name, "no cells found (a greyscale image, not a stained smear)")
    norm = flatten_background(rgb)
    dark, od_cells = stain_darkness(norm)
    threshold, mode, sigma = _threshold(dark)
    mask = (dark > threshold).astype(np.uint8)
    # One stain, whatever its hue: a smear's cells all lie along one direction in OD space (stained
    # amount varies, colour does not); a landscape's trees, house and sun do not.
    if od_cells is not None and _stain_coherence(norm, mask > 0, od_cells) < STAIN_COHERENCE:
        raise SmearError(name, "no cells found (what stands out is not of one stain's colour: not a blood smear)")
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    # Size first, on every hole filled (gaps too: a ring of cells counts once in the median).
    filled = mask | _holes(mask)
    if um_per_px is not None:  # the user's scale wins over any estimate (in working pixels)
        radius, source = RBC_RADIUS_UM / (um_per_px * scale), "user"
        if radius >= MIN_RADIUS:
            mask = _fill_cell_holes(mask, dark, math.pi * radius * radius, mode + 2 * sigma)
    else:
        radius, source = _estimate_radius(filled, cv2.distanceTransform(filled, cv2.DIST_L2, 5)), "blob depths"
    if um_per_px is None and radius >= MIN_RADIUS:
        mask = _fill_cell_holes(mask, dark, math.pi * radius * radius, mode + 2 * sigma)
        # The components' deepest points underestimate a cell (fragments, debris and partial cells pull
        # the median down): an isolated cell is a convex blob, so their median size is the typical cell.
        single, count = _convex_radius(mask, 0.5 * radius)
        if count >= MIN_SINGLE_CELLS:
            radius, source = single, "isolated cells"
        else:
            # A crowded field (under MIN_SINGLE_CELLS isolated cells) is a few large blobs, so the median of
            # the blobs' deepest points is no cell's size (PA171748: 13 px for ~35 px cells, 235 "clumps").
            # Inside a blob of touching cells the distance transform peaks at each cell's centre, about one
            # radius deep: the median of those local maxima (36.4 px there; 33.6-36.8 on uncrowded fields).
            centres = _centre_depth(filled)
            if centres > radius:
                radius, source = centres, "cell centres"
    dist = cv2.distanceTransform(mask, cv2.DIST_L2, 5)
    # A photo with no cells: nothing stands out of the background, or everything does (no
    # background to count against), or what does is far larger than a cell among many
    # (a landscape's sky line, a dark half, an OCT scan's layers).
    if radius < MIN_RADIUS or not 0.01 < mask.mean() < 0.9 or radius > min(mask.shape) / 8:
        raise SmearError(name, "no cells found (nothing cell-shaped stands out of the background)")
    markers = _markers(mask, dist, radius)
    labels = _merge_oversplit(_nearest_marker(markers, mask), radius)
    # Burned-in labels and scale bars (every IML field has a black "50 um" bar, ~745 pixels) are print:
    # below INK_LEVEL of the background in every channel, which no stained cell is. Their regions are
    # "debris" and their pixels are not chromatin (the release called a "50 um" label parasitized 0.88).
    ink = cv2.dilate((norm.max(axis=2) < INK_LEVEL).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    purple = chromatin(norm, dark, mask, od_cells) & ~ink
    cells = _regions(labels, purple, mask, radius, scale, ink)
    if not any(c.kind == "rbc" for c in cells):
        raise SmearError(name, "no cells found (no region the size and shape of a red blood cell)")
    relabelled = np.zeros_like(labels)
    for c in cells:
        x, y, w, h = c.box
        relabelled[y:y + h, x:x + w][c.mask] = c.index
    _complete_overlapped(cells, labels, mask, radius, scale)
    cells += _chromatin_candidates(cells, relabelled, purple, mask, dist, radius, scale)
    # The threshold sits at the foot of a cell's edge (low, to keep pale cells whole), so a region also
    # holds the blurred rim where the cell fades into the bright background; the NIH crops are cut at
    # the membrane. The edge's half-way level is that membrane, whatever the focus and the stain.
    core = dark >= threshold + 0.5 * (float(np.median(dark[mask > 0])) - threshold)
    return Segmentation(cells=cells, image=rgb, scale=scale, radius=radius, threshold=threshold, labels=relabelled,
                        core=core, radius_source=source)


def chromatin(norm: np.ndarray, dark: np.ndarray, mask: np.ndarray, od_cells: np.ndarray | None) -> np.ndarray:
    """bool image of nuclear (and parasite chromatin) stain: far darker than the cells, in another colour.

    Darker than the field's typical cell by half of what is left to black, relative because stains vary
    from pale pink cells to deep magenta ones; and off the cells' own stain direction in optical density
    (cosine under CHROMATIN_COSINE), because the azure that stains DNA is another dye than what colours
    haemoglobin, whatever either's hue. (The release asked for purple, red and blue above green: on a
    blue-grey stain no pixel was, and no white cell was found.)
    """
    cell_dark = float(np.median(dark[mask > 0]))
    stained = dark > cell_dark + 0.5 * (1.0 - cell_dark)
    if od_cells is None:
        return stained & (norm[:, :, 0] > norm[:, :, 1]) & (norm[:, :, 2] > norm[:, :, 1])
    out = np.zeros_like(stained)
    v = -np.log10(np.clip(norm[stained], 1e-3, 1.0))
    u = (od_cells / max(float(np.linalg.norm(od_cells)), 1e-6)).astype(np.float32)
    out[stained] = (v @ u) < CHROMATIN_COSINE * np.linalg.norm(v, axis=1)
    return out


def _regions(labels: np.ndarray, purple: np.ndarray, mask: np.ndarray, radius: float,
             scale: float, ink: np.ndarray | None = None) -> list[Cell]:
    """One Cell per watershed label, in reading order, with its kind (`purple`: `chromatin`'s image; a region
    more than INK_SHARE print, `ink`, is "debris")."""
    typical = math.pi * radius * radius
    # A white cell's nucleus is one stained mass about as large as a red cell; a parasite's chromatin
    # is a fraction of its host. Whole masses are measured, not their share of one region, because
    # the splitting may cut a white cell (nucleus and cytoplasm) into several regions.
    cv2 = _cv2()
    n_nuc, nuc_lab, nuc_stats, _ = cv2.connectedComponentsWithStats(purple.astype(np.uint8), connectivity=8)
    big = nuc_stats[:, cv2.CC_STAT_AREA] >= WBC_NUCLEUS_AREA * typical
    big[0] = False
    nucleus_mask = big[nuc_lab]
    found = []
    n = int(labels.max())
    if n < 1:
        return []
    ys, xs, bounds = _label_pixels(labels)
    boxes = _label_boxes(ys, xs, bounds).tolist()
    for i in range(1, n + 1):
        a, z = bounds[i - 1], bounds[i]
        if z - a < 4:
            continue
        yy, xx = ys[a:z], xs[a:z]
        x0, y0, x1, y1 = boxes[i]
        m = np.zeros((y1 - y0, x1 - x0), bool)
        m[yy - y0, xx - x0] = True
        area = int(z - a)
        pur = purple[y0:y1, x0:x1][m]
        nucleus = int(nucleus_mask[y0:y1, x0:x1][m].sum())
        on_edge = x0 == 0 or y0 == 0 or x1 == labels.shape[1] or y1 == labels.shape[0]
        kind = _kind(area, typical, nucleus, float(pur.sum()) / area, on_edge)
        if ink is not None and ink[y0:y1, x0:x1][m].mean() > INK_SHARE:
            kind = "debris"
        found.append((y0, x0, m, (x0, y0, x1 - x0, y1 - y0), area, kind))
    found.sort(key=lambda f: (f[0] // max(1, int(radius)), f[1]))
    cells = []
    for k, (_, _, m, box, area, kind) in enumerate(found, start=1):
        x, y, w, h = box
        bbox = [int(round(x * scale)), int(round(y * scale)), int(round(w * scale)), int(round(h * scale))]
        cells.append(Cell(index=k, bbox=bbox, area=int(round(area * scale * scale)), kind=kind, mask=m, box=box))
    return cells

