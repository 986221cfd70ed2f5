"""`serve --https` as a user meets it: the device's certificates, a real HTTPS server, Chromium trusting it.

    python -m pytest -q tests/test_https.py

The certificate tests need only the `openssl` program; the server tests start
`python -m edge_runtime serve --https` with the released field model on
127.0.0.1 and verify every HTTPS answer against the CA the server made; the
browser test loads the HTTPS page in Debian's Chromium (trusting the server's
key through --ignore-certificate-errors-spki-list, in a temporary profile),
registers the service worker, takes a field photo with the live camera (a
fake camera showing a real field photo), stops the server and reloads.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

if shutil.which("openssl") is None:
    pytest.skip("serve --https makes its certificates with the openssl program: apt-get install openssl",
                allow_module_level=True)

from edge_runtime.fileio import sha256_file
from edge_runtime.serve import tls

from helpers import ROOT

FIELDS = sorted((ROOT / "tests" / "data" / "iml_malaria_sample" / "fields").glob("*.JPG"))


def mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


def handshake(files: tls.TLSFiles, server_name: str, cafile: Path | None) -> dict:
    """A TLS handshake over a socket pair: the server side with the device's certificate and key, the client
    verifying against `cafile` for `server_name`; the certificate the client saw (or ssl.SSLCertVerificationError)."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(files.server_cert, files.server_key)
    client_ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    a, b = socket.socketpair()
    errors = []

    def serve():
        try:
            with server_ctx.wrap_socket(a, server_side=True) as s:
                s.recv(1)
        except (ssl.SSLError, OSError) as e:
            errors.append(e)

    t = threading.Thread(target=serve)
    t.start()
    try:
        with client_ctx.wrap_socket(b, server_hostname=server_name) as c:
            cert = c.getpeercert()
            c.sendall(b"x")
            return cert
    finally:
        t.join(timeout=30)


def test_certificates_made_once_reused_and_keys_private(tmp_path):
    folder = tmp_path / "data" / "tls"
    names = tls.default_names("fieldpi", ["192.168.4.1"])
    files = tls.ensure_certificates(folder, names, host="fieldpi")
    assert files.made == ("ca", "server")
    assert {"127.0.0.1", "::1", "localhost", "fieldpi", "fieldpi.local", "192.168.4.1"} <= set(files.names)
    assert tls.cert_names(files.server_cert) == set(files.names)
    assert mode(folder / "ca.key") == 0o600 and mode(files.server_key) == 0o600 and mode(folder) == 0o700
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    before = {p.name: sha256_file(p) for p in folder.iterdir()}

    again = tls.ensure_certificates(folder, names, host="fieldpi")
    assert again.made == () and {p.name: sha256_file(p) for p in folder.iterdir()} == before
    assert again.ca_sha256 == files.ca_sha256

    # Verified as a phone would: against the CA, by name and by address; not without it.
    for name in ("localhost", "fieldpi.local", "192.168.4.1", "127.0.0.1"):
        cert = handshake(files, name, files.ca_cert)
        assert ("DNS", "localhost") in cert["subjectAltName"] and ("IP Address", "127.0.0.1") in cert["subjectAltName"]
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(files, "localhost", None)
    with pytest.raises(ssl.SSLCertVerificationError):  # a name the certificate does not hold
        handshake(files, "192.168.4.2", files.ca_cert)

    # A new address: a new server certificate from the same CA (nothing for phones to trust again).
    moved = tls.ensure_certificates(folder, [*names, "10.1.2.3"], host="fieldpi")
    assert moved.made == ("server",) and moved.ca_sha256 == files.ca_sha256
    assert {"10.1.2.3", "192.168.4.1"} <= set(moved.names)  # the old address stays covered
    assert sha256_file(folder / "ca.key") == before["ca.key"]
    handshake(moved, "10.1.2.3", files.ca_cert)


