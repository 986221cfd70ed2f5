"""Each held-out block decided as the slide report would, on a false-call rate measured on the other blocks.

    PYTHONPATH=. python docs/results/2026-12-07-slide-false-calls/combine.py OUT.md SMEAR_JSON...

Beside OUT.md it writes OUT.json (slides and summary) and, per SMEAR_JSON, `<block>-smear.json`: the report
without its per-cell probabilities (`matched_cells`), which is what `convert release --false-calls` reads.

Each SMEAR_JSON is `python -m benchmarks smear --model FOLD_MODEL --fields <one block> --threshold 0.7` of a
`train field-cv` fold model on the block it never saw. Their rows are pooled and `benchmarks.slides.slide_rows`
decides each block twice (as photographed, and with only its calls on no annotated parasite: the slide without
its parasites), with `held_out=True`: each block's false-call rate comes from the other blocks' rows only.
"""

import json
import sys
from pathlib import Path

from benchmarks.slides import false_calls_of, slide_markdown, slide_rows, slide_summary


def main(out: str, *paths: str) -> None:
    rows = []
    for p in paths:
        doc = json.loads(Path(p).read_text())
        doc["fields"] = [{k: v for k, v in r.items() if k != "matched_cells"} for r in doc["fields"]]
        doc.pop("thresholds", None)
        rows += doc["fields"]
        block = min(Path(r["field"]).stem for r in doc["fields"])
        Path(out).with_name(f"{block}-smear.json").write_text(json.dumps(doc, indent=1) + "\n")
    slides = slide_rows(rows, held_out=True)
    summary = slide_summary(slides)
    pooled = false_calls_of(rows, "every block")
    lines = ["| block | calls off parasites | red cells counted | per 1,000 |", "|---|---:|---:|---:|"]
    for s in slides:
        lines.append(f"| {s['slide']} | {s['calls_off_parasites']} | {s['red_cells']:,} | "
                     f"{1000 * s['calls_off_parasites'] / s['red_cells']:.1f} |")
    lines.append(f"| pooled | {pooled.calls} | {pooled.red_cells:,} | {pooled.per_1000:.1f} (upper 95% "
                 f"{pooled.upper_per_1000:.1f}) |")
    text = "\n".join(lines) + "\n\n" + slide_markdown(slides, summary)
    Path(out).write_text(text)
    Path(out).with_suffix(".json").write_text(json.dumps({"slides": slides, "summary": summary}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main(*sys.argv[1:])
