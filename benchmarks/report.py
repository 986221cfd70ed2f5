"""Reports of a benchmark run: terminal tables, JSON, CSV, Markdown, PNG plots; `--compare`; CI gates."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.interleave import NOISY_HALF_WIDTH, ROUNDS, state_line
from benchmarks.run import FIELD_NOTES, KERAS, ROW_FIELDS
from edge_runtime.fileio import atomic_write_text

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


def speedup_cell(q: dict[str, Any]) -> str:
    """"2.51x [2.40-2.63]" (interleaved, with its 95% interval), "noisy" appended when marked so; "2.51x (apart)"
    when only the ratio of separately timed p50s exists."""
    s = q.get("speedup_vs_float32")
    if s is None:
        return "-"
    if q.get("speedup_method") == "interleaved":
        cell = f"{s:.2f}x [{q['speedup_ci95_low']:.2f}-{q['speedup_ci95_high']:.2f}]"
        return cell + (" noisy" if q.get("speedup_noisy") else "")
    return f"{s:.2f}x (apart)"


def side_by_side(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """Float32 and each quantized format next to each other: speed-up (interleaved, 95% interval), absolute
    latencies, size, size ratio, accuracy."""
    head = ["model", "thr", "float32", "quantized", "speed-up [95%]", "f32 ms abs", "q ms abs", "f32 MB", "q MB",
            "size ratio", "f32 acc", "q acc", "q drop pp", "agree"]
    lines = [[
        b["model"], q["threads"], b["format"], q["format"], speedup_cell(q), _f(b["latency_p50_ms"], ".2f"),
        _f(q["latency_p50_ms"], ".2f"), _f(b["size_mb"], ".3f"),
        _f(q["size_mb"], ".3f"), _f(q["size_ratio_vs_float32"], ".2f") + "x", _f(b["accuracy"], ".4f"),
        _f(q["accuracy"], ".4f"), _f(q["accuracy_drop_pp"], "+.2f"), _f(q["top1_agreement"], ".4f"),
    ] for b, q in pairs(rows)]
    return _table(head, lines, markdown)


def speedup_notes(report: dict[str, Any]) -> list[str]:
    """How the speed-ups were measured, the machine around them, and what to do about noisy or fallback rows."""
    s = report.get("settings") or {}
    state = report.get("machine_state") or {}
    stop = s.get("stop_within")
    rounds = (f"up to {s.get('rounds', '?')} alternating rounds (a pair stopped after {s.get('min_rounds', '?')} or "
              f"more, an even number, once its 95% interval was within ±{stop:.0%} of the median)" if stop
              else f"{s.get('rounds', '?')} alternating rounds")
    out = [f"Speed-up = float32 time / quantized time, both files in one process, timed in {rounds} "
           f"of at least {s.get('min_time_s', '?')} s per file each (order flipped each round): the median "
           "of the per-round ratios and its 95% bootstrap interval. The ms columns are absolute p50s, each timed in "
           "its own process: load-sensitive, not for comparing formats.",
           f"Machine before: {state_line(state.get('before'))}.",
           f"Machine after: {state_line(state.get('after'))}."]
    ps = pairs(report["rows"])
    noisy = [q for _, q in ps if q.get("speedup_noisy")]
    if noisy:
        out.append(f"{len(noisy)} of {len(ps)} speed-ups are noisy (95% interval reaches further than "
                   f"{NOISY_HALF_WIDTH:.0%} from the median): other work moved them; rerun with more rounds "
                   f"(`--rounds {2 * int(s.get('rounds') or ROUNDS)}`) and close other work (busiest others above).")
    apart = [q for _, q in ps if q.get("speedup_method") == "separate-p50"]
    if apart:
        out.append(f"{len(apart)} speed-up(s) marked (apart) are ratios of separately timed p50s: their interleaved "
                   "run failed (`speedup_error` in benchmark.json says why).")
    return out


def _ok(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] == "ok"]


def first_use_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """What a device pays before the steady state: process start, load, the first image, the warm-up calls."""
    head = ["model", "format", "thr", "cold s", "init ms", "first e2e ms", "first inf ms", "warm-up calls ms",
            "steady p50 ms"]
    lines = [[r["model"], r["format"], r["threads"], _f(r["cold_start_s"], ".2f"), _f(r["init_ms"], ".1f"),
              _f(r["first_e2e_ms"], ".2f"), _f(r["first_infer_ms"], ".2f"),
              " ".join(format(v, ".3g") for v in r["warmup_ms"] or []) or "-", _f(r["latency_p50_ms"], ".2f")]
             for r in _ok(rows)]
    return _table(head, lines, markdown)


def steady_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """Steady state per thread count: inference alone and end to end, latency, CPU time and energy per image."""
    head = ["model", "format", "thr", "inf p50", "p90", "p99", "CPU ms/img", "cores busy", "mJ/img", "e2e p50",
            "p90", "p99", "e2e CPU ms/img", "e2e mJ/img", "e2e input"]
    lines = [[r["model"], r["format"], r["threads"], _f(r["latency_p50_ms"], ".2f"), _f(r["latency_p90_ms"], ".2f"),
              _f(r["latency_p99_ms"], ".2f"), _f(r["cpu_ms_per_image"], ".2f"), _f(r["cpu_cores_busy"], ".2f"),
              _f(r["energy_mj_per_image"], ".2f"), _f(r["e2e_p50_ms"], ".2f"), _f(r["e2e_p90_ms"], ".2f"),
              _f(r["e2e_p99_ms"], ".2f"), _f(r["e2e_cpu_ms_per_image"], ".2f"), _f(r["e2e_energy_mj_per_image"], ".2f"),
              r["e2e_input"] or "-"] for r in _ok(rows)]
    return _table(head, lines, markdown)


def thread_choice(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """Per artifact measured at several thread counts: the fastest count against the one that costs least CPU."""
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in _ok(rows):
        if r["cpu_ms_per_image"] is not None:
            by.setdefault((r["model"], r["format"]), []).append(r)
    head = ["model", "format", "fastest thr", "p50 ms", "CPU ms/img", "least-CPU thr", "p50 ms", "CPU ms/img",
            "fastest costs"]
    lines = []
    for (model, fmt), rs in by.items():
        if len(rs) < 2:
            continue
        fast = min(rs, key=lambda r: r["latency_p50_ms"])
        lean = min(rs, key=lambda r: r["cpu_ms_per_image"])
        extra = (fast["cpu_ms_per_image"] / lean["cpu_ms_per_image"] - 1) * 100 if lean["cpu_ms_per_image"] else None
        lines.append([model, fmt, fast["threads"], _f(fast["latency_p50_ms"], ".2f"),
                      _f(fast["cpu_ms_per_image"], ".2f"),
                      lean["threads"], _f(lean["latency_p50_ms"], ".2f"), _f(lean["cpu_ms_per_image"], ".2f"),
                      "same" if fast is lean else _f(extra, "+.0f") + "% CPU"])
    return _table(head, lines, markdown) if lines else "(one thread count measured: no sweep)"


def energy_line(report: dict[str, Any]) -> str:
    """Whether energy per image was measured, and from what; or why not."""
    e = report.get("energy") or {}
    if e.get("available"):
        return (f"Energy (RAPL): measured from {', '.join(e['domains'])} (whole CPU package: other processes on "
                f"the machine count too).")
    return f"RAPL: absent on this machine ({e.get('reason') or 'not checked'}); energy per image is not reported."


def peaks_table(peaks: list[dict[str, Any]], markdown: bool = False) -> str:
    head = ["runtime", "precision", "threads", "GEMM", "p50 ms", "best ms", "GMAC/s (best)"]
    lines = [[p["runtime"], p["precision"], p["threads"], p["op"], _f(p["latency_p50_ms"], ".2f"),
              _f(p.get("latency_min_ms"), ".2f"),
              _f(p["gmacs_per_s"], ".1f") if p["status"] == "ok" else "FAILED: " + (p["error"] or "")[:60]]
             for p in peaks]
    return _table(head, lines, markdown)


def phases_table(report: dict[str, Any], markdown: bool = False) -> str:
    """Where the run's time and memory went (`benchmarks.phases`); empty for reports written before it."""
    phases = report.get("phases") or []
    head = ["phase", "wall s", "CPU s", "cores busy", "peak RSS MB (process tree)"]
    lines = [[p["phase"], _f(p["wall_s"], ".0f"), _f(p["cpu_s"], ".0f"), _f(p.get("cores_busy"), ".2f"),
              _f(p.get("peak_rss_mb"), ".0f")] for p in phases]
    return _table(head, lines, markdown) if lines else ""


