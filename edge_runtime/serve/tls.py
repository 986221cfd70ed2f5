"""`serve --https`: a small certificate authority made on the device, and the server certificate it signs.

    files = ensure_certificates(Path("data/tls"), names=["localhost", "raspberrypi", "192.168.1.20"])
    uvicorn.run(app, ssl_certfile=files.server_cert, ssl_keyfile=files.server_key)

At the first start the device makes `ca.key`/`ca.crt` (its own CA, valid 10
years) and `server.key`/`server.crt` (signed by it, valid 397 days, for every
name and address in `names`); later starts reuse them. A phone trusts the CA
once (`GET /ca.crt`, docs/field-app-https.md); when the device gets a new
address, or the server certificate nears its end, only the server certificate
is made again, and the phone keeps trusting it. The CA is name-constrained to
private and loopback addresses, `localhost`, `.local` and the device's own
names, so a phone that trusts it trusts it for nothing else.

Made with the system `openssl` program (Debian and Raspberry Pi OS have it:
`ca-certificates` depends on it), not Python's `cryptography`, which would add
18 MB to the device install (measured: cryptography 51.0.1 with cffi and
pycparser, Python 3.11, x86_64) for a job done once. Stdlib only here.

Private keys are made inside a 0700 temp folder, set to 0600 and renamed into
place; every file is renamed in whole, and each start checks the set (key
matches certificate, server certificate verifies against the CA, not expiring
within 30 days, covers every name), remaking what does not hold, so a start
killed half-way leaves nothing that is used broken.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

CA_DAYS = 3650
SERVER_DAYS = 397  # within every browser's and Apple's limit for a server certificate
RENEW_BEFORE_S = 30 * 24 * 3600
# What the CA may sign for: networks a field device lives on. A name outside these needs a new CA (and a re-trust).
PRIVATE_NETS = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "169.254.0.0/16", "100.64.0.0/10",
                "::1/128", "fc00::/7", "fe80::/10"]
PRIVATE_DNS = ["localhost", "local"]  # `local` permits every mDNS name (raspberrypi.local)


class TLSError(Exception):
    """The certificates could not be made or read; the message says which file and what to do."""


@dataclass(frozen=True)
class TLSFiles:
    folder: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    names: tuple[str, ...]      # the server certificate's DNS names and IP addresses
    ca_sha256: str              # the CA certificate's SHA-256 fingerprint, AB:CD:..., as phones show it
    made: tuple[str, ...]       # what this call made: "ca" (or "ca-replaced": phones must trust it again), "server"


def openssl_path() -> str:
    path = shutil.which("openssl")
    if path is None:
        raise TLSError("serve --https needs the openssl program, which is not installed: "
                       "sudo apt-get install openssl")
    return path


def _run(*args: str, stdin: bytes | None = None) -> bytes:
    try:
        p = subprocess.run([openssl_path(), *args], input=stdin, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise TLSError(f"openssl {args[0]} failed: {e}") from e
    if p.returncode != 0:
        raise TLSError(f"openssl {' '.join(args[:2])} failed: {p.stderr.decode(errors='replace').strip()}")
    return p.stdout


def _ok(*args: str) -> bool:
    try:
        _run(*args)
        return True
    except TLSError:
        return False


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def check_name(name: str) -> str:
    """A DNS name or IP address for the certificate, normalised; ValueError naming what is wrong."""
    name = name.strip().strip("[]").lower().rstrip(".")
    if is_ip(name):
        return str(ipaddress.ip_address(name))
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*", name):
        raise ValueError(f"{name!r} is neither an IP address nor a host name (letters, digits, '-', '.')")
    return name


def default_names(host_name: str, addresses: list[str]) -> list[str]:
    """What a phone may type to reach the device: localhost, its host name (and .local), loopback, LAN addresses."""
    names = ["localhost", "127.0.0.1", "::1"]
    host = host_name.split(".")[0].lower()
    for n in (host, f"{host}.local", host_name.lower(), *addresses):
        try:
            names.append(check_name(n))
        except ValueError:
            continue
    return list(dict.fromkeys(names))


def _covered(name: str, nets: list, dns: list[str]) -> bool:
    """Whether a name lies in the networks / under the DNS names of a name constraint."""
    if is_ip(name):
        ip = ipaddress.ip_address(name)
        return any(ip.version == n.version and ip in n for n in nets)
    return any(name == d or name.endswith("." + d) for d in dns)


def _ca_scope(names: list[str], host: str) -> tuple[list, list[str]]:
    """What a new CA may sign for: the private networks, localhost and .local, and whatever else `names` holds
    (each public address alone, each other DNS name and its subdomains)."""
    nets = [ipaddress.ip_network(n) for n in PRIVATE_NETS]
    dns = list(PRIVATE_DNS)
    for n in [host, *names]:
        if not _covered(n, nets, dns):
            if is_ip(n):
                nets.append(ipaddress.ip_network(n))
            else:
                dns.append(n)
    return nets, dns


# ------------------------------------------------------------------ reading certificates

def cert_names(cert: Path) -> set[str]:
    """The subjectAltName entries (DNS names and IP addresses, normalised) of a PEM certificate."""
    text = _run("x509", "-in", str(cert), "-noout", "-text").decode(errors="replace")
    m = re.search(r"X509v3 Subject Alternative Name:[^\n]*\n\s*([^\n]*)", text)
    names = set()
    for entry in (m.group(1).split(",") if m else []):
        kind, _, value = entry.strip().partition(":")
        if kind == "DNS":
            names.add(value.lower())
        elif kind == "IP Address":
            names.add(str(ipaddress.ip_address(value.strip())))
    return names


def ca_scope(ca_cert: Path) -> tuple[list, list[str]]:
    """The permitted networks and DNS names of a CA certificate's name constraints."""
    text = _run("x509", "-in", str(ca_cert), "-noout", "-text").decode(errors="replace")
    block = text.split("X509v3 Name Constraints", 1)[-1] if "X509v3 Name Constraints" in text else ""
    block = block.split("Excluded:", 1)[0]
    block = re.split(r"\n\s*X509v3 |\n\s*Signature Algorithm", block, maxsplit=1)[0]
    nets = []
    for addr, mask in re.findall(r"IP:([0-9A-Fa-f:.]+)/([0-9A-Fa-f:.]+)", block):
        prefix = bin(int(ipaddress.ip_address(mask))).count("1")
        nets.append(ipaddress.ip_network(f"{ipaddress.ip_address(addr)}/{prefix}"))
    return nets, [d.lower() for d in re.findall(r"DNS:([^\s,]+)", block)]


