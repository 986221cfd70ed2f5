"""The field app as a user meets it: the real server in a subprocess on 127.0.0.1, real HTTP, a real browser.

    MEDGE_EDGE_ARTIFACTS=/path/to/artifacts python -m pytest -q tests/test_serve.py -s   # -s prints the load figures

Every test starts `python -m edge_runtime serve` on a free port with the test
artifacts (`art` fixture), uploads real smear field photos (IML-Malaria, from
../shared/data/iml_malaria when present, else the two bundled fields) and
synthetic OCT scans, and reads the answers back. The browser test drives
Debian's Chromium through Selenium (no browser download) and skips, saying
why, when /usr/bin/chromium, /usr/bin/chromedriver or selenium is missing.
Screenshots go to $MEDGE_SCREENSHOTS (default: the test's tmp folder).
Load figures are printed and written to <tmp>/load.json; nothing here asserts a time.
"""

from __future__ import annotations

import csv
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("starlette", reason="the field app needs the `serve` extra (starlette, uvicorn, python-multipart)")
pytest.importorskip("uvicorn", reason="the field app needs the `serve` extra")
pytest.importorskip("multipart", reason="the field app needs the `serve` extra (python-multipart)")
pytest.importorskip("cv2", reason="malaria cases need the `smear` extra (opencv-python-headless)")

from benchmarks.loadtest import multipart, post_case, request, run_load
from edge_runtime.fileio import sha256_file

from helpers import MALARIA_FILES, OCT_FILES, ROOT

MALARIA_MODEL = MALARIA_FILES["tflite-int8"]
OCT_MODEL = OCT_FILES["int8"]
SHARED_FIELDS = ROOT.parent / "shared" / "data" / "iml_malaria" / "fields"
BUNDLED_FIELDS = ROOT / "tests" / "data" / "iml_malaria_sample" / "fields"
READY_TIMEOUT_S = 120  # a bound on waiting for start-up, not a performance assertion


