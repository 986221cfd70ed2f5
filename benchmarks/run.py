"""Benchmark prepared models: one flat row per model x format x thread count, plus the Keras reference.

Speed, memory and cold start are measured in a separate process per row
(`benchmarks.probe`: what a device pays on first use, with the thread count
set before the runtime starts); the speed-up of each quantized row over the
float32 file of its runtime in one more process per pair and thread count,
both files timed interleaved (`benchmarks.interleave`), so that load from
other processes falls on both alike; accuracy and agreement with Keras in this
process, on the same preprocessed images for every row (Pillow preprocessing,
as on a device). A row that fails at any step keeps its error and the run
goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import edge_runtime
from benchmarks.cache import REPO, Prepared
from benchmarks.interleave import MIN_TIME_S, ROUNDS, STOP_WITHIN
from benchmarks.peak import peak_for
from convert.formats import Format
from edge_runtime.images import ImageError, is_image_file, load_and_preprocess
from edge_runtime.model import first_line
from train import runs
from train.evaluate import load_model
from train.metrics import binary_rates, classification_metrics
from train.split import read_manifest

KERAS = "keras"  # format name of the reference row

# Every row has these fields, in this order (CSV columns); units are in the names.
ROW_FIELDS = (
    "model", "format", "precision", "runtime", "backend", "backend_version", "threads", "status", "error",
    "file", "size_mb", "weights", "macs", "latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "latency_runs",
    "throughput_batch", "throughput_mode", "throughput_ips", "peak_rss_mb", "cold_start_s", "load_s",
    "init_ms", "first_e2e_ms", "first_infer_ms", "warmup_ms", "cpu_ms_per_image", "cpu_cores_busy",
    "energy_mj_per_image", "e2e_input", "e2e_p50_ms", "e2e_p90_ms", "e2e_p99_ms", "e2e_runs",
    "e2e_cpu_ms_per_image", "e2e_energy_mj_per_image",
    "n_images", "accuracy", "sensitivity", "specificity", "accuracy_drop_pp", "top1_agreement", "max_abs_dprob",
    "speedup_vs_float32", "speedup_ci95_low", "speedup_ci95_high", "speedup_noisy", "speedup_rounds",
    "speedup_method", "speedup_error", "size_ratio_vs_float32", "gmacs_per_s", "peak_gmacs_per_s", "peak_fraction",
    "synthetic_data",
)

# One line per field that is not self-explanatory (the Markdown report's legend).
FIELD_NOTES = {
    "format": "a row of convert's format table, or `keras` (the float reference, Keras `predict_on_batch`)",
    "threads": "runtime threads (intra-op), set before the runtime starts",
    "latency_p50_ms": "batch 1, after 5 warm-up calls, through `EdgeModel.run` (quantize, invoke, dequantize), "
                      "at least 20 calls and 1 s (`--min-seconds`); p90/p99 likewise; `latency_runs` timed calls. "
                      "Absolute and load-sensitive: each row is timed in its own process, so other work on the "
                      "machine moves it; compare formats by `speedup_vs_float32`",
    "throughput_ips": "images per second at batch `throughput_batch` (`batched`: one runtime call per batch; "
                      "`looped`: the graph has a fixed batch of 1), the median batch call after one warm-up call, "
                      "timed for at least 1 s (`--min-seconds`) and at least once (a slow model's one call of 16 "
                      "images)",
    "peak_rss_mb": "peak resident memory of a fresh process that imported the runtime, loaded the model and "
                   "classified one image",
    "cold_start_s": "from starting that process to its first result (interpreter start, imports, load, first image)",
    "init_ms": "in that process: `edge_runtime.load` (open the runtime session, read and check the metadata); "
               "for Keras `load_model`",
    "first_e2e_ms": "the first image of that process end to end (decode + preprocess + the first inference, "
                    "`EdgeModel.predict`); `first_infer_ms` its inference alone",
    "warmup_ms": "the next 5 inference calls, each (how fast the runtime settles); then the steady state",
    "cpu_ms_per_image": "process CPU time (user + system, all threads) per image in the steady-state loop of "
                        "inference alone: the battery's cost, which more threads can raise while latency falls; "
                        "`cpu_cores_busy` = CPU time / wall time (threads that spin while waiting count)",
    "energy_mj_per_image": "millijoules per image from Linux powercap/RAPL over the same loop (whole CPU package: "
                           "other processes count too); null where the machine has no readable counter, "
                           "the report says why",
    "e2e_p50_ms": "steady state end to end: `EdgeModel.predict` on the image file (decode + preprocess + inference "
                  "+ result), same loop as latency; `e2e_input` says what went in (the OCT head takes a features "
                  "array, no decoding); p90/p99, `e2e_cpu_ms_per_image`, `e2e_energy_mj_per_image` likewise",
    "accuracy": "on the evaluation inputs; sensitivity/specificity of the positive class "
                "(macro one-vs-rest when there is none)",
    "accuracy_drop_pp": "Keras accuracy minus this row's, percentage points (same inputs)",
    "top1_agreement": "share of inputs where this row's class equals Keras'; max_abs_dprob the largest probability gap",
    "speedup_vs_float32": "float32 time / this row's, same model, runtime and threads, timed interleaved "
                          "(`speedup_method` `interleaved`: both files in one process, alternating rounds, the "
                          "order flipped each round, a round's ratio from each file's fastest call; "
                          "the median of the per-round ratios, `speedup_ci95_low`/`high` its 95% bootstrap interval "
                          "over `speedup_rounds` rounds (at most `--rounds`; fewer when the interval was within "
                          "`--stop-within` after 8 or more), `speedup_noisy` when the interval reaches further than "
                          "15% from it); `separate-p50` (the ratio of the two rows' absolute p50s, timed apart) only "
                          "when the interleaved run failed; size_ratio_vs_float32 likewise",
    "peak_fraction": "achieved MAC/s (macs / p50) over the machine peak of the same runtime and precision "
                     "(int8 GEMM for int8 and dynamic rows, float32 GEMM otherwise)",
}


# Timed seconds per absolute measurement (latency, end to end, throughput) of one row, at least. Half a second
# gives a fast model hundreds of calls (the released malaria int8 file at 2 threads: about 1,000 in 0.5 s, so p99
# is still the tenth-largest call); a slow one is held by its own minimum of calls (`probe`: 20). At 1.0 s, the
# three measurements of each of the default run's 30 or so rows took about 1.5 of its 6 minutes (2-core Xeon,
# 2026-12-07). The float-vs-int8 ratios come from the interleaved pairs (`--rounds`, `--min-time`), untouched.
MIN_SECONDS = 0.5


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one benchmark run measures (see `benchmarks.cli` for the flags)."""

    threads: tuple[int, ...] = (1,)
    keras_threads: tuple[int, ...] | None = None  # thread counts of the Keras reference's timing (None: `threads`)
    n_images: int = 300
    batch: int = 16
    min_seconds: float = MIN_SECONDS
    max_seconds: float = 10.0
    data: Path | None = None
    seed: int = 0
    probe_timeout_s: float = 900.0
    rounds: int = ROUNDS  # interleaved rounds per float/quantized pair and thread count
    min_time: float = MIN_TIME_S  # seconds per file per interleaved round, at least
    stop_within: float = STOP_WITHIN  # a pair stops early once its interval is this tight (relative; 0: never)

    def threads_of(self, fmt: str) -> tuple[int, ...]:
        """Thread counts a row of `fmt` is timed at: the Keras reference's own, every format `threads`."""
        return self.keras_threads if fmt == KERAS and self.keras_threads is not None else self.threads


