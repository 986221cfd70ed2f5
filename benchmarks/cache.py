"""The benchmark cache: the models `python -m benchmarks` knows, and how it finds or builds their runs and artifacts.

    malaria-edge   the released `edge` model (releases/malaria: the Keras model whose int8 file ships with
                   edge_runtime), scored on the bundled sample of unseen patients; with --from-scratch,
                   an `edge` trained for a few epochs on the bundled sample instead
    malaria-paper  the source's ResNet (benchmarked only when a run is given or cached; too slow to build here)
    oct-fused      InceptionV3 base + head, image -> class (built when missing: synthetic scans, random base)
    oct-head       the head alone, 8x8x2048 features -> class (same run as oct-fused)

Everything built lives in the cache folder (`--cache`) and is reused on the
next run; every step is the project's own command (`python -m train ...`,
`python -m convert ...`), run in its own process with its output shown:

    CACHE/data/malaria-sample.csv        patient split of tests/data/malaria_sample
    CACHE/malaria-edge/run/              python -m train malaria --preset edge (--from-scratch only)
    CACHE/oct/data/, oct.csv, features.h5, run/   python -m train oct synth|extract|head
    CACHE/<model>/export*/               python -m convert (one folder per conversion, conversion.json each)

`--run NAME=DIR` benchmarks an existing run directory instead (read only:
its artifacts are exported into the cache, never into DIR).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks.interleave import MIN_ROUNDS, STOP_WITHIN
from convert.formats import FORMATS, Format, parse_formats
from convert.report import read_report
from edge_runtime.fileio import sha256_file, sha256_text
from train import runs

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "tests" / "data" / "malaria_sample"
# The released malaria model (python -m convert release): a run directory (config.json, model.keras) and
# calibration.csv (calibration cells from ../shared/data/malaria as its train split, the bundled sample as test).
RELEASE = REPO / "releases" / "malaria"


@dataclasses.dataclass(frozen=True)
class QuickSettings:
    """How big the models built for a default run are (small: the whole default run is meant to fit 8 minutes on 2 idle
    cores)."""

    malaria_epochs: int = 6
    oct_per_class: int = 12
    oct_patients: int = 3
    oct_test_per_class: int = 8
    oct_test_patients: int = 2
    oct_epochs: int = 10
    calib_n: int = 100
    eval_n: int = 200


@dataclasses.dataclass(frozen=True)
class BenchModel:
    """One row of the model table.

    Attributes:
        name: what `--models` takes; also the artifact name prefix.
        task: "malaria" or "oct".
        input: "image" (takes images) or "features" (OCT head: InceptionV3 features).
        builds: built from shipped data when missing (else needs `--run` or a cached run).
        default_formats: what `--formats default` (the default) converts and measures; None: every format.
        layer_report: the conversion makes convert's per-layer int8 error report (`--layer-report-n`).
        split_convert: its LiteRT and ONNX formats convert in two processes side by side
            (`Builder.convert_groups`).
    """

    name: str
    task: str
    input: str
    builds: bool
    default_formats: tuple[str, ...] | None = None
    layer_report: bool = True
    split_convert: bool = False


# InceptionV3 at 299x299 costs ~20 s to convert per format and minutes to calibrate, fine-tune (QAT) and
# report per layer, so `--formats default` gives the OCT models (the fused one and its head, which the default
# tables show the same way) one float32/int8 pair per runtime, and the fused model's conversion no per-layer
# report (its random base makes that report say nothing); `--formats all` converts and measures every format of
# every model.
PAIRS = ("tflite-float32", "tflite-int8", "onnx-float32", "onnx-int8")

MODELS: dict[str, BenchModel] = {m.name: m for m in (
    BenchModel("malaria-edge", "malaria", "image", True),
    BenchModel("malaria-paper", "malaria", "image", False),
    BenchModel("oct-fused", "oct", "image", True, default_formats=PAIRS, layer_report=False, split_convert=True),
    BenchModel("oct-head", "oct", "features", True, default_formats=PAIRS),
)}
DEFAULT_MODELS = ("malaria-edge", "malaria-paper", "oct-fused", "oct-head")
DEFAULT_FORMATS = "default"  # what `--formats` means when not given: every format, but PAIRS for slow models


def formats_for(m: BenchModel, spec: str) -> list[Format]:
    """The formats benchmarked for `m`: `spec` is "default" (the model's default set), "all" or a list.

    Raises:
        ValueError: a name not in convert's format table.
    """
    if spec.strip() == DEFAULT_FORMATS:
        return parse_formats(m.default_formats or "all")
    return parse_formats(spec)


def scope_lines(models: Sequence[BenchModel], formats: dict[str, list[Format]], spec: str) -> list[str]:
    """What the run covers, one line per model, and which flag gives the rest (the header and the report say it)."""
    out = []
    for m in models:
        names = [f.name for f in formats[m.name]]
        left = [n for n in FORMATS if n not in names]
        notes = []
        if left and spec.strip() == DEFAULT_FORMATS:
            notes.append(f"not {', '.join(left)}: `--formats all` for every format")
        if not m.layer_report and any(f.calibrated for f in formats[m.name]):
            notes.append("no per-layer int8 report: `python -m convert` makes it")
        out.append(f"{m.name}: {', '.join(names)}" + (f" ({'; '.join(notes)})" if notes else ""))
    return out


def parse_models(spec: str | Sequence[str]) -> list[BenchModel]:
    """Models named by "all" or a comma-separated list, in table order.

    Raises:
        ValueError: a name not in the table (the message lists the valid ones).
    """
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    if names == ["all"]:
        return list(MODELS.values())
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise ValueError(f"unknown model(s) {unknown or names}; choose 'all' or some of: {', '.join(MODELS)}")
    return [m for m in MODELS.values() if m.name in names]


@dataclasses.dataclass
class Prepared:
    """A model ready to benchmark: its Keras reference, its evaluation data and its artifacts.

    Attributes:
        model: the table row.
        run: the run directory (None when it could not be found or built).
        reference: the Keras model file every artifact is compared with.
        manifest: manifest whose test split evaluates image models.
        store: OCT feature store (for oct-head).
        artifacts: format name -> artifact path, for rows that exported.
        errors: format name -> why there is no artifact (the row's error).
        error: why the model as a whole is missing (then every row fails with it).
        synthetic: evaluated on generated data (figures are not clinical).
    """

    model: BenchModel
    run: Path | None = None
    reference: Path | None = None
    manifest: Path | None = None
    store: Path | None = None
    artifacts: dict[str, Path] = dataclasses.field(default_factory=dict)
    errors: dict[str, str] = dataclasses.field(default_factory=dict)
    error: str | None = None
    synthetic: bool = False


# Memory the machine must have available for `Builder.convert_groups` to run a model's LiteRT and ONNX
# conversions side by side (6.5 GB at their peaks, measured, beside the malaria conversion's 1.9 GB).
SPLIT_MIN_AVAILABLE_MB = 10_000


def mem_available_mb() -> float | None:
    """MemAvailable of /proc/meminfo in MB; None where there is none (not Linux)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class StepFailed(RuntimeError):
    """A build command exited non-zero."""


def run_step(argv: list[str], log: Callable[[str], None], ok_codes: Sequence[int] = (0,),
             tag: str | None = None, record: list[dict] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m ...` in its own process, its output passed through (that is the progress shown).

    stderr is captured as well, so the last error line can become a row's error. With `tag` (a build job running
    beside another) stdout and stderr are merged and every line is prefixed with it, so the two stay readable.
    The step's wall time, CPU time (user + system of it and its children) and peak resident memory (its largest
    process) are logged, and appended to `record` when given.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    log("  $ " + " ".join(["python", *argv[1:]] if argv[0] == sys.executable else argv))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE if tag else None,
                            stderr=subprocess.STDOUT if tag else subprocess.PIPE, text=True, env=env)
    err_lines = []
    stream = proc.stdout if tag else proc.stderr
    assert stream is not None
    t0 = time.perf_counter()
    for line in stream:  # pass stderr through too (tqdm bars, warnings), keep it for the error message
        sys.stderr.write(f"{tag} {line}" if tag else line)
        err_lines.append(line.rstrip())
    code, usage = _wait(proc)
    usage = {"step": step_name(argv), "wall_s": round(time.perf_counter() - t0, 2), **usage}
    if record is not None:
        record.append(usage)
    if usage.get("cpu_s") is not None:
        log(f"  ({usage['step']}: {usage['wall_s']:.0f} s wall, {usage['cpu_s']:.0f} s CPU, "
            f"peak RSS {usage['peak_rss_mb'] / 1024:.2f} GB)")
    if code not in ok_codes:
        errors = [l for l in err_lines if l.startswith("error:") or "Error" in l]
        last = (errors or err_lines or [f"exit code {code}"])[-1]
        raise StepFailed(f"`{' '.join(argv[2:5])} ...` failed (exit {code}): {last.removeprefix('error: ')}")
    return subprocess.CompletedProcess(argv, code)


def step_name(argv: Sequence[str]) -> str:
    """`train oct extract`, `convert oct-fused tflite-float32,tflite-int8`: what a build step was, briefly."""
    args = [str(a) for a in argv[2:]]  # after `python -m`
    if args[:1] == ["convert"] and "--name" in args:
        formats = args[args.index("--formats") + 1] if "--formats" in args else "all"
        return f"convert {args[args.index('--name') + 1]} {formats}"
    return " ".join(a for a in args[:3] if not a.startswith("-"))


def _wait(proc: subprocess.Popen) -> tuple[int, dict]:
    """Wait for `proc`: its exit code, and its CPU seconds and peak RSS (os.wait4; empty where there is none)."""
    if not hasattr(os, "wait4"):
        return proc.wait(), {}
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    # ru_maxrss: kilobytes on Linux, the largest single process of the step (its children included once waited for)
    return proc.returncode, {"cpu_s": round(ru.ru_utime + ru.ru_stime, 2), "peak_rss_mb": round(ru.ru_maxrss / 1024)}


def py(*args: str | Path) -> list[str]:
    return [sys.executable, *map(str, args)]


def _run_done(run: Path, model_file: str = runs.BEST) -> bool:
    return runs.is_run(run) and (run / model_file).is_file()


def _fresh(path: Path) -> Path:
    """Remove a half-built folder left by a killed earlier build."""
    if path.exists():
        shutil.rmtree(path)
    return path


class Builder:
    """Finds or builds every model's run and artifacts in the cache folder."""

    def __init__(self, cache: Path, quick: QuickSettings = QuickSettings(), runs: dict[str, Path] | None = None,
                 log: Callable[[str], None] = print, from_scratch: bool = False, tag: str | None = None):
        self.cache = Path(cache).resolve()  # absolute: the build steps run in their own processes
        self.tag = tag  # prefix of this builder's lines when it runs beside another (`prepare_all`)
        self.quick = quick
        self.runs = {k: Path(v).resolve() for k, v in (runs or {}).items()}
        self.log = log
        self.from_scratch = from_scratch
        self.steps: list[dict] = []  # every build step's wall time, CPU time and peak memory (`run_step`)

    # -- malaria

    def sample_manifest(self) -> Path:
        out = self.cache / "data" / "malaria-sample.csv"
        if not out.is_file():
            self.log(f"== split the bundled sample {SAMPLE} by patient -> {out}")
            run_step(py("-m", "train", "split", "--data", SAMPLE, "--out", out), self.log, tag=self.tag,
                     record=self.steps)
        return out

    def uses_release(self, m: BenchModel) -> bool:
        return (m.name == "malaria-edge" and m.name not in self.runs and not self.from_scratch
                and (RELEASE / "model.keras").is_file())

    def malaria_run(self, m: BenchModel) -> Path:
        if m.name in self.runs:
            return self.runs[m.name]
        if self.uses_release(m):
            return RELEASE
        preset = m.name.split("-", 1)[1]
        run = self.cache / m.name / "run"
        if _run_done(run):
            return run
        if not m.builds:
            raise FileNotFoundError(
                f"no {m.name} run in {run}; train one (`python -m train malaria --preset {preset} ...`) and pass "
                f"--run {m.name}=RUN_DIR")
        manifest = self.sample_manifest()
        epochs = self.quick.malaria_epochs
        self.log(f"== train `{preset}` for {epochs} epochs on the bundled sample -> {run}")
        run_step(py("-m", "train", "malaria", "--manifest", manifest, "--preset", preset, "--epochs", epochs,
                    "--out", _fresh(run), "--quiet"), self.log, tag=self.tag, record=self.steps)
        return run

    # -- OCT

    def oct_run(self) -> tuple[Path, Path | None]:
        """(run dir with fused.keras and head.keras, feature store or None for a given run)."""
        if "oct-fused" in self.runs or "oct-head" in self.runs:
            run = self.runs.get("oct-fused") or self.runs["oct-head"]
            return run, None
        root = self.cache / "oct"
        data, manifest, store, run = root / "data", root / "oct.csv", root / "features.h5", root / "run"
        q = self.quick
        if not (data / "SYNTHETIC_DATA.txt").is_file():
            self.log(f"== draw synthetic OCT2017-style B-scans -> {data}")
            run_step(py("-m", "train", "oct", "synth", "--out", _fresh(data), "--per-class", q.oct_per_class,
                        "--patients", q.oct_patients, "--test-per-class", q.oct_test_per_class,
                        "--test-patients", q.oct_test_patients), self.log, tag=self.tag, record=self.steps)
        if not manifest.is_file():
            self.log(f"== split the synthetic scans by patient -> {manifest}")
            run_step(py("-m", "train", "split", "--data", data, "--out", manifest, "--val", "0.2"), self.log,
                     tag=self.tag, record=self.steps)
        if not _run_done(run, "fused.keras"):
            # No ImageNet download here: a random base (seeded) has the real architecture and cost.
            self.log(f"== extract InceptionV3 features (random base, --base-weights none) -> {store}")
            run_step(py("-m", "train", "oct", "extract", "--manifest", manifest, "--base-weights", "none",
                        "--out", store), self.log, tag=self.tag, record=self.steps)
            self.log(f"== train the OCT head for {q.oct_epochs} epochs -> {run}")
            run_step(py("-m", "train", "oct", "head", "--store", store, "--out", _fresh(run), "--epochs",
                        q.oct_epochs, "--quiet"), self.log, tag=self.tag, record=self.steps)
        return run, store

    # -- conversion

    def _reports(self, key: str) -> list[Path]:
        """Conversion reports under CACHE/key/export*/ (`conversion.json`, or `{model}_conversion.json`)."""
        base = self.cache / key
        if not base.is_dir():
            return []
        return [r for d in sorted(base.glob("export*")) if d.is_dir() for r in sorted(d.glob("*conversion.json"))]

    def export(self, p: Prepared, formats: Sequence[Format], source: Path, key: str,
               extra: Sequence[str] = ()) -> None:
        """Fill `p.artifacts`/`p.errors` from earlier conversions, converting the formats none has made yet.

        Earlier conversions count only when made from the very same Keras file
        (sha256 in the report): a retrained model is converted again.
        """
        sha = sha256_file(p.reference) if p.reference is not None and p.reference.is_file() else None

        def collect() -> set[str]:
            seen = set()
            for path in self._reports(key):
                d = path.parent
                try:
                    report = read_report(path)
                except ValueError:
                    continue  # unreadable: its formats are converted again
                source = report.source
                if source.get("name", p.model.name) != p.model.name:
                    continue  # another model's report in a shared folder
                if sha is not None and source.get("sha256") not in (None, sha):
                    continue  # made from an earlier version of the model
                for row in report.rows:
                    name = row.format
                    if name in seen or name not in {f.name for f in formats}:
                        continue
                    seen.add(name)
                    path = d / row.file if row.file else None
                    if path is not None and path.is_file():
                        p.artifacts[name] = path
                    else:
                        p.errors[name] = f"conversion failed: {row.error or 'no file'}"
            return seen

        missing = [f.name for f in formats if f.name not in collect()]
        if not missing:
            return
        groups = self.convert_groups(p.model, missing)
        k = len(list((self.cache / key).glob("export*"))) if (self.cache / key).is_dir() else 0
        outs = [self.cache / key / ("export" if k + i == 0 else f"export-{k + i + 1}") for i in range(len(groups))]

        def convert(names: list[str], out: Path, tag: str | None) -> None:
            self.log(f"== convert {p.model.name} to {', '.join(names)} -> {out}")
            try:
                run_step(py("-m", "convert", source, "--out", _fresh(out), "--formats", ",".join(names),
                            "--name", p.model.name, "--calib-n", self.quick.calib_n, "--eval-n", self.quick.eval_n,
                            # Keep artifacts below convert's agreement bar: measuring their drop is the point here.
                            "--allow-drop", *extra),
                         # 1: some rows failed, recorded in conversion.json
                         self.log, ok_codes=(0, 1), tag=tag, record=self.steps)
            except StepFailed as e:
                shutil.rmtree(out, ignore_errors=True)
                for name in names:
                    p.errors[name] = str(e)

        if len(groups) == 1:
            convert(missing, outs[0], self.tag)
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=len(groups)) as pool:
                tags = [f"{self.tag or ''}[{p.model.name} {FORMATS[names[0]].runtime}]" for names in groups]
                list(pool.map(convert, groups, outs, tags))
        found = collect()
        for name in missing:
            if name not in found and name not in p.errors:
                p.errors[name] = f"python -m convert left no report row for {name} in {', '.join(map(str, outs))}"

    def convert_groups(self, m: BenchModel, names: list[str]) -> list[list[str]]:
        """The `python -m convert` processes that make `names`: one, or for a model marked `split_convert` one per
        runtime (LiteRT formats, ONNX formats) side by side, when the machine has the memory for both.

        Why: a fused InceptionV3 conversion is ~80% one busy thread (SavedModel export, the TFLite converter,
        tf2onnx; measured per thread), so its two halves finish sooner side by side on 2 cores. Each process
        loads the model and Keras' proof outputs again, and both together hold about 6.5 GB at their peaks
        (measured: 4.0 GB while tf2onnx runs, 2.4 GB for the TFLite rows), hence `SPLIT_MIN_AVAILABLE_MB`.
        """
        by_runtime: dict[str, list[str]] = {}
        for n in names:
            by_runtime.setdefault(FORMATS[n].runtime, []).append(n)
        if not m.split_convert or len(by_runtime) < 2:
            return [names]
        avail = mem_available_mb()
        if avail is None or avail < SPLIT_MIN_AVAILABLE_MB:
            self.log(f"   {m.name}: one conversion process, not one per runtime side by side: "
                     + ("available memory unknown" if avail is None else f"{avail / 1024:.1f} GB available")
                     + f" (two need about {SPLIT_MIN_AVAILABLE_MB / 1024:.0f} GB with the rest of the build)")
            return [names]
        return list(by_runtime.values())

    # -- entry point

    def prepare(self, m: BenchModel, formats: Sequence[Format]) -> Prepared:
        """A `Prepared` for `m`; failures end up in its `error`/`errors`, never raised."""
        p = Prepared(m)
        try:
            if m.task == "malaria":
                p.run = self.malaria_run(m)
                cfg = runs.read_config(p.run)
                p.reference = p.run / cfg.model_file
                p.manifest = Path(cfg.manifest) if cfg.manifest else None
                key = m.name if m.name not in self.runs else f"{m.name}-{_digest(self.runs[m.name])}"
                extra: list[str] = []
                if self.uses_release(m):
                    # Calibrated as released (all 300 cells), so its tflite-int8 row is the shipped file.
                    p.manifest, key = RELEASE / "calibration.csv", f"{m.name}-release"
                    extra = ["--calib", str(p.manifest), "--calib-n", "300"]
                self.export(p, formats, p.run, key, extra)
            else:
                p.run, p.store = self.oct_run()
                cfg = runs.read_config(p.run)
                p.synthetic = cfg.synthetic
                p.manifest = self.cache / "oct" / "oct.csv" if p.store is not None else None
                given = "oct-fused" in self.runs or "oct-head" in self.runs
                key = m.name if not given else f"{m.name}-{_digest(p.run)}"
                # The run directory, not its .keras file: convert then reads the run's config (labels,
                # preprocessing, model_file, feature store) and writes the Grad-CAM head weights.
                if m.input == "image":
                    p.reference = p.run / cfg.model_file
                    calib = ["--calib", str(p.manifest)] if p.manifest else []
                    self.export(p, formats, p.run, key, calib + ([] if m.layer_report else ["--layer-report-n", "0"]))
                else:
                    if not cfg.head_file:
                        raise ValueError(f"{p.run} ({cfg.mode}) has no head model to benchmark")
                    p.reference = p.run / cfg.head_file
                    # The head is calibrated and proven on the run's feature store.
                    self.export(p, formats, p.run, key, ["--part", "head"])
        except (FileNotFoundError, ValueError, StepFailed, KeyError) as e:
            p.error = str(e)
        return p


def prepare_all(models: Sequence[BenchModel], formats: dict[str, Sequence[Format]], cache: Path,
                runs: dict[str, Path] | None = None, log: Callable[[str], None] = print,
                from_scratch: bool = False, steps: list[dict] | None = None) -> list[Prepared]:
    """`Builder.prepare` for every model, the malaria models and the OCT models as two build jobs side by side.

    Why side by side: most of a cold run is building (training, converting, proving), and much of a build step is
    one busy thread (the TFLite converter, imports, Python loops), so on 2 cores two independent chains finish
    sooner together than one after the other. Each chain stays in order (the OCT models share one run and
    feature store; the malaria models one sample split), and each gets its own Builder, whose lines are prefixed
    with its task while both run.
    """
    from concurrent.futures import ThreadPoolExecutor

    groups: dict[str, list[BenchModel]] = {}
    for m in models:
        groups.setdefault(m.task, []).append(m)
    side_by_side = len(groups) > 1

    def chain(task: str, ms: list[BenchModel]) -> list[Prepared]:
        tag = f"[{task} build]" if side_by_side else None
        b = Builder(cache, runs=runs, from_scratch=from_scratch, tag=tag,
                    log=(lambda s: log(f"{tag} {s}")) if tag else log)
        out = []
        for m in ms:
            b.log(f"== prepare {m.name}")
            out.append(b.prepare(m, formats[m.name]))
        if steps is not None:
            steps.extend(dict(s, job=task) for s in b.steps)
        return out

    with ThreadPoolExecutor(max_workers=max(1, len(groups))) as pool:
        futures = [pool.submit(chain, task, ms) for task, ms in groups.items()]
        done = {p.model.name: p for f in futures for p in f.result()}
    return [done[m.name] for m in models]


# What a default run's steps take on an idle 2-core x86 machine, in seconds, for the first lines' estimate: the
# 2026-12-07 fresh-cache run on a 2-core AVX2 EPYC without VNNI (9 min 25 s; docs/results/2026-12-07-benchmarks-
# savedmodel.md). Rows and pairs are its phase times per probe; the build steps are its wall times scaled so that
# `expected_seconds`' side-by-side rule gives its measured build (214 s). An estimate to plan by, not a
# measurement: the report's `seconds` is the measured figure, and a CPU with int8 dot-product instructions is faster.
EXPECT_BUILD_S = {"malaria-edge": 114.0, "malaria-paper": 114.0, "oct": 45.0, "oct-fused": 103.0, "oct-head": 10.0}
EXPECT_ROW_S = {"malaria-edge": 3.9, "malaria-paper": 6.0, "oct-fused": 14.5, "oct-head": 2.8}  # one probe process
EXPECT_ROW_MIN_SECONDS = 1.0  # the --min-seconds those rows were timed at
# Of a row's measurements, how many last --min-seconds (the rest are held by a minimum of calls: the fused
# InceptionV3's float rows take 20 calls of 100-250 ms whatever --min-seconds is). A row's estimate moves by this
# many times the change of --min-seconds from `EXPECT_ROW_MIN_SECONDS`.
EXPECT_TIMED_PER_ROW = {"malaria-edge": 3, "malaria-paper": 3, "oct-fused": 1, "oct-head": 2}
EXPECT_CALL_MS = {"oct-fused": 250.0}  # slow models: one call may outlast --min-time (default: well below it)
EXPECT_PEAKS_S = 14.0
EXPECT_ROUNDS_EARLY = MIN_ROUNDS + 2  # interleaved rounds of a pair that may stop early, on an idle machine


def expected_seconds(models: Sequence[BenchModel], formats: dict[str, Sequence[Format]], threads: Sequence[int],
                     cache: Path, rounds: int, min_time: float, peaks: bool = True,
                     stop_within: float = STOP_WITHIN, min_seconds: float = EXPECT_ROW_MIN_SECONDS
                     ) -> tuple[float, float]:
    """(building, timing): about how long a run takes on an idle 2-core machine (see `EXPECT_BUILD_S`), seconds.

    A model whose cache already holds a conversion report counts no build; the malaria and OCT chains are built
    side by side (`prepare_all`), so the longer chain counts in full and the shorter at half. A pair that may
    stop early (`stop_within`) counts `EXPECT_ROUNDS_EARLY` rounds: on an idle machine most pairs are that tight.
    """
    chains: dict[str, float] = {}
    for m in models:
        key = f"{m.name}-release" if m.name == "malaria-edge" and (RELEASE / "model.keras").is_file() else m.name
        built = any((Path(cache) / key).glob("export*/*conversion.json"))
        cost = 0.0 if built else EXPECT_BUILD_S.get(m.name, 60.0)
        if m.task == "oct" and not built and not (Path(cache) / "oct" / "run").is_dir() and "oct" not in chains:
            cost += EXPECT_BUILD_S["oct"]
        chains[m.task] = chains.get(m.task, 0.0) + cost
    spans = sorted(chains.values(), reverse=True)
    build = (spans[0] + 0.5 * sum(spans[1:])) if spans else 0.0
    timing = EXPECT_PEAKS_S if peaks else 0.0
    for m in models:
        fs = formats[m.name]
        rows = (len(fs) * len(threads) + 1)  # + the Keras reference at one thread count
        pairs = sum(1 for f in fs if f.precision != "float32"
                    and any(g.precision == "float32" and g.runtime == f.runtime for g in fs)) * len(threads)
        round_s = 2 * max(min_time, EXPECT_CALL_MS.get(m.name, 0.0) / 1e3)
        n = min(rounds, EXPECT_ROUNDS_EARLY) if stop_within > 0 else rounds
        timed = EXPECT_TIMED_PER_ROW.get(m.name, 3) * (min_seconds - EXPECT_ROW_MIN_SECONDS)
        row_s = EXPECT_ROW_S.get(m.name, 8.0) + timed
        timing += rows * max(row_s, 0.5) + pairs * (n * round_s + 2.0)
    return build, timing


def _digest(path: Path) -> str:
    return sha256_text(str(Path(path).resolve()))[:8]
