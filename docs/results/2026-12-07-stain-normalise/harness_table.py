"""One harness run's table with the quality gate's side, recomputed from its smear.json (repo root).

    python docs/results/2026-12-07-stain-normalise/harness_table.py RUN_DIR [RUN_DIR ...]

Each RUN_DIR is a `benchmarks smear --shift all --out RUN_DIR` result. The rows are re-summarised with
`train.annotations.summarise` (so a run made before the gate-aware columns existed gets them too) and the
17-transform means are printed: parasites flagged on every analysed field, and counting a field the gate
refused as flagging nothing.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from train.annotations import summarise  # noqa: E402


def main(dirs: list[str]) -> None:
    for d in dirs:
        report = json.loads((Path(d) / "smear.json").read_text())
        print(f"\n{d}\n")
        print("| transform | flagged | flagged, refused as none | FP | uncertain | refused by gate | silent < 70% |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        flagged, read = [], []
        for t in report["shift"]:
            s = summarise(t["fields"], True)
            if t["transform"] != "none":
                flagged.append(s["parasite_recall_called"])
                read.append(s["parasite_recall_called_read"])
            print(f"| {t['transform']} | {100 * s['parasite_recall_called']:.1f}% | "
                  f"{100 * s['parasite_recall_called_read']:.1f}% | {100 * s['uninfected_false_positive_rate']:.2f}% | "
                  f"{100 * s['uninfected_uncertain_rate']:.1f}% | {s['fields_unreadable']} of {s['fields']} | "
                  f"{s['fields_collapsed_silent']} |")
        print(f"| mean of the {len(flagged)} transforms | {100 * sum(flagged) / len(flagged):.1f}% | "
              f"{100 * sum(read) / len(read):.1f}% | | | | |")


if __name__ == "__main__":
    main(sys.argv[1:])