def phases_section(report: dict[str, Any], markdown: bool = False) -> list[str]:
    table = phases_table(report, markdown)
    if not table:
        return []
    exp = report.get("expected_s") or {}
    said = (f" The first line expected {(exp['build'] + exp['timing']) / 60:.0f} min on an idle 2-core machine."
            if exp else "")
    head = ("## Where the time went" if markdown else "where the time went (CPU: user + system, children included):")
    note = ("CPU time is user + system of the run and every child process (build steps, probes), what the run "
            "cost whatever else the machine did; peak RSS is the whole process tree, summed." + said)
    out = [head, "", table, "", note, ""] if markdown else ["", head, "", table, note]
    steps = report.get("build_steps") or []
    if steps:
        st = _table(["job", "build step", "wall s", "CPU s", "peak RSS MB"],
                    [[s.get("job", "-"), s["step"], _f(s["wall_s"], ".0f"), _f(s.get("cpu_s"), ".0f"),
                      _f(s.get("peak_rss_mb"), ".0f")] for s in steps], markdown)
        out += (["Build steps (each its own process; peak RSS: its largest process):", "", st, ""] if markdown
                else ["", "build steps (each its own process; peak RSS: its largest process):", "", st])
    return out


def machine_line(report: dict[str, Any]) -> str:
    m = report["machine"]
    state = report.get("machine_state") or {}
    ends = [(state.get(k) or {}).get("load_average") for k in ("before", "after")]
    # 1-minute load at start and end: from the machine state; reports written before it kept them in the machine.
    load = [e[0] for e in ends] if all(ends) else m.get("load_average_1min")
    busy = "" if load is None else f"; load average {load[0]:.1f} at start, {load[1]:.1f} at end"
    return (f"{m['cpu_model']} ({m['arch']}, {m['cores']} cores; SIMD: {', '.join(m['simd']) or 'none found'}), "
            f"{m['os']}, Python {m['python']}{busy}")


