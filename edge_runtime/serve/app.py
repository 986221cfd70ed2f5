"""The field app's HTTP side: a Starlette application around `analysis` and `storage`.

    app = build_app(slots, CaseStore("data/"), Limits(), access_code="k7m2p9qx")
    uvicorn.run(app, host="127.0.0.1", port=8080)      # what `python -m edge_runtime serve` does

Why Starlette on uvicorn: the app is a dozen routes, one static page and
multipart uploads. Starlette is the ASGI toolkit FastAPI is built on, without
FastAPI's pydantic layer (a compiled dependency and ~10 MB more on a Pi for
validation this app does in a few lines); uvicorn runs it in one process with
h11 (pure Python; no uvloop/httptools build needed on ARM). One process means
one loaded copy of each model; inference runs in worker threads
(`anyio.to_thread`, bounded by `workers`) so the event loop keeps answering
(health checks, the case list, image downloads) while a slide is analysed.

API (JSON unless said otherwise; errors are {"error": message, "status": code}, 4xx for bad input):

    GET  /healthz                          status, models, limits, whether an access code is needed (no code needed)
    POST /api/session                      {"code": ...} -> 204 + cookie, for the page (401 on a wrong code)
    POST /api/cases                        multipart: kind=malaria|oct, files (1..max_files; OCT one), subject, note,
                                           retake_of (malaria: the id of the case whose fields are retaken)
                                           -> 201 the case (results, model, image URLs, the malaria report)
    GET  /api/cases?q=&day=&limit=&offset= cases, newest first (q: id or subject substring; day: YYYY-MM-DD or today)
                                           each with `review`: rows, reviewed_by, reviewed_at (None: no review yet)
    GET  /api/cases/export.csv?q=&day=     one row per case
    GET  /api/cases/{id}                   one case; a malaria case with its `report` (`verdict.malaria_report`)
    GET  /api/cases/{id}/export.csv        malaria: one row per cell region; OCT: the scan's row
    GET  /api/cases/{id}/files/{name}      a file the case lists (photos, overlays, crops, Grad-CAM, reports)
    POST /api/cases/{id}/reviews           a reviewer's calls on flagged cells, a white-cell count, "reviewed"
    GET  /api/cases/{id}/reviews[/{row}]   the case's review rows (append-only: no PUT/PATCH/DELETE; `review`)
    GET  /api/ondevice                     what a phone needs to run a model itself: the runtime's URLs (or why
                                           there is none) and per kind the model file and its medge metadata
    GET  /api/ondevice/{kind}/model.tflite that model file, as the phone's runtime takes it (ondevice.static_batch)
    POST /api/cells                        multipart: files (1..max_files cell crops) -> {"cells": [...], "model"}:
                                           the Cells tab's model on this device, for a phone that cannot run it
    GET  /web-runtime/...                  LiteRT.js (`python -m edge_runtime webruntime fetch`), when installed
    GET  /sw.js                            the service worker that keeps the page on the phone (registered over HTTPS)
    GET  /ca.crt                           with `serve --https`: the device's CA certificate, for phones to trust
                                           (no code needed; docs/field-app-https.md)

Safety on a shared network: with an access code (always when bound beyond
loopback) every /api call needs it, as the header `X-Access-Code` or the
HttpOnly, SameSite=Strict cookie `POST /api/session` sets. A POST whose
`Origin` is not this server is refused (403), so another site open on the
phone cannot post forms here. Bound to loopback, a `Host` that is not a
loopback name is refused (421) against DNS rebinding. Responses carry a
Content-Security-Policy that allows only this server's own scripts, styles
and images.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime as dt
import hashlib
import hmac
import io
import json
import logging
import re
import traceback
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from edge_runtime.serve import verdict
from edge_runtime.serve.analysis import (
    KINDS,
    Limits,
    UploadError,
    analyse_malaria,
    analyse_oct,
    check_upload,
    classify_cells,
    cpu_workers,
    display_name,
)
from edge_runtime.serve.case import Case
from edge_runtime.serve.ondevice import RUNTIME_URL, UNAVAILABLE, OnDevice
from edge_runtime.serve.review import CASE_CSV, CELL_CSV, Reviews
from edge_runtime.serve.storage import CASE_ID, CaseStore

STATIC = Path(__file__).resolve().parent / "static"
SHELL_FILES = ("app.js", "app.css", "ondevice.js")  # with the page: what the service worker keeps on the phone
COOKIE = "medge_access"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
MAX_SUBJECT, MAX_NOTE = 64, 2000
CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src {script}; connect-src 'self'; "
       "frame-ancestors 'none'; form-action 'self'")
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
log = logging.getLogger("edge_runtime.serve")


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


def _token(code: str) -> str:
    """What the cookie holds: a digest of the code, not the code."""
    return hashlib.sha256(b"medge-session\0" + code.encode()).hexdigest()


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    """ASGI middleware: host check, Origin check on writes, access code on /api, security headers."""

    def __init__(self, app, access_code: str | None, loopback: bool, script_src: str = "'self'"):
        self.app, self.code, self.loopback = app, access_code, loopback
        self.token = _token(access_code) if access_code else None
        self.headers = [(b"content-security-policy", CSP.format(script=script_src).encode()), *SECURITY_HEADERS]

    def authorised(self, request: Request) -> bool:
        if self.code is None:
            return True
        given = request.headers.get("x-access-code")
        if given is not None and hmac.compare_digest(given.encode(), self.code.encode()):
            return True
        cookie = request.cookies.get(COOKIE)
        return cookie is not None and hmac.compare_digest(cookie.encode(), self.token.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + self.headers
            await send(message)

        request = Request(scope)
        host = request.headers.get("host", "")
        problem = None
        if self.loopback and _host_name(host) not in LOOPBACK_NAMES and not _host_name(host).startswith("127."):
            problem = error(421, f"this server answers only on its loopback address, not as {host!r}")
        elif request.method not in ("GET", "HEAD", "OPTIONS"):
            origin = request.headers.get("origin")
            if origin is not None and origin.rstrip("/") != f"{scope.get('scheme', 'http')}://{host}":
                problem = error(403, "cross-site request refused: post from this app's own page")
        if problem is None and scope["path"].startswith("/api/") and scope["path"] != "/api/session" \
                and not self.authorised(request):
            problem = error(401, "access code needed: enter the code shown where the server was started")
        if problem is not None:
            return await problem(scope, receive, send_with_headers)
        await self.app(scope, receive, send_with_headers)


class TooLarge(Exception):
    """The request body passed the byte limit while it was being read."""


def _clean_text(value: Any, field: str, limit: int) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UploadError(400, f"“{field}” must be text, not a file")
    value = "".join(c for c in value if c.isprintable() or c in "\n\t").strip()
    if len(value) > limit:
        raise UploadError(400, f"“{field}” is {len(value)} characters; at most {limit} are kept")
    return value


def _csv_cell(v: Any) -> Any:
    """Text a spreadsheet would run as a formula gets a leading apostrophe (CSV injection)."""
    if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + v
    return v


def _csv_response(rows: list[dict[str, Any]], fields: list[str], filename: str) -> Response:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _csv_cell("" if r.get(k) is None else r.get(k)) for k in fields})
    return Response(buf.getvalue(), media_type="text/csv; charset=utf-8",
                    headers={"content-disposition": f'attachment; filename="{filename}"'})


CASES_CSV = ["id", "created", "kind", "subject", "note", "headline", "refer", "model_name", "model_version",
             "model_sha256", "fields", "fields_without_cells", "red_cells", "parasitized", "uncertain",
             "parasitemia_percent", "parasitemia_min_percent", "parasitemia_max_percent", "refer_reasons", "oct_label",
             "oct_decision", "oct_confidence", "oct_referral", "p_CNV", "p_DME", "p_DRUSEN", "p_NORMAL",
             "analysis_ms", "retake_of", "duplicates"]


def case_row(c: Case) -> dict[str, Any]:
    """One case as one flat CSV row."""
    m, r = c.model, c.result
    row = {k: getattr(c, k) for k in ("id", "created", "kind", "subject", "note", "headline")}
    # refer: empty when undecided (a slide with too little evidence), never 0 for it.
    row.update(refer="" if c.refer is None else int(bool(c.refer)), model_name=m.get("name"),
               model_version=m.get("version"),
               model_sha256=m.get("sha256"), analysis_ms=c.analysis_ms)
    if c.kind == "malaria":
        s = r.get("summary") or {}
        row.update(fields=s.get("fields"), fields_without_cells=s.get("fields_without_cells"), red_cells=s.get("cells"),
                   parasitized=s.get("parasitized"), uncertain=s.get("uncertain"),
                   parasitemia_percent=s.get("parasitemia_percent"),
                   parasitemia_min_percent=s.get("parasitemia_min_percent"),
                   parasitemia_max_percent=s.get("parasitemia_max_percent"),
                   refer_reasons="; ".join(s.get("refer_reasons") or []), retake_of=r.get("retake_of"),
                   duplicates="; ".join(verdict.duplicate_lines(list(r.get("duplicates") or []))))
    else:
        row.update(oct_label=r.get("label"), oct_decision=r.get("decision"), oct_confidence=r.get("confidence"),
                   oct_referral=r.get("referral"))
        row.update({f"p_{k}": v for k, v in (r.get("probabilities") or {}).items()})
    return row


def with_urls(case: Case) -> dict[str, Any]:
    """The stored record plus the URLs of its files and exports (URLs are not stored: the API may move)."""
    base = f"/api/cases/{case.id}"
    out = {**case.to_dict(), "url": base, "export_csv": f"{base}/export.csv",
           "file_urls": {n: f"{base}/files/{n}" for n in case.files}}
    if case.kind == "malaria":  # made from the stored result when read: cases stored before it read the same way
        out["report"] = verdict.malaria_report(case.result, case.analysis_ms)
    return out


class FieldApp:
    """Routes and the state they share (models, store, limits, the worker pool)."""

    def __init__(self, slots, store: CaseStore, limits: Limits, workers: int | None, access_code: str | None,
                 ondevice: OnDevice, min_cells: int | None = None, ca_cert: Path | None = None,
                 https_port: int | None = None, false_calls=None):
        self.slots, self.store, self.limits, self.min_cells = slots, store, limits, min_cells
        self.false_calls = false_calls
        self.workers = workers or cpu_workers()
        self.access_code = access_code
        self.limiter: anyio.CapacityLimiter | None = None
        self.started = None
        self.ondevice = ondevice
        self.page, self.page_script_hash = ondevice.page((STATIC / "index.html").read_text("utf-8"))
        self.ca_cert, self.https_port = ca_cert, https_port
        # The service worker names its cache after the shell it keeps: a changed page or script is a changed
        # sw.js, which makes the phone's browser install it again (and drop the old copy).
        shell = hashlib.sha256(self.page.encode())
        for name in SHELL_FILES:
            shell.update((STATIC / name).read_bytes())
        self.service_worker_js = (STATIC / "sw.js").read_text("utf-8").replace("__SHELL_VERSION__",
                                                                               shell.hexdigest()[:16])
        self.reviews = Reviews(store, self._case)

    # -------------------------------------------------------- pages and health

    async def index(self, request: Request) -> Response:
        return HTMLResponse(self.page, headers={"cache-control": "no-cache"})

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({
            # models: per tab (malaria, cells, oct); kinds: the case kinds this device analyses.
            "status": "ok", "models": {k: s.info for k, s in self.slots.items()},
            "kinds": [k for k in KINDS if k in self.slots],
            "cases": await anyio.to_thread.run_sync(self.store.count), "limits": self.limits.to_dict(),
            "workers": self.workers, "access_code_required": self.access_code is not None,
            "recovered_at_start": self.store.recovered, "on_device": self.ondevice.health(),
            "https": {"port": self.https_port, "ca_cert": "/ca.crt"} if self.ca_cert else None,
        })

    async def service_worker(self, request: Request) -> Response:
        return Response(self.service_worker_js, media_type="text/javascript",
                        headers={"cache-control": "no-cache", "service-worker-allowed": "/"})

    async def ca_certificate(self, request: Request) -> Response:
        if self.ca_cert is None:
            raise HTTPException(404, "this device serves no CA certificate: it was started without --https")
        # application/x-x509-ca-cert: iOS offers to install it as a profile, Android saves it for Settings.
        return Response(self.ca_cert.read_bytes(), media_type="application/x-x509-ca-cert",
                        headers={"cache-control": "no-cache",
                                 "content-disposition": 'inline; filename="medge-field-app-ca.crt"'})

    async def session(self, request: Request) -> Response:
        if self.access_code is None:
            return Response(status_code=204)
        try:
            body = await request.json()
            code = str(body.get("code", "")) if isinstance(body, dict) else ""
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error(400, 'send {"code": "..."} as JSON')
        if not hmac.compare_digest(code.strip().encode(), self.access_code.encode()):
            await asyncio.sleep(1.0)  # slows guessing; the loop keeps serving others
            return error(401, "that access code is not right")
        resp = Response(status_code=204)
        resp.set_cookie(COOKIE, _token(self.access_code), max_age=30 * 24 * 3600, httponly=True, samesite="strict",
                        path="/", secure=request.url.scheme == "https")
        return resp

    # -------------------------------------------------------- uploads

    async def _read_form(self, request: Request):
        """The multipart form, reading at most `max_request_bytes` of body."""
        seen = 0
        limit = self.limits.max_request_bytes

        async def stream():
            nonlocal seen
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > limit:
                    raise TooLarge()
                yield chunk

        parser = MultiPartParser(request.headers, stream(), max_files=self.limits.max_files + 1, max_fields=10,
                                 max_part_size=64 * 1024)
        return await parser.parse()

    async def _drain(self, request: Request) -> None:
        """Read and drop the rest of a refused body (up to 4x the limit), so the client, still sending, gets
        the 413 instead of a broken pipe; beyond that the connection is closed on it."""
        cap, seen = 4 * self.limits.max_request_bytes, 0
        while seen <= cap:
            message = await request.receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def create_case(self, request: Request) -> Response:
        return await self._with_form(request, self._create, "send the case as multipart/form-data (fields kind, "
                                                             "files, subject, note)")

    async def _with_form(self, request: Request, handle, wrong_type: str) -> Response:
        """Read a multipart upload within the limits and hand it to `handle`; 4xx JSON for anything wrong."""
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            return error(415, wrong_type)
        limit = self.limits.max_request_bytes
        try:
            declared = int(request.headers.get("content-length", "0") or 0)
        except ValueError:
            return error(400, "Content-Length is not a number")
        if declared > limit:
            await self._drain(request)
            return error(413, f"this upload is {declared / 2**20:.1f} MB; the limit is {limit / 2**20:.0f} MB "
                              "per case. Send fewer or smaller photos.", {"connection": "close"})
        form = None
        try:
            try:
                form = await self._read_form(request)
            except TooLarge:
                await self._drain(request)
                return error(413, f"this upload is over the limit of {limit / 2**20:.0f} MB per case. "
                                  "Send fewer or smaller photos.", {"connection": "close"})
            except MultiPartException as e:
                if "Too many files" in e.message:
                    return error(413, f"too many photos: at most {self.limits.max_files} per case")
                return error(400, f"the upload could not be read: {e.message}")
            return await handle(form)
        except UploadError as e:
            return error(e.status, e.message)
        finally:
            if form is not None:
                await form.close()

    async def _create(self, form) -> Response:
        kind = form.get("kind")
        if not isinstance(kind, str) or kind not in KINDS:
            kind = kind if isinstance(kind, str) or kind is None else "a file"
            raise UploadError(400, f"“kind” must be one of {', '.join(KINDS)}; got {kind!r}")
        slot = self._slot(kind)
        subject = _clean_text(form.get("subject"), "subject", MAX_SUBJECT)
        note = _clean_text(form.get("note"), "note", MAX_NOTE)
        uploads = self._uploads(form)
        if kind == "oct" and len(uploads) != 1:
            raise UploadError(400, f"an OCT case takes one scan; {len(uploads)} were sent")
        retake_of = await self._retake_of(form.get("retake_of"), kind)
        case = await anyio.to_thread.run_sync(self._analyse, kind, slot, uploads, subject, note, retake_of,
                                              limiter=self.limiter)
        return JSONResponse(with_urls(case), status_code=201)

    async def _retake_of(self, value, kind: str) -> str | None:
        """The id of the malaria case a retake replaces fields of (it must be on this device), or None."""
        if value is None or value == "":
            return None
        if not isinstance(value, str) or not CASE_ID.match(value):
            raise UploadError(400, f"“retake_of” must be a case id like 20261122-143012-a3f9c1, got {value!r}"[:200])
        if kind != "malaria":
            raise UploadError(400, "only a malaria case can retake another case's fields")
        old = await anyio.to_thread.run_sync(self.store.get, value)
        if old is None or old.kind != "malaria":
            raise UploadError(400, f"“retake_of”: no malaria case {value} on this device")
        return value

    def _slot(self, kind: str):
        if kind not in self.slots:
            served = ", ".join(self.slots) or "none"
            raise UploadError(400, f"this device has no {kind} model loaded (it serves: {served})")
        return self.slots[kind]

    def _uploads(self, form) -> list[tuple[str, Any]]:
        """(display name, file object) of each part under "files", within the count and per-file limits."""
        files = form.getlist("files")
        if any(not isinstance(f, UploadFile) for f in files):
            raise UploadError(400, "“files” must be file uploads (multipart parts with a filename)")
        if not files:
            raise UploadError(400, "no photo was sent: add at least one file under “files”")
        if len(files) > self.limits.max_files:
            raise UploadError(413, f"too many photos: {len(files)} sent, at most {self.limits.max_files} per case")
        uploads = []
        for k, f in enumerate(files):
            name = display_name(f.filename, k)
            if f.size is not None and f.size > self.limits.max_file_bytes:
                raise UploadError(413, f"“{name}” is {f.size / 2**20:.1f} MB; the limit is "
                                       f"{self.limits.max_file_bytes / 2**20:.0f} MB per photo.")
            uploads.append((name, f.file))  # read in the worker: a queued upload waits on disk, not in memory
        return uploads

    def _checked(self, uploads) -> list:
        """In a worker thread: every upload read and decoded (`check_upload`), or the first one's UploadError."""
        images = []
        for name, fh in uploads:
            fh.seek(0)
            images.append(check_upload(name, fh.read(self.limits.max_file_bytes + 1), self.limits))
        return images

    def _analyse(self, kind, slot, uploads, subject, note, retake_of=None) -> Case:
        """In a worker thread: check every image, analyse, store. Nothing is stored unless all of it worked."""
        images = self._checked(uploads)
        with self.store.stage() as st:
            if kind == "malaria":
                case = analyse_malaria(slot, images, st, subject, note, min_cells=self.min_cells,
                                       retake_of=retake_of, false_calls=self.false_calls)
            else:
                case = analyse_oct(slot, images[0], st, subject, note)
            return self.store.commit(st, case)

    # -------------------------------------------------------- on the phone, or cells on this device

    async def ondevice_info(self, request: Request) -> Response:
        return JSONResponse(self.ondevice.describe())

    async def ondevice_model(self, request: Request) -> Response:
        kind = request.path_params["kind"]
        data = self.ondevice.model_bytes(kind)
        if data is None:
            raise HTTPException(404, f"no {kind} model for phones here: {UNAVAILABLE}")
        return Response(data, media_type="application/octet-stream",
                        headers={"cache-control": "no-cache", "etag": f'"{self.ondevice.models[kind]["sha256"]}"'})

    async def create_cells(self, request: Request) -> Response:
        return await self._with_form(request, self._cells, "send the cells as multipart/form-data (field files)")

    async def _cells(self, form) -> Response:
        slot = self._slot("cells")
        uploads = self._uploads(form)

        def work():
            return classify_cells(slot, self._checked(uploads))

        cells = await anyio.to_thread.run_sync(work, limiter=self.limiter)
        return JSONResponse({"cells": cells, "model": slot.info})

    # -------------------------------------------------------- reading

    def _query(self, request: Request) -> tuple[str, str | None]:
        q = request.query_params.get("q", "").strip()[:MAX_SUBJECT]
        day = request.query_params.get("day") or None
        if day == "today":  # the device's date: phones and an offline Pi may disagree, the device's list is what counts
            day = dt.date.today().isoformat()
        if day is not None:
            try:
                ok = bool(re.fullmatch(r"\d{4}-\d{2}-\d{2}", day)) and dt.date.fromisoformat(day) is not None
            except ValueError:
                ok = False
            if not ok:
                raise UploadError(400, f"day must be a date YYYY-MM-DD or 'today', got {day!r}")
        return q, day

    async def list_cases(self, request: Request) -> Response:
        try:
            q, day = self._query(request)
            limit = int(request.query_params.get("limit", 100))
            offset = int(request.query_params.get("offset", 0))
        except UploadError as e:
            return error(e.status, e.message)
        except ValueError:
            return error(400, "limit and offset must be whole numbers")
        if not 1 <= limit <= 1000 or offset < 0:
            return error(400, "limit must be 1..1000 and offset >= 0")
        cases, total = await anyio.to_thread.run_sync(lambda: self.store.list(q, day, limit, offset))
        reviews = await anyio.to_thread.run_sync(self.reviews.log.status_by_case, [c["id"] for c in cases])
        for c in cases:
            c["url"] = f"/api/cases/{c['id']}"
            c["review"] = reviews.get(c["id"])  # None: nobody has reviewed anything on this case yet
        return JSONResponse({"cases": cases, "total": total, "limit": limit, "offset": offset})

    async def export_all(self, request: Request) -> Response:
        try:
            q, day = self._query(request)
        except UploadError as e:
            return error(e.status, e.message)
        cases, _ = await anyio.to_thread.run_sync(lambda: self.store.list(q, day, -1, 0, full=True))
        reviewed = await anyio.to_thread.run_sync(self.reviews.case_columns, cases)
        name = f"medge-cases-{day or 'all'}.csv"
        return _csv_response([{**case_row(c), **reviewed.get(c.id, {})} for c in cases], CASES_CSV + CASE_CSV, name)

    async def _case(self, request: Request) -> Case:
        case_id = request.path_params["case_id"]
        case = await anyio.to_thread.run_sync(self.store.get, case_id) if CASE_ID.match(case_id) else None
        if case is None:
            raise HTTPException(404, f"no case {case_id!r} on this device")
        return case

    async def get_case(self, request: Request) -> Response:
        case = await self._case(request)
        # The reviewer's calls beside the machine's record, never in it (`serve.review`).
        return JSONResponse({**with_urls(case), "review": await anyio.to_thread.run_sync(self.reviews.block, case)})

    async def export_case(self, request: Request) -> Response:
        case = await self._case(request)
        head = {"case_id": case.id, "subject": case.subject, "model_name": case.model.get("name"),
                "model_sha256": case.model.get("sha256")}
        if case.kind == "malaria":
            path = self.store.file(case.id, "cells.json")
            cells = json.loads(path.read_text("utf-8")) if path else []
            rows = [{**head, "field": c["field"], "field_name": c["field_name"], "cell": c["index"],
                     "x": c["bbox"][0], "y": c["bbox"][1], "w": c["bbox"][2], "h": c["bbox"][3], "kind": c["kind"],
                     "area": c["area"], "label": c["label"], "confidence": c["confidence"],
                     "uncertain": int(bool(c["uncertain"])), "verdict": c["verdict"]} for c in cells]
            rows = await anyio.to_thread.run_sync(self.reviews.cell_rows, case, rows)
            fields = [*head, "field", "field_name", "cell", "x", "y", "w", "h", "kind", "area", "label", "confidence",
                      "uncertain", "verdict", *CELL_CSV]
        else:
            r = case.result
            rows = [{**head, "scan": r["name"], "label": r["label"], "decision": r["decision"],
                     "confidence": r["confidence"], "referral": r["referral"],
                     **{f"p_{k}": v for k, v in (r.get("probabilities") or {}).items()}}]
            fields = [*head, "scan", "label", "decision", "confidence", "referral",
                      *[f"p_{k}" for k in (r.get("probabilities") or {})]]
        return _csv_response(rows, fields, f"medge-case-{case.id}.csv")

    async def case_file(self, request: Request) -> Response:
        case_id, name = request.path_params["case_id"], request.path_params["name"]
        path = await anyio.to_thread.run_sync(self.store.file, case_id, name)
        if path is None:
            raise HTTPException(404, f"case {case_id!r} has no file {name!r}")
        return FileResponse(path, headers={"cache-control": "private, max-age=86400, immutable"})


