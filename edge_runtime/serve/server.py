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

    python -m edge_runtime serve --host 0.0.0.0 --https        # https on 8443, plain http on 8080 beside it

`--https` makes (once, kept in DATA/tls) the device's CA and a server
certificate for its names and addresses (`edge_runtime.serve.tls`), serves
HTTPS on `--port` and the same app in plain HTTP on `--http-port`, where a
phone that does not trust the CA yet still works and downloads `/ca.crt`
(docs/field-app-https.md). Both listeners run in one process (one loaded copy
of each model, one case store).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import signal
import socket
import struct
import sys
import tempfile
from pathlib import Path

from edge_runtime import registry
from edge_runtime.model import ModelError
from edge_runtime.serve.analysis import Limits, load_models
from edge_runtime.serve.storage import CaseStore, StoreError
from edge_runtime.serve.tls import TLSError, default_names, ensure_certificates
from edge_runtime.smear.decision import FalseCalls, min_cells_for, model_false_calls

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


def _interface_addresses() -> set[str]:
    """Every network interface's IPv4 address (Linux, SIOCGIFADDR); empty elsewhere."""
    found = set()
    try:
        import fcntl
        names = [n for _, n in socket.if_nameindex()]
    except (ImportError, OSError):
        return found
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in names:
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
                found.add(socket.inet_ntoa(packed[20:24]))
            except OSError:  # an interface without an IPv4 address
                continue
    return found


def lan_addresses() -> list[str]:
    """This machine's IPv4 addresses other phones may reach (best effort, no network traffic)."""
    found = _interface_addresses()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            found.add(info[4][0])
    except OSError:
        pass
    return sorted(a for a in found if not a.startswith("127.") and not a.startswith("0."))


def _ports(args) -> tuple[int, int | None]:
    """(main port, plain-HTTP port beside HTTPS or None); ValueError with what is wrong."""
    https = getattr(args, "https", False)
    port = args.port if args.port is not None else (8443 if https else 8080)
    http_port = None
    if https and str(getattr(args, "http_port", "off")).lower() != "off":
        try:
            http_port = int(args.http_port)
        except ValueError:
            raise ValueError(f"--http-port must be a port number or off, not {args.http_port!r}") from None
        if not 0 < http_port < 65536 or http_port == port:
            raise ValueError(f"--http-port {http_port} must be 1-65535 and differ from the HTTPS port {port}")
    return port, http_port


def certificates(args, store_root: Path):
    """The `tls.TLSFiles` for --https: the device's names and addresses, the bound host, --tls-name."""
    host = socket.gethostname()
    names = default_names(host, lan_addresses())
    if args.host not in ("0.0.0.0", "::", ""):
        names.append(args.host)
    names += args.tls_name
    return ensure_certificates(store_root / "tls", names, host=host)


def _serve_both(app, host: str, port: int, http_port: int | None, tls_files, **common) -> None:
    """uvicorn on `port` (HTTPS with `tls_files`), and on `http_port` the same app in plain HTTP beside it.

    With two listeners, SIGINT/SIGTERM stop both gracefully (a second SIGINT forces), then end the process by
    that signal, as uvicorn alone does."""
    import uvicorn

    ssl = {"ssl_certfile": str(tls_files.server_cert), "ssl_keyfile": str(tls_files.server_key)} if tls_files else {}
    if http_port is None:
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, **ssl, **common)).run()
        return

    class Together(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # the handler below stops both servers
            yield

    servers = [Together(uvicorn.Config(app, host=host, port=port, **ssl, **common)),
               Together(uvicorn.Config(app, host=host, port=http_port, **common))]
    caught: list[int] = []

    def on_signal(sig, frame):
        caught.append(sig)
        for s in servers:
            s.force_exit = s.force_exit or (s.should_exit and sig == signal.SIGINT)
            s.should_exit = True

    async def both():
        await asyncio.gather(*(s.serve() for s in servers))

    originals = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        asyncio.run(both())
    finally:
        for sig, handler in originals.items():
            signal.signal(sig, handler)
    for sig in reversed(caught):
        signal.raise_signal(sig)


def run(args) -> int:
    """Start the server from parsed `serve` arguments; returns the exit code."""
    try:  # inside: the web framework is the `serve` extra, which the plain device install does not have
        import uvicorn  # noqa: F401

        from edge_runtime.serve.app import build_app
    except ImportError as e:
        print(f"error: the field app needs its extra: pip install \"medge[serve]\" ({e})", file=sys.stderr)
        return 2
    try:
        port, http_port = _ports(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
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
    tls_files = None
    if args.https:
        try:
            tls_files = certificates(args, store.root)
        except TLSError as e:
            print(f"error: --https: {e}", file=sys.stderr)
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
    rate = getattr(args, "false_call_rate", None)
    false_calls = None if rate is None else FalseCalls.given(rate, "--false-call-rate")
    app = build_app(slots, store, limits, access_code=code, loopback=loopback, workers=args.workers,
                    web_runtime=args.web_runtime, min_cells=getattr(args, "min_cells", None),
                    ca_cert=tls_files.ca_cert if tls_files else None, https_port=port if tls_files else None,
                    false_calls=false_calls)
    rec = store.recovered
    scheme = "https" if tls_files else "http"
    print(f"medge field app on {scheme}://{args.host}:{port}/"
          + (f" and http://{args.host}:{http_port}/" if http_port else ""), flush=True)
    for tab, slot in slots.items():
        i = slot.info
        print(f"  {tab} tab: {i['name']} {i['version']} {i['format']} ({i['file']}, sha256 {i['sha256'][:12]}...)",
              flush=True)
    if "malaria" in slots:
        need = getattr(args, "min_cells", None) or min_cells_for()
        print(f"  malaria cases: at least {need:,} red cells before a negative call", flush=True)
        used = false_calls or model_false_calls(slots["malaria"].model.path)
        print("  malaria cases: " + (f"parasitized calls weighed against {used.per_1000:.1f} false calls per 1,000 "
                                     f"red cells ({used.source})" if used else
                                     "this model's false-call rate is not measured: every call is a parasite seen"),
              flush=True)
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
    addrs = lan_addresses() if not loopback else []
    if addrs:
        print("  phones open: " + ", ".join(f"{scheme}://{a}:{port}/" for a in addrs), flush=True)
    if tls_files:
        t = tls_files
        made = ("reused" if not t.made else "made now" if t.made != ("ca-replaced", "server")
                else "made now with a NEW CA: phones that trusted this device's earlier CA must trust this one")
        print(f"  certificate: {t.server_cert} ({made}) for {', '.join(t.names)}", flush=True)
        base = addrs[0] if addrs else args.host
        where = f"http://{base}:{http_port}/ca.crt" if http_port else f"https://{base}:{port}/ca.crt"
        print(f"  phones trust the device's CA once: {where}, SHA-256 {t.ca_sha256} (docs/field-app-https.md)",
              flush=True)
    if code is not None:
        print(f"  access code: {code}", flush=True)
    _serve_both(app, args.host, port, http_port, tls_files, log_level=args.log_level, server_header=False,
                timeout_graceful_shutdown=10)
    return 0
