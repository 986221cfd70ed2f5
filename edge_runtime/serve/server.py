"""`python -m edge_runtime serve`: load the models, open the case store, print how to connect, run uvicorn.

    python -m edge_runtime serve --models export/malaria_tflite-int8.tflite export/oct_tflite-int8.tflite
    python -m edge_runtime serve --host 0.0.0.0 --port 8080 --data /srv/medge     # every released model

Models are named or given as paths; each value goes to `edge_runtime.load`
unchanged and its metadata decides whether it serves malaria or OCT cases.
Without `--models`, the models released with the package are served, one per task: for malaria the one
fine-tuned for whole fields (`malaria-field`) when it is released, since the app analyses field photos, and
the cell model (`malaria`) for the Cells tab's single-cell crops (`registry.serving_models`).
Beyond loopback an access code is required: `--access-code`, or one is
generated and printed at start.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import socket
import sys
import tempfile
from pathlib import Path

from edge_runtime import registry
from edge_runtime.model import ModelError
from edge_runtime.serve.analysis import Limits, load_models
from edge_runtime.serve.storage import CaseStore, StoreError
from edge_runtime.smear.decision import min_cells_for

# No 0/O, 1/l/i: read off a screen and typed on a phone.
CODE_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "medge" / "field-app"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def new_access_code(n: int = 8) -> str:
    return "".join(secrets.choice(CODE_ALPHABET) for _ in range(n))


def lan_addresses() -> list[str]:
    """This machine's IPv4 addresses other phones may reach (best effort, no network traffic)."""
    found = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            found.add(info[4][0])
    except OSError:
        pass
    return sorted(a for a in found if not a.startswith("127."))


def run(args) -> int:
    """Start the server from parsed `serve` arguments; returns the exit code."""
    try:  # inside: the web framework is the `serve` extra, which the plain device install does not have
        import uvicorn

        from edge_runtime.serve.app import build_app
    except ImportError as e:
        print(f"error: the field app needs its extra: pip install \"medge[serve]\" ({e})", file=sys.stderr)
        return 2
    try:
        models = args.models or registry.serving_models()
    except registry.ReleaseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not models:
        print("error: no released models in this install; give artifacts: --models MALARIA.tflite OCT.tflite",
              file=sys.stderr)
        return 2
    try:
        slots = load_models(models, threads=args.threads, log=lambda m: print(m, file=sys.stderr))
    except (ModelError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        store = CaseStore(args.data or default_data_dir())
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Uploads over 1 MB are spooled to temp files while they arrive; keep them on the data folder's disk
    # (a Pi's /tmp may be RAM), in its tmp/ that every start empties.
    tempfile.tempdir = str(store.tmp_dir)
    loopback = is_loopback(args.host)
    code = args.access_code
    if code is not None and not code.strip():
        print("error: --access-code is empty", file=sys.stderr)
        return 2
    if code is None and not loopback:
        code = new_access_code()
    limits = Limits(max_request_bytes=int(args.max_upload_mb * 2**20), max_file_bytes=int(args.max_file_mb * 2**20),
                    max_files=args.max_files, max_pixels=int(args.max_megapixels * 1e6))
    app = build_app(slots, store, limits, access_code=code, loopback=loopback, workers=args.workers,
                    web_runtime=args.web_runtime, min_cells=getattr(args, "min_cells", None))
    rec = store.recovered
    print(f"medge field app on http://{args.host}:{args.port}/", flush=True)
    for tab, slot in slots.items():
        i = slot.info
        print(f"  {tab} tab: {i['name']} {i['version']} {i['format']} ({i['file']}, sha256 {i['sha256'][:12]}...)",
              flush=True)
    if "malaria" in slots:
        need = getattr(args, "min_cells", None) or min_cells_for()
        print(f"  malaria cases: at least {need:,} red cells before a negative call", flush=True)
    print(f"  cases: {store.count()} in {store.root}"
          + (f" (removed {rec['tmp']} unfinished upload(s) and {rec['orphans']} unregistered folder(s))"
             if rec["tmp"] or rec["orphans"] else ""), flush=True)
    od = app.state.field_app.ondevice
    # The administrator's note (paths, commands) goes here and to the log; phones read only that it is unavailable.
    if od.ready:
        print(f"  on the phone: the {', '.join(od.models)} tab with {od.health()['runtime']}", flush=True)
    else:
        print(f"  on the phone: no ({od.setup_note}); cells run here", flush=True)
        logging.getLogger("edge_runtime.serve").warning("on-phone analysis unavailable: %s", od.setup_note)
    if not loopback:
        addrs = lan_addresses()
        if addrs:
            print("  phones open: " + ", ".join(f"http://{a}:{args.port}/" for a in addrs), flush=True)
    if code is not None:
        print(f"  access code: {code}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, server_header=False,
                timeout_graceful_shutdown=10)
    return 0
