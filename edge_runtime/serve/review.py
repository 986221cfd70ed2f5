"""The field app's review of flagged cells: the `reviews` table beside the cases, its routes and export columns.

    POST /api/cases/{id}/reviews        JSON {"reviewer": "A. K.", "calls": [{"field": 0, "cell": 12,
                                        "after": "parasite", "stage": "ring"}], "rest": "not_parasite",
                                        "wbc_count": 14, "reviewed": true} (any of calls/rest/wbc_count/reviewed)
                                        -> 201 {"rows": [...], "review": {...}}: every row written in one
                                        transaction, or none (4xx naming what is wrong)
    GET  /api/cases/{id}/reviews        {"rows": [every row, oldest first], "review": {...}}
    GET  /api/cases/{id}/reviews/{row}  one row
    (no PUT, PATCH or DELETE: 405; the table's triggers refuse UPDATE and DELETE from any program)

The rules (what is offered, how the reviewed result is counted, parasites/µL) are
`edge_runtime.smear.review`'s, the storage `edge_runtime.reviewlog`'s; this module checks a request against
the case (only its offered cells can be called, `before` is taken from the case, never from the client) and
adds the review block to the case JSON (`review`) and the review columns to the exports. "rest":
"not_parasite" calls every offered uncertain cell that has no call yet "not_parasite", one row per cell;
parasitized cells are always called one by one. "reviewed": true is refused (409) while an offered cell has
no call.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import anyio.to_thread
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edge_runtime.reviewlog import ReviewLog
from edge_runtime.serve.case import Case
from edge_runtime.serve.storage import CaseStore
from edge_runtime.smear.review import (
    Flagged,
    ReviewError,
    ReviewRow,
    ReviewState,
    plan_rows,
    reviewed_result,
    to_review,
)

MAX_BODY = 256 * 1024  # bytes of one review request: hundreds of calls
# Per-cell export (one row per region): the reviewer's current call beside the machine's `verdict`.
CELL_CSV = ["review_call", "review_stage", "reviewer", "review_at"]
# All-cases export: the machine's decision and the reviewed one, who reviewed, the white-cell count, parasites/µL.
CASE_CSV = ["decision", "reviewed_decision", "reviewed_by", "reviewed_at", "review_status", "cells_offered",
            "cells_called", "reviewed_red_cells", "reviewed_parasitized", "reviewed_uncertain", "wbc_count",
            "parasites_per_ul", "parasites_per_ul_low", "parasites_per_ul_high", "parasites_per_ul_basis"]


def offered(case: Case) -> list[Flagged]:
    """The case's cells a reviewer is shown (`to_review` over its crops), in the order shown."""
    fields = case.result.get("fields") or []
    flagged = []
    for c in case.result.get("crops") or []:
        if not c:
            continue
        f = fields[c["field"]] if 0 <= c["field"] < len(fields) else {}
        flagged.append(Flagged(field=c["field"], cell=c["cell"], verdict=c["verdict"], confidence=c.get("confidence"),
                               fragment=bool(c.get("fragment")),
                               readable=bool(f.get("readable", f.get("error") is None)),
                               model_label=c.get("label"), field_name=str(f.get("name", "")),
                               image=c.get("image")))
    return to_review(flagged)


def review_block(case: Case, rows: Sequence[ReviewRow]) -> dict[str, Any] | None:
    """The case JSON's `review` (None for OCT cases)."""
    if case.kind != "malaria":
        return None
    block = reviewed_result(case.result.get("summary") or {}, offered(case), ReviewState.from_rows(rows))
    base = f"/api/cases/{case.id}/files/"
    for c in block["cells"]:
        c["image_url"] = base + c["image"] if c.get("image") else None
    return block


def plan(case: Case, rows: Sequence[ReviewRow], body: Any) -> list[dict[str, Any]]:
    """The rows a request asks to append to `case`, checked against it (`plan_rows`; nothing is written here).

    Raises:
        ReviewError: `status` 400 bad body or values, 409 "reviewed" while a cell has no call.
    """
    if case.kind != "malaria":
        raise ReviewError(f"case {case.id} is an OCT case: only malaria cases have cells to review")
    return plan_rows(case.result.get("summary") or {}, offered(case), rows, body, f"case {case.id}")