async def _http_error(request: Request, exc: HTTPException) -> Response:
    messages = {404: "not found", 405: "method not allowed here"}
    detail = exc.detail if isinstance(exc.detail, str) and exc.detail else messages.get(exc.status_code, "error")
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"nothing at {request.url.path}"
    return error(exc.status_code, detail, getattr(exc, "headers", None))


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("internal error on %s %s\n%s", request.method, request.url.path,
              "".join(traceback.format_exception(exc)))
    return error(500, "the device hit an internal error; the case was not stored. Please try again.")


class RuntimeFiles(StaticFiles):
    """The phone runtime's files: revalidated by ETag on each load (a 304, not 9 MB, when unchanged)."""

    def file_response(self, *args, **kwargs) -> Response:
        resp = super().file_response(*args, **kwargs)
        resp.headers["cache-control"] = "no-cache"
        return resp


def build_app(slots, store: CaseStore, limits: Limits | None = None, access_code: str | None = None,
              loopback: bool = True, workers: int | None = None, web_runtime: str | None = None,
              min_cells: int | None = None, ca_cert: Path | None = None, https_port: int | None = None,
              false_calls=None) -> Starlette:
    """The ASGI app.

    Args:
        slots: tab -> `ModelSlot` (`analysis.load_models`: malaria, cells, oct).
        store: where cases live.
        limits: upload limits.
        access_code: required on every /api call when given.
        loopback: the server is bound to a loopback address (enables the Host check).
        workers: analyses run at once (default: one per CPU core).
        web_runtime: the phone runtime's cache folder (`edge_runtime.webruntime.cache_dir`'s default when None;
            "off": never offer on-phone inference).
        min_cells: red cells a malaria case needs before a negative call (None: the counting rule's, 2,000).
        ca_cert: with `serve --https`, the device's CA certificate, served at /ca.crt.
        https_port: with `serve --https`, the HTTPS port (the plain-HTTP page links to it).
        false_calls: the site's false-call rate malaria cases are decided on (`smear.decision.FalseCalls`; None:
            the released model's own, from the registry).
    """
    fa = FieldApp(slots, store, limits or Limits(), workers, access_code, OnDevice(slots, web_runtime), min_cells,
                  ca_cert, https_port, false_calls)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if fa.limiter is None:  # `serve --https` runs the app on two listeners: one pool for both
            fa.limiter = anyio.CapacityLimiter(fa.workers)
        yield

    routes = [
        Route("/", fa.index, methods=["GET"]),
        Route("/healthz", fa.healthz, methods=["GET"]),
        Route("/sw.js", fa.service_worker, methods=["GET"]),
        Route("/ca.crt", fa.ca_certificate, methods=["GET"]),
        Route("/api/session", fa.session, methods=["POST"]),
        Route("/api/cases", fa.create_case, methods=["POST"]),
        Route("/api/cases", fa.list_cases, methods=["GET"]),
        Route("/api/cases/export.csv", fa.export_all, methods=["GET"]),
        Route("/api/cases/{case_id}", fa.get_case, methods=["GET"]),
        Route("/api/cases/{case_id}/export.csv", fa.export_case, methods=["GET"]),
        Route("/api/cases/{case_id}/files/{name}", fa.case_file, methods=["GET"]),
        *fa.reviews.routes(),
        Route("/api/ondevice", fa.ondevice_info, methods=["GET"]),
        Route("/api/ondevice/{kind}/model.tflite", fa.ondevice_model, methods=["GET"]),
        Route("/api/cells", fa.create_cells, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    if fa.ondevice.runtime is not None:
        routes.append(Mount(RUNTIME_URL.rstrip("/"), RuntimeFiles(directory=fa.ondevice.runtime.root)))
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error, Exception: _server_error})
    app.state.field_app = fa
    # WebAssembly compiles only under 'wasm-unsafe-eval'; the import map is the page's one inline script.
    script_src = "'self'" + (f" 'wasm-unsafe-eval' {fa.page_script_hash}" if fa.page_script_hash else "")
    app.add_middleware(Guard, access_code=access_code, loopback=loopback, script_src=script_src)
    return app
