"""A person's review of the flagged cells and the slide result recomputed from it: rules and records, no storage.

    offered = to_review(flagged)                        # the cells a reviewer is shown, in the order shown
    state = ReviewState.from_rows(rows)                 # rows: ReviewRow, oldest first (`edge_runtime.reviewlog`)
    result = reviewed_result(summary, offered, state)   # the machine's counts with the reviewer's calls applied

The machine's call is never changed: a review is a row appended to a log (`edge_runtime.reviewlog`: the field
app's `reviews` table, or `reviews.sqlite` in a smear report folder), and the latest row per cell is that
cell's current call. Rows are of three kinds:
- "cell": a call on one flagged cell: `after` is parasite, not_parasite or not_cell (`CALLS`), with an
  optional `stage` for a parasite (`STAGES`); `before` is the machine's verdict (parasitized or uncertain).
- "wbc_count": the white cells the health worker counted over the same fields (`value`).
- "reviewed": the reviewer's mark that the case is reviewed; it stands while no row follows it.

What is offered (`to_review`): the parasitized and uncertain red cells of the fields that were counted (a field
the quality gate refused is retaken, not reviewed), parasitized first, most confident first. An uncertain
fragment (a region under half a typical cell's area, `quality.is_fragment`) is left out; a parasitized one
stays, because it counts.

The reviewed counts (`reviewed_counts`): from the machine's, a reviewed cell first leaves its machine verdict
(parasitized - 1 or uncertain - 1), then "parasite" adds it to the parasitized, "not_parasite" leaves it an
uninfected red cell, "not_cell" removes it from the red cells too. The slide decision is then
`decision.decide` on those counts with the machine's counting rule, fields and false-call rate, so "parasites
seen", "cells to review", "no parasites seen in N red cells" and "not enough evidence" mean what they mean for
the machine; a cell a person called "parasite" makes it "parasites seen" (`confirmed`).

Parasites/µL (`density`) is reported on one basis, named: per white cell counted x WHO's assumed 8,000/µL
when a white-cell count was entered (the per-red-cell figure is kept as the labelled `alternative`), else per
red cell x an assumed 5,000,000 red cells/µL; none while the evidence is short and no parasite is seen.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from edge_runtime.smear.decision import (
    ASSUMED_RBC_PER_UL,
    COUNTING_RULES,
    DEFAULT_RULE,
    Density,
    FalseCalls,
    SlideDecision,
    decide,
    density_from_rbc,
    density_from_wbc,
)
from edge_runtime.smear.quality import is_fragment

CALLS = ("parasite", "not_parasite", "not_cell")
STAGES = ("ring", "trophozoite", "schizont", "gametocyte")
BEFORE = ("parasitized", "uncertain")  # the machine's verdicts a reviewer is asked about
KINDS = ("cell", "wbc_count", "reviewed")
MAX_REVIEWER = 64  # characters of a reviewer's name
MAX_WBC = 100_000  # white cells counted: far above any count over a few fields; a typo guard
MAX_CALLS = 500  # calls in one request
BODY_KEYS = ("reviewer", "calls", "rest", "wbc_count", "reviewed")  # a review request (`plan_rows`)
CALL_KEYS = ("field", "cell", "after", "stage")


class ReviewError(ValueError):
    """A review that cannot be recorded; the message names what is wrong, `status` the HTTP status it maps to
    (400 bad values, 409 a state that does not allow it)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


Key = tuple[int, int]  # (field index, cell index)


@dataclasses.dataclass(frozen=True)
class Flagged:
    """A cell the machine flagged: where it is, what the machine called it, and whether it is reviewed.

    Attributes:
        field: the field's index in the case or report (0-based).
        cell: the cell's index in its field (as on the overlay and in cells.csv).
        verdict: "parasitized" or "uncertain".
        confidence: the model's confidence in its label.
        fragment: under half a typical cell's area (`quality.is_fragment`).
        readable: its field was counted (passed the quality gate).
        model_label: the model's label (its best guess for an uncertain cell).
        field_name: the field's name, for a person; image: the crop's file, when there is one.
    """

    field: int
    cell: int
    verdict: str
    confidence: float | None = None
    fragment: bool = False
    readable: bool = True
    model_label: str | None = None
    field_name: str = ""
    image: str | None = None

    @property
    def key(self) -> Key:
        return (self.field, self.cell)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def to_review(flagged: Iterable[Flagged]) -> list[Flagged]:
    """The cells offered for review, in the order shown (see the module docstring)."""
    offered = [f for f in flagged if f.verdict in BEFORE and f.readable
               and not (f.verdict == "uncertain" and f.fragment)]
    return sorted(offered, key=lambda f: (f.verdict != "parasitized", -(f.confidence or 0.0), f.field, f.cell))


