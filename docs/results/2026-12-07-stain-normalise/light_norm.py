"""Experimental crop normalisations referenced to the field's own blank glass (repo root; issue 23).

    python docs/results/2026-12-07-stain-normalise/light_norm.py reference     # prints BG_REF and OD_REF

`background(seg)`: each channel scaled so the field's background (median of the unlabelled pixels) matches
BG_REF, the median background of the reference fields (blocks PA171790, PA171830, PA171880, PA171990:
neither the selection block PA171700 nor the report blocks PA171740 and PA171960): exposure and white balance.
`od(seg)`: that, then each channel's optical density scaled so the median red-cell OD matches OD_REF
(Beer-Lambert: a weaker or differently coloured stain is a per-channel factor on the OD).
Both return an RGB uint8 image like `seg.image`, as `edge_runtime.smear.crops.normalise_stain` does.
"""

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "iml_malaria"

BG_REF = (199.5, 225.5, 205.5)  # `reference`, 2026-12-07 (48 fields)
OD_REF = (0.1284, 0.6031, 0.2119)


def _bg_and_cells(seg):
    labels = np.asarray(seg.labels)
    bg = labels == 0
    idx = np.zeros(len(seg.cells) + 1, bool)
    idx[[c.index for c in seg.cells if c.kind == "rbc"]] = True
    rbc = idx[labels]
    if seg.core is not None:
        rbc &= seg.core
    img = np.asarray(seg.image, np.float32)
    b = np.median(img[bg], axis=0) if bg.sum() > 1000 else np.percentile(img.reshape(-1, 3), 95, axis=0)
    c = np.median(img[rbc], axis=0) if rbc.sum() > 100 else None
    return img, np.maximum(b, 1.0), c


def _od(v, bg):
    return -np.log10(np.clip(v, 1.0, None) / bg)


def background(seg):
    img, b, _ = _bg_and_cells(seg)
    return np.clip(img * (np.asarray(BG_REF, np.float32) / b) + 0.5, 0, 255).astype(np.uint8)


def od(seg):
    img, b, c = _bg_and_cells(seg)
    if c is None:
        return background(seg)
    ref_bg = np.asarray(BG_REF, np.float32)
    k = np.asarray(OD_REF, np.float32) / np.maximum(_od(c, b), 0.02)
    k = np.clip(k, 0.33, 3.0)
    out = ref_bg * 10.0 ** (-_od(img, b) * k)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def reference() -> None:
    from edge_runtime.images import load_image
    from edge_runtime.smear import segment
    from train.annotations import field_blocks

    files = sorted((DATA / "fields").iterdir())
    blocks = field_blocks([f.name for f in files])
    keep = [f for f in files if blocks[f.name] in ("PA171790", "PA171830", "PA171880", "PA171990")]
    bgs, ods = [], []
    for f in keep:
        seg = segment(np.asarray(load_image(f)), f.name)
        _, b, c = _bg_and_cells(seg)
        bgs.append(b)
        ods.append(_od(c, b))
    print(f"{len(keep)} fields; BG_REF = {tuple(round(float(v), 1) for v in np.median(bgs, axis=0))}; "
          f"OD_REF = {tuple(round(float(v), 4) for v in np.median(ods, axis=0))}")


if __name__ == "__main__":
    reference()
