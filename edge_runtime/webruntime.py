"""The browser runtime the field app serves to phones: LiteRT.js from the npm registry, pinned, verified, cached.

    python -m edge_runtime webruntime fetch [--dir DIR]     # download, verify, unpack (about 19 MB on disk)
    python -m edge_runtime webruntime status [--dir DIR] [--json]
    python3 edge_runtime/webruntime.py fetch                # the same with a bare Python: stdlib only, no numpy

`webruntime.lock.json` (beside this file) pins every package: name, version,
tarball URL, the registry's sha512 `integrity`, and the sha256 of each file
the page needs (LiteRT.js' ES module and its two WebAssembly builds, with and
without relaxed SIMD). `fetch` downloads each tarball with urllib, refuses it
unless its sha512 is the pinned one, extracts only the listed files (checking
each sha256), and renames the finished folder into place: a failed or killed
fetch leaves the cache as it was. Nothing else is downloaded, ever: the
server and the tests only read the cache.

Where: `--dir`, else $MEDGE_WEB_RUNTIME, else $XDG_CACHE_HOME/medge/web-runtime
(~/.cache/medge/web-runtime). The runtime lives in `<dir>/<name>-<version>/`
with its lock as `medge-web-runtime.json`, written last. The 9 MB .wasm files
are never committed to the repository.

Exit codes (fetch, status): 0 ready, 1 not fetched / download or check failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

try:
    from edge_runtime.fileio import sha256_file, write_json
except ImportError:  # run as a script by a Python without numpy (CI before its venv): fileio is stdlib-only
    from fileio import sha256_file, write_json  # type: ignore[no-redef]

LOCK = Path(__file__).resolve().parent / "webruntime.lock.json"
ENV = "MEDGE_WEB_RUNTIME"
MANIFEST = "medge-web-runtime.json"
SCHEMA = "medge-web-runtime/1"
MAX_TARBALL_BYTES = 64 * 2**20  # the pinned tarballs are ~11 MB; anything far larger is not them
TIMEOUT_S = 60
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class WebRuntimeError(RuntimeError):
    """The runtime could not be fetched or is not usable; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Package:
    """One pinned npm package: where its tarball is, its sha512, and the files (relative path -> sha256) we keep."""

    name: str
    version: str
    tarball: str
    integrity: str
    files: Mapping[str, str]
    license: str = ""


@dataclasses.dataclass(frozen=True)
class Lock:
    """The pinned runtime: packages, the ES module to import, the folder of the .wasm files, the import map."""

    name: str
    version: str
    entry: str
    wasm_dir: str
    import_map: Mapping[str, str]
    packages: tuple[Package, ...]
    raw: Mapping[str, Any]

    @property
    def folder(self) -> str:
        return f"{self.name}-{self.version}"

    @classmethod
    def read(cls, path: Path = LOCK) -> Lock:
        d = json.loads(Path(path).read_text("utf-8"))
        if d.get("schema") != SCHEMA:
            raise WebRuntimeError(f"{path}: schema {d.get('schema')!r}, expected {SCHEMA!r}")
        pkgs = tuple(Package(p["name"], p["version"], p["tarball"], p["integrity"], dict(p["files"]),
                             p.get("license", "")) for p in d["packages"])
        return cls(d["name"], d["version"], d["entry"], d["wasm_dir"], dict(d.get("import_map", {})), pkgs, d)


@dataclasses.dataclass(frozen=True)
class WebRuntime:
    """A fetched, verified runtime: `root` is served at the app's /web-runtime/."""

    root: Path
    lock: Lock

    @property
    def files(self) -> list[Path]:
        return [self.root / p.name / rel for p in self.lock.packages for rel in p.files]

    @property
    def bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def describe(self) -> dict[str, Any]:
        return {"name": self.lock.name, "version": self.lock.version, "root": str(self.root), "bytes": self.bytes,
                "packages": [f"{p.name}@{p.version}" for p in self.lock.packages],
                "licenses": sorted({p.license for p in self.lock.packages if p.license})}


def cache_dir(dest: str | os.PathLike | None = None) -> Path:
    """`dest`, else $MEDGE_WEB_RUNTIME, else $XDG_CACHE_HOME/medge/web-runtime (~/.cache/medge/web-runtime)."""
    if dest:
        return Path(dest).expanduser()
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "medge" / "web-runtime"


