"""Reports of a benchmark run: terminal tables, JSON, CSV, Markdown, PNG plots; `--compare`; CI gates."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Sequence

from benchmarks.run import FIELD_NOTES, KERAS, ROW_FIELDS

RESULTS_JSON, RESULTS_CSV, RESULTS_MD = "benchmark.json", "benchmark.csv", "benchmark.md"
PLOT_SIZE, PLOT_ACCURACY = "latency_vs_size.png", "accuracy_vs_latency.png"


def _f(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _table(head: Sequence[str], lines: Sequence[Sequence[Any]], markdown: bool = False) -> str:
    cells = [[str(c) for c in l] for l in lines]
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(out + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *cells)]
    line = lambda cs: "  ".join(str(c).ljust(w) for c, w in zip(cs, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, cells)])


def rows_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """Every row: speed, size, memory, quality; a failed row says FAILED [n], its error listed under the table."""
    head = ["model", "format", "thr", "p50 ms", "p90 ms", "p99 ms", "img/s", "MB", "RSS MB", "cold s", "acc",
            "sens", "spec", "drop pp", "agree", "peak %"]
    lines, errors = [], []
    for r in rows:
        if r["status"] != "ok":
            err = r["error"] or "unknown error"
            if err not in errors:
                errors.append(err)
            lines.append([r["model"], r["format"], _f(r["threads"], "d"), f"FAILED [{errors.index(err) + 1}]"]
                         + [""] * (len(head) - 4))
            continue
        lines.append([
            r["model"], r["format"], r["threads"], _f(r["latency_p50_ms"], ".2f"), _f(r["latency_p90_ms"], ".2f"),
            _f(r["latency_p99_ms"], ".2f"), _f(r["throughput_ips"], ".1f"), _f(r["size_mb"], ".3f"),
            _f(r["peak_rss_mb"], ".0f"), _f(r["cold_start_s"], ".2f"), _f(r["accuracy"], ".4f"),
            _f(r["sensitivity"], ".3f"), _f(r["specificity"], ".3f"), _f(r["accuracy_drop_pp"], "+.2f"),
            _f(r["top1_agreement"], ".4f"), _f(r["peak_fraction"] * 100 if r["peak_fraction"] else None, ".1f"),
        ])
    notes = [f"[{i}] {e}" for i, e in enumerate(errors, 1)]
    if markdown:
        notes = [n.replace("|", "\\|") + "  " for n in notes]
    return _table(head, lines, markdown) + ("\n\n" + "\n".join(notes) if notes else "")


def pairs(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(float32 row, quantized row) of the same model, runtime and threads, both measured."""
    base = {(r["model"], r["runtime"], r["threads"]): r for r in rows
            if r["status"] == "ok" and r["precision"] == "float32" and r["format"] != KERAS}
    return [(base[(r["model"], r["runtime"], r["threads"])], r) for r in rows
            if r["status"] == "ok" and r["precision"] != "float32" and (r["model"], r["runtime"], r["threads"]) in base]