@dataclasses.dataclass
class EvalSet:
    """Preprocessed inputs with true class indices; `first_image` is what the probe classifies first."""

    x: np.ndarray
    y: np.ndarray
    origin: str
    first_image: str | None
    skipped: int = 0


def empty_row(model: str, fmt: str, threads: int | None, **kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(ROW_FIELDS)
    row.update(model=model, format=fmt, threads=threads, status="ok")
    row.update(kw)
    return row


# ---------------------------------------------------------------- data


def _image_items(p: Prepared, data: Path | None) -> tuple[list[tuple[str, str]], str]:
    """(path, label) of the evaluation images: --data (malaria only), else the run's manifest test split."""
    src = data if (data is not None and p.model.task == "malaria") else p.manifest
    if src is None:
        raise FileNotFoundError(f"{p.model.name}: no evaluation images (its run names no manifest); pass --data")
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"evaluation data {src} does not exist; give a manifest CSV or a class-folder tree")
    if src.is_file():
        records = read_manifest(src)
        test = [r for r in records if r.split == "test"] or records
        return [(r.path, r.label) for r in test], f"{src} ({'test split' if len(test) < len(records) else 'all'})"

    items = [(str(f), f.parent.name) for f in sorted(src.rglob("*"))
             if f.is_file() and is_image_file(f) and f.parent != src and not f.name.startswith(".")]
    return items, f"{src} (class folders)"


