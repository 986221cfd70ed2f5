"""Many phones at once against a running field app, with the standard library only.

    python -m benchmarks.loadtest http://127.0.0.1:8080 --kind malaria field.jpg --clients 16 --rounds 2
    python -m benchmarks.loadtest http://127.0.0.1:8080 --kind oct scan.jpeg --clients 16 --rounds 4

Each client thread uploads one case per round (bounded loops, no duration
timer) and checks the answer is a stored case; the report gives cases per
second over the whole run and p50/p95 of the time from sending to the answer.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import secrets
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def multipart(fields: dict[str, str], files: Sequence[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data request; files are (field, filename, bytes)."""
    boundary = "medge" + secrets.token_hex(12)
    out = bytearray()
    for k, v in fields.items():
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n").encode() + v.encode() + b"\r\n"
    for field, filename, data in files:
        ctype = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
                f"Content-Type: {ctype}\r\n\r\n").encode() + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def request(url: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None,
            timeout: float = 300.0) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one HTTP request; 4xx/5xx are returned, not raised."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def post_case(base: str, kind: str, paths: Sequence[Path | tuple[str, bytes]], subject: str = "", note: str = "",
              code: str | None = None, timeout: float = 300.0) -> tuple[int, dict[str, Any]]:
    """Upload one case; (status, JSON answer). `paths` are files or (filename, bytes)."""
    files = []
    for p in paths:
        name, data = (p if isinstance(p, tuple) else (Path(p).name, Path(p).read_bytes()))
        files.append(("files", name, data))
    body, ctype = multipart({"kind": kind, "subject": subject, "note": note}, files)
    headers = {"Content-Type": ctype}
    if code:
        headers["X-Access-Code"] = code
    status, _, raw = request(base.rstrip("/") + "/api/cases", "POST", body, headers, timeout)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, {"error": raw[:200].decode("utf-8", "replace")}


def run_load(base: str, kind: str, paths: Sequence[Path], clients: int = 16, rounds: int = 1,
             code: str | None = None, subject_prefix: str = "load") -> dict[str, Any]:
    """`clients` threads, each uploading `rounds` cases; every answer recorded (status, ms, case id)."""
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def client(i: int) -> None:
        start.wait()
        for r in range(rounds):
            t0 = time.perf_counter()
            try:
                status, body = post_case(base, kind, paths, subject=f"{subject_prefix}-{i}-{r}", code=code)
            except OSError as e:
                status, body = 0, {"error": f"{type(e).__name__}: {e}"}
            ms = (time.perf_counter() - t0) * 1e3
            with lock:
                results.append({"client": i, "round": r, "status": status, "ms": ms, "id": body.get("id"),
                                "error": body.get("error")})

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 201]
    times = sorted(r["ms"] for r in ok)

    def pct(q: float) -> float | None:
        return round(times[min(len(times) - 1, int(round(q * (len(times) - 1))))], 1) if times else None

    return {"kind": kind, "clients": clients, "rounds": rounds, "requests": len(results), "ok": len(ok),
            "failed": [r for r in results if r["status"] != 201], "ids": [r["id"] for r in ok],
            "wall_s": round(wall, 2), "cases_per_s": round(len(ok) / wall, 2) if wall else None,
            "p50_ms": pct(0.5), "p95_ms": pct(0.95),
            "mean_ms": round(statistics.fmean(times), 1) if times else None}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.loadtest", description=__doc__.split("\n")[0])
    ap.add_argument("url")
    ap.add_argument("--kind", choices=("malaria", "oct"), required=True)
    ap.add_argument("files", nargs="+", type=Path, help="the photos of one case (OCT: one scan)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--access-code")
    args = ap.parse_args(argv)
    report = run_load(args.url, args.kind, args.files, args.clients, args.rounds, args.access_code)
    report["failed"] = report["failed"][:5]
    report.pop("ids")
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] == report["requests"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