def scope_section(report: dict[str, Any], markdown: bool = False) -> list[str]:
    """Which formats each model ran with, and the Keras reference's threads (with the flags for the rest), then a
    blank line; none in older reports."""
    scope = report.get("scope") or []
    if not scope:
        return []
    spec = (report.get("settings") or {}).get("formats_spec")
    head = "What ran" + (f" (`--formats {spec}`)" if spec else "") + ":"
    return [head, *[f"- {line}" if markdown else f"  {line}" for line in scope], ""]


def terminal(report: dict[str, Any]) -> str:
    rows = report["rows"]
    parts = [f"medge benchmark, {report['created']} on {machine_line(report)}", "", *scope_section(report),
             "float32 vs quantized (same runtime and threads; speed-up and size ratio = float32 / quantized):", "",
             side_by_side(rows), "", *speedup_notes(report), "",
             ("all rows (absolute latency, load-sensitive: batch 1 after warm-up; img/s at batch "
              f"{report['settings']['batch']}; RSS and cold start of a fresh process; drop and agreement vs Keras):"),
             "", rows_table(rows), "",
             "what a device sees first (fresh process: load, first image end to end, warm-up calls, steady state):",
             "", first_use_table(rows), "",
             "steady state per thread count (inference alone and end to end; CPU time summed over all threads):",
             "", steady_table(rows), "", energy_line(report), "",
             "thread choice (fastest vs least CPU per image, the battery's cost):", "", thread_choice(rows), "",
             "machine peak (one large matrix product per runtime):", "", peaks_table(report["peaks"]),
             *phases_section(report)]
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
             *scope_section(report, markdown=True),
             "## Float32 vs quantized", "", side_by_side(report["rows"], markdown=True), "",
             *[line + "\n" for line in speedup_notes(report)],
             "## All rows", "", ("Latencies here are absolute and load-sensitive (each row timed in its own "
                                 "process); the speed-ups above are the interleaved figures."), "",
             rows_table(report["rows"], markdown=True), "",
             "## What a device sees first", "",
             "A fresh process per row: load, the first image end to end (decode + preprocess + inference) and its "
             "inference alone, the next calls one by one, then the steady state.", "",
             first_use_table(report["rows"], markdown=True), "",
             "## Steady state and battery cost per thread count", "",
             "Inference alone (`EdgeModel.run`) and end to end (`EdgeModel.predict` on the image file). CPU time is "
             "the process's, summed over all threads: the battery's cost, which more threads can raise while "
             "latency falls.", "", energy_line(report), "", steady_table(report["rows"], markdown=True), "",
             "## Thread choice", "", thread_choice(report["rows"], markdown=True), "",
             "## Machine peak", "", peaks_table(report["peaks"], markdown=True), "",
             *phases_section(report, markdown=True),
             "## Fields", "", *[f"- `{k}`: {v}" for k, v in FIELD_NOTES.items()], ""]
    if any(r.get("synthetic_data") for r in report["rows"]):
        parts += ["OCT rows are scored on synthetic scans with a random (not ImageNet) InceptionV3 base: "
                  "their accuracy tests the pipeline, not the model.", ""]
    return "\n".join(parts)