def load_eval_set(p: Prepared, spec, labels: Sequence[str], settings: Settings) -> EvalSet:
    """The images (or, for the OCT head, stored features) every row of `p` is scored on."""
    index = {l: i for i, l in enumerate(labels)}
    if p.model.input == "features":
        from train.oct.store import read_column, split_indices  # loads TensorFlow: imported only when this runs

        if p.store is None:
            raise FileNotFoundError(f"{p.model.name}: no feature store to evaluate the head on")
        idx = split_indices(p.store, "test")
        idx = np.array(sorted(random.Random(settings.seed).sample(list(idx), min(len(idx), settings.n_images))))
        x = read_column(p.store, "features", idx).astype(np.float32)
        y = read_column(p.store, "label", idx).astype(int)
        return EvalSet(x, y, f"{p.store} (stored test features)", None)

    items, origin = _image_items(p, settings.data)
    items = [it for it in items if it[1] in index]
    if not items:
        raise ValueError(f"{origin}: no images of the model's classes {list(labels)}")
    items = sorted(items)
    random.Random(settings.seed).shuffle(items)
    xs, ys, skipped = [], [], 0
    for path, label in items:
        if len(xs) >= settings.n_images:
            break
        try:
            xs.append(load_and_preprocess(path, spec))
            ys.append(index[label])
        except (ImageError, OSError):
            skipped += 1
    first = next(path for path, _ in items)
    return EvalSet(np.stack(xs), np.array(ys), origin, first, skipped)


def quality(y: np.ndarray, probs: np.ndarray, labels: Sequence[str], positive: str | None) -> dict[str, float | None]:
    """Accuracy, and sensitivity/specificity of the positive class (macro one-vs-rest when there is none)."""
    m = classification_metrics(y, probs, labels, positive)
    out = {"accuracy": m["accuracy"]}
    if positive is not None:
        out.update(sensitivity=m["sensitivity"], specificity=m["specificity"])
    else:
        pred = probs.argmax(1)
        rates = [binary_rates(y == k, pred == k) for k in range(len(labels))]
        for key in ("sensitivity", "specificity"):
            vals = [r[key] for r in rates if r[key] is not None]
            out[key] = float(np.mean(vals)) if vals else None
    return out


def count_macs(model) -> int:
    """MACs per input of Conv2D/Dense layers, nested models (the fused OCT model's base) included."""
    from train.malaria.models import count_macs as flat  # loads TensorFlow: imported only when this runs

    return flat(model) + sum(count_macs(l) for l in model.layers if hasattr(l, "layers") and hasattr(l, "inputs"))


# ---------------------------------------------------------------- the probe process


