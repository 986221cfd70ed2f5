"""Before/after tables of 2026-12-07-bg-trained.md from `benchmarks smear --shift all` reports (repo root).

    python docs/results/2026-12-07-bg-trained/compare.py BEFORE/smear.json AFTER/smear.json [--nih B A]

Prints, per transform, parasites flagged (a field the quality gate refused counted as flagging nothing),
uninfected called parasitized and uncertain, before -> after; then the plan's rule lines: untransformed figures
and the means over the 17 transforms ("none" left out).
"""

import json
import sys


def rows(path):
    return {t["transform"]: t["summary"] for t in json.load(open(path))["shift"]}


def pct(v):
    return f"{100 * v:.1f}%"


def main(argv):
    before, after = rows(argv[0]), rows(argv[1])
    print("| transform | parasites flagged, refused fields as none | uninfected called parasitized | uncertain "
          "| fields refused |")
    print("|---|---:|---:|---:|---:|")
    for t, b in before.items():
        a = after[t]
        print(f"| {t} | {pct(b['parasite_recall_called_read'])} -> {pct(a['parasite_recall_called_read'])} "
              f"| {pct(b['uninfected_false_positive_rate'])} -> {pct(a['uninfected_false_positive_rate'])} "
              f"| {pct(b['uninfected_uncertain_rate'])} -> {pct(a['uninfected_uncertain_rate'])} "
              f"| {b['fields_unreadable']} -> {a['fields_unreadable']} |")
    shifted = [t for t in before if t != "none"]

    def mean(rep, key):
        return sum(rep[t][key] for t in shifted) / len(shifted)

    nb, na = before["none"], after["none"]
    print()
    print(f"untransformed: parasites flagged {round(nb['parasite_recall_called_read'] * nb['annotated_parasites'])} -> "
          f"{round(na['parasite_recall_called_read'] * na['annotated_parasites'])} of {nb['annotated_parasites']}; "
          f"uninfected called parasitized {pct(nb['uninfected_false_positive_rate'])} -> "
          f"{pct(na['uninfected_false_positive_rate'])}; uncertain {pct(nb['uninfected_uncertain_rate'])} -> "
          f"{pct(na['uninfected_uncertain_rate'])}; calls off parasites per 1,000 red cells "
          f"{nb['false_calls_per_1000_red_cells']:.1f} -> {na['false_calls_per_1000_red_cells']:.1f}")
    print(f"mean over the {len(shifted)} transforms: parasites flagged (refused as none) "
          f"{pct(mean(before, 'parasite_recall_called_read'))} -> {pct(mean(after, 'parasite_recall_called_read'))}; "
          f"the same with refused fields analysed anyway {pct(mean(before, 'parasite_recall_called'))} -> "
          f"{pct(mean(after, 'parasite_recall_called'))}; uninfected called parasitized "
          f"{100 * mean(before, 'uninfected_false_positive_rate'):.2f}% -> "
          f"{100 * mean(after, 'uninfected_false_positive_rate'):.2f}%")
    if "--nih" in argv:
        i = argv.index("--nih")
        print(f"NIH sample int8: {argv[i + 1]} -> {argv[i + 2]}")


if __name__ == "__main__":
    main(sys.argv[1:])