def rows_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(ROW_FIELDS), extrasaction="ignore")
    w.writeheader()
    # A list (the warm-up calls) is one cell, its values space-separated.
    w.writerows({k: " ".join(format(x, ".4g") for x in v) if isinstance(v, list) else v for k, v in r.items()}
                for r in rows)
    return buf.getvalue()


# Numbered labels beside the plot points: a label's box in pixels (fontsize 8) and the spots tried around a point.
LABEL_H, LABEL_CHAR_W, LABEL_GAP, MARKER_R = 11.0, 6.0, 4.0, 5.0
LABEL_RADII = (9, 13, 18, 24, 31, 40, 50, 62, 76)
LABEL_ANGLES = (45, 135, 315, 225, 90, 270, 0, 180)


def label_offsets(points: Sequence[tuple[float, float]], texts: Sequence[str],
                  bounds: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    """Pixel offsets that put each point's label where it covers no marker and no other label, inside `bounds`.

    Greedy, most crowded point first: the nearest free spot on rings of
    growing radius around the point (the plot draws a leader line to a far
    one); when no spot is free, the least crowded of the outer ring.

    Args:
        points: marker centres in pixels.
        texts: the labels (their length sets the box width).
        bounds: (x0, y0, x1, y1) in pixels that labels must stay inside.
    """
    import math

    def box(cx: float, cy: float, text: str) -> tuple[float, float, float, float]:
        # with a gap around it, so that "4" beside "7" never reads as "47"
        w, h = LABEL_CHAR_W * len(text) + LABEL_GAP, LABEL_H + LABEL_GAP / 2
        return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2

    def hits(b: tuple[float, float, float, float], others: list[tuple[float, float, float, float]]) -> int:
        return sum(b[0] < o[2] and o[0] < b[2] and b[1] < o[3] and o[1] < b[3] for o in others)

    markers = [(x - MARKER_R, y - MARKER_R, x + MARKER_R, y + MARKER_R) for x, y in points]
    crowd = [sum(math.dist(p, q) < 40 for q in points) for p in points]
    placed: list[tuple[float, float, float, float]] = []
    out: list[tuple[float, float]] = [(0.0, 0.0)] * len(points)
    for i in sorted(range(len(points)), key=lambda k: -crowd[k]):
        (x, y), best = points[i], None
        for r in LABEL_RADII:
            for a in LABEL_ANGLES:
                dx, dy = r * math.cos(math.radians(a)), r * math.sin(math.radians(a))
                b = box(x + dx, y + dy, texts[i])
                if not (bounds[0] <= b[0] and b[2] <= bounds[2] and bounds[1] <= b[1] and b[3] <= bounds[3]):
                    continue
                n = hits(b, markers) + hits(b, placed)
                if best is None or n < best[0] or (n == best[0] == 0):
                    best = (n, dx, dy, b)
                if n == 0:
                    break
            if best is not None and best[0] == 0:
                break
        if best is None:  # nothing fits inside: keep the label on the point's upper right
            best = (0, LABEL_RADII[0], LABEL_RADII[0], box(x + LABEL_RADII[0], y + LABEL_RADII[0], texts[i]))
        out[i] = (best[1], best[2])
        placed.append(best[3])
    return out


def plots(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """latency_vs_size.png and accuracy_vs_latency.png, one point per measured row at the most threads.

    Points are numbered (the same number in both plots), the key beside the
    axes names each; labels are placed clear of the markers and of each
    other, so 20-30 points stay readable when formats of two models crowd.
    """
    import matplotlib  # optional: plots only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: plots only
    import matplotlib.ticker  # loads matplotlib.ticker for the formatters below

    ok = [r for r in rows if r["status"] == "ok" and r["latency_p50_ms"]]
    if not ok:
        return []
    top = max(r["threads"] for r in ok)
    ok = [r for r in ok if r["threads"] == top]
    models = list(dict.fromkeys(r["model"] for r in ok))
    colors = {m: plt.cm.tab10(i) for i, m in enumerate(models)}
    dpi, size = 100, (11.5, 6.2)
    written = []
    for fname, xkey, ykey, xlabel, ylabel in (
        (PLOT_SIZE, "size_mb", "latency_p50_ms", "file size (MB)", "latency p50, batch 1 (ms)"),
        (PLOT_ACCURACY, "latency_p50_ms", "accuracy", "latency p50, batch 1 (ms)", "accuracy"),
    ):
        fig = plt.figure(figsize=size, dpi=dpi)
        ax = fig.add_axes((0.085, 0.1, 0.585, 0.8))  # fixed place: the pixel positions below stay true when saved
        drawn = [(n, r) for n, r in enumerate(ok, 1) if r[xkey] is not None and r[ykey] is not None]
        for _, r in drawn:
            marker = "s" if r["format"] == KERAS else ("^" if r["precision"] == "int8" else "o")
            ax.scatter(r[xkey], r[ykey], color=colors[r["model"]], marker=marker, s=36, zorder=3,
                       edgecolors="white", linewidths=0.5)
        # Log axes labelled as plain numbers (a narrow range gets labelled minor ticks: "0.102", not "1.02x10^-1").
        axes = [ax.xaxis] + ([ax.yaxis] if ykey == "latency_p50_ms" else [])
        ax.set_xscale("log")
        if ykey == "latency_p50_ms":
            ax.set_yscale("log")
        ax.margins(0.15)
        ax.autoscale_view()
        for axis, (lo, hi) in zip(axes, (ax.get_xlim(), ax.get_ylim())):
            axis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            axis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g") if hi / lo < 20
                                     else matplotlib.ticker.NullFormatter())
        if drawn:
            pix = ax.transData.transform([(r[xkey], r[ykey]) for _, r in drawn])
            bb = ax.get_window_extent()
            texts = [str(n) for n, _ in drawn]
            offs = label_offsets([tuple(p) for p in pix], texts, (bb.x0 + 2, bb.y0 + 2, bb.x1 - 2, bb.y1 - 2))
            for (_n, r), text, (dx, dy) in zip(drawn, texts, offs):
                far = (dx * dx + dy * dy) ** 0.5 > LABEL_RADII[1] + 1
                ax.annotate(text, (r[xkey], r[ykey]), xytext=(dx, dy), textcoords="offset pixels", fontsize=8,
                            ha="center", va="center", color=colors[r["model"]], fontweight="bold", zorder=4,
                            bbox=dict(boxstyle="square,pad=0.05", fc="white", ec="none", alpha=0.75),
                            arrowprops=dict(arrowstyle="-", lw=0.5, color="0.5", shrinkA=0, shrinkB=3) if far else None)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} vs {xlabel} ({top} threads; triangles int8, squares Keras, circles float)", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        # The key: one line per number, coloured by model.
        step = min(0.035, 0.86 / max(len(ok), 1))
        fig.text(0.70, 0.93, "key (model, format)", fontsize=9, fontweight="bold", va="top")
        for n, r in enumerate(ok, 1):
            fig.text(0.70, 0.93 - step * (n + 0.3), f"{n:>2}  {r['model']}  {r['format']}",
                     fontsize=8 if step >= 0.028 else 7,
                     va="top", color=colors[r["model"]], family="monospace")
        path = out / fname
        tmp = path.with_name(".tmp-" + path.name)
        fig.savefig(tmp, dpi=dpi, format="png")
        plt.close(fig)
        os.replace(tmp, path)
        written.append(path)
    return written


def write_all(report: dict[str, Any], out: Path) -> list[Path]:
    """JSON, CSV, Markdown and the plots in `out`; the paths written."""
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

COMPARED = (("latency_p50_ms", ".2f", "ms"), ("e2e_p50_ms", ".2f", "ms"), ("cpu_ms_per_image", ".2f", "ms"),
            ("throughput_ips", ".1f", "img/s"), ("size_mb", ".3f", "MB"), ("peak_rss_mb", ".0f", "MB"),
            ("accuracy", ".4f", ""), ("top1_agreement", ".4f", ""))


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
    for k in before:
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
