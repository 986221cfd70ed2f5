"""Where sensor noise starts to make parasites, and what the quality gate's noise measure reads (repo root).

    python docs/results/2026-12-07-noise-gate/noise_calibration.py fp [MODEL]   # FP and uncertain vs added noise
    python docs/results/2026-12-07-noise-gate/noise_calibration.py gate [STEP]  # the gate's measure per transform

`fp`: every 4th shared field (23), the harness's sensor noise (train.fieldaug.noise) at sigma 0-8 added, scored by
`train.annotations.measure_field` with MODEL (default: the released malaria-field). `gate`: every STEP-th field
(default 3), the gate's `noise` measure and how many fields it refuses as grainy.
"""

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "iml_malaria"


def fp(model_name: str) -> None:
    import edge_runtime
    from benchmarks.shift import field_seed
    from edge_runtime.images import load_image
    from train.annotations import load_annotations, measure_field, summarise
    from train.fieldaug import noise

    model = edge_runtime.load(model_name)
    anns = load_annotations(DATA)[::4]
    for sigma in (0, 2, 3, 4, 5, 6, 8):
        rows = []
        for a in anns:
            rgb = np.asarray(load_image(a["image"]))
            img = rgb if sigma == 0 else noise(rgb, float(sigma), field_seed(a["image"].name))
            rows.append(measure_field(a, model, False, image=img))
        s = summarise(rows, True)
        print(f"sigma {sigma}: uninfected called parasitized {100 * s['uninfected_false_positive_rate']:.2f}%, "
              f"uncertain {100 * s['uninfected_uncertain_rate']:.1f}%, parasites flagged "
              f"{100 * s['parasite_recall_called']:.1f}% ({len(rows)} fields)", flush=True)


def gate_table(step: int) -> None:
    from PIL import Image

    from benchmarks.shift import BY_NAME, field_seed
    from edge_runtime.smear import segment
    from edge_runtime.smear.quality import gate, measure
    from train.fieldaug import noise

    files = sorted((DATA / "fields").iterdir())[::step]
    def added(sigma: float):
        return lambda x, seed: noise(x, sigma, seed)

    added = {f"sigma{s}": added(float(s)) for s in (2, 3, 4)}
    shifts = {n: BY_NAME[n].apply for n in ("none", "noise_8", "scale_0.6", "jpeg_30", "bright",
                                            "blue_grey_soft_small")}
    for name, fn in {**added, **shifts}.items():
        values, refused = [], 0
        for f in files:
            rgb = np.asarray(Image.open(f).convert("RGB"))
            q = gate(measure(segment(fn(rgb, field_seed(f.name)), f.name)))
            values.append(q.measures.noise)
            refused += any("grainy" in r for r in q.reasons)
        v = np.array(values)
        print(f"{name:22s} n={len(v)} noise min {v.min():.2f} median {np.median(v):.2f} max {v.max():.2f}; "
              f"refused as grainy {refused}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["fp"]:
        fp(sys.argv[2] if len(sys.argv) > 2 else "malaria-field")
    else:
        gate_table(int(sys.argv[2]) if len(sys.argv) > 2 else 3)