def test_the_ca_signs_for_nothing_but_the_device(tmp_path):
    """Name constraints: a certificate for another site made with the device's CA key does not verify."""
    files = tls.ensure_certificates(tmp_path / "tls", tls.default_names("fieldpi", ["192.168.4.1"]), host="fieldpi")
    scope = tls.ca_scope(files.ca_cert)
    assert "fieldpi" in scope[1] and "local" in scope[1] and "example.com" not in scope[1]
    cnf = tmp_path / "evil.cnf"
    cnf.write_text("[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = example.com\n"
                   "[ext]\nsubjectAltName = DNS:example.com, IP:8.8.8.8\nextendedKeyUsage = serverAuth\n")

    def openssl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["openssl", *args], capture_output=True, text=True)

    key, csr, crt = tmp_path / "evil.key", tmp_path / "evil.csr", tmp_path / "evil.crt"
    assert openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                   "-out", str(key)).returncode == 0
    assert openssl("req", "-new", "-config", str(cnf), "-key", str(key), "-out", str(csr)).returncode == 0
    assert openssl("x509", "-req", "-in", str(csr), "-CA", str(files.ca_cert), "-CAkey", str(files.folder / "ca.key"),
                   "-set_serial", "7", "-days", "30", "-extfile", str(cnf), "-extensions", "ext",
                   "-out", str(crt)).returncode == 0
    out = openssl("verify", "-CAfile", str(files.ca_cert), str(crt))
    assert out.returncode != 0 and "subtree violation" in (out.stdout + out.stderr), out.stdout + out.stderr
    assert openssl("verify", "-CAfile", str(files.ca_cert), str(files.server_cert)).returncode == 0


def test_a_half_made_or_broken_set_is_made_again(tmp_path):
    folder = tmp_path / "tls"
    names = ["localhost", "127.0.0.1"]
    first = tls.ensure_certificates(folder, names)
    (folder / "server.crt").unlink()  # killed between the key and the certificate
    assert tls.ensure_certificates(folder, names).made == ("server",)
    # A CA key that is not the certificate's: a new CA, said so (phones must trust it again).
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-out", str(folder / "ca.key")], check=True, capture_output=True)
    again = tls.ensure_certificates(folder, names)
    assert again.made == ("ca-replaced", "server") and again.ca_sha256 != first.ca_sha256
    handshake(again, "localhost", again.ca_cert)
    with pytest.raises(tls.TLSError, match="neither an IP address nor a host name"):
        tls.ensure_certificates(folder, ["bad name!"])


# ---------------------------------------------------------------- the server over HTTPS

pytest.importorskip("starlette", reason="the field app needs the `serve` extra")
pytest.importorskip("cv2", reason="malaria cases need the `smear` extra (opencv-python-headless)")
from test_serve import READY_TIMEOUT_S, Server, free_port, need_browser, phone_browser  # noqa: E402

from benchmarks.loadtest import multipart  # noqa: E402


def https_server(tmp_path: Path, *extra: str, data: Path | None = None, port: int | None = None) -> tuple[Server, int]:
    """`serve --https` with the released field model: (server polled on its plain-HTTP port, HTTPS port)."""
    https_port, http_port = port or free_port(), free_port()
    s = Server(ROOT, data or tmp_path / "data", "--https", "--port", str(https_port), "--http-port", str(http_port),
               *extra, port=http_port, models=["malaria-field"]).start()
    return s, https_port


def https_get(port: int, path: str, cafile: Path, host: str = "127.0.0.1", **kw):
    ctx = ssl.create_default_context(cafile=str(cafile))
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=READY_TIMEOUT_S)
    try:
        conn.request(kw.pop("method", "GET"), path, **kw)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read(), conn.sock.getpeercert()
    finally:
        conn.close()