@dataclasses.dataclass(frozen=True)
class ReviewRow:
    """One appended row (`KINDS`); `id` orders them (the log's), `at` is UTC ISO 8601."""

    id: int
    case_id: str
    kind: str
    reviewer: str
    at: str
    field: int | None = None
    cell: int | None = None
    before: str | None = None
    after: str | None = None
    stage: str | None = None
    value: int | None = None

    @property
    def key(self) -> Key:
        return (int(self.field), int(self.cell))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def clean_reviewer(value: Any) -> str:
    """A reviewer's name as stored: printable, stripped, 1..MAX_REVIEWER characters.

    Raises:
        ReviewError: not text, empty, or too long.
    """
    if not isinstance(value, str):
        raise ReviewError("“reviewer” must be the reviewer's name as text")
    name = " ".join("".join(c for c in value if c.isprintable()).split())
    if not name:
        raise ReviewError("“reviewer” is empty: say who reviewed (a name or initials)")
    if len(name) > MAX_REVIEWER:
        raise ReviewError(f"“reviewer” is {len(name)} characters; at most {MAX_REVIEWER}")
    return name


def check_call(after: Any, stage: Any = None) -> tuple[str, str | None]:
    """(after, stage) when valid.

    Raises:
        ReviewError: an unknown call, an unknown stage, or a stage on a call that is not "parasite".
    """
    if after not in CALLS:
        raise ReviewError(f"a call must be one of {', '.join(CALLS)}; got {after!r}")
    if stage in (None, ""):
        return after, None
    if stage not in STAGES:
        raise ReviewError(f"a stage must be one of {', '.join(STAGES)} (or none); got {stage!r}")
    if after != "parasite":
        raise ReviewError(f"a stage ({stage}) goes with the call 'parasite', not {after!r}")
    return after, stage


