"""The per-block site-adaptation table (issue 25), from the `site-adapt.json` each `train site-adapt` run writes.

    python docs/results/2026-12-08-site-adapt-blocks/table.py RUN_DIR... [--json table.json]   # repo root

One row per run: the block (site), k, the held-out fields and their parasites, the site crops it learned from,
parasites flagged (called parasitized or uncertain, at the run's bar) before -> after as counts, false positives
and uncertain share of the held-out uninfected cells before -> after, the NIH sample (int8) before -> after,
training and export minutes, and the model the command kept. Then, per k, the rows pooled (counts summed, rates
weighted by each block's uninfected cells), and parasites flagged by stage (from `before.json` / `after.json`).
"Before" is the run's `--release` (here each block's fold model, which never saw the block); the numbers are the
command's own, nothing is recomputed.
"""

import argparse
import json
import sys
from pathlib import Path


def counts(side: dict) -> dict:
    """Parasites flagged and the uninfected cells behind the rates, as counts, from one side of site-adapt.json."""
    parasites = side["annotated_parasites"]
    # red_cells_read = parasites read + uninfected read; the rates are over the uninfected cells read
    return {"parasites": parasites, "flagged": round(side["parasite_recall_called"] * parasites),
            "fp_rate": side["uninfected_false_positive_rate"], "unc_rate": side["uninfected_uncertain_rate"],
            "fields": side["fields"], "cells": side["annotated_cells"]}


STAGES = ("ring", "trophozoite", "schizont", "gametocyte")


def stages(path: Path) -> dict[str, list[int]]:
    """Per stage, [annotated, flagged] summed over the held-out fields of one side's per-field rows."""
    out = {s: [0, 0] for s in STAGES}
    for r in json.loads(path.read_text())["rows"]:
        for s in STAGES:
            out[s][0] += (r.get("stage_annotated") or {}).get(s, 0)
            out[s][1] += (r.get("stage_called") or {}).get(s, 0)
    return out


def row(path: Path) -> dict:
    d = json.loads((path / "site-adapt.json").read_text())
    b, a = counts(d["before"]), counts(d["after"])
    uninfected = d["before"]["red_cells_read"] - b["parasites"]  # weight for pooling (approximate: parasites read)
    return {"run": path.name, "site": d["site"], "k": len(d["adapt_fields"]), "held_out": len(d["held_out"]),
            "held_out_fields": d["held_out"], "cells": b["cells"], "parasites": b["parasites"],
            "site_crops": d["site_crops"], "lr": d["preset"]["lr"],
            "flagged_before": b["flagged"], "flagged_after": a["flagged"],
            "fp_before": b["fp_rate"], "fp_after": a["fp_rate"],
            "unc_before": b["unc_rate"], "unc_after": a["unc_rate"],
            "nih_before": d["nih_sample"]["before"], "nih_after": d["nih_sample"]["after"],
            "train_min": d["train_seconds"] / 60, "convert_min": d["convert_seconds"] / 60,
            "kept": "site model" if d["keep"] == d["name"] else "before", "reasons": d["reasons"],
            "weight": max(uninfected, 1), "command": d["command"],
            "stages_before": stages(path / "before.json"), "stages_after": stages(path / "after.json")}


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def markdown(rows: list[dict]) -> str:
    head = ("| site | k | held-out fields (cells, parasites) | site crops P / U | parasites flagged | false positives "
            "| uncertain | NIH sample int8 | train + export, min | kept |\n"
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---|")
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['site']} | {r['k']} | {r['held_out']} ({r['cells']}, {r['parasites']}) "
            f"| {r['site_crops'].get('Parasitized', 0)} / {r['site_crops'].get('Uninfected', 0)} "
            f"| {r['flagged_before']} -> {r['flagged_after']} of {r['parasites']} "
            f"| {pct(r['fp_before'])} -> {pct(r['fp_after'])} | {pct(r['unc_before'])} -> {pct(r['unc_after'])} "
            f"| {pct(r['nih_before'])} -> {pct(r['nih_after'])} | {r['train_min']:.1f} + {r['convert_min']:.1f} "
            f"| {r['kept']} |")
    for k in sorted({r["k"] for r in rows}):
        rs = [r for r in rows if r["k"] == k]
        w = sum(r["weight"] for r in rs)
        p = sum(r["parasites"] for r in rs)

        def wmean(key: str, rs=rs, w=w) -> float:
            return sum(r[key] * r["weight"] for r in rs) / w

        lines.append(
            f"| **pooled, {len(rs)} sites** | {k} | {sum(r['held_out'] for r in rs)} "
            f"({sum(r['cells'] for r in rs)}, {p}) "
            f"| | {sum(r['flagged_before'] for r in rs)} -> {sum(r['flagged_after'] for r in rs)} of {p} "
            f"| {pct(wmean('fp_before'))} -> {pct(wmean('fp_after'))} | {pct(wmean('unc_before'))} -> "
            f"{pct(wmean('unc_after'))} | | | site models: {sum(r['kept'] == 'site model' for r in rs)} |")
    lines += ["", "| k | sites | " + " | ".join(f"{s}s flagged" for s in STAGES) + " |",
              "|---:|---:|" + "---:|" * len(STAGES)]
    for k in sorted({r["k"] for r in rows}):
        rs = [r for r in rows if r["k"] == k]
        cells = []
        for s in STAGES:
            n = sum(r["stages_before"][s][0] for r in rs)
            b, a = (sum(r[f"stages_{w}"][s][1] for r in rs) for w in ("before", "after"))
            cells.append(f"{b} -> {a} of {n}" if n else "-")
        lines.append(f"| {k} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="site-adapt output folders")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "site-adapt.json").is_file()]
    if missing:
        print(f"no site-adapt.json in: {', '.join(missing)}", file=sys.stderr)
        return 2
    rows = sorted((row(r) for r in args.runs), key=lambda r: (r["k"], r["site"]))
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