@pytest.mark.server
def test_https_server_verified_against_its_ca_and_plain_http_beside_it(tmp_path):
    s, port = https_server(tmp_path)
    ca = s.data / "tls" / "ca.crt"
    try:
        out = s.output()
        assert f"https://127.0.0.1:{port}/" in out and "(made now)" in out and "/ca.crt" in out
        status, _, body, cert = https_get(port, "/healthz", ca)
        assert status == 200 and json.loads(body)["https"] == {"port": port, "ca_cert": "/ca.crt"}
        assert ("IP Address", "127.0.0.1") in cert["subjectAltName"] and ("DNS", "localhost") in cert["subjectAltName"]
        status, headers, page, _ = https_get(port, "/", ca, host="localhost")
        assert status == 200 and b"/static/app.js" in page
        with pytest.raises(ssl.SSLCertVerificationError):  # nobody trusts it without the CA
            http.client.HTTPSConnection("127.0.0.1", port, context=ssl.create_default_context(),
                                        timeout=30).request("GET", "/healthz")

        # The service worker: at the root, as JavaScript, never cached by HTTP, its version filled in.
        status, headers, sw, _ = https_get(port, "/sw.js", ca)
        assert status == 200 and headers["content-type"].startswith("text/javascript")
        assert headers["cache-control"] == "no-cache" and b"__SHELL_VERSION__" not in sw
        assert b'"/static/app.js"' in sw and "default-src 'self'" in headers["content-security-policy"]

        # A case over HTTPS, from the page's own origin; the plain-HTTP side sees it and serves the CA.
        body, ctype = multipart({"kind": "malaria"}, [("files", FIELDS[0].name, FIELDS[0].read_bytes())])
        status, _, answer, _ = https_get(port, "/api/cases", ca, method="POST", body=body,
                                         headers={"Content-Type": ctype, "Origin": f"https://127.0.0.1:{port}"})
        assert status == 201, answer[:300]
        assert s.json("/api/cases")["total"] == 1
        status, headers, crt = s.get("/ca.crt")
        assert status == 200 and crt == ca.read_bytes() and headers["content-type"] == "application/x-x509-ca-cert"
        assert s.json("/healthz")["https"]["port"] == port
    finally:
        s.stop()
    before = sha256_file(s.data / "tls")
    s2, port2 = https_server(tmp_path, data=s.data)
    try:
        assert "(reused)" in s2.output() and sha256_file(s.data / "tls") == before
        assert https_get(port2, "/healthz", ca)[0] == 200
    finally:
        s2.stop()
    # Plain HTTP as before: no CA to hand out, nothing about HTTPS.
    s3 = Server(ROOT, s.data, models=["malaria-field"]).start()
    try:
        assert s3.json("/healthz")["https"] is None
        status, _, body = s3.get("/ca.crt")
        assert status == 404 and "--https" in json.loads(body)["error"]
    finally:
        s3.stop()


def test_bad_https_options_and_no_openssl_exit_2(tmp_path):
    no_openssl = tmp_path / "empty-path"
    no_openssl.mkdir()
    for extra, path, message in (
            (["--http-port", "x"], None, "--http-port must be a port number or off"),
            (["--port", "9443", "--http-port", "9443"], None, "differ from the HTTPS port"),
            (["--tls-name", "no such name!"], None, "neither an IP address nor a host name"),
            ([], str(no_openssl), "needs the openssl program, which is not installed: sudo apt-get install openssl")):
        env = {**os.environ, "PYTHONPATH": str(ROOT), **({"PATH": path} if path else {})}
        p = subprocess.run([sys.executable, "-m", "edge_runtime", "serve", "--https", "--models", "malaria-field",
                            "--data", str(tmp_path / "d"), *extra],
                           cwd=ROOT, capture_output=True, text=True, timeout=READY_TIMEOUT_S, env=env)
        assert p.returncode == 2 and message in p.stderr, (extra, p.stderr)
        assert not (tmp_path / "d" / "tls" / "server.crt").exists()


# ---------------------------------------------------------------- Chromium over HTTPS

def fake_camera_file(tmp_path: Path) -> Path:
    """A real field photo as the fake camera's picture (Chromium plays an .mjpeg file: JPEG frames)."""
    out = tmp_path / "field.mjpeg"
    with Image.open(FIELDS[1]) as im:
        im.convert("RGB").save(out, "JPEG", quality=95)
    return out