def side_by_side(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """Float32 and each quantized format next to each other: latency, speed-up, size, size ratio, accuracy."""
    head = ["model", "thr", "float32", "quantized", "f32 ms", "q ms", "speed-up", "f32 MB", "q MB", "size ratio",
            "f32 acc", "q acc", "q drop pp", "agree"]
    lines = [[
        b["model"], q["threads"], b["format"], q["format"], _f(b["latency_p50_ms"], ".2f"),
        _f(q["latency_p50_ms"], ".2f"), _f(q["speedup_vs_float32"], ".2f") + "x", _f(b["size_mb"], ".3f"),
        _f(q["size_mb"], ".3f"), _f(q["size_ratio_vs_float32"], ".2f") + "x", _f(b["accuracy"], ".4f"),
        _f(q["accuracy"], ".4f"), _f(q["accuracy_drop_pp"], "+.2f"), _f(q["top1_agreement"], ".4f"),
    ] for b, q in pairs(rows)]
    return _table(head, lines, markdown)


def peaks_table(peaks: list[dict[str, Any]], markdown: bool = False) -> str:
    head = ["runtime", "precision", "threads", "GEMM", "p50 ms", "best ms", "GMAC/s (best)"]
    lines = [[p["runtime"], p["precision"], p["threads"], p["op"], _f(p["latency_p50_ms"], ".2f"),
              _f(p.get("latency_min_ms"), ".2f"),
              _f(p["gmacs_per_s"], ".1f") if p["status"] == "ok" else "FAILED: " + (p["error"] or "")[:60]]
             for p in peaks]
    return _table(head, lines, markdown)


def machine_line(report: dict[str, Any]) -> str:
    m = report["machine"]
    load = m.get("load_average_1min")
    busy = "" if load is None else f"; load average {load[0]:.1f} at start, {load[1]:.1f} at end"
    return (f"{m['cpu_model']} ({m['arch']}, {m['cores']} cores; SIMD: {', '.join(m['simd']) or 'none found'}), "
            f"{m['os']}, Python {m['python']}{busy}")


def terminal(report: dict[str, Any]) -> str:
    rows = report["rows"]
    parts = [f"medge benchmark, {report['created']} on {machine_line(report)}", "",
             "float32 vs quantized (same runtime and threads; speed-up and size ratio = float32 / quantized):", "",
             side_by_side(rows), "", "all rows (latency at batch 1 after warm-up; img/s at batch "
             f"{report['settings']['batch']}; RSS and cold start of a fresh process; drop and agreement vs Keras):",
             "", rows_table(rows), "", "machine peak (one large matrix product per runtime):", "",
             peaks_table(report["peaks"])]
    if any(r.get("synthetic_data") for r in rows):
        parts += ["", "note: OCT rows are scored on synthetic scans with a random (not ImageNet) base; their "
                      "accuracy tests the pipeline, not the model."]
    return "\n".join(parts)


def markdown(report: dict[str, Any]) -> str:
    v = report["versions"]
    parts = [f"# medge benchmark, {report['created']}", "",
             f"Machine: {machine_line(report)}.", "",
             "Libraries: " + ", ".join(f"{k} {v[k]}" for k in v) + ".", "",
             f"Command: `{report['command']}` ({report['seconds']:.0f} s).", "",
             "## Float32 vs quantized", "", side_by_side(report["rows"], markdown=True), "",
             "## All rows", "", rows_table(report["rows"], markdown=True), "",
             "## Machine peak", "", peaks_table(report["peaks"], markdown=True), "",
             "## Fields", "", *[f"- `{k}`: {v}" for k, v in FIELD_NOTES.items()], ""]
    if any(r.get("synthetic_data") for r in report["rows"]):
        parts += ["OCT rows are scored on synthetic scans with a random (not ImageNet) InceptionV3 base: "
                  "their accuracy tests the pipeline, not the model.", ""]
    return "\n".join(parts)


def rows_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(ROW_FIELDS), extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def plots(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """latency_vs_size.png and accuracy_vs_latency.png, one point per measured row at the most threads."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (loads matplotlib.ticker for the formatters below)

    ok = [r for r in rows if r["status"] == "ok" and r["latency_p50_ms"]]
    if not ok:
        return []
    top = max(r["threads"] for r in ok)
    ok = [r for r in ok if r["threads"] == top]
    models = sorted({r["model"] for r in ok})
    colors = {m: plt.cm.tab10(i) for i, m in enumerate(models)}
    written = []
    for fname, xkey, ykey, xlabel, ylabel in (
        (PLOT_SIZE, "size_mb", "latency_p50_ms", "file size (MB)", "latency p50, batch 1 (ms)"),
        (PLOT_ACCURACY, "latency_p50_ms", "accuracy", "latency p50, batch 1 (ms)", "accuracy"),
    ):
        fig, ax = plt.subplots(figsize=(8, 5.5))
        for r in ok:
            if r[xkey] is None or r[ykey] is None:
                continue
            marker = "s" if r["format"] == KERAS else ("^" if r["precision"] == "int8" else "o")
            ax.scatter(r[xkey], r[ykey], color=colors[r["model"]], marker=marker, s=40)
            ax.annotate(r["format"], (r[xkey], r[ykey]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for m in models:
            ax.scatter([], [], color=colors[m], label=m)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        if ykey == "latency_p50_ms":
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} vs {xlabel} ({top} threads; triangles int8, squares Keras)", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / fname
        tmp = path.with_name(".tmp-" + path.name)
        fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
        os.replace(tmp, path)
        written.append(path)
    return written


def write_all(report: dict[str, Any], out: Path) -> list[Path]:
    """JSON, CSV, Markdown and the plots in `out`; the paths written."""
    from edge_runtime.fileio import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / RESULTS_JSON, json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / RESULTS_CSV, rows_csv(report["rows"]))
    atomic_write_text(out / RESULTS_MD, markdown(report))
    written = [out / RESULTS_JSON, out / RESULTS_CSV, out / RESULTS_MD]
    try:
        written += plots(report["rows"], out)
    except ImportError as e:  # matplotlib is in the `train` extra; the numbers matter more than the pictures
        print(f"plots skipped ({e}); pip install 'medge[train]' for matplotlib")
    return written


# ---------------------------------------------------------------- compare and gates

COMPARED = (("latency_p50_ms", ".2f", "ms"), ("throughput_ips", ".1f", "img/s"), ("size_mb", ".3f", "MB"),
            ("peak_rss_mb", ".0f", "MB"), ("accuracy", ".4f", ""), ("top1_agreement", ".4f", ""))


def compare(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What changed per row (model, format, threads) between two benchmark.json files."""
    key = lambda r: (r["model"], r["format"], r["threads"])  # noqa: E731
    before = {key(r): r for r in old.get("rows", [])}
    head = ["model", "format", "thr", "status"] + [f"{k} ({u})" if u else k for k, _, u in COMPARED]
    lines = []
    for r in new["rows"]:
        o = before.pop(key(r), None)
        if o is None:
            lines.append([*key(r), f"new ({r['status']})"] + [""] * len(COMPARED))
            continue
        status = r["status"] if o["status"] == r["status"] else f"{o['status']} -> {r['status']}"
        cells = []
        for k, spec, _ in COMPARED:
            a, b = o.get(k), r.get(k)
            if a is None or b is None:
                cells.append(f"{_f(a, spec)} -> {_f(b, spec)}" if a != b else "-")
            elif a == b:
                cells.append(format(b, spec))
            else:
                rel = f" ({(b - a) / a * 100:+.0f}%)" if a else ""
                cells.append(f"{format(a, spec)} -> {format(b, spec)}{rel}")
        lines.append([*key(r), status, *cells])
    for k, o in before.items():
        lines.append([*k, "gone"] + [""] * len(COMPARED))
    m_old, m_new = old.get("machine", {}), new["machine"]
    note = "" if m_old.get("cpu_model") == m_new.get("cpu_model") else \
        f"\nnote: different machines ({m_old.get('cpu_model')} -> {m_new.get('cpu_model')})"
    return f"compared with the run of {old.get('created', '?')}:\n\n" + _table(head, lines) + note


def gates(rows: list[dict[str, Any]], max_drop_pp: float | None, min_speedup: float | None) -> list[str]:
    """Why an int8 row fails the user's thresholds (empty: all pass). A failed int8 row fails a gate too."""
    problems = []
    for r in rows:
        if r["precision"] != "int8" or (max_drop_pp is None and min_speedup is None):
            continue
        where = f"{r['model']} {r['format']} threads={r['threads']}"
        if r["status"] != "ok":
            problems.append(f"{where}: not measured ({r['error']})")
            continue
        if max_drop_pp is not None and r["accuracy_drop_pp"] is not None and r["accuracy_drop_pp"] > max_drop_pp:
            problems.append(f"{where}: accuracy drop {r['accuracy_drop_pp']:.2f} pp > --max-drop {max_drop_pp}")
        if min_speedup is not None:
            s = r["speedup_vs_float32"]
            if s is None:
                problems.append(f"{where}: no float32 row of the same runtime to compute a speed-up")
            elif s < min_speedup:
                problems.append(f"{where}: speed-up {s:.2f}x < --min-speedup {min_speedup}")
    return problems
