"""The review log: append-only rows in SQLite, enforced by the database itself. Standard library only.

    log = ReviewLog("field-data/cases.sqlite")        # the field app: a `reviews` table beside `cases`
    log = ReviewLog("report/reviews.sqlite")          # `python -m edge_runtime review report/`
    rows = log.append("20261122-143012-a3f9c1", [{"kind": "cell", "field": 0, "cell": 12, "reviewer": "AK",
                                                  "before": "uncertain", "after": "not_parasite"}])
    log.rows("20261122-143012-a3f9c1")                # every row of the case, oldest first

What makes it a log and not a table of current answers:
- BEFORE UPDATE and BEFORE DELETE triggers RAISE(ABORT): no statement, from any program that opens the file,
  changes or removes a row (a changed call is a new row; the latest row per cell is its current call).
- CHECK constraints hold the values (`edge_runtime.smear.review`: CALLS, STAGES, KINDS), so a row the rules
  would refuse cannot be written even by hand.
- One `append` is one transaction (BEGIN IMMEDIATE ... COMMIT) with `synchronous=FULL`: when it returns, its
  rows are on disk and survive a SIGKILL or a power cut; when it fails, none of them is written.
- `at` is set here, in UTC (ISO 8601, milliseconds, "Z"), not by the client.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from edge_runtime.smear.review import BEFORE, CALLS, KINDS, MAX_REVIEWER, STAGES, ReviewRow


def _in(values: Sequence[str]) -> str:
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"


SCHEMA = f"""
CREATE TABLE IF NOT EXISTS reviews (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    case_id TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN {_in(KINDS)}),
    reviewer TEXT NOT NULL CHECK (length(reviewer) BETWEEN 1 AND {MAX_REVIEWER}),
    at TEXT NOT NULL,
    field INTEGER,
    cell INTEGER,
    before TEXT CHECK (before IS NULL OR before IN {_in(BEFORE)}),
    after TEXT CHECK (after IS NULL OR after IN {_in(CALLS)}),
    stage TEXT CHECK (stage IS NULL OR (stage IN {_in(STAGES)} AND after = 'parasite')),
    value INTEGER CHECK (value IS NULL OR value >= 1),
    CHECK ((kind = 'cell') = (field IS NOT NULL AND cell IS NOT NULL AND before IS NOT NULL AND after IS NOT NULL)),
    CHECK ((kind = 'wbc_count') = (value IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS reviews_case ON reviews(case_id, id);
CREATE TRIGGER IF NOT EXISTS reviews_append_only_update BEFORE UPDATE ON reviews
BEGIN SELECT RAISE(ABORT, 'reviews are append-only: a changed call is a new row'); END;
CREATE TRIGGER IF NOT EXISTS reviews_append_only_delete BEFORE DELETE ON reviews
BEGIN SELECT RAISE(ABORT, 'reviews are append-only: no row is ever deleted'); END;
"""
COLUMNS = ("id", "case_id", "kind", "reviewer", "at", "field", "cell", "before", "after", "stage", "value")


@contextlib.contextmanager
def connect(db_path: Path, error: type[Exception]) -> Iterator[sqlite3.Connection]:
    """A short-lived connection in autocommit mode (callers BEGIN IMMEDIATE themselves; threads never share one),
    every commit synced to disk (`synchronous=FULL`), closed always; an unopenable file raises `error`, naming it.
    The field app's case store opens its database the same way."""
    try:
        con = sqlite3.connect(db_path, timeout=30, isolation_level=None)
    except sqlite3.Error as e:
        raise error(f"cannot open {db_path}: {e}") from None
    try:
        con.execute("PRAGMA synchronous=FULL")
        yield con
    finally:
        con.close()


class ReviewLogError(RuntimeError):
    """The log's file cannot be used (not writable, not a SQLite database, another program's table)."""


def utc_now() -> str:
    """2026-11-22T14:30:12.345Z"""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ReviewLog:
    """Append-only review rows in the SQLite file `db_path` (created with its table when missing).

    Args:
        db_path: the database file; the field app passes its case store's, so reviews live beside the cases.
    """

    def __init__(self, db_path: str | Path):
        self.db_path = Path(db_path)
        try:
            with self._connect() as con:
                con.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise ReviewLogError(f"{self.db_path}: cannot keep reviews here ({e})") from None

    def _connect(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return connect(self.db_path, ReviewLogError)

    def append(self, case_id: str, rows: Iterable[Mapping[str, Any]]) -> list[ReviewRow]:
        """Write `rows` (dicts of COLUMNS without id, case_id and at) in one transaction; returns them as stored.

        Raises:
            sqlite3.IntegrityError: a row the CHECK constraints refuse (nothing of this call is written).
        """
        at = utc_now()
        rows = [dict(r) for r in rows]
        written = []
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                for r in rows:
                    values = (case_id, r["kind"], r["reviewer"], at, r.get("field"), r.get("cell"), r.get("before"),
                              r.get("after"), r.get("stage"), r.get("value"))
                    cur = con.execute(f"INSERT INTO reviews ({', '.join(COLUMNS[1:])}) VALUES "
                                      f"({', '.join('?' * len(values))})", values)
                    written.append(ReviewRow(cur.lastrowid, *values))
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return written

    def rows(self, case_id: str) -> list[ReviewRow]:
        """Every row of one case, oldest first."""
        with self._connect() as con:
            found = con.execute(f"SELECT {', '.join(COLUMNS)} FROM reviews WHERE case_id = ? ORDER BY id",
                                (case_id,)).fetchall()
        return [ReviewRow(*r) for r in found]

    def status_by_case(self, case_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """case id -> {"rows": how many, "reviewed_by", "reviewed_at": the latest "reviewed" mark or None}, for the
        cases that have rows (the case list's badge; one indexed read per case, no row decoded)."""
        out: dict[str, dict[str, Any]] = {}
        with self._connect() as con:
            for case_id in dict.fromkeys(case_ids):
                n, = con.execute("SELECT count(*) FROM reviews WHERE case_id = ?", (case_id,)).fetchone()
                if not n:
                    continue
                mark = con.execute("SELECT reviewer, at FROM reviews WHERE case_id = ? AND kind = 'reviewed' "
                                   "ORDER BY id DESC LIMIT 1", (case_id,)).fetchone()
                out[case_id] = {"rows": n, "reviewed_by": mark[0] if mark else None,
                                "reviewed_at": mark[1] if mark else None}
        return out

    def rows_by_case(self, case_ids: Iterable[str]) -> dict[str, list[ReviewRow]]:
        """case id -> its rows, oldest first, for many cases in one read (the all-cases export)."""
        wanted = set(case_ids)
        out: dict[str, list[ReviewRow]] = {c: [] for c in wanted}
        with self._connect() as con:
            for r in con.execute(f"SELECT {', '.join(COLUMNS)} FROM reviews ORDER BY id"):
                if r[1] in wanted:
                    out[r[1]].append(ReviewRow(*r))
        return out