def smear_fields() -> list[Path]:
    """Real field photos: the shared IML-Malaria set when it is beside the project, else the bundled two."""
    shared = sorted(SHARED_FIELDS.glob("*.JPG")) if SHARED_FIELDS.is_dir() else []
    return shared[:2] if len(shared) >= 2 else sorted(BUNDLED_FIELDS.glob("*.JPG"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m edge_runtime serve` in a subprocess; `start` waits for /healthz."""

    def __init__(self, art: Path, data: Path, *extra: str, port: int | None = None, host: str = "127.0.0.1",
                 models: list[str] | None = None):
        self.art, self.data, self.extra, self.host = art, data, extra, host
        # The test artifacts by default; [] starts the app without --models (the released models).
        self.models = [str(art / MALARIA_MODEL), str(art / OCT_MODEL)] if models is None else models
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = data.parent / f"{data.name}-server-{self.port}.log"

    def start(self) -> Server:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
        cmd = [sys.executable, "-m", "edge_runtime", "serve", *(["--models", *self.models] if self.models else []),
               "--host", self.host, "--port", str(self.port), "--data", str(self.data), "--log-level", "warning",
               *self.extra]
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                status, _, _ = request(self.url + "/healthz", timeout=5)
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready after {READY_TIMEOUT_S} s:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str, **headers) -> tuple[int, dict, bytes]:
        return request(self.url + path, headers=headers)

    def json(self, path: str, **headers):
        status, _, body = self.get(path, **headers)
        assert status == 200, (path, status, body[:300])
        return json.loads(body)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.log.close()

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind runs in the server."""
        self.stop(signal.SIGKILL)


@pytest.fixture
def start_server(art, tmp_path):
    servers = []

    def start(*extra: str, data: Path | None = None, **kw) -> Server:
        s = Server(art, data or tmp_path / "data", *extra, **kw).start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def shared_server(art, tmp_path_factory):
    s = Server(art, tmp_path_factory.mktemp("serve") / "data").start()
    yield s
    s.stop()


def constant_model(art, folder: Path, name: str, probs: list[float]) -> Path:
    """A tiny ONNX model that gives every cell the same `probs` (Parasitized, Uninfected): the pipeline
    (segmentation, quality gate, counting rule) runs for real on real field photos, with a call the tiny test
    model (trained for seconds, mostly uncertain) cannot be relied on to give. Its metadata is the test model's,
    renamed."""
    onnx = pytest.importorskip("onnx", reason="the negative-slide model is built with onnx (train extra)")
    pytest.importorskip("onnxruntime", reason="the negative-slide model runs on onnxruntime (onnx extra)")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    out = folder / f"{name}.onnx"
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 64, 64, 3])
    y = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", 2])
    nodes = [helper.make_node("ReduceMean", ["image"], ["m"], axes=[1, 2, 3], keepdims=1),
             helper.make_node("Flatten", ["m"], ["f"]), helper.make_node("Mul", ["f", "zero"], ["z"]),
             helper.make_node("Add", ["z", "probs_const"], ["probs"])]
    consts = [numpy_helper.from_array(np.zeros((1, 1), np.float32), "zero"),
              numpy_helper.from_array(np.array([probs], np.float32), "probs_const")]
    model = helper.make_model(helper.make_graph(nodes, name, [x], [y], consts),
                              opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, out)
    meta = json.loads((art / MALARIA_FILES["onnx-float32"].replace(".onnx", ".json")).read_text())
    assert meta["labels"] == ["Parasitized", "Uninfected"], meta["labels"]
    out.with_suffix(".json").write_text(json.dumps({**meta, "model": name}))
    return out


@pytest.fixture(scope="module")
def uninfected(art, tmp_path_factory) -> Path:
    """Every cell Uninfected at 0.98: the slide is negative once enough red cells are counted."""
    return constant_model(art, tmp_path_factory.mktemp("uninfected"), "uninfected", [0.02, 0.98])


@pytest.fixture(scope="module")
def parasitized(art, tmp_path_factory) -> Path:
    """Every cell Parasitized at 0.98: a positive slide whatever the tiny test model would have said."""
    return constant_model(art, tmp_path_factory.mktemp("parasitized"), "parasitized", [0.98, 0.02])


def no_cells_png() -> bytes:
    """A photo with no cells in it (flat pink): the field the app cannot read."""
    buf = io.BytesIO()
    Image.new("RGB", (640, 480), (200, 100, 120)).save(buf, "PNG")
    return buf.getvalue()


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def check_whole(server: Server, case: dict) -> None:
    """Every file a case lists is served and (images) decodes completely."""
    for name, url in case["file_urls"].items():
        status, headers, body = server.get(url)
        assert status == 200, (url, status)
        if name.endswith(".png") or name.endswith(".jpg"):
            decode(body)


# ---------------------------------------------------------------- what a user does


@pytest.mark.server
def test_health_and_page(shared_server, art):
    h = shared_server.json("/healthz")
    assert h["status"] == "ok" and set(h["kinds"]) == {"malaria", "oct"}
    assert h["models"]["malaria"]["sha256"] == sha256_file(art / MALARIA_MODEL)
    assert h["models"]["oct"]["sha256"] == sha256_file(art / OCT_MODEL)
    assert h["models"]["oct"]["gradcam"] is True and h["access_code_required"] is False
    status, headers, page = shared_server.get("/")
    assert status == 200 and b"/static/app.js" in page
    assert "script-src 'self'" in headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/app.css"):
        assert shared_server.get(asset)[0] == 200
    # Nothing from the internet: the page and its assets name no other host.
    for path in ("/", "/static/app.js", "/static/app.css"):
        text = shared_server.get(path)[2].decode()
        assert "http://" not in text and "https://" not in text, path


@pytest.mark.server
def test_malaria_case_from_real_field_photos(shared_server, art, tmp_path):
    import edge_runtime
    from edge_runtime.smear import analyse_slide

    fields = smear_fields()
    status, case = post_case(shared_server.url, "malaria", fields, subject="C17 slide 3", note="fever 3 days")
    assert status == 201, case
    r = case["result"]
    assert case["kind"] == "malaria" and case["subject"] == "C17 slide 3" and case["note"] == "fever 3 days"
    assert case["model"]["sha256"] == sha256_file(art / MALARIA_MODEL) and case["model"]["name"] == "malaria"
    # The server ran the CLI's function: the same model on the same photos here gives the same slide summary.
    model = edge_runtime.load(art / MALARIA_MODEL)
    direct = analyse_slide(model, fields).summary.to_dict()
    for key in ("cells", "parasitized", "uncertain", "parasitemia_percent", "parasitemia_max_percent", "refer"):
        assert r["summary"][key] == direct[key], key
    assert r["summary"]["cells"] > 50 and len(r["fields"]) == len(fields)
    for f, path in zip(r["fields"], fields):
        assert f["name"] == path.name and f["error"] is None
        overlay = decode(shared_server.get(case["file_urls"][f["overlay"]])[2])
        assert overlay.size == Image.open(path).size
    flagged = r["summary"]["parasitized"] + r["summary"]["uncertain"]
    assert r["crops_total"] == flagged and len(r["crops"]) == min(flagged, 60)
    for c in r["crops"]:
        assert c["verdict"] in ("parasitized", "uncertain")
        assert max(decode(shared_server.get(case["file_urls"][c["image"]])[2]).size) == 160
    check_whole(shared_server, case)
    assert shared_server.json(case["url"])["result"] == r
    # Exports: one row per region of the case; the case's row in the all-cases CSV.
    status, headers, body = shared_server.get(case["export_csv"])
    assert status == 200 and headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert sum(row["kind"] == "rbc" for row in rows) == r["summary"]["cells"]
    assert {row["case_id"] for row in rows} == {case["id"]} and rows[0]["model_sha256"] == case["model"]["sha256"]
    rows = list(csv.DictReader(io.StringIO(shared_server.get("/api/cases/export.csv")[2].decode())))
    mine = [row for row in rows if row["id"] == case["id"]]
    assert len(mine) == 1 and mine[0]["red_cells"] == str(r["summary"]["cells"])
    # The list and its search.
    listed = shared_server.json("/api/cases?q=c17")["cases"]
    assert [c["id"] for c in listed] == [case["id"]]
    assert case["id"] in [c["id"] for c in shared_server.json("/api/cases?day=today")["cases"]]
    assert shared_server.json("/api/cases?q=nobody-has-this-id")["cases"] == []


@pytest.mark.server
def test_malaria_verdicts_duplicates_and_retake_over_http(start_server, uninfected):
    """A negative on enough red cells, not enough evidence on too few, the same photo twice counted once, and a
    retake of an unreadable field linked to its case, with the model that calls every cell uninfected."""
    s = start_server("--min-cells", "200", models=[str(uninfected)])
    f0, f1 = smear_fields()[:2]
    status, one = post_case(s.url, "malaria", [f0])
    assert status == 201, one
    cells0 = one["result"]["summary"]["cells"]
    assert 0 < cells0 < 200, f"the test needs one field under the minimum: {cells0} red cells"
    rep = one["report"]
    assert rep["verdict"] == "Not enough evidence: photograph about 1 more field" and rep["state"] == "amber"
    assert one["headline"].startswith(rep["verdict"]) and one["refer"] is None
    assert rep["progress"] == {**rep["progress"], "counted": cells0, "needed": 200, "more_fields": 1}
    assert rep["progress"]["text"] == f"{cells0} of 200 red cells counted: about 1 more field to photograph."
    assert rep["disclaimer"] == "A screening aid, not a diagnosis."
    assert rep["time"].startswith("Analysed in ") and one["analysis_ms"] > 0
    # Both fields, and the first again under another name: counted once, and said so.
    status, two = post_case(s.url, "malaria", [f0, f1, ("again.jpg", f0.read_bytes())])
    assert status == 201, two
    summary, rep = two["result"]["summary"], two["report"]
    assert summary["fields"] == 2 and len(two["result"]["fields"]) == 2 and summary["cells"] >= 200
    assert rep["verdict"] == f"No parasites seen in {summary['cells']:,} red cells" and rep["state"] == "ok"
    assert two["refer"] is False and rep["parasitemia"][0]["value"] == f"none seen in {summary['cells']:,} red cells"
    assert "does not rule out malaria" in rep["action"]
    assert rep["duplicates"] == [f"Photo “again.jpg” is the same as photo “{f0.name}”: counted once."]
    assert [f["sha256"] for f in two["result"]["fields"]] == [sha256_file(f0), sha256_file(f1)]
    row = next(r for r in csv.DictReader(io.StringIO(s.get("/api/cases/export.csv")[2].decode()))
               if r["id"] == two["id"])
    assert "again.jpg" in row["duplicates"] and row["headline"] == two["headline"]
    # A field without cells: not counted, its reason given; the retake is a new case linked to this one.
    status, bad = post_case(s.url, "malaria", [f0, ("blank.png", no_cells_png())])
    assert status == 201, bad
    unread = bad["report"]["unread_fields"]
    assert [(u["field"], u["name"]) for u in unread] == [(1, "blank.png")]
    assert unread[0]["reason"].startswith("can't read this field: retake (")
    assert bad["report"]["state"] == "amber" and "Retake the 1 field" in bad["report"]["action"]
    files = [("files", f0.name, s.get(bad["file_urls"][bad["result"]["fields"][0]["photo"]])[2]),
             ("files", f1.name, f1.read_bytes())]
    body, ctype = multipart({"kind": "malaria", "retake_of": bad["id"]}, files)
    status, _, raw = request(s.url + "/api/cases", "POST", body, {"Content-Type": ctype})
    retake = json.loads(raw)
    assert status == 201, retake
    assert retake["result"]["retake_of"] == bad["id"] and retake["report"]["retake_of"] == bad["id"]
    assert retake["report"]["unread_fields"] == [] and retake["report"]["state"] == "ok"
    assert s.json(bad["url"])["result"] == bad["result"]  # the old case is not changed
    for value, words in (("nonsense", "case id"), ("20991231-000000-abcdef", "no malaria case")):
        body, ctype = multipart({"kind": "malaria", "retake_of": value}, files)
        status, _, raw = request(s.url + "/api/cases", "POST", body, {"Content-Type": ctype})
        assert status == 400 and words in json.loads(raw)["error"], raw


@pytest.mark.server
def test_positive_case_reads_treat_and_refer(start_server, parasitized):
    srv = s = start_server(models=[str(parasitized)])
    status, case = post_case(s.url, "malaria", smear_fields()[:1])
    assert status == 201, case
    s = case["result"]["summary"]
    assert s["parasitized"] > 0, "the stand-in model calls every cell parasitized"
    rep = case["report"]
    assert rep["verdict"] == "Parasites seen: treat per protocol and refer" and rep["state"] == "refer"
    assert rep["evidence"] == f"{s['parasitized']:,} parasitized of {s['cells']:,} red cells counted."
    assert "Refer: send the patient" in rep["action"]
    assert "positive at any count" in rep["progress"]["text"] and rep["progress"]["more_fields"] == 0
    assert rep["parasitemia"][0]["label"] == "Parasitemia" and rep["parasitemia"][0]["meaning"]
    assert case["headline"].startswith("Parasites seen: treat per protocol and refer.")
    assert "this model's false-call rate is not measured: every call is a parasite seen" in srv.output()


@pytest.mark.server
def test_a_sites_false_call_rate_turns_calls_it_explains_into_cells_to_review(start_server, parasitized, tmp_path):
    """`serve --false-call-rate R`: a case whose calls no more than a slide without parasites gives at that rate
    reads "Cells to review" (amber, referred to review), and the reviewed result follows a person's calls."""
    srv = start_server("--false-call-rate", "900", models=[str(parasitized)], data=tmp_path / "fcr")
    assert "weighed against 900.0 false calls per 1,000 red cells (--false-call-rate" in srv.output()
    status, case = post_case(srv.url, "malaria", smear_fields()[:1])
    assert status == 201, case
    summary, rep = case["result"]["summary"], case["report"]
    d = summary["decision"]
    assert d["decision"] == "cells to review" and summary["parasitized"] <= d["false_call_limit"]
    assert rep["state"] == "amber" and rep["verdict"] == f"Cells to review: check the {summary['parasitized']} " \
                                                         "flagged cells"
    assert summary["refer"] and "review them" in summary["refer_reasons"][0]
    assert "if every flagged cell is a parasite" in rep["parasitemia"][0]["label"]


def test_one_malaria_model_per_tab_the_cell_model_on_the_cells_tab(art, tmp_path):
    """Released malaria-field and malaria: the field model on the Malaria tab, the cell model on the Cells tab,
    whatever the order; one model alone serves both; two unreleased ones need a prefix."""
    from edge_runtime import registry
    from edge_runtime.serve.analysis import load_models

    released = {r.name: r for r in registry.read_registry()}
    if not {"malaria", "malaria-field"} <= set(released):
        pytest.skip("needs the released malaria and malaria-field models")
    assert registry.serving_models() == ["malaria-field", "malaria"]
    notes = []
    for specs in (["malaria-field", "malaria"], ["malaria", "malaria-field"]):
        slots = load_models(specs, log=notes.append)
        assert (slots["malaria"].info["name"], slots["cells"].info["name"]) == ("malaria-field", "malaria")
    assert notes == []
    slots = load_models(["malaria-field"], log=notes.append)
    assert slots["cells"] is slots["malaria"] and "oct" not in slots
    field = released["malaria-field"].version
    assert f"the cells tab runs malaria-field {field}, made for whole smear fields" in notes[0]
    test_model = str(art / MALARIA_MODEL)
    slots = load_models([f"malaria={test_model}", "cells=malaria"])
    assert (slots["malaria"].info["file"], slots["cells"].info["name"]) == (MALARIA_MODEL, "malaria")
    with pytest.raises(ValueError, match="a second model for the malaria tab .* malaria=FIELDS cells=CELLS"):
        load_models([test_model, str(art / MALARIA_FILES["tflite-float32"])])
    with pytest.raises(ValueError, match="cannot serve the oct tab"):
        load_models([f"oct={test_model}"])


@pytest.mark.server
def test_oct_case_from_a_synthetic_scan(shared_server, art):
    import edge_runtime

    scan = sorted((art / "oct_scans").glob("*.jpeg"))[0]
    status, case = post_case(shared_server.url, "oct", [scan], subject="eye-7")
    assert status == 201, case
    r = case["result"]
    pred = edge_runtime.load(art / OCT_MODEL).predict([scan])[0]
    assert (r["label"], r["decision"], r["referral"]) == (pred.label, pred.decision, pred.referral)
    assert r["probabilities"] == pytest.approx(pred.probabilities, abs=1e-6)
    assert case["model"]["sha256"] == sha256_file(art / OCT_MODEL)
    cam = decode(shared_server.get(case["file_urls"][r["gradcam"]])[2])
    assert cam.size == Image.open(scan).size and cam.mode == "RGB"
    check_whole(shared_server, case)
    rows = list(csv.DictReader(io.StringIO(shared_server.get(case["export_csv"])[2].decode())))
    assert len(rows) == 1 and rows[0]["label"] == pred.label and rows[0]["referral"] == pred.referral


# ---------------------------------------------------------------- bad input: 4xx with a message, nothing stored


def _error(status_body, status):
    got, body = status_body
    assert got == status, body
    assert isinstance(body.get("error"), str) and body["error"] and body.get("status") == status
    return body["error"]


@pytest.mark.server
def test_bad_uploads_get_plain_4xx_and_store_nothing(shared_server, art, tmp_path):
    url = shared_server.url
    before = shared_server.json("/healthz")["cases"]
    field = smear_fields()[0]
    scan = sorted((art / "oct_scans").glob("*.jpeg"))[0]
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 100, 120)).save(png, "PNG")
    assert "not a photo" in _error(post_case(url, "malaria", [("notes.jpg", b"just some text, not a photo")]), 415)
    assert "not a photo" in _error(post_case(url, "malaria", [("empty.png", b"\x89PNG\r\n\x1a\n")]), 415)
    truncated = field.read_bytes()[: field.stat().st_size * 2 // 3]  # past the EXIF header, into the scan
    assert "damaged" in _error(post_case(url, "malaria", [("cut.jpg", truncated)]), 415)
    assert "no cells we can find" in _error(post_case(url, "malaria", [scan]), 422)
    assert "no cells we can find" in _error(post_case(url, "malaria", [("pink.png", png.getvalue())]), 422)
    assert "kind" in _error(post_case(url, "xray", [field]), 400)
    assert "too small" in _error(post_case(url, "oct", [("thumb.png", png.getvalue())]), 422)
    assert "one scan" in _error(post_case(url, "oct", [scan, scan]), 400)
    assert "no photo" in _error(post_case(url, "malaria", []), 400)
    status, _, body = request(url + "/api/cases", "POST", b"kind=malaria",
                              {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 415 and "multipart" in json.loads(body)["error"]
    # A file name never becomes a path: traversal-looking names are display text only.
    status, case = post_case(url, "oct", [("../../etc/passwd.jpeg", scan.read_bytes())])
    assert status == 201 and case["result"]["name"] == "passwd.jpeg" and "passwd" not in "".join(case["files"])
    for path in ("/api/cases/..%2F..%2Fetc", f"/api/cases/{case['id']}/files/..%2Fcases.sqlite",
                 f"/api/cases/{case['id']}/files/cases.sqlite", "/api/cases/20991231-000000-abcdef"):
        status, _, body = shared_server.get(path)
        assert status == 404 and json.loads(body)["status"] == 404, path
    assert shared_server.json("/healthz")["cases"] == before + 1  # only the one good upload
    # Another site open on the phone cannot post here; another host name is refused on loopback (DNS rebinding).
    body, ctype = multipart({"kind": "oct"}, [("files", "s.jpeg", scan.read_bytes())])
    status, _, _ = request(url + "/api/cases", "POST", body, {"Content-Type": ctype, "Origin": "http://evil.example"})
    assert status == 403
    assert request(url + "/api/cases", headers={"Host": "evil.example"})[0] == 421


@pytest.mark.server
def test_upload_limits_give_413(start_server, art, tmp_path):
    s = start_server("--max-upload-mb", "2", "--max-file-mb", "1", "--max-files", "3", "--max-megapixels", "2")
    field = smear_fields()[0]  # 1280x960, ~0.2 MB: within every limit
    assert post_case(s.url, "malaria", [field])[0] == 201
    assert "at most 3" in _error(post_case(s.url, "malaria", [field] * 4), 413)
    big = io.BytesIO()
    Image.new("L", (2000, 1500)).save(big, "PNG")  # 3 megapixels in a few KB
    assert "megapixels" in _error(post_case(s.url, "malaria", [("big.png", big.getvalue())]), 413)
    assert "per photo" in _error(post_case(s.url, "malaria", [("large.jpg", os.urandom(1_200_000))]), 413)
    assert "limit" in _error(post_case(s.url, "malaria", [("huge.jpg", os.urandom(2_500_000))]), 413)
    # A chunked body (no Content-Length) is cut off at the limit while it streams.
    body, ctype = multipart({"kind": "malaria"}, [("files", "huge.jpg", os.urandom(2_500_000))])
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
    try:
        conn.request("POST", "/api/cases", body=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]),
                     headers={"Content-Type": ctype}, encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 413 and "limit" in json.loads(resp.read())["error"]
    except (BrokenPipeError, ConnectionResetError):
        pytest.fail("the server dropped the connection instead of answering 413")
    finally:
        conn.close()
    assert s.json("/healthz")["cases"] == 1


@pytest.mark.server
def test_access_code(start_server, art):
    s = start_server("--access-code", "k7m2p9qx")
    scan = sorted((art / "oct_scans").glob("*.jpeg"))[0]
    assert s.json("/healthz")["access_code_required"] is True
    assert "access code" in _error(post_case(s.url, "oct", [scan]), 401)
    assert s.get("/api/cases")[0] == 401 and s.get("/api/cases", **{"X-Access-Code": "wrong"})[0] == 401
    status, case = post_case(s.url, "oct", [scan], code="k7m2p9qx")
    assert status == 201
    assert s.get(case["file_urls"]["gradcam.png"])[0] == 401  # images too
    assert s.json("/api/cases", **{"X-Access-Code": "k7m2p9qx"})["total"] == 1
    # The page's one-time entry: the session call sets an HttpOnly, SameSite=Strict cookie that then works.
    status, _, _ = request(s.url + "/api/session", "POST", b'{"code": "nope"}', {"Content-Type": "application/json"})
    assert status == 401
    status, headers, _ = request(s.url + "/api/session", "POST", b'{"code": "k7m2p9qx"}',
                                 {"Content-Type": "application/json"})
    cookie = headers["set-cookie"]
    assert status == 204 and "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
    assert s.get(case["file_urls"]["gradcam.png"], Cookie=cookie.split(";")[0])[0] == 200


@pytest.mark.server
def test_beyond_loopback_a_code_is_generated_and_required(start_server, art):
    s = start_server(host="0.0.0.0")
    line = next(ln for ln in s.output().splitlines() if "access code:" in ln)
    code = line.split("access code:")[1].strip()
    assert len(code) >= 8
    assert s.get("/api/cases")[0] == 401
    assert s.json("/api/cases", **{"X-Access-Code": code})["total"] == 0


# ---------------------------------------------------------------- under load


@pytest.mark.server
def test_sixteen_clients_at_once_all_answered_and_stored(start_server, art, tmp_path):
    s = start_server()
    field = smear_fields()[:1]
    scan = sorted((art / "oct_scans").glob("*.jpeg"))[:1]
    malaria = run_load(s.url, "malaria", field, clients=16, rounds=1, subject_prefix="smear")
    oct_ = run_load(s.url, "oct", scan, clients=16, rounds=2, subject_prefix="oct")
    for rep in (malaria, oct_):
        assert rep["ok"] == rep["requests"], rep["failed"][:3]
    ids = malaria["ids"] + oct_["ids"]
    assert len(set(ids)) == len(ids) == 48
    listed = s.json("/api/cases?limit=1000")
    assert listed["total"] == 48 and {c["id"] for c in listed["cases"]} == set(ids)
    figures = {k: {f: rep[f] for f in ("clients", "rounds", "ok", "wall_s", "cases_per_s", "p50_ms", "p95_ms")}
               for k, rep in (("smear field", malaria), ("oct scan", oct_))}
    (tmp_path / "load.json").write_text(json.dumps(figures, indent=2))
    print("\nload figures (16 clients, this machine):", json.dumps(figures, indent=2))


@pytest.mark.server
def test_benchmark_verb_reports_both_kinds(art, tmp_path):
    from benchmarks.serve import main

    scan = sorted((art / "oct_scans").glob("*.jpeg"))[0]
    rc = main(["--models", str(art / MALARIA_MODEL), str(art / OCT_MODEL), "--field", str(smear_fields()[0]),
               "--scan", str(scan), "--clients", "2", "--out", str(tmp_path / "bench")])
    doc = json.loads((tmp_path / "bench" / "serve.json").read_text())
    assert rc == 0 and [r["kind"] for r in doc["rows"]] == ["malaria", "oct"]
    for r in doc["rows"]:
        assert r["ok"] == r["requests"] == 2 and r["p95_ms"] >= r["p50_ms"] > 0
    assert "cases/s" in (tmp_path / "bench" / "serve.md").read_text()


# ---------------------------------------------------------------- nothing lost


def _slow_upload(port: int, body: bytes, ctype: str, stop: threading.Event) -> None:
    """Sends a case's headers and half its body, then waits: an upload in flight when the server dies."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(f"POST /api/cases HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 2])
            stop.wait(60)
    except OSError:
        pass


@pytest.mark.server
def test_sigkill_mid_upload_then_restart_keeps_every_case_and_no_half_case(start_server, art, tmp_path):
    data = tmp_path / "data"
    s = start_server(data=data)
    fields = smear_fields()
    scan = sorted((art / "oct_scans").glob("*.jpeg"))[0]
    earlier = [post_case(s.url, "malaria", fields, subject="before-1")[1],
               post_case(s.url, "oct", [scan], subject="before-2")[1]]
    assert all("id" in c for c in earlier), earlier
    # In flight when the server dies: one upload half sent, and several slides being analysed.
    body, ctype = multipart({"kind": "malaria", "subject": "half"}, [("files", f.name, f.read_bytes()) for f in fields])
    stop = threading.Event()
    half = threading.Thread(target=_slow_upload, args=(s.port, body, ctype, stop))
    half.start()
    answers = []

    def during(i: int) -> None:
        try:
            answers.append(post_case(s.url, "malaria", fields * 3, subject=f"during-{i}")[0])
        except OSError as e:  # the server died under this request: expected
            answers.append(type(e).__name__)

    busy = [threading.Thread(target=during, args=(i,)) for i in range(3)]
    for t in busy:
        t.start()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline and not any((data / "tmp").iterdir()):
        time.sleep(0.01)
    staged = sorted(p.name for p in (data / "tmp").iterdir())
    assert staged, "no case was being written when the server was to be killed"
    s.kill()
    stop.set()
    half.join()
    for t in busy:
        t.join()
    # Restart on the same data: every earlier case is there, whole; nothing half made is left or listed.
    s2 = start_server(data=data)
    h = s2.json("/healthz")
    assert h["recovered_at_start"]["tmp"] >= 1
    assert not any((data / "tmp").iterdir())
    listed = s2.json("/api/cases?limit=1000")["cases"]
    ids = {c["id"] for c in listed}
    assert {c["id"] for c in earlier} <= ids
    assert not set(staged) & ids
    assert {p.name for p in (data / "cases").iterdir()} == ids  # a folder per row, a row per folder
    for c in listed:
        assert c["subject"] != "half"
        check_whole(s2, s2.json(c["url"]))
    for c in earlier:
        assert s2.json(c["url"])["result"] == c["result"]
    print(f"\nkill-and-restart: {len(earlier)} earlier case(s) kept, {len(ids) - len(earlier)} finished before the "
          f"kill, {len(staged)} staged case(s) removed at restart ({h['recovered_at_start']}); "
          f"in-flight answers: {answers}")


def test_model_version_is_the_release_version_when_the_file_is_a_released_one(art, tmp_path):
    import shutil

    from edge_runtime.registry import SCHEMA
    from edge_runtime.serve.analysis import release_version

    model = tmp_path / "released" / MALARIA_MODEL
    model.parent.mkdir()
    shutil.copy(art / MALARIA_MODEL, model)
    sha = sha256_file(model)
    assert release_version(model, sha) is None  # an exported file: no registry beside it
    entry = {"name": "malaria", "version": "1.2.0", "file": model.name, "sha256": sha, "bytes": model.stat().st_size,
             "format": "tflite-int8", "task": "malaria", "labels": ["Parasitized", "Uninfected"]}
    (model.parent / "models.json").write_text(json.dumps({"schema": SCHEMA, "models": [entry]}))
    assert release_version(model, sha) == "1.2.0"
    assert release_version(model, "0" * 64) is None  # another file under the released name is not that release


@pytest.mark.server
def test_released_model_by_name(start_server, tmp_path):
    from edge_runtime.registry import read_registry, serving_defaults

    released = {r.name: r for r in read_registry()}
    if "malaria" not in released:
        pytest.skip("no released malaria model in this install")
    # One malaria model is served: the one made for whole fields, if released (the app analyses field photos).
    name = next(n for n in serving_defaults() if released[n].task == "malaria")
    assert name == ("malaria-field" if "malaria-field" in released else "malaria")
    server = start_server(models=[], data=tmp_path / "data-released")  # no --models: the released ones
    status, case = post_case(server.url, "malaria", smear_fields()[:1])
    assert status == 201, case
    assert case["model"]["version"] == released[name].version
    assert case["model"]["sha256"] == released[name].sha256


def test_store_removes_folders_without_rows_and_rolls_back_a_failed_insert(tmp_path):
    from edge_runtime.serve.case import Case
    from edge_runtime.serve.storage import CaseStore

    store = CaseStore(tmp_path / "d")
    with store.stage() as st:
        st.path("a.png").write_bytes(b"x")
        kept = store.commit(st, Case(kind="oct", subject="kept"))
    assert store.get(kept.id) == kept and kept.files == ("a.png",)
    (store.cases_dir / "20260101-000000-abcdef").mkdir()  # renamed into place, killed before its row
    (store.tmp_dir / "20260101-000001-abcdef").mkdir()
    again = CaseStore(tmp_path / "d")
    assert again.recovered == {"tmp": 1, "orphans": 1, "rows_without_files": 0}
    assert [p.name for p in again.cases_dir.iterdir()] == [kept.id]
    with pytest.raises(TypeError):  # a result JSON cannot hold fails the insert: its folder goes too
        with again.stage() as st:
            st.path("b.png").write_bytes(b"x")
            again.commit(st, Case(kind="oct", subject="broken", result={"x": object()}))
    assert [p.name for p in again.cases_dir.iterdir()] == [kept.id] and again.count() == 1
    assert not any(again.tmp_dir.iterdir())


def test_a_store_written_before_cases_were_typed_still_loads(tmp_path):
    """A row as the app stored it when a case was a dict (every key of a malaria case) reads back as a `Case`
    whose JSON is the row's, key for key; an unknown key is refused with the known ones named."""
    import json
    import sqlite3

    from edge_runtime.serve.case import Case
    from edge_runtime.serve.storage import CaseStore

    store = CaseStore(tmp_path / "d")
    old = {"kind": "malaria", "subject": "C17", "note": "", "model": {"name": "malaria", "sha256": "ab"},
           "headline": "No parasites seen in 120 red cells.", "refer": False,
           "result": {"summary": {"cells": 120}, "fields": [], "crops": [], "crops_total": 0,
                      "positive_label": "Parasitized", "cells": "cells.json", "contact_sheet": None},
           "analysis_ms": 812.5, "id": "20260101-000000-abcdef", "created": "2026-01-01T00:00:00+00:00",
           "files": ["cells.json", "field_00.jpg"]}
    (store.cases_dir / old["id"]).mkdir()
    (store.cases_dir / old["id"] / "cells.json").write_text("[]")
    with sqlite3.connect(store.db_path) as con:
        con.execute("INSERT INTO cases (id, created, day, kind, subject, headline, refer, model_sha256, record) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (old["id"], old["created"], "2026-01-01", "malaria", "C17",
                                                           old["headline"], 0, "ab", json.dumps(old)))
    case = store.get(old["id"])
    assert isinstance(case, Case) and case.to_dict() == old and list(case.to_dict()) == list(old)
    assert store.file(old["id"], "cells.json") is not None and store.list(full=True)[0] == [case]
    with pytest.raises(ValueError, match="unknown case keys \\['reviewed'\\]"):
        Case.from_dict({**old, "reviewed": True})


# ---------------------------------------------------------------- the light layers stay light


def test_plain_install_never_imports_the_web_framework_and_serve_never_tensorflow(art, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = ("import sys, edge_runtime, edge_runtime.cli\n"
            "assert not {'starlette', 'uvicorn', 'multipart'} & set(sys.modules), 'web framework imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)
    code = f"""
import sys
from pathlib import Path
import edge_runtime.serve.app, edge_runtime.serve.server
from edge_runtime.serve.analysis import Limits, analyse_malaria, analyse_oct, check_upload, load_models
from edge_runtime.serve.storage import CaseStore
art, fields = Path({str(art)!r}), [Path(p) for p in {[str(p) for p in smear_fields()]!r}]
slots = load_models([str(art / {MALARIA_MODEL!r}), str(art / {OCT_MODEL!r})])
store = CaseStore({str(tmp_path / 'd')!r})
with store.stage() as st:
    images = [check_upload(f.name, f.read_bytes(), Limits()) for f in fields]
    store.commit(st, analyse_malaria(slots["malaria"], images, st))
scan = sorted((art / "oct_scans").glob("*.jpeg"))[0]
with store.stage() as st:
    store.commit(st, analyse_oct(slots["oct"], check_upload(scan.name, scan.read_bytes(), Limits()), st))
heavy = {{"tensorflow", "keras", "tf_keras"}} & set(sys.modules)
assert not heavy, heavy
print(store.count())
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip().splitlines()[-1] == "2"


# ---------------------------------------------------------------- in a real browser, at phone size

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def need_browser():
    """selenium.webdriver, or a skip saying what is missing."""
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip(f"needs Debian's Chromium and driver ({CHROMIUM}, {CHROMEDRIVER}): "
                    "apt-get install -y chromium chromium-driver")
    return pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")


def phone_browser(tmp_path: Path, width: int = 360, height: int = 800, flags: tuple[str, ...] = ()):
    """Debian's Chromium, headless, as a phone (360x800 unless said), console logged; `flags`: more switches."""
    webdriver = need_browser()
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--window-size={width},{height}",
                 f"--user-data-dir={tmp_path / 'profile'}", *flags):
        opts.add_argument(flag)
    # A phone's viewport: width x height CSS pixels, touch, a phone's user agent.
    opts.add_experimental_option("mobileEmulation",
                                 {"deviceMetrics": {"width": width, "height": height, "pixelRatio": 1}})
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))


@pytest.mark.server
@pytest.mark.browser
def test_phone_browser_malaria_oct_cases_and_restart(start_server, art, parasitized, tmp_path):
    need_browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    shots = Path(os.environ.get("MEDGE_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "data"
    # The stand-in that calls every cell parasitized makes the malaria case positive, with crops to show, whatever
    # the tiny test model (trained for seconds) would call; the OCT tab runs the test OCT model.
    models = [f"malaria={parasitized}", f"oct={art / OCT_MODEL}"]
    s = start_server(data=data, models=models)
    driver = phone_browser(tmp_path)
    console = []
    try:
        wait = WebDriverWait(driver, READY_TIMEOUT_S)

        def shot(name: str) -> None:
            driver.save_screenshot(str(shots / f"{name}.png"))

        def done_case() -> str:
            wait.until(lambda d: d.find_element(By.ID, "case-view").is_displayed()
                       and d.find_elements(By.CSS_SELECTOR, "#case-view #headline"))
            return driver.find_element(By.ID, "case-view").get_attribute("data-case-id")

        def images_loaded(sel: str) -> None:
            wait.until(lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)
                                     for i in d.find_elements(By.CSS_SELECTOR, sel)))

        # Malaria: a field photo, an id and a note -> overlay, slide summary, crops.
        driver.get(s.url + "/#/malaria")
        wait.until(EC.text_to_be_present_in_element((By.ID, "device"), "malaria"))
        assert driver.execute_script("return document.documentElement.scrollWidth") <= 360  # no sideways scrolling
        field = smear_fields()[0]
        driver.find_element(By.ID, "malaria-files").send_keys(str(field))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#malaria-list li")) == 1)
        driver.find_element(By.CSS_SELECTOR, "#malaria-form input[name=subject]").send_keys("C17-slide-3")
        driver.find_element(By.CSS_SELECTOR, "#malaria-form textarea[name=note]").send_keys("fever 3 days")
        shot("1-malaria-form")
        driver.find_element(By.ID, "malaria-submit").click()
        malaria_id = done_case()
        images_loaded("#case-view figure.overlay img")
        summary = driver.find_element(By.ID, "summary").text
        assert "Red cells counted" in summary and "Refer" in summary
        assert driver.find_element(By.ID, "headline").text == "Parasites seen: treat per protocol and refer"
        assert "Parasitemia" in driver.find_element(By.ID, "parasitemia").text
        assert driver.find_elements(By.CSS_SELECTOR, "#case-view figure.overlay img")
        assert "sha256" in driver.find_element(By.CSS_SELECTOR, "details.model summary").text
        shot("2-malaria-case")
        driver.execute_script("document.querySelector('#case-view h3').scrollIntoView(); window.scrollBy(0, -60)")
        shot("3-malaria-overlay")
        driver.execute_script("document.getElementById('crops').scrollIntoView(); window.scrollBy(0, -60)")
        images_loaded("#crops img")
        shot("4-malaria-crops")

        # OCT: one scan -> class, referral, probabilities, Grad-CAM.
        driver.find_element(By.CSS_SELECTOR, "nav a[data-tab=oct]").click()
        scan = sorted((art / "oct_scans").glob("*.jpeg"))[0]
        driver.find_element(By.ID, "oct-file").send_keys(str(scan))
        driver.find_element(By.CSS_SELECTOR, "#oct-form input[name=subject]").send_keys("eye-7")
        driver.find_element(By.ID, "oct-submit").click()
        oct_id = done_case()
        assert oct_id != malaria_id
        images_loaded("#case-view img")
        text = driver.find_element(By.ID, "case-view").text
        assert "Referral" in text and "Probabilities" in text and "Grad-CAM" in text
        shot("5-oct-case")

        # Cases: both listed; search by id.
        driver.find_element(By.CSS_SELECTOR, "nav a[data-tab=cases]").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#case-list li")) == 2)
        shot("6-cases")
        driver.find_element(By.ID, "case-search").send_keys("eye-7")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#case-list li")) == 1)
        driver.find_element(By.CSS_SELECTOR, "#case-list li a").click()
        assert done_case() == oct_id

        # Restart the server, reload the page: the case is still there.
        driver.get(s.url + f"/#/case/{malaria_id}")
        assert done_case() == malaria_id
        console += driver.get_log("browser")
        s.stop()
        s2 = start_server(data=data, port=s.port, models=models)
        driver.refresh()
        assert done_case() == malaria_id
        images_loaded("#case-view figure.overlay img")
        assert "Red cells counted" in driver.find_element(By.ID, "summary").text
        shot("7-after-restart")
        console += driver.get_log("browser")
        assert s2.json("/api/cases")["total"] == 2
    finally:
        driver.quit()
    errors = [e for e in console if e.get("level") == "SEVERE"]
    assert not errors, errors
    print(f"\nscreenshots in {shots}")


@pytest.mark.server
@pytest.mark.browser
def test_phone_browser_access_code_entered_once(start_server, art, tmp_path):
    need_browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    s = start_server("--access-code", "k7m2p9qx")
    driver = phone_browser(tmp_path)
    try:
        wait = WebDriverWait(driver, READY_TIMEOUT_S)
        driver.get(s.url + "/#/cases")
        wait.until(lambda d: d.find_element(By.ID, "code-view").is_displayed())
        driver.find_element(By.ID, "code-input").send_keys("wrong")
        driver.find_element(By.CSS_SELECTOR, "#code-form button").click()
        wait.until(lambda d: "not right" in d.find_element(By.ID, "error").text)
        driver.find_element(By.ID, "code-input").clear()
        driver.find_element(By.ID, "code-input").send_keys("k7m2p9qx")
        driver.find_element(By.CSS_SELECTOR, "#code-form button").click()
        wait.until(lambda d: d.find_element(By.ID, "cases-view").is_displayed())
        wait.until(lambda d: "No cases" in d.find_element(By.ID, "case-count").text)
        driver.refresh()  # once entered, the code is remembered (cookie)
        wait.until(lambda d: d.find_element(By.ID, "cases-view").is_displayed())
        assert not driver.find_element(By.ID, "code-view").is_displayed()
        console = driver.get_log("browser")
    finally:
        driver.quit()
    # The 401s of the probe and of the wrong code are the only errors the browser may log.
    errors = [e for e in console if e.get("level") == "SEVERE" and "401" not in e.get("message", "")]
    assert not errors, errors


@pytest.mark.server
@pytest.mark.browser
def test_phone_browser_verdicts_progress_duplicates_retake_and_tabs(start_server, uninfected, tmp_path):
    """At 390x844: the three verdicts' words, the count toward the minimum, the same photo twice said and counted
    once, a retake of the field that could not be read, no OCT tab without an OCT model, the Cells tab on the cell
    model `malaria`, and no administrator's text (paths, commands) anywhere on the page."""
    need_browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from edge_runtime import registry

    if "malaria" not in {r.name for r in registry.read_registry()}:
        pytest.skip("no released malaria (cell) model in this install")
    shots = Path(os.environ.get("MEDGE_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    no_runtime = tmp_path / "no-runtime"
    s = start_server("--min-cells", "200", "--web-runtime", str(no_runtime),
                     models=[f"malaria={uninfected}", "cells=malaria"])
    f0, f1 = smear_fields()[:2]
    blank = tmp_path / "blank.png"
    blank.write_bytes(no_cells_png())
    # A case uploaded with a copy of a photo under another name (as another client might): the page says so.
    status, copied = post_case(s.url, "malaria", [f0, f1, ("again.jpg", f0.read_bytes())])
    assert status == 201, copied
    driver = phone_browser(tmp_path, 390, 844)
    console = []
    try:
        wait = WebDriverWait(driver, READY_TIMEOUT_S)

        def text(css: str) -> str:
            return driver.find_element(By.CSS_SELECTOR, css).text

        def case_after(previous: str | None) -> str:
            wait.until(lambda d: d.find_element(By.ID, "case-view").is_displayed()
                       and d.find_elements(By.CSS_SELECTOR, "#case-view #headline")
                       and d.find_element(By.ID, "case-view").get_attribute("data-case-id") != previous)
            return driver.find_element(By.ID, "case-view").get_attribute("data-case-id")

        def submit(*paths: Path) -> str:
            driver.find_element(By.CSS_SELECTOR, "nav a[data-tab=malaria]").click()
            for path in paths:
                driver.find_element(By.ID, "malaria-files").send_keys(str(path))
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#malaria-list li")) == len(set(paths)))
            previous = driver.find_element(By.ID, "case-view").get_attribute("data-case-id")
            driver.find_element(By.ID, "malaria-submit").click()
            return case_after(previous)

        driver.get(s.url + "/#/oct")
        wait.until(lambda d: "cells: malaria" in d.find_element(By.ID, "device").text)
        # No OCT model: no OCT tab, and its address opens the first tab that has a model.
        wait.until(lambda d: d.execute_script("return location.hash") == "#/malaria")
        assert not driver.find_element(By.CSS_SELECTOR, "nav a[data-tab=oct]").is_displayed()
        assert driver.find_element(By.CSS_SELECTOR, "nav a[data-tab=cells]").is_displayed()
        assert text("#disclaimer") == "A screening aid, not a diagnosis."
        assert driver.execute_script("return document.documentElement.scrollWidth") <= 390

        # The same photo picked twice: listed once, and the page says so.
        driver.find_element(By.ID, "malaria-files").send_keys(str(f0))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#malaria-list li")) == 1)
        driver.find_element(By.ID, "malaria-files").send_keys(str(f0))
        wait.until(lambda d: d.find_element(By.ID, "malaria-dupes").is_displayed())
        assert text("#malaria-dupes") == f"Photo “{f0.name}” is the same as photo “{f0.name}”: counted once."
        assert len(driver.find_elements(By.CSS_SELECTOR, "#malaria-list li")) == 1
        shot = shots / "9-duplicate-photo.png"
        driver.save_screenshot(str(shot))
        previous = driver.find_element(By.ID, "case-view").get_attribute("data-case-id")
        driver.find_element(By.ID, "malaria-submit").click()
        one = case_after(previous)

        # One field: under the minimum -> not enough evidence, with the count toward 200 and the fields to add.
        cells0 = s.json(f"/api/cases/{one}")["result"]["summary"]["cells"]
        assert text("#headline") == "Not enough evidence: photograph about 1 more field"
        assert "amber" in driver.find_element(By.ID, "headline").get_attribute("class")
        assert text("#count-text") == f"{cells0} of 200 red cells counted: about 1 more field to photograph."
        assert driver.find_element(By.ID, "count-bar").get_attribute("value") == str(cells0)
        assert text("#time-taken").startswith("Analysed in ") and text("#time-taken").endswith(" s on the device.")
        assert "A screening aid, not a diagnosis." in text("#verdict")
        driver.save_screenshot(str(shots / "10-not-enough-evidence.png"))

        # Two fields: enough red cells and none parasitized -> the negative, in green, with what it does not mean.
        two = submit(f0, f1)
        cells2 = s.json(f"/api/cases/{two}")["result"]["summary"]["cells"]
        assert text("#headline") == f"No parasites seen in {cells2:,} red cells"
        assert "ok" in driver.find_element(By.ID, "headline").get_attribute("class").split()
        assert "does not rule out malaria" in text("#verdict-action")
        assert "minimum of 200 is reached" in text("#count-text")
        assert f"none seen in {cells2:,} red cells" in text("#parasitemia")
        driver.save_screenshot(str(shots / "11-negative.png"))

        # The case with a copy uploaded: counted once, said on the case.
        driver.get(s.url + f"/#/case/{copied['id']}")
        case_after(two)
        assert text("#duplicates") == f"Photo “again.jpg” is the same as photo “{f0.name}”: counted once."

        # A field without cells: its reason, and a retake that makes a new case linked to this one.
        bad = submit(f0, blank)
        assert text("#headline").startswith("Not enough evidence")
        unread = text("#unread-fields")
        assert "Field 2, “blank.png”: can't read this field: retake (" in unread and "Retake field 2" in unread
        driver.execute_script("document.getElementById('unread-fields').scrollIntoView()")
        driver.save_screenshot(str(shots / "12-field-to-retake.png"))
        retake_input = "#unread-fields .unread[data-field='1'] input[type=file]"
        driver.find_element(By.CSS_SELECTOR, retake_input).send_keys(str(f1))
        again = case_after(bad)
        retaken = s.json(f"/api/cases/{again}")["result"]
        assert again != bad and text("#retake-of") == f"Retake of case {bad}."
        assert text("#headline") == f"No parasites seen in {retaken['summary']['cells']:,} red cells"
        assert not driver.find_elements(By.ID, "unread-fields")
        assert [f["name"] for f in retaken["fields"]] == [f0.name, f1.name] and retaken["retake_of"] == bad

        # The Cells tab: the cell model, and no administrator's text on the page.
        driver.find_element(By.CSS_SELECTOR, "nav a[data-tab=cells]").click()
        wait.until(lambda d: d.find_element(By.ID, "cells-where").get_attribute("class") == "where device")
        version = registry.get("malaria").version
        assert text("#cells-model") == f"Model: malaria {version}, for single red cells."
        assert "on-phone analysis is not available on this device" in text("#cells-where")
        page = driver.execute_script("return document.body.innerText")
        for admin in ("webruntime", "python", "--", str(no_runtime), str(tmp_path), "/root", "fetch"):
            assert admin not in page, admin
        driver.save_screenshot(str(shots / "13-cells-tab.png"))
        console += driver.get_log("browser")
    finally:
        driver.quit()
    # The administrator reads the fix where the server was started.
    banner = s.output()
    assert "on the phone: no (the phone runtime is not installed" in banner and "webruntime fetch" in banner
    assert f"cells tab: malaria {registry.get('malaria').version}" in banner and "malaria tab: uninfected" in banner
    errors = [e for e in console if e.get("level") == "SEVERE"]
    assert not errors, errors
