"""Cases on the device: one SQLite (WAL) row per case, its images in a folder beside it, stored whole or not at all.

    store = CaseStore("field-data/")          # removes what a killed server left half-written
    with store.stage() as st:                 # field-data/tmp/<id>/, deleted if anything fails
        (st.dir / "overlay_00.png").write_bytes(...)
        case = store.commit(st, case)         # a `Case`: files fsynced, folder renamed, row inserted last

Layout under the data folder:

    cases.sqlite (+ -wal, -shm)   one row per finished case; `record` holds the case JSON
    cases/<id>/                   the case's files (uploads, overlays, crops, reports)
    tmp/<id>/                     a case being made; never read by the API

Why this order: a case becomes visible only through its row, and the row is
inserted (one transaction) after the folder is complete and renamed into
`cases/`. A SIGKILL or power cut at any point leaves either a folder in
`tmp/` (removed at the next start), a folder in `cases/` without a row
(removed at the next start), or a whole case. SQLite runs in WAL mode
(readers never block the writer, a crash never corrupts the file) with
`synchronous=FULL` (a committed case survives a power cut, not only a killed
process; the cost is one fsync per case, nothing next to an inference).

No name given by a client reaches the file system: case ids are made here
(`new_case_id`) and checked against `CASE_ID` before any lookup; file names
inside a case are made by the server and served only when listed in its record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import re
import secrets
import shutil
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edge_runtime.reviewlog import connect
from edge_runtime.serve.case import Case

# 20261122-143012-a3f9c1: local time (what the clinic reads), then 24 random bits against collisions.
CASE_ID = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9a-f]{6}$")
FILE_NAME = re.compile(r"^[a-z0-9_]+(\.[a-z0-9]+)?$")
SCHEMA = """
CREATE TABLE IF NOT EXISTS cases (
    id TEXT PRIMARY KEY,
    created TEXT NOT NULL,
    day TEXT NOT NULL,
    kind TEXT NOT NULL,
    subject TEXT NOT NULL DEFAULT '',
    headline TEXT NOT NULL DEFAULT '',
    refer INTEGER,
    model_sha256 TEXT NOT NULL DEFAULT '',
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS cases_created ON cases(created);
CREATE INDEX IF NOT EXISTS cases_subject ON cases(subject);
"""


class StoreError(RuntimeError):
    """The data folder cannot be used (not writable, foreign database, disk full)."""


def new_case_id(now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now().astimezone()
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Staging:
    """A case being made: `dir` is its private folder under tmp/."""

    def __init__(self, case_id: str, path: Path, created: dt.datetime):
        self.id, self.dir, self.created = case_id, path, created
        self.committed = False

    def path(self, name: str) -> Path:
        """A file of this case; names are the server's own (`FILE_NAME`)."""
        if not FILE_NAME.match(name):
            raise ValueError(f"internal file name {name!r} does not match {FILE_NAME.pattern}")
        return self.dir / name


class CaseStore:
    """The device's cases (see the module docstring for layout and crash safety).

    Args:
        root: the data folder; created when missing.

    Attributes:
        recovered: what the start-up clean-up removed ({"tmp": n, "orphans": n}).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.cases_dir = self.root / "cases"
        self.tmp_dir = self.root / "tmp"
        self.db_path = self.root / "cases.sqlite"
        try:
            for d in (self.root, self.cases_dir, self.tmp_dir):
                d.mkdir(parents=True, exist_ok=True)
            probe = self.tmp_dir / f".write-test-{secrets.token_hex(4)}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise StoreError(f"data folder {self.root} is not usable: {e}") from None
        # One writer at a time: SQLite would serialise the inserts anyway; this avoids its busy waits.
        self._write_lock = threading.Lock()
        with self._connect() as con:
            mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"{self.db_path}: SQLite refused WAL mode (got {mode!r}); is it on a network share?")
            try:
                con.executescript(SCHEMA)
            except sqlite3.DatabaseError as e:
                raise StoreError(f"{self.db_path} is not a medge case database ({e})") from None
        self.recovered = self.recover()

    def _connect(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A short-lived connection (threads never share one), synced on commit, closed always."""
        return connect(self.db_path, StoreError)

    # ------------------------------------------------------------ start-up

    def recover(self) -> dict[str, int]:
        """Remove what a killed server left: every folder in tmp/, and case folders without a row."""
        removed_tmp = 0
        for p in self.tmp_dir.iterdir():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed_tmp += 1
        with self._connect() as con:
            known = {r[0] for r in con.execute("SELECT id FROM cases")}
        orphans = 0
        for p in self.cases_dir.iterdir():
            if p.name not in known:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                orphans += 1
        missing = sorted(i for i in known if not (self.cases_dir / i).is_dir())
        return {"tmp": removed_tmp, "orphans": orphans, "rows_without_files": len(missing)}

    # ------------------------------------------------------------ writing

    @contextlib.contextmanager
    def stage(self) -> Iterator[Staging]:
        """A private folder for one new case; removed unless `commit` published it."""
        created = dt.datetime.now().astimezone().replace(microsecond=0)
        case_id = new_case_id(created)
        path = self.tmp_dir / case_id
        path.mkdir()
        st = Staging(case_id, path, created)
        try:
            yield st
        finally:
            if not st.committed:
                shutil.rmtree(path, ignore_errors=True)

    def commit(self, st: Staging, case: Case) -> Case:
        """Publish a staged case: fsync its files, rename the folder into cases/, then insert its row.

        Returns the case as stored: with its `id`, `created` time and the names of its `files`.
        """
        files = sorted(p.name for p in st.dir.iterdir() if p.is_file())
        case = dataclasses.replace(case, id=st.id, created=st.created.isoformat(), files=tuple(files))
        for name in files:
            with open(st.dir / name, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(st.dir)
        final = self.cases_dir / st.id
        with self._write_lock:
            os.rename(st.dir, final)
            st.committed = True
            _fsync_dir(self.cases_dir)
            try:
                with self._connect() as con:
                    con.execute("BEGIN IMMEDIATE")
                    con.execute(
                        "INSERT INTO cases (id, created, day, kind, subject, headline, refer, model_sha256, record) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (st.id, case.created, st.created.strftime("%Y-%m-%d"), case.kind, case.subject or "",
                         case.headline or "", None if case.refer is None else int(bool(case.refer)),
                         case.model.get("sha256") or "", json.dumps(case.to_dict(), ensure_ascii=False)))
                    con.execute("COMMIT")
            except BaseException:
                shutil.rmtree(final, ignore_errors=True)  # no row, no files: the case never happened
                raise
        return case

    # ------------------------------------------------------------ reading

    def get(self, case_id: str) -> Case | None:
        if not CASE_ID.match(case_id):
            return None
        with self._connect() as con:
            row = con.execute("SELECT record FROM cases WHERE id = ?", (case_id,)).fetchone()
        return Case.from_dict(json.loads(row[0])) if row else None

    def list(self, query: str = "", day: str | None = None, limit: int = 100, offset: int = 0,
             full: bool = False) -> tuple[list[Any], int]:
        """(cases newest first, total matching): `query` matches id or subject (substring, case-insensitive).

        With `full`, whole `Case`s; else one dict per case of the indexed columns (id, created, kind, subject,
        headline, refer), which is what a list page needs.
        """
        where, args = [], []
        if query:
            like = "%" + query.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            where.append("(lower(id) LIKE ? ESCAPE '\\' OR lower(subject) LIKE ? ESCAPE '\\')")
            args += [like, like]
        if day:
            where.append("day = ?")
            args.append(day)
        sql_where = (" WHERE " + " AND ".join(where)) if where else ""
        cols = "record" if full else "id, created, kind, subject, headline, refer"
        with self._connect() as con:
            total = con.execute(f"SELECT count(*) FROM cases{sql_where}", args).fetchone()[0]
            rows = con.execute(f"SELECT {cols} FROM cases{sql_where} ORDER BY created DESC, id DESC LIMIT ? OFFSET ?",
                               [*args, limit, offset]).fetchall()
        if full:
            return [Case.from_dict(json.loads(r[0])) for r in rows], total
        keys = ("id", "created", "kind", "subject", "headline", "refer")
        return [dict(zip(keys, r)) | {"refer": None if r[5] is None else bool(r[5])} for r in rows], total

    def count(self) -> int:
        with self._connect() as con:
            return con.execute("SELECT count(*) FROM cases").fetchone()[0]

    def file(self, case_id: str, name: str) -> Path | None:
        """The path of a file listed in a stored case's record, else None (no client string becomes a path)."""
        case = self.get(case_id)
        if case is None or name not in case.files:
            return None
        path = self.cases_dir / case.id / name
        return path if path.is_file() else None
