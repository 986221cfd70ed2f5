"""The conversion report, `conversion.json`: read and written here, and nowhere else.

    python -m convert runs/malaria-edge --out export --formats all   # writes export/conversion.json

One report per output folder: the source model, the options, the image sets,
the thresholds, and one `ConversionRow` per row of the format table (its
file, its proof against Keras, how it was judged, its quantization and
per-layer records). `convert.export` writes it; `convert.cli` (inspect),
`convert.release`, `convert.bundle` and `benchmarks` read it through
`read_report` as typed records, never by key.

The JSON on disk is what the rows' `to_dict` gives: keys in a fixed order, a
row's proof figures flat beside its other keys, keys a row does not have
(a failed row has no proof) left out. Both are frozen, like the artifact
contracts (`edge_runtime.spec.PreprocessSpec`, `ArtifactMetadata`,
`train.runs.RunConfig`), and refuse keys they do not know.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from edge_runtime.fileio import write_json

CONVERSION_JSON = "conversion.json"

# Row statuses.
OK, FLAGGED, FAILED = "ok", "kept-below-threshold", "failed"


def _refuse_unknown(kind: str, d: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{kind} has unknown key(s) {unknown}; known: {sorted(known)} "
                         "(written by a newer medge? convert again with this one)")


@dataclasses.dataclass(frozen=True)
class Proof:
    """An artifact's outputs against Keras' on the proof inputs (`convert.verify.compare`)."""

    images: int
    top1_agreement: float
    disagreements: int
    max_abs_diff: float
    mean_abs_diff: float
    keras_accuracy: float | None = None  # None: no labelled proof inputs
    accuracy: float | None = None
    accuracy_delta: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Proof:
        _refuse_unknown("proof", d, {f.name for f in dataclasses.fields(cls)})
        return cls(**d)


_PROOF_KEYS = tuple(f.name for f in dataclasses.fields(Proof))


@dataclasses.dataclass(frozen=True)
class ConversionRow:
    """One row of the format table as converted: its file (None when it failed), proof and records.

    Attributes:
        status: `OK`, `FLAGGED` (below its threshold, kept by --allow-drop) or `FAILED` (with `error`).
        selftest: the golden-set self-test of the published file.
        runtimes: the runtimes it ran on (the metadata's `runtimes`).
        io: its input and output tensors (`TensorInfo.to_dict`).
        proof: its outputs against Keras'; None when the row failed before it was measured.
        criterion: how it was judged (`convert.export.criterion`).
        max_drop: the `--max-drop` search record (`convert.bounded`).
        layer_errors: the per-layer int8 error report (`convert.layer_errors`).
        carried_over: when the row comes from an earlier run into the same folder, that run's time.
    """

    format: str
    file: str | None
    runtime: str
    precision: str
    status: str
    error: str | None = None
    seconds: float | None = None
    selftest: dict[str, Any] | None = None
    runtimes: dict[str, Any] | None = None
    size_bytes: int | None = None
    quantization: dict[str, Any] | None = None
    io: dict[str, Any] | None = None
    proof: Proof | None = None
    criterion: dict[str, Any] | None = None
    max_drop: dict[str, Any] | None = None
    layer_errors: dict[str, Any] | None = None
    carried_over: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The row as conversion.json holds it (this key order; absent records left out; `error` always there)."""
        d: dict[str, Any] = {"format": self.format, "file": self.file, "runtime": self.runtime,
                             "precision": self.precision}
        for k in ("selftest", "runtimes", "size_bytes", "quantization", "io"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        if self.proof is not None:
            d.update(self.proof.to_dict())
        if self.criterion is not None:
            d["criterion"] = self.criterion
        d.update(status=self.status, error=self.error)
        for k in ("max_drop", "layer_errors", "seconds", "carried_over"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConversionRow:
        own = {f.name for f in dataclasses.fields(cls)} - {"proof"}
        _refuse_unknown(f"row {d.get('format')!r}", d, own | set(_PROOF_KEYS))
        proof = Proof.from_dict({k: d[k] for k in _PROOF_KEYS if k in d}) if "images" in d else None
        return cls(proof=proof, **{k: v for k, v in d.items() if k in own})

    @property
    def failed(self) -> bool:
        return self.status == FAILED


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    """One `python -m convert` run into one folder (`conversion.json`).

    Attributes:
        source: the Keras model: path, name, sha256, task, part, labels, preprocess.
        options: the run's `convert.job.Options.to_dict()`.
        calibration, proof: the image sets (`ImageSet.describe()`; no calibration set: None).
        thresholds: what the rows were held to.
        rows: this run's rows and the earlier rows of the same model still in the folder, in table order.
        ok: no row of this run failed (and the bundle, when asked for, was written).
        bundle: {"folder", "zip"} or {"error"}; None when not asked for.
        gradcam_weights: the OCT head's Grad-CAM weights file, beside the artifacts.
    """

    source: dict[str, Any]
    options: dict[str, Any]
    calibration: dict[str, Any] | None
    proof: dict[str, Any]
    thresholds: dict[str, Any]
    rows: tuple[ConversionRow, ...]
    ok: bool
    seconds: float
    machine: dict[str, Any]
    versions: dict[str, Any]
    created: str
    bundle: dict[str, Any] | None = None
    gradcam_weights: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["rows"] = [r.to_dict() for r in self.rows]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConversionReport:
        _refuse_unknown("conversion report", d, {f.name for f in dataclasses.fields(cls)})
        return cls(**{**d, "rows": tuple(ConversionRow.from_dict(r) for r in d.get("rows", []))})

    def row_for_file(self, name: str) -> ConversionRow | None:
        """The row whose artifact is the file `name` (a basename)."""
        return next((r for r in self.rows if r.file == name), None)


def report_path(out: Path, model: str | None = None) -> Path:
    """Where the conversion report goes in `out` (one per folder; `model` kept for callers that pass it)."""
    return Path(out) / CONVERSION_JSON


def read_report(path: Path) -> ConversionReport:
    """The report at `path` (a conversion.json).

    Raises:
        FileNotFoundError: no file there.
        ValueError: not JSON, or not a conversion report (names the file).
    """
    path = Path(path)
    try:
        d = json.loads(path.read_text())
        if not isinstance(d, dict):
            raise ValueError(f"a JSON {type(d).__name__}, not an object")
        return ConversionReport.from_dict(d)
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a readable conversion report ({e}); convert again to rewrite it") from e


def write_report(out: Path, report: ConversionReport) -> Path:
    """Write `report` to `out`/conversion.json (atomically); returns the path."""
    p = report_path(out)
    write_json(p, report.to_dict())
    return p


def report_json(report: ConversionReport) -> str:
    return json.dumps(report.to_dict(), indent=2)


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(report: ConversionReport) -> str:
    """The summary table printed at the end of a run: one line per row of the format table."""
    head = ["format", "status", "size_mb", "top1_agree", "max_dprob", "keras_acc", "acc", "judged by", "seconds",
            "file / error"]
    lines = []
    for r in report.rows:
        p = r.proof
        lines.append([
            r.format, r.status, _fmt(r.size_bytes / 1e6 if r.size_bytes else None, ".3f"),
            _fmt(p and p.top1_agreement, ".4f"), _fmt(p and p.max_abs_diff, ".2e"),
            _fmt(p and p.keras_accuracy, ".4f"), _fmt(p and p.accuracy, ".4f"),
            (r.criterion or {}).get("text", "-"), _fmt(r.seconds, ".1f"),
            (r.file or "") + (("  " if r.file else "") + r.error if r.error else ""),
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt_line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt_line(head), fmt_line(["-" * w for w in widths]), *map(fmt_line, lines)])