def probe(path: Path, threads: int, image: str | None, settings: Settings) -> dict[str, Any]:
    """Start `benchmarks.probe` on one model; its JSON result with cold start and load time added (seconds)."""
    argv = [sys.executable, "-m", "benchmarks.probe", str(path), "--threads", str(threads), "--time",
            "--batch", str(settings.batch), "--min-seconds", str(settings.min_seconds),
            "--max-seconds", str(settings.max_seconds)]
    if image:
        argv += ["--image", image]
    env = _python_env()
    t_spawn = time.time()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=settings.probe_timeout_s)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if not lines:
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise RuntimeError(f"probe process failed: {tail}")
    out = json.loads(lines[-1])
    if "error" in out:
        raise RuntimeError(out["error"])
    out["cold_start_s"] = out["t_first_result"] - t_spawn
    out["load_s"] = out["t_loaded"] - t_spawn
    return out


def _python_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


def pair_probe(a: Path, b: Path, threads: int, image: str | None, settings: Settings) -> dict[str, Any]:
    """Start `benchmarks.interleave` on a float32 file `a` and a quantized file `b`; its JSON result."""
    argv = [sys.executable, "-m", "benchmarks.interleave", str(a), str(b), "--threads", str(threads),
            "--rounds", str(settings.rounds), "--min-time", str(settings.min_time),
            "--stop-within", str(settings.stop_within * 100)]
    if image:
        argv += ["--image", image]
    proc = subprocess.run(argv, capture_output=True, text=True, env=_python_env(), timeout=settings.probe_timeout_s)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if not lines:
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise RuntimeError(f"interleaved process failed: {tail}")
    out = json.loads(lines[-1])
    if "error" in out:
        raise RuntimeError(out["error"])
    return out


def fill_pair(row: dict[str, Any], r: dict[str, Any]) -> None:
    """The interleaved speed-up of a quantized row: median ratio, its interval, rounds, noisy flag."""
    lo, hi = r["speedup_ci95"]
    row.update(speedup_vs_float32=r["speedup"], speedup_ci95_low=lo, speedup_ci95_high=hi,
               speedup_noisy=bool(r["noisy"]), speedup_rounds=r["rounds"], speedup_method="interleaved")


