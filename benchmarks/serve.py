"""The field app under load: many phones uploading at once to `python -m edge_runtime serve` on this machine.

    python -m benchmarks serve --models MALARIA.tflite OCT.tflite --field FIELD.jpg --scan SCAN.jpeg [--clients 16]
    python -m benchmarks serve --models malaria oct --field ../shared/data/iml_malaria/fields/PA171700.JPG \\
        --scan scan.jpeg --clients 16 --rounds 2 --out runs/serve-bench

Starts the app as a user does (a subprocess on 127.0.0.1, a free port, a
fresh data folder), then for a smear field and for an OCT scan runs
`--clients` threads that each upload `--rounds` cases at once
(`benchmarks.loadtest`, standard library HTTP), and checks every
answer is a stored case. Reports cases per second over the run and p50/p95
of the time from sending a case to its answer, with the machine and its
load average (other jobs on the cores move these figures a lot).

Writes OUT/serve.json and OUT/serve.md; prints the table. Exit 1 when an
upload failed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.loadtest import request, run_load
from benchmarks.machine import machine_info
from edge_runtime.fileio import atomic_write_text

READY_TIMEOUT_S = 120
FIGURES = ("kind", "clients", "rounds", "requests", "ok", "wall_s", "cases_per_s", "p50_ms", "p95_ms", "mean_ms")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks serve", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", required=True, metavar="NAME|PATH", help="as `edge_runtime serve --models`")
    p.add_argument("--field", type=Path, help="a smear field photo (malaria cases)")
    p.add_argument("--scan", type=Path, help="an OCT scan (OCT cases)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--rounds", type=int, default=1, help="cases each client uploads, one after the other")
    p.add_argument("--workers", type=int, help="the app's --workers (default: its own)")
    p.add_argument("--out", type=Path, default=Path("runs/serve-bench"))
    args = p.parse_args(argv)
    jobs = [(k, f) for k, f in (("malaria", args.field), ("oct", args.scan)) if f is not None]
    if not jobs:
        print("error: give --field and/or --scan", file=sys.stderr)
        return 2
    for _, f in jobs:
        if not f.is_file():
            print(f"error: {f} is not a file", file=sys.stderr)
            return 2
    if args.clients < 1 or args.rounds < 1:
        print("error: --clients and --rounds must be >= 1", file=sys.stderr)
        return 2

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="medge-serve-bench-") as tmp:
        cmd = [sys.executable, "-m", "edge_runtime", "serve", "--models", *args.models, "--port", str(port),
               "--data", str(Path(tmp) / "data"), "--log-level", "warning"]
        if args.workers:
            cmd += ["--workers", str(args.workers)]
        log = open(Path(tmp) / "server.log", "wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            health = None
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    status, _, body = request(url + "/healthz", timeout=5)
                    if status == 200:
                        health = json.loads(body)
                        break
                except OSError:
                    pass
                time.sleep(0.2)
            if health is None:
                print(f"error: the app did not start:\n{(Path(tmp) / 'server.log').read_text(errors='replace')}",
                      file=sys.stderr)
                return 2
            rows, failed = [], 0
            for kind, f in jobs:
                if kind not in health["kinds"]:
                    print(f"error: none of --models serves {kind} cases", file=sys.stderr)
                    return 2
                load_before = _load()
                rep = run_load(url, kind, [f], clients=args.clients, rounds=args.rounds, subject_prefix="bench")
                failed += len(rep["failed"])
                row = {k: rep[k] for k in FIGURES}
                row.update(input=f.name, model=health["models"][kind]["file"], load_avg_before=load_before,
                           load_avg_after=_load(), errors=[r["error"] for r in rep["failed"][:5]])
                rows.append(row)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"command": " ".join(["python -m benchmarks serve", *(argv if argv is not None else sys.argv[1:])]),
           "machine": machine_info(), "workers": health.get("workers"), "rows": rows}
    atomic_write_text(args.out / "serve.json", json.dumps(doc, indent=2) + "\n")
    lines = ["| kind | input | clients x rounds | stored | cases/s | p50 ms | p95 ms | load avg |", "|---" * 8 + "|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['input']} | {r['clients']} x {r['rounds']} | {r['ok']}/{r['requests']} | "
                     f"{r['cases_per_s']} | {r['p50_ms']} | {r['p95_ms']} | {r['load_avg_before']} |")
    m = doc["machine"]
    table = "\n".join(lines)
    atomic_write_text(args.out / "serve.md", f"Machine: {m['cpu_model']} ({m['arch']}, {m['cores']} cores), "
                                             f"{m['os']}; app workers {doc['workers']}.\n\n{table}\n")
    print(table)
    return 1 if failed else 0