def check_wbc(value: Any) -> int:
    """A white-cell count as stored: a whole number 1..MAX_WBC.

    Raises:
        ReviewError: not a whole number, or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ReviewError(f"the white-cell count must be a whole number; got {value!r}")
    try:
        n = int(value)
    except ValueError:
        raise ReviewError(f"the white-cell count must be a whole number; got {value!r}") from None
    if not 1 <= n <= MAX_WBC:
        raise ReviewError(f"the white-cell count must be 1..{MAX_WBC:,} (white cells counted over these fields); "
                          f"got {n}")
    return n


@dataclasses.dataclass(frozen=True)
class ReviewState:
    """The current review of one case, from its rows: the latest call per cell, the latest white-cell count,
    the latest "reviewed" mark and whether any row came after it."""

    calls: Mapping[Key, ReviewRow]
    wbc: ReviewRow | None
    mark: ReviewRow | None
    mark_current: bool
    rows: int

    @classmethod
    def from_rows(cls, rows: Sequence[ReviewRow]) -> ReviewState:
        calls: dict[Key, ReviewRow] = {}
        wbc = mark = None
        last_change = 0
        for r in sorted(rows, key=lambda r: r.id):
            if r.kind == "cell":
                calls[r.key] = r
                last_change = r.id
            elif r.kind == "wbc_count":
                wbc, last_change = r, r.id
            elif r.kind == "reviewed":
                mark = r
        return cls(calls=calls, wbc=wbc, mark=mark, mark_current=mark is not None and mark.id > last_change,
                   rows=len(rows))


def reviewed_counts(parasitized: int, uncertain: int, red_cells: int,
                    calls: Iterable[tuple[str, str]]) -> tuple[int, int, int]:
    """(parasitized, uncertain, red cells) after the (before, after) calls on counted cells."""
    for before, after in calls:
        if before == "parasitized":
            parasitized -= 1
        elif before == "uncertain":
            uncertain -= 1
        else:
            raise ReviewError(f"a reviewed cell was {before!r} for the machine; only {' or '.join(BEFORE)} are")
        if after == "parasite":
            parasitized += 1
        elif after == "not_cell":
            red_cells -= 1
        elif after != "not_parasite":
            raise ReviewError(f"unknown call {after!r}")
    return parasitized, uncertain, red_cells


def density(decision: SlideDecision, wbc_count: int | None) -> tuple[Density | None, Density | None]:
    """(reported, alternative) parasites/µL for these counts (see the module docstring); (None, None) while the
    evidence is short and no parasite is seen: a "0/µL" there would reassure without evidence."""
    if decision.decision == "not enough evidence":
        return None, None
    by_rbc = density_from_rbc(decision.parasitized, decision.red_cells, ASSUMED_RBC_PER_UL, measured=False)
    by_wbc = density_from_wbc(decision.parasitized, wbc_count) if wbc_count else None
    return (by_wbc, by_rbc) if by_wbc is not None else (by_rbc, None)


def _rule(summary: Mapping[str, Any]) -> dict[str, Any]:
    """decide()'s rule arguments, field counts and the model's false-call rate as the machine's summary recorded
    them."""
    d = summary.get("decision") or {}
    fields = d.get("fields", summary.get("fields", 0)) or 0
    readable = d.get("readable_fields", fields - (summary.get("fields_without_cells") or 0))
    rule = d.get("rule", DEFAULT_RULE)
    false_calls = FalseCalls.from_dict(d["false_calls"]) if d.get("false_calls") else None
    common = {"fields": fields, "readable_fields": readable, "false_calls": false_calls}
    if rule in COUNTING_RULES:
        return {"rule": rule, "min_cells": None, **common}
    need = d.get("min_cells") or summary.get("min_cells")
    return {"rule": DEFAULT_RULE, "min_cells": need, **common}


def reviewed_result(summary: Mapping[str, Any], offered: Sequence[Flagged], state: ReviewState) -> dict[str, Any]:
    """The review block of a case or report: the machine's decision, the reviewed one, parasites/µL with its
    basis, who reviewed and when, and each offered cell with its current call.

    Args:
        summary: the machine's slide summary (`SlideSummary.to_dict()`; summary.json).
        offered: `to_review(...)`: the cells that can be called; calls on other cells are ignored.
        state: the case's `ReviewState`.
    """
    by_key = {f.key: f for f in offered}
    applied = [(by_key[k].verdict, r.after) for k, r in state.calls.items() if k in by_key]
    p, u, n = reviewed_counts(int(summary.get("parasitized") or 0), int(summary.get("uncertain") or 0),
                              int(summary.get("cells") or 0), applied)
    wbc = state.wbc.value if state.wbc is not None else None
    rule = _rule(summary)
    # A cell a person called a parasite is a parasite seen, whatever the model's false calls.
    confirmed = sum(after == "parasite" for _, after in applied)
    decision = decide(parasitized=p, uncertain=u, red_cells=n, confirmed=confirmed, **rule)
    reported, alternative = density(decision, wbc)
    decision = dataclasses.replace(decision, density=reported, alternative=alternative)
    # The machine's decision on the same rule, without a density: the one density shown is the reviewed one
    # (equal to the machine's counts until a cell is called), so two figures never stand side by side.
    machine = decide(parasitized=int(summary.get("parasitized") or 0), uncertain=int(summary.get("uncertain") or 0),
                     red_cells=int(summary.get("cells") or 0), **rule)
    cells = []
    for f in offered:
        r = state.calls.get(f.key)
        cells.append({**f.to_dict(), "call": r.after if r else None, "stage": r.stage if r else None,
                      "reviewer": r.reviewer if r else None, "at": r.at if r else None})
    called = sum(c["call"] is not None for c in cells)
    mark = state.mark
    if mark is not None and state.mark_current:
        status = f"reviewed by {mark.reviewer} at {mark.at}"
    elif mark is not None:
        status = (f"changed after {mark.reviewer}'s review at {mark.at}: {called} of {len(cells)} cells called; "
                  "mark it reviewed again")
    elif state.rows:
        status = f"in review: {called} of {len(cells)} cells called, not marked reviewed"
    else:
        status = f"not reviewed: {len(cells)} cells to check"
    return {
        "status": status,
        "reviewed": mark is not None and state.mark_current,
        "reviewed_by": mark.reviewer if mark is not None else None,
        "reviewed_at": mark.at if mark is not None else None,
        "offered": len(cells), "called": called, "rows": state.rows,
        "calls": {c: sum(x["call"] == c for x in cells) for c in CALLS},
        "wbc_count": None if state.wbc is None else {"value": wbc, "reviewer": state.wbc.reviewer,
                                                     "at": state.wbc.at},
        "machine": machine.to_dict(),
        "result": decision.to_dict(),
        "density_from": "the reviewed calls" if applied else "the machine's calls: none reviewed yet",
        "cells": cells,
    }


def uncalled(result: Mapping[str, Any], verdict: str | None = None) -> list[Key]:
    """Offered cells without a call (of one machine verdict when given), in the order shown."""
    return [(c["field"], c["cell"]) for c in result["cells"]
            if c["call"] is None and (verdict is None or c["verdict"] == verdict)]


def _int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ReviewError(f"“{what}” must be a whole number; got {v!r}")
    return v


def plan_rows(summary: Mapping[str, Any], offered: Sequence[Flagged], rows: Sequence[ReviewRow], body: Any,
              what: str = "this slide") -> list[dict[str, Any]]:
    """The rows a review request asks to append, checked against the offered cells; nothing is written here.

    Args:
        summary: the machine's slide summary; offered: `to_review(...)`; rows: the rows already in the log.
        body: {"reviewer", "calls": [{"field", "cell", "after", "stage"}], "rest": "not_parasite",
            "wbc_count", "reviewed": true}, any of the last four. "rest" calls every offered uncertain cell without
            a call "not_parasite" (one row each); "reviewed" needs every offered cell called.
        what: how messages name the case or report.

    Raises:
        ReviewError: what is wrong, with `status` 400 (bad values) or 409 ("reviewed" while a cell has no call).
    """
    if not isinstance(body, dict):
        raise ReviewError('send a JSON object: {"reviewer": "...", "calls": [{"field": 0, "cell": 12, '
                          '"after": "parasite"}]}')
    unknown = sorted(set(body) - set(BODY_KEYS))
    if unknown:
        raise ReviewError(f"unknown keys {unknown}; a review takes {', '.join(BODY_KEYS)}")
    if not (body.get("calls") or body.get("rest") is not None or body.get("wbc_count") is not None
            or body.get("reviewed") not in (None, False)):
        raise ReviewError("nothing to record: send calls, rest, wbc_count or reviewed")
    reviewer = clean_reviewer(body.get("reviewer"))
    cells = {f.key: f for f in offered}
    calls = body.get("calls") or []
    if not isinstance(calls, list) or len(calls) > MAX_CALLS:
        raise ReviewError(f"“calls” must be a list of at most {MAX_CALLS} calls")
    out, seen = [], set()
    for i, c in enumerate(calls):
        if not isinstance(c, dict) or set(c) - set(CALL_KEYS):
            raise ReviewError(f"call {i + 1} must be an object with {', '.join(CALL_KEYS)}; got {c!r}"[:300])
        key = (_int(c.get("field"), "field"), _int(c.get("cell"), "cell"))
        if key not in cells:
            raise ReviewError(f"field {key[0] + 1} cell {key[1]} is not among the {len(cells)} cells of {what} to "
                              "review (the parasitized and uncertain cells offered)")
        if key in seen:
            raise ReviewError(f"field {key[0] + 1} cell {key[1]} is called twice in one request")
        seen.add(key)
        after, stage = check_call(c.get("after"), c.get("stage"))
        out.append({"kind": "cell", "field": key[0], "cell": key[1], "before": cells[key].verdict, "after": after,
                    "stage": stage, "reviewer": reviewer})
    rest = body.get("rest")
    if rest not in (None, "not_parasite"):
        raise ReviewError(f"“rest” can only be \"not_parasite\" (the uncertain cells left); got {rest!r}")
    state = ReviewState.from_rows(rows)
    if rest:
        for f in cells.values():
            if f.verdict == "uncertain" and f.key not in state.calls and f.key not in seen:
                out.append({"kind": "cell", "field": f.field, "cell": f.cell, "before": "uncertain",
                            "after": "not_parasite", "stage": None, "reviewer": reviewer})
    if body.get("wbc_count") is not None:
        out.append({"kind": "wbc_count", "value": check_wbc(body["wbc_count"]), "reviewer": reviewer})
    mark = body.get("reviewed")
    if mark not in (None, True, False):
        raise ReviewError(f"“reviewed” must be true; got {mark!r}")
    if mark:
        pending = [ReviewRow(id=2**62 + i, case_id="", at="", **r) for i, r in enumerate(out)
                   if r["kind"] == "cell"]
        after = ReviewState.from_rows([*rows, *pending])
        left = uncalled(reviewed_result(summary, list(cells.values()), after))
        if left:
            raise ReviewError(f"{len(left)} of the {len(cells)} cells of {what} to review have no call yet "
                              f"(first: field {left[0][0] + 1} cell {left[0][1]}); call each one before marking it "
                              "reviewed", status=409)
        out.append({"kind": "reviewed", "reviewer": reviewer})
    return out


# ---------------------------------------------------------------- a smear report folder (`smear --out DIR`)


@dataclasses.dataclass(frozen=True)
class ReportFolder:
    """What a review of a report folder needs: the machine's summary, the flagged cells, the fields' names."""

    path: Path
    summary: Mapping[str, Any]
    flagged: tuple[Flagged, ...]
    fields: tuple[str, ...]

    def key(self, text: str) -> Key:
        """FIELD:CELL -> (field index, cell), FIELD being the field's file stem or its number from 1.

        Raises:
            ReviewError: not FIELD:CELL, an unknown field, or a cell that is not flagged.
        """
        name, sep, cell = text.rpartition(":")
        if not sep or not name or not cell.isdigit():
            raise ReviewError(f"{text!r} is not FIELD:CELL (e.g. {self._example()})")
        stems = [Path(f).stem for f in self.fields]
        if name.isdigit() and 1 <= int(name) <= len(self.fields):
            k = int(name) - 1
        elif stems.count(name) == 1:
            k = stems.index(name)
        elif stems.count(name) > 1:
            raise ReviewError(f"{self.path}: {stems.count(name)} fields are named {name!r}; give its number "
                              f"(1..{len(self.fields)}) instead")
        else:
            raise ReviewError(f"{self.path}: no field {name!r}; the fields are "
                              + ", ".join(f"{i + 1} ({s})" for i, s in enumerate(stems)))
        return (k, int(cell))

    def _example(self) -> str:
        f = self.flagged[0] if self.flagged else None
        return f"{Path(self.fields[f.field]).stem}:{f.cell}" if f else "PA171700:12"


def read_report_folder(path) -> ReportFolder:
    """summary.json and cells.json of a `python -m edge_runtime smear --out DIR` folder.

    Raises:
        ReviewError: not a folder, or a file missing or unreadable (named).
    """
    path = Path(path)
    if not path.is_dir():
        raise ReviewError(f"{path} is not a folder (give the folder `python -m edge_runtime smear ... --out DIR` "
                          "wrote)")
    docs = {}
    for name in ("summary.json", "cells.json"):
        f = path / name
        if not f.is_file():
            raise ReviewError(f"{path} is not a smear report folder: no {name} (make one with `python -m "
                              "edge_runtime smear MODEL FIELD... --out DIR`)")
        try:
            docs[name] = json.loads(f.read_text("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ReviewError(f"{f} cannot be read: {e}") from None
    summary, cells = docs["summary.json"], docs["cells.json"]
    if not isinstance(summary, dict) or not isinstance(cells, dict) or not isinstance(cells.get("fields"), list):
        raise ReviewError(f"{path}: summary.json or cells.json is not a smear report's (expected objects with "
                          "the slide's counts and a 'fields' list)")
    positive = cells.get("positive_label") or "Parasitized"
    flagged, names = [], []
    try:
        for k, f in enumerate(cells["fields"]):
            names.append(str(f["field"]))
            readable = bool(f.get("readable", f.get("error") is None))
            for c in f.get("cells") or []:
                if c.get("kind") != "rbc" or c.get("label") is None:
                    continue
                verdict = "uncertain" if c.get("uncertain") else "parasitized" if c["label"] == positive else None
                if verdict is None:
                    continue
                flagged.append(Flagged(field=k, cell=int(c["index"]), verdict=verdict, confidence=c.get("confidence"),
                                       fragment=c.get("area") is not None
                                       and is_fragment(c["area"], f.get("radius_px")),
                                       readable=readable, model_label=c["label"], field_name=names[-1]))
    except (KeyError, TypeError, ValueError) as e:
        raise ReviewError(f"{path / 'cells.json'}: a field or cell lacks {e}") from None
    return ReportFolder(path=path, summary=summary, flagged=tuple(flagged), fields=tuple(names))