def float_partners(rows: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(float32 row, quantized row) of the same model, runtime and threads, both measured."""
    base = {(r["model"], r["runtime"], r["threads"]): r for r in rows
            if r["status"] == "ok" and r["precision"] == "float32" and r["format"] != KERAS}
    return [(base[(r["model"], r["runtime"], r["threads"])], r) for r in rows
            if r["status"] == "ok" and r["precision"] != "float32" and r["format"] != KERAS
            and (r["model"], r["runtime"], r["threads"]) in base]


def measure_pairs(rows: Sequence[dict[str, Any]], image: str | None, settings: Settings,
                  log: Callable[[str], None] = print, pair_fn: Callable[..., dict[str, Any]] | None = None) -> None:
    """Each quantized row's speed-up over its float32 partner, timed interleaved (`fill_pair`); a failure is logged
    and leaves the row to `add_ratios`' ratio of separately timed p50s, which the row then says."""
    pair_fn = pair_fn or pair_probe
    for b, q in float_partners(rows):
        try:
            r = pair_fn(Path(b["file"]), Path(q["file"]), q["threads"], image, settings)
            fill_pair(q, r)
            lo, hi = r["speedup_ci95"]
            log(f"[{q['model']}] {b['format']} -> {q['format']} threads={q['threads']}: {r['speedup']:.2f}x "
                f"[{lo:.2f}-{hi:.2f}] over {r['rounds']} interleaved rounds" + (" (noisy)" if r["noisy"] else "")
                + (" (within the stop bound)" if r.get("stopped_early") else ""))
        except Exception as e:
            q["speedup_error"] = f"interleaved: {first_line(e)}"
            log(f"[{q['model']}] {b['format']} -> {q['format']} threads={q['threads']}: interleaved timing failed "
                f"({first_line(e)}); the speed-up falls back to the ratio of the separately timed p50s")


def fill_speed(row: dict[str, Any], r: dict[str, Any]) -> None:
    lat, thr, first, e2e = r["latency"], r["throughput"], r["first_use"], r.get("e2e") or {}
    row.update(
        latency_p50_ms=lat["p50_ms"], latency_p90_ms=lat["p90_ms"], latency_p99_ms=lat["p99_ms"],
        latency_runs=lat["runs"], throughput_batch=thr["batch"], throughput_mode=thr["mode"],
        throughput_ips=thr["batch"] / (thr["p50_ms"] / 1e3), peak_rss_mb=r["peak_rss_mb"],
        cold_start_s=r["cold_start_s"], load_s=r["load_s"],
        init_ms=first["init_ms"], first_e2e_ms=first["first_e2e_ms"], first_infer_ms=first["first_infer_ms"],
        warmup_ms=lat["warmup_ms"], cpu_ms_per_image=lat["cpu_ms"], cpu_cores_busy=lat["cpu_ms"] / lat["mean_ms"],
        energy_mj_per_image=lat["energy_mj"], e2e_input=first["e2e_input"] if e2e else None,
        e2e_p50_ms=e2e.get("p50_ms"), e2e_p90_ms=e2e.get("p90_ms"), e2e_p99_ms=e2e.get("p99_ms"),
        e2e_runs=e2e.get("runs"), e2e_cpu_ms_per_image=e2e.get("cpu_ms"), e2e_energy_mj_per_image=e2e.get("energy_mj"),
    )


# ---------------------------------------------------------------- one model


def benchmark_model(p: Prepared, formats: Sequence[Format], settings: Settings, peaks: list[dict[str, Any]],
                    log: Callable[[str], None] = print,
                    phase: Callable[[str], contextlib.AbstractContextManager[Any]] | None = None,
                    ) -> list[dict[str, Any]]:
    """Rows for one prepared model: the Keras reference, then every format, each at every thread count.

    `phase(name)` (e.g. `benchmarks.phases.Phases.phase`) measures the two parts: "rows" (reference, accuracy,
    one probe process per row) and "pairs" (the interleaved speed-ups).
    """
    phase = phase or (lambda name: contextlib.nullcontext())
    with phase("rows"):
        rows, first_image = _rows(p, formats, settings, peaks, log)
    if rows and first_image is not False:
        with phase("pairs"):
            # Speed-ups: each quantized file against its runtime's float32 file, both in one process, interleaved.
            measure_pairs(rows, first_image, settings, log)
    return rows


def _rows(p: Prepared, formats: Sequence[Format], settings: Settings, peaks: list[dict[str, Any]],
          log: Callable[[str], None]) -> tuple[list[dict[str, Any]], str | None | bool]:
    """`benchmark_model`'s rows before the speed-ups, and the image the pairs classify (False: no pairs)."""
    name = p.model.name
    names = [KERAS] + [f.name for f in formats]
    fmt_of = {f.name: f for f in formats}

    def failed_rows(fmt: str, error: str) -> list[dict[str, Any]]:
        f = fmt_of.get(fmt)
        return [empty_row(name, fmt, t, status="failed", error=error, precision=f.precision if f else "float32",
                          runtime=f.runtime if f else KERAS) for t in settings.threads_of(fmt)]

    if p.error:
        log(f"[{name}] not benchmarked: {p.error}")
        return [r for fmt in names for r in failed_rows(fmt, p.error)], False

    # Reference: Keras on the evaluation set (this process, all threads).
    try:
        cfg = runs.read_config(p.run)
        labels, positive = list(cfg.labels), cfg.positive_label
        keras_model = load_model(p.reference)
        data = load_eval_set(p, cfg.preprocess, labels, settings)
        log(f"[{name}] {len(data.y)} evaluation inputs from {data.origin}")
        ref_probs = np.asarray(keras_model.predict(data.x, batch_size=32, verbose=0))
        weights = int(keras_model.count_params())
        macs = int((cfg.size or {}).get("macs") or count_macs(keras_model))
    except Exception as e:  # nothing to compare against: every row of this model fails with the reason
        log(f"[{name}] reference failed: {first_line(e)}")
        return [r for fmt in names for r in failed_rows(fmt, f"reference: {first_line(e)}")], False
    ref_q = quality(data.y, ref_probs, labels, positive)
    common = dict(weights=weights, macs=macs, n_images=int(len(data.y)), synthetic_data=p.synthetic)

    import importlib.metadata as md

    rows: list[dict[str, Any]] = []
    for fmt in names:
        f = fmt_of.get(fmt)
        path = p.reference if f is None else p.artifacts.get(fmt)
        base = dict(precision=f.precision if f else "float32", runtime=f.runtime if f else KERAS, **common)
        if path is None:
            rows += [empty_row(name, fmt, t, status="failed", error=p.errors.get(fmt, "no artifact"), **base)
                     for t in settings.threads_of(fmt)]
            log(f"[{name}] {fmt}: failed ({p.errors.get(fmt, 'no artifact')})")
            continue
        base.update(file=str(path), size_mb=path.stat().st_size / 1e6)
        # Quality: same inputs, this process.
        try:
            if f is None:
                version = f"keras {md.version('keras')} / tensorflow {md.version('tensorflow')}"
                probs, backend = ref_probs, "keras"
            else:
                em = edge_runtime.load(path, threads=max(settings.threads))
                probs = em.run(data.x)
                backend, version = em.backend, em.session.runtime_version()
            q = quality(data.y, probs, labels, positive)
            base.update(backend=backend, backend_version=version, **q,
                        accuracy_drop_pp=(ref_q["accuracy"] - q["accuracy"]) * 100,
                        top1_agreement=float((probs.argmax(1) == ref_probs.argmax(1)).mean()),
                        max_abs_dprob=float(np.abs(probs - ref_probs).max()))
        except Exception as e:
            rows += [empty_row(name, fmt, t, status="failed", error=f"inference: {first_line(e)}", **base)
                     for t in settings.threads_of(fmt)]
            log(f"[{name}] {fmt}: failed ({first_line(e)})")
            continue
        # Speed, memory, cold start: a fresh process per thread count.
        for t in settings.threads_of(fmt):
            row = empty_row(name, fmt, t, **base)
            try:
                fill_speed(row, probe(path, t, data.first_image, settings))
                g = macs / (row["latency_p50_ms"] / 1e3) / 1e9
                peak = peak_for(peaks, None if f is None else f.runtime, row["precision"], t)
                row.update(gmacs_per_s=g, peak_gmacs_per_s=peak, peak_fraction=g / peak if peak else None)
                log(f"[{name}] {fmt} threads={t}: p50 {row['latency_p50_ms']:.2f} ms, "
                    f"{row['throughput_ips']:.1f} img/s at batch {row['throughput_batch']}, "
                    f"acc {row['accuracy']:.4f}, RSS {row['peak_rss_mb']:.0f} MB, cold {row['cold_start_s']:.2f} s")
            except Exception as e:
                row.update(status="failed", error=f"timing: {first_line(e)}")
                log(f"[{name}] {fmt} threads={t}: failed ({first_line(e)})")
            rows.append(row)
    return rows, data.first_image


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Size ratio of every row against the float32 artifact of the same model, runtime and threads; the speed-up
    where `measure_pairs` left none (1.0 for the float32 row itself)."""
    base = {(r["model"], r["runtime"], r["threads"]): r for r in rows
            if r["status"] == "ok" and r["precision"] == "float32" and r["format"] != KERAS}
    for r in rows:
        b = base.get((r["model"], r["runtime"], r["threads"]))
        if b is None or r["status"] != "ok" or r["format"] == KERAS:
            continue
        if r is b:
            r.update(speedup_vs_float32=1.0, speedup_method="reference")
        elif r["speedup_vs_float32"] is None and b["latency_p50_ms"] and r["latency_p50_ms"]:
            # No interleaved figure (its process failed): the ratio of two separately timed p50s, said so.
            r.update(speedup_vs_float32=b["latency_p50_ms"] / r["latency_p50_ms"], speedup_method="separate-p50")
        if b["size_mb"] and r["size_mb"]:
            r["size_ratio_vs_float32"] = b["size_mb"] / r["size_mb"]