def fingerprint(cert: Path) -> str:
    out = _run("x509", "-in", str(cert), "-noout", "-fingerprint", "-sha256").decode().strip()
    return out.split("=", 1)[1]


def spki_sha256(cert: Path) -> str:
    """base64 sha256 of the certificate's public key (SubjectPublicKeyInfo): what key pinning and Chromium's
    --ignore-certificate-errors-spki-list take."""
    pub = _run("x509", "-in", str(cert), "-noout", "-pubkey")
    der = _run("pkey", "-pubin", "-outform", "DER", stdin=pub)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def _pair_ok(key: Path, cert: Path, ca: Path | None = None) -> bool:
    """Both files there, the key is the certificate's, it is not ending within 30 days (and verifies against ca)."""
    if not key.is_file() or not cert.is_file():
        return False
    try:
        pub_key = _run("pkey", "-in", str(key), "-pubout")
        pub_cert = _run("x509", "-in", str(cert), "-noout", "-pubkey")
    except TLSError:
        return False
    if pub_key.strip() != pub_cert.strip():
        return False
    if not _ok("x509", "-in", str(cert), "-noout", "-checkend", str(RENEW_BEFORE_S)):
        return False
    return ca is None or _ok("verify", "-CAfile", str(ca), str(cert))


# ------------------------------------------------------------------ making them

def _serial() -> str:
    return f"0x{secrets.randbits(126) | 1 << 100:x}"  # positive, unpredictable, under 20 bytes


def _install(tmp: Path, final: Path, mode: int) -> None:
    """Set the mode, flush to disk, rename into place (the folder is fsynced by the caller)."""
    os.chmod(tmp, mode)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_key(path: Path) -> None:
    _run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))
    os.chmod(path, 0o600)


def _alt_names(names: list[str]) -> str:
    dns = [n for n in names if not is_ip(n)]
    ips = [n for n in names if is_ip(n)]
    return "\n".join([f"DNS.{i} = {n}" for i, n in enumerate(dns, 1)] + [f"IP.{i} = {n}" for i, n in enumerate(ips, 1)])