@pytest.mark.server
@pytest.mark.browser
def test_phone_browser_https_service_worker_camera_and_reload_without_the_device(tmp_path):
    need_browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    shots = Path(os.environ.get("MEDGE_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    s, port = https_server(tmp_path)
    spki = tls.spki_sha256(s.data / "tls" / "server.crt")
    driver = phone_browser(tmp_path, flags=(f"--ignore-certificate-errors-spki-list={spki}",
                                            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                                            f"--use-file-for-fake-video-capture={fake_camera_file(tmp_path)}"))
    url = f"https://127.0.0.1:{port}/"
    console = []
    try:
        wait = WebDriverWait(driver, READY_TIMEOUT_S)
        # The plain-HTTP page points to the secure one and to the certificate.
        driver.get(s.url + "/#/malaria")
        wait.until(lambda d: d.find_element(By.ID, "secure-link").is_displayed())
        links = [a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "#secure-link a")]
        assert links == [url, s.url + "/ca.crt"], links

        driver.get(url + "#/malaria")
        wait.until(lambda d: "malaria" in d.find_element(By.ID, "device").text)
        assert driver.execute_script("return window.isSecureContext && location.protocol") == "https:"
        assert not driver.find_element(By.ID, "secure-link").is_displayed()
        driver.set_script_timeout(READY_TIMEOUT_S)
        scope = driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "navigator.serviceWorker.ready.then((r) => done(r.scope), (e) => done('error: ' + e));")
        assert scope == url, scope
        driver.refresh()
        wait.until(lambda d: d.execute_script("return !!navigator.serviceWorker.controller"))
        wait.until(lambda d: "malaria" in d.find_element(By.ID, "device").text)
        kept = driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "caches.keys().then(async (ks) => done((await Promise.all(ks.map(async (k) =>"
            " (await (await caches.open(k)).keys()).map((r) => new URL(r.url).pathname)))).flat()));")
        assert sorted(kept) == ["/", "/static/app.css", "/static/app.js", "/static/ondevice.js"], kept

        # The live camera: the rear camera's frames become field photos, then a case as usual.
        assert not driver.find_element(By.ID, "malaria-camera-label").is_displayed()
        driver.find_element(By.ID, "malaria-live").click()
        wait.until(lambda d: d.execute_script("return document.getElementById('camera-video').videoWidth > 0"))
        size = driver.execute_script("const v = document.getElementById('camera-video'); "
                                     "return [v.videoWidth, v.videoHeight]")
        driver.find_element(By.ID, "camera-shot").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#malaria-list li")) == 1)
        assert "camera-1.jpg" in driver.find_element(By.ID, "malaria-list").text
        assert f"{size[0]}×{size[1]}" in driver.find_element(By.ID, "camera-status").text
        driver.save_screenshot(str(shots / "https-1-camera.png"))
        driver.find_element(By.ID, "camera-done").click()
        assert not driver.execute_script("return !!document.getElementById('camera-video').srcObject")
        driver.find_element(By.ID, "malaria-submit").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#case-view #headline"))
        summary = driver.find_element(By.ID, "summary").text
        assert "Red cells counted" in summary
        cells = int(next(line for line in summary.splitlines() if line.startswith("Red cells counted")).split()[-1])
        assert cells > 50, summary  # the camera frame was the field photo, and its cells were found
        console += driver.get_log("browser")

        # The device goes away: a reload still shows the page, and says so.
        s.stop()
        driver.get(url + "#/malaria")  # the same document: only the hash changes
        driver.refresh()
        wait.until(lambda d: "not reachable" in d.find_element(By.ID, "device").text)
        assert "kept on this phone" in driver.find_element(By.ID, "device").text
        assert driver.find_element(By.ID, "malaria-form").is_displayed()
        assert "Cannot reach the device" in driver.find_element(By.ID, "error").text
        driver.save_screenshot(str(shots / "https-2-offline.png"))
        offline = driver.get_log("browser")
    finally:
        driver.quit()
    errors = [e for e in console if e.get("level") == "SEVERE"]
    assert not errors, errors
    # Offline, the only errors are the calls that could not reach the device.
    unexpected = [e for e in offline if e.get("level") == "SEVERE" and "ERR_CONNECTION_REFUSED" not in e["message"]
                  and "Failed to fetch" not in e["message"]]
    assert not unexpected, unexpected


@pytest.mark.server
@pytest.mark.browser
def test_phone_browser_past_the_warning_gets_the_camera_but_no_kept_page(tmp_path):
    """Not trusting the CA: Chromium's warning; past it the camera opens, but no service worker, and the page
    says why and links the certificate."""
    need_browser()
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    s, port = https_server(tmp_path)
    driver = phone_browser(tmp_path, flags=("--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"))
    try:
        wait = WebDriverWait(driver, READY_TIMEOUT_S)
        driver.get(f"https://127.0.0.1:{port}/#/malaria")
        wait.until(lambda d: "ERR_CERT_AUTHORITY_INVALID" in d.find_element(By.TAG_NAME, "body").text)
        ActionChains(driver).send_keys("thisisunsafe").perform()  # Chromium's "proceed anyway" from the keyboard
        wait.until(lambda d: any(e.is_displayed() for e in d.find_elements(By.ID, "secure-link")))
        assert "does not trust the device's certificate" in driver.find_element(By.ID, "secure-link").text
        href = driver.find_element(By.CSS_SELECTOR, "#secure-link a").get_attribute("href")
        assert href == f"https://127.0.0.1:{port}/ca.crt"
        assert driver.execute_script("return !!navigator.serviceWorker.controller") is False
        driver.find_element(By.ID, "malaria-live").click()
        wait.until(lambda d: d.execute_script("return document.getElementById('camera-video').videoWidth > 0"))
    finally:
        driver.quit()
        s.stop()
