"""The field app's case: one frozen record from the analysis to the store, the API and the exports.

A case is made by `analysis.analyse_malaria` / `analyse_oct` (without `id`, `created` and `files`), completed
by `CaseStore.commit` and read back by `CaseStore.get`. On disk it is the JSON of `to_dict()` in the SQLite
row's `record` column, key for key what the app stored before the record was typed, so existing stores load.
`result` stays the JSON the page reads (malaria: summary, fields, crops; OCT: label, referral, Grad-CAM).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from edge_runtime.spec import known_keys

CASE_KINDS = ("malaria", "oct")


@dataclasses.dataclass(frozen=True)
class Case:
    """One analysed case.

    Attributes:
        kind: "malaria" or "oct".
        subject, note: what the health worker typed (free text, may be empty).
        model: the model that analysed it (`ModelSlot.info`: name, version, sha256, ...).
        headline: the one sentence a health worker reads first.
        refer: whether the case is referred (None: not decided).
        result: the kind's result, as the page reads it.
        analysis_ms: wall time of the analysis.
        id, created, files: set by `CaseStore.commit` (None / empty before).
    """

    kind: str
    subject: str = ""
    note: str = ""
    model: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    headline: str = ""
    refer: bool | None = None
    result: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    analysis_ms: float | None = None
    id: str | None = None
    created: str | None = None
    files: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in CASE_KINDS:
            raise ValueError(f"case kind {self.kind!r} is not one of {CASE_KINDS}")
        object.__setattr__(self, "files", tuple(self.files))

    def to_dict(self) -> dict[str, Any]:
        """The stored JSON: the analysis's keys, then id, created and files once committed."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["model"], d["result"], d["files"] = dict(self.model), dict(self.result), list(self.files)
        if self.id is None:  # not committed yet: what the analysis handed over
            for k in ("id", "created", "files"):
                d.pop(k)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Case:
        known_keys(cls, d, "case")
        if "kind" not in d:
            raise ValueError(f"a case record needs a 'kind' ({' or '.join(CASE_KINDS)}); got keys {sorted(d)}")
        return cls(**d)