class Reviews:
    """The review side of the field app: the log in the case store's database, its routes and export columns."""

    def __init__(self, store: CaseStore, find_case):
        self.store, self.find_case = store, find_case
        self.log = ReviewLog(store.db_path)
        self._lock = threading.Lock()  # a request is checked against the rows it is appended after

    def block(self, case: Case) -> dict[str, Any] | None:
        return review_block(case, self.log.rows(case.id)) if case.kind == "malaria" else None

    def _record(self, case: Case, body: Any) -> tuple[list[ReviewRow], dict[str, Any]]:
        with self._lock:
            new = plan(case, self.log.rows(case.id), body)
            written = self.log.append(case.id, new)
        return written, self.block(case)

    # -------------------------------------------------------- routes

    async def post(self, request: Request) -> Response:
        case = await self.find_case(request)
        if not request.headers.get("content-type", "").lower().startswith("application/json"):
            return _error(415, "send the review as JSON (Content-Type: application/json)")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                return _error(413, f"a review request is at most {MAX_BODY // 1024} KB")
        try:
            doc = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return _error(400, f"the review is not JSON: {e}")
        try:
            written, block = await anyio.to_thread.run_sync(self._record, case, doc)
        except ReviewError as e:
            return _error(e.status, str(e))
        return JSONResponse({"rows": [r.to_dict() for r in written], "review": block}, status_code=201)

    async def list(self, request: Request) -> Response:
        case = await self.find_case(request)
        rows = await anyio.to_thread.run_sync(self.log.rows, case.id)
        block = review_block(case, rows)
        return JSONResponse({"rows": [r.to_dict() for r in rows], "review": block})

    async def one(self, request: Request) -> Response:
        case = await self.find_case(request)
        try:
            row_id = int(request.path_params["row_id"])
        except ValueError:
            row_id = None
        row = next((r for r in await anyio.to_thread.run_sync(self.log.rows, case.id) if r.id == row_id), None)
        if row is None:
            raise HTTPException(404, f"case {case.id} has no review row {request.path_params['row_id']!r}")
        return JSONResponse(row.to_dict())

    def routes(self) -> list[Route]:
        base = "/api/cases/{case_id}/reviews"
        return [Route(base, self.post, methods=["POST"]), Route(base, self.list, methods=["GET"]),
                Route(base + "/{row_id}", self.one, methods=["GET"])]

    # -------------------------------------------------------- exports

    def cell_rows(self, case: Case, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The per-region export rows with the reviewer's current call of each reviewed cell."""
        state = ReviewState.from_rows(self.log.rows(case.id))
        for r in rows:
            call = state.calls.get((r["field"], r["cell"]))
            if call is not None:
                r.update(review_call=call.after, review_stage=call.stage, reviewer=call.reviewer, review_at=call.at)
        return rows

    def case_columns(self, cases: Sequence[Case]) -> dict[str, dict[str, Any]]:
        """case id -> its all-cases export columns (CASE_CSV), one read of the log for every case."""
        by_case = self.log.rows_by_case(c.id for c in cases if c.kind == "malaria")
        return {c.id: case_row(review_block(c, by_case[c.id])) for c in cases if c.kind == "malaria"}


def case_row(block: Mapping[str, Any]) -> dict[str, Any]:
    """CASE_CSV's values for one malaria case's review block."""
    res, den = block["result"], block["result"].get("density") or {}
    return {"decision": block["machine"]["message"], "reviewed_decision": res["message"] if block["rows"] else "",
            "reviewed_by": block["reviewed_by"] if block["reviewed"] else "",
            "reviewed_at": block["reviewed_at"] if block["reviewed"] else "", "review_status": block["status"],
            "cells_offered": block["offered"], "cells_called": block["called"],
            "reviewed_red_cells": res["red_cells"] if block["rows"] else "",
            "reviewed_parasitized": res["parasitized"] if block["rows"] else "",
            "reviewed_uncertain": res["uncertain"] if block["rows"] else "",
            "wbc_count": (block["wbc_count"] or {}).get("value"), "parasites_per_ul": den.get("per_ul"),
            "parasites_per_ul_low": den.get("low_per_ul"), "parasites_per_ul_high": den.get("high_per_ul"),
            "parasites_per_ul_basis": den.get("basis")}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)