def _make_ca(work: Path, host: str, names: list[str]) -> None:
    nets, dns = _ca_scope(names, host)
    permitted = [f"permitted;IP:{n.network_address}/{n.netmask}" for n in nets]
    permitted += [f"permitted;DNS:{d}" for d in dns]
    (work / "ca.cnf").write_text(
        "[req]\ndistinguished_name = dn\nprompt = no\nx509_extensions = v3_ca\n"
        f"[dn]\nCN = medge field app CA ({host})\nO = medge field app\n"
        "[v3_ca]\nbasicConstraints = critical, CA:TRUE, pathlen:0\nkeyUsage = critical, keyCertSign, cRLSign\n"
        "subjectKeyIdentifier = hash\n"
        f"nameConstraints = critical, {', '.join(permitted)}\n")
    _new_key(work / "ca.key")
    _run("req", "-new", "-x509", "-config", str(work / "ca.cnf"), "-key", str(work / "ca.key"), "-sha256",
         "-days", str(CA_DAYS), "-set_serial", _serial(), "-out", str(work / "ca.crt"))


def _make_server(work: Path, ca_cert: Path, ca_key: Path, host: str, names: list[str]) -> None:
    (work / "server.cnf").write_text(
        f"[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = {host}\nO = medge field app\n"
        "[v3_server]\nbasicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature\n"
        "extendedKeyUsage = serverAuth\nsubjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n"
        f"subjectAltName = @alt\n[alt]\n{_alt_names(names)}\n")
    _new_key(work / "server.key")
    _run("req", "-new", "-config", str(work / "server.cnf"), "-key", str(work / "server.key"),
         "-out", str(work / "server.csr"))
    _run("x509", "-req", "-in", str(work / "server.csr"), "-CA", str(ca_cert), "-CAkey", str(ca_key),
         "-set_serial", _serial(), "-days", str(SERVER_DAYS), "-sha256", "-extfile", str(work / "server.cnf"),
         "-extensions", "v3_server", "-out", str(work / "server.crt"))


def ensure_certificates(folder: Path, names: list[str], host: str = "medge") -> TLSFiles:
    """The CA and server certificate in `folder`, made when missing, broken, ending or not covering `names`.

    Args:
        folder: where they live (`<data>/tls`), made 0700.
        names: DNS names and IP addresses the server certificate must hold (`check_name`d; see `default_names`).
        host: the device's name, shown in the certificates' subjects.
    Raises:
        TLSError: no openssl, a folder that cannot be written, or a name the CA may not sign for.
    """
    try:
        names = list(dict.fromkeys(check_name(n) for n in names))
        host = check_name(host.split(".")[0]) if host else "medge"
    except ValueError as e:
        raise TLSError(f"a certificate name: {e}") from None
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
    except OSError as e:
        raise TLSError(f"cannot use {folder} for the certificates: {e}") from e
    ca_key, ca_cert = folder / "ca.key", folder / "ca.crt"
    key, cert = folder / "server.key", folder / "server.crt"
    made = []
    with tempfile.TemporaryDirectory(prefix=".new-", dir=folder) as tmp:  # 0700: keys are never readable by others
        work = Path(tmp)
        scope = ca_scope(ca_cert) if _pair_ok(ca_key, ca_cert) else None
        if scope is None or not all(_covered(n, *scope) for n in names):
            replaced = ca_cert.is_file()
            _make_ca(work, host, names)
            _install(work / "ca.key", ca_key, 0o600)
            _install(work / "ca.crt", ca_cert, 0o644)
            _fsync_dir(folder)
            made.append("ca-replaced" if replaced else "ca")
            scope = ca_scope(ca_cert)
        have = cert_names(cert) if cert.is_file() and _pair_ok(key, cert, ca_cert) else None
        if have is None or not set(names) <= have:
            keep = sorted(n for n in (have or set()) if _covered(n, *scope))  # a flapping address stays covered
            _make_server(work, ca_cert, ca_key, host, list(dict.fromkeys(names + keep)))
            _install(work / "server.key", key, 0o600)
            _install(work / "server.crt", cert, 0o644)
            _fsync_dir(folder)
            made.append("server")
            have = cert_names(cert)
            if not _pair_ok(key, cert, ca_cert):
                raise TLSError(f"the server certificate made in {folder} does not verify against its CA")
    return TLSFiles(folder, ca_cert, cert, key, tuple(sorted(have)), fingerprint(ca_cert), tuple(made))

