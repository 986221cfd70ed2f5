"""The models released with the package: open them by name, list them, check they are intact.

    import edge_runtime
    model = edge_runtime.load("malaria")          # the packaged int8 .tflite, sha256-checked
    model = edge_runtime.load("malaria", runtime="onnxruntime")   # the same release's int8 .onnx

    python -m edge_runtime models                 # name, version, formats, size, sha256, measured figures
    python -m edge_runtime predict malaria cells/

The files live in `edge_runtime/released/` (package data, so `pip install
medge[edge]` carries them): per model its int8 files for each ecosystem
(`.tflite` for LiteRT, `.onnx` and `.ort` for ONNX Runtime), its model card,
and `models.json`, the registry `python -m convert release` writes. The
registry records each file's sha256 and the runtime that loads it; `resolve`
refuses a file that no longer matches it, so a device never answers with a
damaged or swapped model under a released name.

Which file a name opens: the one for the runtime asked for (`.tflite` for
litert and tflite-runtime; for onnxruntime the `.onnx`, which the full
onnxruntime optimises for the CPU it runs on when it opens it; the `.ort` is
for ONNX Runtime Mobile and minimal builds, which read only that format, and is
listed for apps). Without one, the `.tflite` when a TFLite runtime is
installed, else the first file an installed runtime reads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edge_runtime.backends import BACKENDS
from edge_runtime.fileio import sha256_file

RELEASED_DIR = Path(__file__).resolve().parent / "released"
REGISTRY = "models.json"
SCHEMA = "medge.released/1"


class ReleaseError(ValueError):
    """A released name that is unknown, or a packaged file that is missing or altered."""


def _strict(cls, d: Mapping[str, Any], where: str):
    """`cls(**d)`, refusing keys `cls` does not have (a registry written by a newer medge, or edited by hand)."""
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ReleaseError(f"{REGISTRY}: unknown keys {sorted(unknown)} in {where}")
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class ReleasedFile:
    """One file of a release, as `models.json` records it.

    Attributes:
        format: row of the convert format table, e.g. "onnx-int8".
        file: its name in the released folder.
        runtime: what loads it: "litert" (also the legacy tflite-runtime) or "onnxruntime".
        sha256, bytes: of that file.
    """

    format: str
    file: str
    runtime: str
    sha256: str
    bytes: int

    @property
    def path(self) -> Path:
        return RELEASED_DIR / self.file

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReleasedFile:
        return _strict(cls, d, f"the file entry {d.get('file')!r}")


@dataclasses.dataclass(frozen=True)
class Release:
    """One released model, as `models.json` records it.

    Attributes:
        name: what `edge_runtime.load(name)` takes, e.g. "malaria".
        version: semantic version of this release.
        file: the artifact's file name in the released folder.
        sha256, bytes: of that file.
        format: row of the convert format table, e.g. "tflite-int8".
        task, labels: from the artifact's metadata.
        card: file name of the model card (Markdown) beside it.
        metrics: measured figures (e.g. "sample": accuracy on the bundled unseen patients, "cv": cross-validation).
        trained: provenance (preset, data, patients, seed, command, source sha256).
        inputs: what it was made for: "cells" (single-cell crops, as the NIH set) or "fields" (whole smear
            fields through `edge_runtime.smear`, fine-tuned on crops cut from field photos).
        files: every file of the release, one per format (the `.tflite` above first; `.onnx`, `.ort`);
            releases made before 1.1.0 list none (their one file is `file`).
        changes: what changed since the previous version, as its card says.
    """

    name: str
    version: str
    file: str
    sha256: str
    bytes: int
    format: str
    task: str
    labels: tuple[str, ...]
    card: str = ""
    metrics: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    trained: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    inputs: str = "cells"
    files: tuple[ReleasedFile, ...] = ()
    changes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "changes", tuple(self.changes))
        object.__setattr__(self, "files", tuple(f if isinstance(f, ReleasedFile) else ReleasedFile.from_dict(f)
                                                for f in self.files))

    @property
    def path(self) -> Path:
        return RELEASED_DIR / self.file

    @property
    def all_files(self) -> tuple[ReleasedFile, ...]:
        """Every file of the release; for one made before `files` existed, its one `.tflite`."""
        return self.files or (ReleasedFile(self.format, self.file, "litert", self.sha256, self.bytes),)

    def file_for(self, backend: str | None = None) -> ReleasedFile:
        """The file `backend` opens (see the module docstring); without one, the first an installed runtime reads.

        Raises:
            ReleaseError: the release has no file that runtime reads.
        """
        files = self.all_files
        if backend is None:
            installed = [b for b in BACKENDS.values() if b.installed()]
            return next((f for f in files if any(Path(f.file).suffix in b.suffixes for b in installed)), files[0])
        if backend not in BACKENDS:  # `backends.resolve` names the known ones
            return files[0]
        found = [f for f in files if Path(f.file).suffix in BACKENDS[backend].suffixes]
        if not found:
            raise ReleaseError(f"released model {self.name!r} {self.version} has no file {backend!r} runs "
                               f"(its files: {', '.join(f.file for f in files)})")
        return found[0]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["labels"] = list(self.labels)
        d["changes"] = list(self.changes)
        d["files"] = [dataclasses.asdict(f) for f in self.files]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Release:
        return _strict(cls, d, f"the entry of {d.get('name')!r}")


def read_registry(folder: Path | None = None) -> list[Release]:
    """Every release recorded in `folder/models.json` (default: the package's; none if the file is absent)."""
    path = Path(folder or RELEASED_DIR) / REGISTRY
    if not path.exists():
        return []
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ReleaseError(f"{path}: unreadable registry ({e})") from None
    if doc.get("schema") != SCHEMA:
        raise ReleaseError(f"{path}: schema {doc.get('schema')!r} is not {SCHEMA!r}")
    return [Release.from_dict(d) for d in doc.get("models", [])]


def registry_json(releases: list[Release]) -> str:
    """The text of `models.json` for these releases (sorted by name)."""
    doc = {"schema": SCHEMA, "models": [r.to_dict() for r in sorted(releases, key=lambda r: r.name)]}
    return json.dumps(doc, indent=2) + "\n"


def serving_defaults(folder: Path | None = None) -> list[str]:
    """The released models a server runs when none are named: one per task, the one made for whole fields
    where there is a choice (the field app analyses photos of whole fields), else the first by name."""
    chosen: dict[str, Release] = {}
    for r in read_registry(folder):
        if r.task not in chosen or (r.inputs == "fields" and chosen[r.task].inputs != "fields"):
            chosen[r.task] = r
    return [r.name for r in chosen.values()]


def serving_models(folder: Path | None = None) -> list[str]:
    """What the field app serves when no models are named: `serving_defaults`, plus, when the malaria one was made
    for whole fields, the released cell model for the Cells tab (single-cell crops), placed by its `inputs`."""
    names = serving_defaults(folder)
    releases = read_registry(folder)
    chosen = {r.task: r for r in releases if r.name in names}
    malaria = chosen.get("malaria")
    if malaria is not None and malaria.inputs == "fields":
        cells = next((r for r in releases if r.task == "malaria" and r.inputs == "cells"), None)
        if cells is not None:
            names.append(cells.name)
    return names


def get(name: str, folder: Path | None = None) -> Release:
    for r in read_registry(folder):
        if r.name == name:
            return r
    names = ", ".join(r.name for r in read_registry(folder)) or "none in this install"
    raise ReleaseError(f"no released model named {name!r} (released: {names})")


def is_name(value: str | os.PathLike) -> bool:
    """A bare name like "malaria" (no folder, no suffix), not a path."""
    s = os.fspath(value)
    return bool(s) and os.sep not in s and "/" not in s and not Path(s).suffix


def verified_path(release: Release, backend: str | None = None) -> Path:
    """The packaged file of `release` for `backend` (`Release.file_for`), after checking it is there and its
    sha256 is the recorded one."""
    f = release.file_for(backend)
    p = f.path
    if not p.is_file():
        raise ReleaseError(f"released model {release.name!r}: its file {p} is missing from this install")
    digest = sha256_file(p)
    if digest != f.sha256:
        raise ReleaseError(
            f"released model {release.name!r}: {p} has sha256 {digest[:12]}..., not the released "
            f"{f.sha256[:12]}...; the file was altered or replaced (reinstall medge)"
        )
    return p


def resolve(value: str | os.PathLike, backend: str | None = None) -> Path:
    """A path as given, or for a released name its verified packaged file for `backend` (`Release.file_for`).

    An existing path always wins; a bare name that is neither a file here nor
    a release is an error that lists the released names.
    """
    if os.path.exists(value) or not is_name(value):
        return Path(value)
    return verified_path(get(os.fspath(value)), backend)


def card_text(release: Release) -> str:
    """The model card's Markdown, or "" when the release has none."""
    p = RELEASED_DIR / release.card if release.card else None
    return p.read_text(encoding="utf-8") if p and p.is_file() else ""
