"""The README's main job on the bundled sample: split, train `edge` briefly, evaluate, print the report.

    python -m train demo --out runs/demo

The bundled sample is 400 real NIH cells from 20 patients, so the test split
is 4 unseen patients (80 cells): the figure it prints shows the pipeline
working end to end, not the model's accuracy (see the README for that).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from train import evaluate, split
from train.malaria import fit


def run(data: Path, out: Path, epochs: int) -> int:
    out = Path(out)
    if out.exists():
        print(f"removing the previous demo in {out}")
        shutil.rmtree(out)
    manifest = out / "manifest.csv"
    print(f"== 1/3 split {data} by patient -> {manifest}")
    split.run(data, manifest, mode="patient", seed=42, val=0.1, test=0.2)
    print(f"\n== 2/3 train the `edge` preset for {epochs} epochs -> {out / 'malaria-edge'}")
    fit.train_malaria(manifest, "edge", out / "malaria-edge", epochs=epochs, verbose=2)
    print("\n== 3/3 evaluate on the test patients")
    report = evaluate.evaluate_run(out / "malaria-edge", manifest=manifest, split="test")
    print(evaluate.format_report(report))
    return 0
