"""The rule table of 2026-12-07-chroma-trained.md: several seeds of a baseline and of a candidate, side by side.

    python docs/results/2026-12-07-chroma-trained/seeds.py \
        --baseline 42=SMEAR.json:RESULT.json 43=... 44=... --candidate 42=... 43=... 44=...

SMEAR.json: a `benchmarks smear --shift all` report of the fold's held-out fields (for a field-cv fold:
FOLD/shift/smear.json); RESULT.json: the fold's result.json (its NIH sample int8 accuracy). Prints, per seed, the
figures the plan's bars are on, the bars and whether each holds, then blue-grey per seed.
"""

import argparse
import json

SHIFTED = None  # the transforms other than "none", from the first report


def figures(smear_path, result_path):
    rep = {t["transform"]: t["summary"] for t in json.load(open(smear_path))["shift"]}
    shifted = [t for t in rep if t != "none"]
    none = rep["none"]
    return {
        "mean_flagged": sum(rep[t]["parasite_recall_called_read"] for t in shifted) / len(shifted),
        "mean_fp": sum(rep[t]["uninfected_false_positive_rate"] for t in shifted) / len(shifted),
        "nih": json.load(open(result_path))["nih_sample_int8"]["accuracy"],
        "flagged": round(none["parasite_recall_called_read"] * none["annotated_parasites"]),
        "parasites": none["annotated_parasites"],
        "fp": none["uninfected_false_positive_rate"],
        "uncertain": none["uninfected_uncertain_rate"],
        "blue_grey": rep["blue_grey"]["parasite_recall_called_read"],
        "blue_grey_soft_small": rep["blue_grey_soft_small"]["parasite_recall_called_read"],
        "n_transforms": len(shifted),
    }


def parse(items):
    out = {}
    for item in items:
        seed, paths = item.split("=", 1)
        smear, result = paths.split(":")
        out[seed] = figures(smear, result)
    return out


def pct(v, d=1):
    return f"{100 * v:.{d}f}%"


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--baseline", nargs="+", required=True)
    p.add_argument("--candidate", nargs="+", required=True)
    a = p.parse_args(argv)
    base, cand = parse(a.baseline), parse(a.candidate)
    mean = lambda d, k: sum(v[k] for v in d.values()) / len(d)  # noqa: E731
    n = next(iter(base.values()))["n_transforms"]
    cols = [f"baseline {s}" for s in base] + [f"candidate {s}" for s in cand]
    allf = list(base.values()) + list(cand.values())
    print("| selection fold | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    print(f"| {n}-transform mean of parasites flagged, refused fields as none | "
          + " | ".join(pct(f["mean_flagged"]) for f in allf) + " |")
    print(f"| {n}-transform mean of uninfected called parasitized | "
          + " | ".join(pct(f["mean_fp"], 2) for f in allf) + " |")
    print("| NIH sample int8 | " + " | ".join(pct(f["nih"], 2) for f in allf) + " |")
    print("| untransformed: parasites flagged | "
          + " | ".join(f"{f['flagged']} of {f['parasites']}" for f in allf) + " |")
    print("| untransformed: uninfected called parasitized / uncertain | "
          + " | ".join(f"{pct(f['fp'])} / {pct(f['uncertain'])}" for f in allf) + " |")
    print("| blue_grey: parasites flagged | " + " | ".join(pct(f["blue_grey"]) for f in allf) + " |")
    print("| blue_grey_soft_small: parasites flagged | "
          + " | ".join(pct(f["blue_grey_soft_small"]) for f in allf) + " |")
    best = max(f["mean_flagged"] for f in base.values())
    base_fp, low_nih = mean(base, "mean_fp"), min(f["nih"] for f in base.values())
    bars = [
        (f"every candidate seed's {n}-transform mean > the best baseline seed's ({pct(best)})",
         ", ".join(pct(f["mean_flagged"]) for f in cand.values()),
         all(f["mean_flagged"] > best for f in cand.values())),
        (f"candidate seeds' mean false positives over the transforms <= baseline seeds' ({pct(base_fp, 2)})",
         pct(mean(cand, "mean_fp"), 2), mean(cand, "mean_fp") <= base_fp),
        (f"candidate seeds' mean NIH int8 >= the lowest baseline seed's ({pct(low_nih, 2)})",
         pct(mean(cand, "nih"), 2), mean(cand, "nih") >= low_nih),
        ("every candidate seed flags >= 19 of 22 untransformed", ", ".join(str(f["flagged"]) for f in cand.values()),
         all(f["flagged"] >= 19 for f in cand.values())),
        ("every candidate seed: untransformed false positives <= 1%", ", ".join(pct(f["fp"]) for f in cand.values()),
         all(f["fp"] <= 0.01 for f in cand.values())),
        ("candidate seeds' mean untransformed uncertain <= 5%", pct(mean(cand, "uncertain")),
         mean(cand, "uncertain") <= 0.05),
    ]
    print()
    print("| bar | candidate | holds |")
    print("|---|---:|---|")
    for name, value, ok in bars:
        print(f"| {name} | {value} | {'yes' if ok else '**no**'} |")
    print()
    print("means over seeds: baseline", pct(mean(base, "mean_flagged")), "candidate", pct(mean(cand, "mean_flagged")),
          "(17-transform mean of parasites flagged)")
    print("candidate goes to the report fold:", "yes" if all(ok for *_, ok in bars) else "no")


if __name__ == "__main__":
    main()