def _sri(data: bytes, integrity: str) -> bool:
    """Does `data` match an npm `integrity` string (Subresource Integrity: "sha512-<base64>")?"""
    algo, _, digest = integrity.partition("-")
    if algo not in ("sha512", "sha384", "sha256"):
        raise WebRuntimeError(f"integrity {integrity[:20]!r}...: only sha256/384/512 are accepted")
    return base64.b64encode(hashlib.new(algo, data).digest()).decode() == digest


def _download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:  # URLs come from the pinned lock
        data = resp.read(MAX_TARBALL_BYTES + 1)
    if len(data) > MAX_TARBALL_BYTES:
        raise WebRuntimeError(f"{url}: more than {MAX_TARBALL_BYTES // 2**20} MB; not the pinned tarball")
    return data


def _unpack(pkg: Package, data: bytes, into: Path) -> None:
    """Only the listed files of an npm tarball (top folder `package/`, whatever its name), each sha256-checked."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name}
        for rel, sha in pkg.files.items():
            m = members.get(rel)
            if m is None or not m.isfile():
                raise WebRuntimeError(f"{pkg.name}@{pkg.version}: the tarball has no file {rel!r}")
            content = tar.extractfile(m).read()
            if hashlib.sha256(content).hexdigest() != sha:
                raise WebRuntimeError(f"{pkg.name}@{pkg.version}: {rel} does not have its pinned sha256")
            out = into / pkg.name / rel  # names from the lock, never from the tarball
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(content)


def find(dest: str | os.PathLike | None = None, lock: Lock | None = None) -> WebRuntime:
    """The fetched runtime, every file present with its pinned sha256.

    Raises:
        WebRuntimeError: not fetched, another version, or a file missing or altered (the message says which
            and gives the fetch command).
    """
    lock = lock or Lock.read()
    root = cache_dir(dest) / lock.folder
    fix = f"run: python -m edge_runtime webruntime fetch{f' --dir {dest}' if dest else ''}"
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise WebRuntimeError(f"{lock.name} {lock.version} is not fetched into {root.parent} ({fix})")
    if json.loads(manifest.read_text("utf-8")) != lock.raw:
        raise WebRuntimeError(f"{root} was fetched from another lock file ({fix})")
    for p in lock.packages:
        for rel, sha in p.files.items():
            f = root / p.name / rel
            if not f.is_file() or sha256_file(f) != sha:
                raise WebRuntimeError(f"{f} is missing or altered ({fix})")
    return WebRuntime(root, lock)


def fetch(dest: str | os.PathLike | None = None, lock: Lock | None = None,
          download: Callable[[str], bytes] = _download, log: Callable[[str], None] = print) -> WebRuntime:
    """Download, verify and unpack the pinned runtime into the cache (nothing happens if it is already there).

    Raises:
        WebRuntimeError: a tarball that is not the pinned one, a file missing from it or altered.
        OSError: the registry cannot be reached (urllib.error.URLError) or the folder cannot be written.
    """
    lock = lock or Lock.read()
    try:
        return find(dest, lock)
    except WebRuntimeError:
        pass
    root = cache_dir(dest)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{lock.folder}.tmp-", dir=root))
    try:
        tmp.chmod(0o755)  # mkdtemp makes 0700; the server may run as another user
        for p in lock.packages:
            log(f"fetching {p.name}@{p.version} from {p.tarball}")
            data = download(p.tarball)
            if not _sri(data, p.integrity):
                raise WebRuntimeError(f"{p.tarball}: its sha512 is not the pinned integrity; refused")
            _unpack(p, data, tmp)
        write_json(tmp / MANIFEST, lock.raw)  # last: a folder without it is not a runtime
        final = root / lock.folder
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{lock.folder}.old-", dir=root))
            os.replace(final, old / "x")
            shutil.rmtree(old)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    rt = find(dest, lock)
    log(f"{lock.name} {lock.version} ready in {rt.root} ({rt.bytes / 2**20:.1f} MB)")
    return rt


# ---------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("fetch", "status"), help="fetch: download and verify; status: is it there?")
    p.add_argument("--dir", help=f"cache folder (default ${ENV}, else ~/.cache/medge/web-runtime)")
    p.add_argument("--json", action="store_true", help="status as JSON")


def run(args) -> int:
    try:
        rt = fetch(args.dir) if args.action == "fetch" else find(args.dir)
    except (WebRuntimeError, OSError) as e:
        if args.json:
            print(json.dumps({"ready": False, "reason": str(e)}))
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps({"ready": True, **rt.describe()}, indent=2) if args.json
          else f"ready: {rt.lock.name} {rt.lock.version} in {rt.root} ({rt.bytes / 2**20:.1f} MB)")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="webruntime", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
