"""The rule's quantities per block from `python -m benchmarks smear` reports, baseline and candidate side by side.

    python docs/results/2026-12-07-spanning/compare.py BASE.json CAND.json [BASE.json CAND.json ...]

Prints a Markdown table: parasites flagged (called parasitized or uncertain), calls off parasites (counted
parasitized calls on no annotated parasite, `calls_off_parasites`) per 1,000 red cells counted, uninfected
called parasitized and uncertain, and the pooled calls per 1,000 of each side.
"""

import json
import sys


def figures(path: str) -> dict:
    s = json.load(open(path))["summary"]
    n = s["annotated_parasites"]
    return {"parasites": n, "flagged": round(s["parasite_recall_called"] * n),
            "calls": s["calls_off_parasites"], "red": s["red_cells_read"],
            "fp": 100 * s["uninfected_false_positive_rate"], "unc": 100 * s["uninfected_uncertain_rate"]}


def main(paths: list[str]) -> None:
    if not paths or len(paths) % 2:
        sys.exit(__doc__)
    print("| block | parasites flagged | calls off parasites (per 1,000 red cells) | uninfected called parasitized |"
          " uncertain |")
    print("|---|---:|---:|---:|---:|")
    tot = {"b": [0, 0, 0], "c": [0, 0, 0]}
    for base, cand in zip(paths[::2], paths[1::2]):
        b, c = figures(base), figures(cand)
        block = json.load(open(cand))["command"].split("--fields ")[1].split()[0][:8]
        for k, f in (("b", b), ("c", c)):
            tot[k] = [tot[k][0] + f["flagged"], tot[k][1] + f["calls"], tot[k][2] + f["red"]]
        print(f"| {block} ({b['parasites']} parasites, {c['red']:,} red cells) | {b['flagged']} -> {c['flagged']} | "
              f"{b['calls']} ({1000 * b['calls'] / b['red']:.1f}) -> "
              f"{c['calls']} ({1000 * c['calls'] / c['red']:.1f}) | "
              f"{b['fp']:.2f}% -> {c['fp']:.2f}% | {b['unc']:.2f}% -> {c['unc']:.2f}% |")
    b, c = tot["b"], tot["c"]
    print(f"| pooled | {b[0]} -> {c[0]} | {b[1]} ({1000 * b[1] / b[2]:.1f}) -> {c[1]} ({1000 * c[1] / c[2]:.1f}) | | |")


if __name__ == "__main__":
    main(sys.argv[1:])
