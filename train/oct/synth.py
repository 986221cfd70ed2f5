"""OCT-like synthetic B-scans laid out like Kermany's OCT2017, for tests and demos.

    python -m train oct synth --out data/oct-synth --per-class 40 --patients 8 --seed 0

No real OCT image can be downloaded on the project's machines, so the OCT
pipeline is exercised on images this module draws: a layered retina (nerve
fibre, ganglion cell, plexiform and nuclear layers, photoreceptor bands, RPE,
choroid) with a foveal pit, lateral speckle and per-patient anatomy, and:

- DRUSEN: dome-shaped bumps lifting the RPE off Bruch's membrane;
- DME: a thickened retina with dark intraretinal cysts and bright foci;
- CNV: a pigment-epithelial detachment over a bright fibrovascular lesion,
  dark subretinal fluid and a thickened retina;
- NORMAL: none of these.

Severity, lesion count and position vary per patient and per scan, and some
scans of sick patients are mild, so the task is not trivial. Files follow
`train|test/<CLASS>/<CLASS>-<patient>-<n>.jpeg`; test patients never appear
in train. A `SYNTHETIC_DATA.txt` marker at the root says the data is
synthetic, and every report made from it repeats that.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from edge_runtime.clinical import OCT_LABELS
from train.oct.facts import SYNTHETIC_MARKER, SYNTHETIC_NOTE

HEIGHT, WIDTH = 496, 512  # the commonest OCT2017 B-scan size (width x height 512x496)


@dataclasses.dataclass(frozen=True)
class Patient:
    """Anatomy and acquisition settings shared by all scans of one eye."""

    pid: str
    label: str
    top: float  # ILM height at the centre (px from the top)
    tilt: float  # px per px
    curvature: float  # px of sag at the edges
    thickness: float  # ILM-to-RPE thickness away from the fovea (px)
    pit_depth: float
    pit_width: float
    fovea_x: float
    nasal_side: int  # +1 or -1: side where the nerve fibre layer thickens
    brightness: float
    contrast: float
    noise: float
    severity: float  # 0.25 (mild) .. 1 (severe); unused for NORMAL


def make_patient(rng: np.random.Generator, pid: str, label: str) -> Patient:
    return Patient(
        pid=pid,
        label=label,
        top=rng.uniform(120, 220),
        tilt=rng.normal(0, 0.06),
        curvature=rng.uniform(-10, 45),
        thickness=rng.uniform(95, 130),
        pit_depth=rng.uniform(0.55, 0.8),
        pit_width=rng.uniform(45, 75),
        fovea_x=WIDTH / 2 + rng.normal(0, 30),
        nasal_side=int(rng.choice((-1, 1))),
        brightness=rng.uniform(0.85, 1.1),
        contrast=rng.uniform(0.85, 1.2),
        noise=rng.uniform(0.7, 1.3),
        severity=rng.uniform(0.25, 1.0),
    )


def _bump(x: np.ndarray, centre: float, half_width: float, height: float, power: float = 0.8) -> np.ndarray:
    """A dome: `height` at `centre`, 0 beyond `half_width`."""
    u = np.clip(1 - ((x - centre) / half_width) ** 2, 0, None)
    return height * u ** power


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    """Soft-edged filled ellipse in [0, 1]."""
    d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    return np.clip((1.25 - d) / 0.25, 0, 1)


def render_scan(p: Patient, rng: np.random.Generator) -> np.ndarray:
    """One grayscale B-scan of patient `p` as a HEIGHTxWIDTH uint8 array."""
    H, W = HEIGHT, WIDTH
    x = np.arange(W, dtype=np.float64)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    sev = p.severity * rng.uniform(0.6, 1.2)
    # Scans are slices at different distances from the fovea: far ones have no pit.
    fovea_x = p.fovea_x + rng.normal(0, 20)
    through_fovea = float(np.exp(-((rng.uniform(0, 1.2)) / 0.55) ** 2))
    dy = rng.normal(0, 12)
    centre = (x - W / 2) / (W / 2)
    base = p.top + dy + p.tilt * (x - W / 2) + p.curvature * centre**2

    thick = np.full(W, p.thickness)
    pit = p.pit_depth * through_fovea * np.exp(-(((x - fovea_x) / p.pit_width) ** 2))
    lift = np.zeros(W)  # RPE elevation (drusen, PED)
    fluid = np.zeros(W)  # subretinal fluid height between photoreceptors and RPE

    label = p.label
    if label == "DME":
        # Oedema thickens the macula and fills the pit.
        thick = thick + sev * rng.uniform(40, 110) * np.exp(-(((x - fovea_x) / rng.uniform(90, 170)) ** 2))
        pit = pit * (1 - min(0.9, sev))
    elif label == "CNV":
        c = fovea_x + rng.normal(0, 45)
        hw = rng.uniform(45, 95) * (0.6 + 0.5 * sev)
        lift = lift + _bump(x, c, hw, rng.uniform(18, 55) * (0.5 + 0.6 * sev), power=0.6)
        if rng.uniform() < 0.85:
            fc = c + rng.normal(0, 25)
            fluid = fluid + _bump(x, fc, hw * rng.uniform(0.8, 1.6), rng.uniform(6, 26) * sev, power=0.9)
        thick = thick + sev * rng.uniform(10, 50) * np.exp(-(((x - c) / 120) ** 2))
        pit = pit * (1 - min(0.8, sev))
    elif label == "DRUSEN":
        for _ in range(int(rng.integers(2, 8))):
            c = fovea_x + rng.normal(0, 110)
            lift = lift + _bump(x, c, rng.uniform(10, 30), rng.uniform(4, 18) * (0.5 + 0.7 * sev), power=0.7)

    # Boundaries from the top: ILM, and the photoreceptor/RPE complex from Bruch's membrane up.
    bruch = base + thick
    rpe_top = bruch - 9 - lift
    ilm = base + pit * thick * 0.75 - lift * 0.15 - fluid * 0.2
    ez = rpe_top - fluid - 7  # ellipsoid zone top
    elm = ez - 6
    outer_total = np.maximum(elm - ilm, 8)
    # Inner layers: the fovea pushes them aside, so they thin where the pit is.
    inner_share = 0.62 * (1 - 0.85 * pit / max(p.pit_depth, 1e-6))
    inner = outer_total * np.clip(inner_share, 0.05, 0.7)
    nfl_w = inner * (0.16 + 0.14 / (1 + np.exp(-p.nasal_side * (x - fovea_x) / 60)))
    rest = inner - nfl_w
    gcl_b = ilm + nfl_w + rest * 0.32
    ipl_b = gcl_b + rest * 0.25
    inl_b = ipl_b + rest * 0.22
    opl_b = ilm + inner
    nfl_b = ilm + nfl_w

    # (lower boundary, intensity) from the top; the first band above its boundary wins.
    bands = [
        (ilm, 0.06),  # vitreous
        (nfl_b, 0.78),  # nerve fibre layer
        (gcl_b, 0.42),  # ganglion cell layer
        (ipl_b, 0.58),  # inner plexiform
        (inl_b, 0.24),  # inner nuclear
        (opl_b, 0.55),  # outer plexiform
        (elm, 0.17),  # outer nuclear
        (elm + 2, 0.5),  # external limiting membrane
        (ez, 0.28),  # myoid zone
        (ez + 4, 0.82),  # ellipsoid zone
        (ez + 7, 0.4),  # interdigitation
        (ez + 7 + fluid, 0.05),  # subretinal fluid
        (rpe_top + 9, 0.97),  # RPE
        (bruch, 0.5),  # under a lifted RPE: drusen / fibrovascular material
        (bruch + 2, 0.85),  # Bruch's membrane
    ]
    img = np.full((H, W), 0.0)
    filled = np.zeros((H, W), bool)
    for bound, value in bands:
        m = (yy < bound[None, :]) & ~filled
        img[m] = value
        filled |= m
    # Choroid: textured, with dark vessel lumens, fading into the sclera.
    depth = yy - (bruch + 2)[None, :]
    tex = gaussian_filter(rng.standard_normal((H, W)), sigma=(3, 6))
    tex = tex / (tex.std() + 1e-9)
    chor = (0.42 + 0.16 * tex) * np.exp(-np.clip(depth, 0, None) / rng.uniform(40, 70))
    img = np.where(filled, img, np.clip(chor, 0.02, 1.0))

    # Lesion material with texture.
    under = (yy >= rpe_top[None, :] + 9) & (yy < bruch[None, :]) & (lift[None, :] > 1)
    if label == "CNV":
        img[under] = np.clip(0.45 + 0.25 * tex[under], 0.05, 1.0)  # fibrovascular PED
        # Hyper-reflective subretinal material above the RPE.
        c = int(np.argmax(lift))
        blob = _ellipse(yy, xx, rpe_top[c] - fluid[c] * 0.3 - 4, c + rng.normal(0, 8), rng.uniform(5, 12),
                        rng.uniform(15, 40))
        img = np.maximum(img, blob * (0.6 + 0.3 * sev))
    elif label == "DRUSEN":
        img[under] = np.clip(0.55 + 0.1 * tex[under], 0.05, 1.0)
    if label == "DME" or (label == "CNV" and rng.uniform() < 0.3 * sev):
        n_cysts = int(rng.integers(2, 6) + sev * rng.integers(2, 9))
        for _ in range(n_cysts):
            cx = fovea_x + rng.normal(0, 70)
            i = int(np.clip(cx, 0, W - 1))
            lo, hi = ipl_b[i], elm[i]
            if hi - lo < 10:
                continue
            cy = rng.uniform(lo + 4, hi - 4)
            ry = min(rng.uniform(4, 22) * (0.5 + sev), cy - lo, hi - cy)
            rx = ry * rng.uniform(0.7, 1.8)
            m = _ellipse(yy, xx, cy, cx, ry, rx)
            img = img * (1 - m) + m * 0.04
        for _ in range(int(rng.integers(0, 10) * sev)):  # hard exudates / hyper-reflective foci
            i = int(rng.uniform(0, W))
            cy = rng.uniform(ipl_b[i], elm[i]) if elm[i] > ipl_b[i] else ipl_b[i]
            img = np.maximum(img, _ellipse(yy, xx, cy, i, 2.5, 3.5) * 0.9)

    # Speckle: multiplicative, laterally elongated, plus a noisy floor; then display gamma.
    speck = gaussian_filter(rng.standard_normal((H, W)), sigma=(0.6, 1.4))
    speck = speck / (speck.std() + 1e-9)
    out = img * np.exp(0.32 * p.noise * speck) + 0.045 * p.noise * np.abs(rng.standard_normal((H, W)))
    out = gaussian_filter(out, sigma=(0.7, 1.0))
    out = (out * p.brightness - 0.5) * p.contrast + 0.5
    out = np.clip(out, 0, 1) ** rng.uniform(1.1, 1.5)
    return np.round(out * 255).astype(np.uint8)


def _patient_ids(rng: np.random.Generator, n: int) -> list[str]:
    ids: set[str] = set()
    while len(ids) < n:
        ids.add(str(int(rng.integers(100_000, 9_999_999))))
    return sorted(ids, key=lambda s: rng.uniform())


def generate(
    out: Path,
    per_class: int = 40,
    patients: int = 8,
    test_per_class: int | None = None,
    test_patients: int | None = None,
    seed: int = 0,
    quality: int = 90,
) -> dict:
    """Write an OCT2017-style folder of synthetic B-scans and its marker; return the settings.

    Args:
        out: root folder; gets `train/` and `test/`, each with the four class folders.
        per_class: train images per class.
        patients: train patients per class (images are dealt round-robin).
        test_per_class, test_patients: the same for test (default a quarter, at least 1).
        seed: everything drawn follows from it.
        quality: JPEG quality.
    """
    if per_class < 1 or patients < 1:
        raise ValueError(f"--per-class ({per_class}) and --patients ({patients}) must be at least 1")
    if patients > per_class:
        raise ValueError(f"--patients {patients} exceeds --per-class {per_class}: every patient needs an image")
    test_per_class = test_per_class if test_per_class is not None else max(1, per_class // 4)
    test_patients = test_patients if test_patients is not None else max(1, min(test_per_class, patients // 4))
    if test_patients > test_per_class or test_per_class < 1 or test_patients < 1:
        raise ValueError(f"need 1 <= test patients ({test_patients}) <= test images per class ({test_per_class})")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (out / SYNTHETIC_MARKER).is_file():
            raise ValueError(f"{out} exists and is not a synthetic OCT folder; choose an empty --out")
    rng = np.random.default_rng(seed)
    n_patients = len(OCT_LABELS) * (patients + test_patients)
    ids = iter(_patient_ids(rng, n_patients))
    settings = {
        "generator": "python -m train oct synth",
        "seed": seed,
        "per_class": per_class,
        "patients": patients,
        "test_per_class": test_per_class,
        "test_patients": test_patients,
        "size": [WIDTH, HEIGHT],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    counts = {}
    for split, n_img, n_pat in (("train", per_class, patients), ("test", test_per_class, test_patients)):
        for label in OCT_LABELS:
            folder = out / split / label
            folder.mkdir(parents=True, exist_ok=True)
            pats = [make_patient(rng, next(ids), label) for _ in range(n_pat)]
            scan_no = {pt.pid: 0 for pt in pats}
            for k in range(n_img):
                pt = pats[k % n_pat]
                scan_no[pt.pid] += 1
                arr = render_scan(pt, rng)
                name = f"{label}-{pt.pid}-{scan_no[pt.pid]}.jpeg"
                Image.fromarray(arr, mode="L").save(folder / name, format="JPEG", quality=quality)
            counts[f"{split}/{label}"] = n_img
    settings["images"] = counts
    (out / SYNTHETIC_MARKER).write_text(SYNTHETIC_NOTE + "\n\n" + json.dumps(settings, indent=2) + "\n")
    return settings


def run(out: Path, per_class: int, patients: int, test_per_class: int | None, test_patients: int | None,
        seed: int) -> int:
    """CLI body of `python -m train oct synth`."""
    s = generate(out, per_class, patients, test_per_class, test_patients, seed)
    total = sum(s["images"].values())
    print(
        f"wrote {total} synthetic B-scans ({WIDTH}x{HEIGHT}) to {out}: train {s['per_class']} per class from "
        f"{s['patients']} patients per class, test {s['test_per_class']} per class from {s['test_patients']} "
        f"other patients per class; marker {Path(out) / SYNTHETIC_MARKER}"
    )
    print(f"next: python -m train split --data {out} --out {Path(out) / 'manifest.csv'} --val 0.2")
    return 0
