"""Review of flagged cells as a person meets it: the field app on 127.0.0.1 (real HTTP, Chromium at 390x844),
the append-only log under SIGKILL and direct SQL, and `python -m edge_runtime review DIR` on a smear report folder.

    python -m pytest -q -s tests/test_serve_review.py      # -s prints the taps and the kill-mid-review figures

The app serves the released field model (`malaria-field`, what `serve` serves by default) on two field photos
(the shared IML-Malaria fields when they are beside the project, else the two bundled ones), so the cells a
reviewer is offered are the ones a health worker meets; without that release the server tests skip, saying
why. Every reviewed result the API gives is checked against `recompute`, written here from the stored rows
and the case record alone.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_runtime.smear.decision import (
    ASSUMED_RBC_PER_UL,
    COUNTING_RULES,
    FalseCalls,
    decide,
    density_from_rbc,
    density_from_wbc,
)
from edge_runtime.smear.review import (
    Flagged,
    ReviewError,
    ReviewRow,
    ReviewState,
    plan_rows,
    reviewed_counts,
    reviewed_result,
    to_review,
)

from helpers import ROOT

MODEL = "malaria-field"


def _released() -> bool:
    from edge_runtime.registry import read_registry

    return any(r.name == MODEL for r in read_registry())


def need_app():
    """test_serve's server helpers, or a skip saying what is missing."""
    for mod, why in (("starlette", "the `serve` extra"), ("uvicorn", "the `serve` extra"),
                     ("multipart", "python-multipart"), ("cv2", "the `smear` extra (OpenCV)")):
        pytest.importorskip(mod, reason=f"the field app needs {why}")
    if not _released():
        pytest.skip(f"no released {MODEL} model in this install: the review tests use the model the app serves")
    import test_serve

    return test_serve


# ---------------------------------------------------------------- the reference: from stored rows alone


def recompute(record: dict, rows: list[tuple]) -> dict:
    """The reviewed slide result from a case's stored record and its `reviews` rows (id, kind, field, cell,
    before, after, value), without the app's review code: the latest row per cell, applied to the machine's
    counts, through `decide`."""
    r = record["result"]
    s, fields = r["summary"], r["fields"]
    offered = {}
    for c in r["crops"]:
        f = fields[c["field"]]
        if c["verdict"] in ("parasitized", "uncertain") and f.get("readable", f.get("error") is None) \
                and not (c["verdict"] == "uncertain" and c.get("fragment")):
            offered[(c["field"], c["cell"])] = c["verdict"]
    latest, wbc = {}, None
    for _id, kind, field, cell, _before, after, value in sorted(rows):
        if kind == "cell" and (field, cell) in offered:
            latest[(field, cell)] = after
        elif kind == "wbc_count":
            wbc = value
    p, u, n = s["parasitized"], s["uncertain"], s["cells"]
    for key, after in latest.items():
        p, u = (p - 1, u) if offered[key] == "parasitized" else (p, u - 1)
        p += after == "parasite"
        n -= after == "not_cell"
    d = s["decision"]
    rule = dict(rule=d["rule"]) if d["rule"] in COUNTING_RULES else dict(min_cells=d["min_cells"])
    fc = FalseCalls.from_dict(d["false_calls"]) if d.get("false_calls") else None
    out = decide(parasitized=p, uncertain=u, red_cells=n, readable_fields=d["readable_fields"], fields=d["fields"],
                 confirmed=sum(a == "parasite" for a in latest.values()), false_calls=fc, **rule).to_dict()
    if out["decision"] != "not enough evidence":
        den = density_from_wbc(p, wbc) if wbc else density_from_rbc(p, n, ASSUMED_RBC_PER_UL, measured=False)
        out["density"] = den.to_dict()
    return out


def stored(data: Path) -> dict[str, tuple[dict, list[tuple]]]:
    """case id -> (record, review rows) read from the SQLite file with sqlite3."""
    with sqlite3.connect(data / "cases.sqlite") as con:
        cases = {i: json.loads(rec) for i, rec in con.execute("SELECT id, record FROM cases")}
        rows = con.execute("SELECT id, case_id, kind, field, cell, before, after, value FROM reviews").fetchall()
    return {i: (rec, [(r[0], *r[2:]) for r in rows if r[1] == i]) for i, rec in cases.items()}


def assert_matches_store(server, data: Path) -> int:
    """Every malaria case's reviewed result (API) equals `recompute` from the stored rows; returns cases checked."""
    checked = 0
    for case_id, (record, rows) in stored(data).items():
        if record["kind"] != "malaria":
            continue
        got = server.json(f"/api/cases/{case_id}")["review"]["result"]
        want = recompute(record, rows)
        for key in ("decision", "message", "parasitized", "uncertain", "red_cells", "parasitemia_percent"):
            assert got[key] == want[key], (case_id, key, got[key], want[key])
        assert (got["density"] or {}).get("per_ul") == (want["density"] or {}).get("per_ul"), case_id
        assert (got["density"] or {}).get("basis") == (want["density"] or {}).get("basis"), case_id
        checked += 1
    return checked


def post_json(server, path: str, body, method: str = "POST") -> tuple[int, dict]:
    from benchmarks.loadtest import request

    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, _, out = request(server.url + path, method, raw, {"Content-Type": "application/json"})
    try:
        return status, json.loads(out)
    except ValueError:
        return status, {"raw": out[:200]}


# ---------------------------------------------------------------- rules, no server


def _flag(field, cell, verdict, conf, **kw):
    return Flagged(field=field, cell=cell, verdict=verdict, confidence=conf, **kw)


def test_offered_cells_order_and_what_is_left_out():
    cells = [_flag(0, 1, "uncertain", 0.7), _flag(0, 2, "parasitized", 0.9), _flag(1, 3, "parasitized", 0.99),
             _flag(1, 4, "uncertain", 0.8, fragment=True), _flag(1, 5, "parasitized", 0.95, fragment=True),
             _flag(2, 6, "parasitized", 1.0, readable=False), _flag(0, 7, "uncertain", 0.75)]
    assert [f.key for f in to_review(cells)] == [(1, 3), (1, 5), (0, 2), (0, 7), (0, 1)]


def test_reviewed_counts_and_result():
    assert reviewed_counts(4, 61, 329, [("parasitized", "parasite"), ("parasitized", "not_parasite"),
                                        ("parasitized", "not_cell"), ("uncertain", "parasite"),
                                        ("uncertain", "not_cell")]) == (3, 59, 327)
    summary = {"cells": 2100, "parasitized": 1, "uncertain": 3, "fields": 2,
               "decision": {"rule": "who-2000", "min_cells": 2000, "fields": 2, "readable_fields": 2}}
    offered = to_review([_flag(0, 1, "parasitized", 0.9), _flag(0, 2, "uncertain", 0.7)])
    rows = [ReviewRow(1, "c", "cell", "A", "t1", 0, 1, "parasitized", "parasite"),
            ReviewRow(2, "c", "cell", "A", "t2", 0, 1, "parasitized", "not_parasite"),  # the latest row counts
            ReviewRow(3, "c", "cell", "A", "t3", 0, 2, "uncertain", "not_cell"),
            ReviewRow(4, "c", "cell", "A", "t4", 9, 9, "uncertain", "parasite")]  # not offered: ignored
    out = reviewed_result(summary, offered, ReviewState.from_rows(rows))
    assert out["machine"]["decision"] == "parasites seen"
    assert out["result"]["message"] == "no parasites seen in 2,099 red cells" and out["called"] == 2
    assert out["result"]["density"]["per_ul"] == 0 and "assumed, not measured" in out["result"]["density"]["basis"]
    assert out["status"].startswith("in review") and not out["reviewed"]
    rows.append(ReviewRow(5, "c", "wbc_count", "B", "t5", value=40))
    rows.append(ReviewRow(6, "c", "reviewed", "B", "t6"))
    out = reviewed_result(summary, offered, ReviewState.from_rows(rows))
    assert out["reviewed"] and out["status"] == "reviewed by B at t6"
    assert out["result"]["density"]["method"] == "wbc" and out["result"]["alternative"]["method"] == "rbc"
    rows.append(ReviewRow(7, "c", "cell", "A", "t7", 0, 1, "parasitized", "parasite", "ring"))
    out = reviewed_result(summary, offered, ReviewState.from_rows(rows))
    assert not out["reviewed"] and out["status"].startswith("changed after B's review")
    assert out["result"]["message"] == "parasites seen: 1 parasitized of 2,099 red cells, 1 confirmed in review"
    # Too few red cells and no parasite: no density at all (a "0/µL" there would reassure without evidence).
    short = {**summary, "cells": 300, "parasitized": 0}
    assert reviewed_result(short, [], ReviewState.from_rows([]))["result"]["density"] is None


def test_a_review_decides_a_slide_whose_calls_a_clean_slide_would_give():
    """The machine's "cells to review" (2 calls, a clean slide of 2,100 red cells gives up to 26 at the model's
    recorded false-call rate) becomes "parasites seen" when a person confirms one, and "no parasites seen" when
    they reject both; the rate is the one the machine's summary recorded."""
    fc = {"calls": 7, "red_cells": 1748, "source": "fold"}
    summary = {"cells": 2100, "parasitized": 2, "uncertain": 0, "fields": 15,
               "decision": {"rule": "who-2000", "min_cells": 2000, "fields": 15, "readable_fields": 15,
                            "false_calls": fc}}
    offered = to_review([_flag(0, 1, "parasitized", 0.9), _flag(3, 4, "parasitized", 0.8)])
    out = reviewed_result(summary, offered, ReviewState.from_rows([]))
    assert out["machine"]["decision"] == out["result"]["decision"] == "cells to review"
    assert out["result"]["false_call_limit"] == 26 and out["result"]["false_calls"]["calls"] == 7
    one = [ReviewRow(1, "c", "cell", "A", "t1", 0, 1, "parasitized", "parasite", "ring")]
    out = reviewed_result(summary, offered, ReviewState.from_rows(one))
    assert out["result"]["decision"] == "parasites seen" and out["result"]["confirmed"] == 1
    both = [ReviewRow(1, "c", "cell", "A", "t1", 0, 1, "parasitized", "not_parasite"),
            ReviewRow(2, "c", "cell", "A", "t2", 3, 4, "parasitized", "not_cell")]
    out = reviewed_result(summary, offered, ReviewState.from_rows(both))
    assert out["result"]["message"] == "no parasites seen in 2,099 red cells"


def test_plan_rows_refuses_what_it_cannot_record():
    summary = {"cells": 300, "parasitized": 1, "uncertain": 2, "fields": 1,
               "decision": {"rule": "who-2000", "min_cells": 2000, "fields": 1, "readable_fields": 1}}
    offered = to_review([_flag(0, 1, "parasitized", 0.9), _flag(0, 2, "uncertain", 0.7), _flag(0, 3, "uncertain", 0.6)])
    ok = {"reviewer": "A", "calls": [{"field": 0, "cell": 1, "after": "parasite", "stage": "ring"}]}
    assert plan_rows(summary, offered, [], ok) == [{"kind": "cell", "field": 0, "cell": 1, "before": "parasitized",
                                                    "after": "parasite", "stage": "ring", "reviewer": "A"}]
    bad = [({"calls": ok["calls"]}, "reviewer"), ({**ok, "reviewer": "  "}, "empty"),
           ({**ok, "reviewer": "x" * 65}, "at most 64"), ({**ok, "extra": 1}, "unknown keys"),
           ({"reviewer": "A"}, "nothing to record"),
           ({"reviewer": "A", "calls": [{"field": 0, "cell": 9, "after": "parasite"}]}, "not among the 3 cells"),
           ({"reviewer": "A", "calls": [{"field": 0, "cell": 2, "after": "maybe"}]}, "one of parasite"),
           ({"reviewer": "A", "calls": [{"field": 0, "cell": 2, "after": "not_cell", "stage": "ring"}]}, "goes with"),
           ({"reviewer": "A", "calls": [{"field": 0, "cell": 2, "after": "parasite", "stage": "adult"}]}, "stage"),
           ({"reviewer": "A", "calls": [{"field": "0", "cell": 2, "after": "parasite"}]}, "whole number"),
           ({"reviewer": "A", "calls": [ok["calls"][0], ok["calls"][0]]}, "twice"),
           ({"reviewer": "A", "wbc_count": 0}, "1..100,000"), ({"reviewer": "A", "wbc_count": 2.5}, "whole number"),
           ({"reviewer": "A", "rest": "parasite"}, "can only be"), ({"reviewer": "A", "reviewed": "yes"}, "true"),
           ([1, 2], "JSON object")]
    for body, words in bad:
        with pytest.raises(ReviewError, match=words) as e:
            plan_rows(summary, offered, [], body)
        assert e.value.status == 400
    with pytest.raises(ReviewError, match="2 of the 3 cells") as e:
        plan_rows(summary, offered, [], {**ok, "reviewed": True})
    assert e.value.status == 409
    # "rest" calls the uncertain cells left, one row each; with it, the same request may mark the case reviewed.
    rows = plan_rows(summary, offered, [], {**ok, "rest": "not_parasite", "wbc_count": "12", "reviewed": True})
    assert [(r["kind"], r.get("cell"), r.get("after"), r.get("value")) for r in rows] == [
        ("cell", 1, "parasite", None), ("cell", 2, "not_parasite", None), ("cell", 3, "not_parasite", None),
        ("wbc_count", None, None, 12), ("reviewed", None, None, None)]


def test_an_oct_case_has_nothing_to_review():
    pytest.importorskip("starlette", reason="the field app needs the `serve` extra")
    from edge_runtime.serve.case import Case
    from edge_runtime.serve.review import plan, review_block

    oct_case = Case(kind="oct", id="20260101-000000-abcdef", result={"label": "NORMAL"})
    assert review_block(oct_case, []) is None
    with pytest.raises(ReviewError, match="OCT case: only malaria cases"):
        plan(oct_case, [], {"reviewer": "A", "wbc_count": 3})


def test_log_is_append_only_in_the_database_itself(tmp_path):
    from edge_runtime.reviewlog import ReviewLog

    log = ReviewLog(tmp_path / "r.sqlite")
    first = log.append("c1", [{"kind": "cell", "field": 0, "cell": 1, "reviewer": "A", "before": "uncertain",
                                "after": "not_cell"}, {"kind": "wbc_count", "value": 9, "reviewer": "A"}])
    assert [r.id for r in first] == [1, 2] and first[0].at.endswith("Z") and log.rows("c1") == first
    with pytest.raises(sqlite3.IntegrityError):  # one bad row: none of the call is written
        log.append("c1", [{"kind": "cell", "field": 0, "cell": 2, "reviewer": "A", "before": "uncertain",
                           "after": "parasite"}, {"kind": "cell", "field": 0, "cell": 3, "reviewer": "A",
                                                  "before": "uncertain", "after": "maybe"}])
    assert log.rows("c1") == first
    with sqlite3.connect(tmp_path / "r.sqlite") as con:
        for sql in ("UPDATE reviews SET after = 'parasite' WHERE id = 1", "DELETE FROM reviews WHERE id = 1",
                    "DELETE FROM reviews"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                con.execute(sql)
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            con.execute("INSERT INTO reviews (case_id, kind, reviewer, at, field, cell, before, after, stage) "
                        "VALUES ('c1', 'cell', 'A', 't', 0, 5, 'uncertain', 'not_cell', 'ring')")
    assert log.rows("c1") == first


# ---------------------------------------------------------------- the field app over HTTP


@pytest.fixture(scope="module")
def review_app(tmp_path_factory):
    """The app with the released field model and one two-field malaria case; (server, data folder, case)."""
    ts = need_app()
    from benchmarks.loadtest import post_case

    data = tmp_path_factory.mktemp("review") / "data"
    s = ts.Server(None, data, models=[MODEL]).start()
    status, case = post_case(s.url, "malaria", ts.smear_fields(), subject="review-api")
    assert status == 201, case
    yield s, data, case
    s.stop()


@pytest.mark.server
def test_review_api_calls_result_exports_and_no_way_to_change_a_row(review_app):
    from benchmarks.loadtest import request

    s, data, case = review_app
    base = f"/api/cases/{case['id']}/reviews"
    b = s.json(case["url"])["review"]
    machine = s.json(case["url"])["result"]["summary"]

    def listed() -> dict | None:  # the case list's review state of this case
        return next(c for c in s.json("/api/cases")["cases"] if c["id"] == case["id"])["review"]

    assert listed() is None
    assert b["rows"] == 0 and b["offered"] == len(b["cells"]) > 0 and b["status"].startswith("not reviewed")
    assert b["machine"]["message"] == machine["decision"]["message"]
    verdicts = [c["verdict"] for c in b["cells"]]
    assert verdicts == sorted(verdicts, key=lambda v: v != "parasitized")  # parasitized first
    # Calls: one per request and several in one; `before` comes from the case, never from the client.
    first, second = b["cells"][0], b["cells"][1]
    status, out = post_json(s, base, {"reviewer": "A. K.", "calls": [
        {"field": first["field"], "cell": first["cell"], "after": "not_cell"}]})
    assert status == 201 and out["rows"][0]["before"] == first["verdict"] and out["rows"][0]["at"].endswith("Z")
    status, out = post_json(s, base, {"reviewer": "A. K.", "calls": [
        {"field": first["field"], "cell": first["cell"], "after": "parasite", "stage": "ring"},
        {"field": second["field"], "cell": second["cell"], "after": "not_parasite"}]})
    assert status == 201 and len(out["rows"]) == 2 and out["review"]["called"] == 2 and out["review"]["rows"] == 3
    assert listed() == {"rows": 3, "reviewed_by": None, "reviewed_at": None}
    assert out["review"]["cells"][0]["call"] == "parasite" and out["review"]["cells"][0]["stage"] == "ring"
    # Bad requests: 4xx naming the problem, nothing written.
    for body, status_, words in (
            ({"reviewer": "A", "calls": [{"field": 0, "cell": 99999, "after": "parasite"}]}, 400, "not among"),
            ({"calls": [{"field": first["field"], "cell": first["cell"], "after": "parasite"}]}, 400, "reviewer"),
            ({"reviewer": "A", "reviewed": True}, 409, "no call yet"),
            (b"{not json", 400, "not JSON")):
        got, answer = post_json(s, base, body)
        assert got == status_ and words in answer["error"], (body, got, answer)
    got, _, answer = request(s.url + base, "POST", b"reviewer=A", {"Content-Type": "application/x-www-form-urlencoded"})
    assert got == 415
    assert s.json(base)["review"]["rows"] == 3
    # No route changes or removes a row; the database refuses it too.
    row_id = s.json(base)["rows"][0]["id"]
    assert s.json(f"{base}/{row_id}")["after"] == "not_cell"
    for method in ("PUT", "PATCH", "DELETE"):
        for path in (base, f"{base}/{row_id}"):
            got, answer = post_json(s, path, {"reviewer": "A", "after": "parasite"}, method)
            assert got == 405, (method, path, got)
    with sqlite3.connect(data / "cases.sqlite") as con:
        for sql in (f"UPDATE reviews SET after = 'parasite' WHERE id = {row_id}", "DELETE FROM reviews"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                con.execute(sql)
    assert [r["after"] for r in s.json(base)["rows"]] == ["not_cell", "parasite", "not_parasite"]
    # The rest, a white-cell count and the mark in one request.
    status, out = post_json(s, base, {"reviewer": "B", "rest": "not_parasite", "wbc_count": 16})
    r = out["review"]
    assert status == 201 and r["wbc_count"]["value"] == 16 and r["result"]["density"]["method"] == "wbc"
    left = [c for c in r["cells"] if c["call"] is None]
    assert all(c["verdict"] == "parasitized" for c in left)  # the rest never calls a parasitized cell
    status, out = post_json(s, base, {"reviewer": "B", "reviewed": True, "calls": [
        {"field": c["field"], "cell": c["cell"], "after": "not_parasite"} for c in left]})
    assert status == 201 and out["review"]["reviewed"] and out["review"]["reviewed_by"] == "B"
    assert listed()["reviewed_by"] == "B" and listed()["reviewed_at"] == out["review"]["reviewed_at"]
    # Exports carry the machine's call and the reviewer's.
    rows = list(csv.DictReader(io.StringIO(s.get(case["export_csv"])[2].decode())))
    called = {(int(x["field"]), int(x["cell"])): x for x in rows if x["review_call"]}
    assert len(called) == out["review"]["offered"]
    one = called[(first["field"], first["cell"])]
    assert one["verdict"] == first["verdict"] and one["review_call"] == "parasite" and one["review_stage"] == "ring"
    assert one["reviewer"] == "A. K."
    mine = next(x for x in csv.DictReader(io.StringIO(s.get("/api/cases/export.csv")[2].decode()))
                if x["id"] == case["id"])
    assert mine["decision"] == machine["decision"]["message"] and mine["reviewed_by"] == "B"
    assert mine["reviewed_decision"] == out["review"]["result"]["message"] and mine["wbc_count"] == "16"
    assert mine["parasites_per_ul_basis"].startswith(f"{out['review']['result']['parasitized']} parasitized per 16")
    # The machine's record is untouched, and a script over the stored rows gets the same reviewed result.
    assert s.json(case["url"])["result"] == case["result"] and s.json(case["url"])["headline"] == case["headline"]
    assert assert_matches_store(s, data) >= 1


@pytest.mark.server
def test_sigkill_mid_review_keeps_every_acknowledged_row(tmp_path):
    ts = need_app()
    from benchmarks.loadtest import post_case

    data = tmp_path / "data"
    s = ts.Server(None, data, models=[MODEL]).start()
    try:
        status, case = post_case(s.url, "malaria", ts.smear_fields(), subject="kill-mid-review")
        assert status == 201, case
        cells = s.json(case["url"])["review"]["cells"]
        base = f"/api/cases/{case['id']}/reviews"
        acked, errors, stop = [], [], threading.Event()

        def reviewer(k: int) -> None:
            calls = ("parasite", "not_parasite", "not_cell")
            i = 0
            while not stop.is_set():
                c = cells[(3 * i + k) % len(cells)]
                try:
                    got, out = post_json(s, base, {"reviewer": f"r{k}", "calls": [
                        {"field": c["field"], "cell": c["cell"], "after": calls[(i + k) % 3]}]})
                except OSError as e:  # the server died under this request
                    errors.append(type(e).__name__)
                    return
                if got == 201:
                    acked.extend(out["rows"])
                i += 1

        threads = [threading.Thread(target=reviewer, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + ts.READY_TIMEOUT_S
        while len(acked) < 60 and time.monotonic() < deadline:
            time.sleep(0.005)
        s.kill()
        stop.set()
        for t in threads:
            t.join()
        acked = list(acked)
        assert len(acked) >= 60
        s2 = ts.Server(None, data, models=[MODEL], port=s.port).start()
        try:
            rows = {r["id"]: r for r in s2.json(base)["rows"]}
            lost = [r for r in acked if rows.get(r["id"]) != r]
            assert not lost, lost[:3]
            assert assert_matches_store(s2, data) == 1
            print(f"\nkill mid-review: {len(acked)} rows acknowledged (201) before SIGKILL, all {len(acked)} found "
                  f"after restart; {len(rows)} rows stored ({len(rows) - len(acked)} committed whose answer was "
                  f"cut off); requests cut by the kill: {errors}")
        finally:
            s2.stop()
    finally:
        s.stop()


# ---------------------------------------------------------------- the page, at phone size


def phone(tmp_path: Path):
    """Debian's Chromium, headless, as a 390x844 phone (a current mid-size phone's viewport)."""
    webdriver = need_app().need_browser()
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=390,844",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    opts.add_experimental_option("mobileEmulation", {"deviceMetrics": {"width": 390, "height": 844, "pixelRatio": 1}})
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path="/usr/bin/chromedriver"))


@pytest.mark.server
@pytest.mark.browser
def test_phone_review_of_a_two_field_case(tmp_path):
    ts = need_app()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    shots = Path(os.environ.get("MEDGE_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "data"
    driver = phone(tmp_path)  # first: where it skips (no Chromium), no server is left running
    s = ts.Server(None, data, models=[MODEL]).start()
    taps = 0
    try:
        wait = WebDriverWait(driver, ts.READY_TIMEOUT_S)

        def tap(element) -> None:
            nonlocal taps
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
            element.click()
            taps += 1

        def card(k) -> object:
            return driver.find_element(By.CSS_SELECTOR, f'.rcell[data-key="{k["field"]}:{k["cell"]}"]')

        def called(k, after) -> None:
            wait.until(lambda d: card(k).get_attribute("data-call") == after)

        driver.get(s.url + "/#/malaria")
        wait.until(lambda d: "malaria" in d.find_element(By.ID, "device").text)
        fields = ts.smear_fields()
        driver.find_element(By.ID, "malaria-files").send_keys("\n".join(str(f) for f in fields))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#malaria-list li")) == len(fields))
        driver.find_element(By.ID, "malaria-submit").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#review-result tr"))
        case_id = driver.find_element(By.ID, "case-view").get_attribute("data-case-id")
        before = s.json(f"/api/cases/{case_id}")["review"]
        cells = before["cells"]
        assert len(driver.find_elements(By.CSS_SELECTOR, ".rcell")) == before["offered"] == len(cells) > 0
        assert driver.execute_script("return document.documentElement.scrollWidth") <= 390  # no sideways scroll
        for img in driver.find_elements(By.CSS_SELECTOR, ".rcell img")[:3]:
            assert img.size["width"] >= 160  # each crop at least its 160 source pixels wide
        assert "Not reviewed yet" in driver.find_element(By.ID, "review-banner").text
        wait.until(lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)
                                 for i in d.find_elements(By.CSS_SELECTOR, ".rcell img")[:4]))
        driver.execute_script("document.getElementById('review-result').scrollIntoView(); window.scrollBy(0, -60)")
        driver.save_screenshot(str(shots / "review-before.png"))

        # The reviewer's name, once (then remembered on this phone).
        tap(driver.find_element(By.ID, "reviewer"))
        driver.find_element(By.ID, "reviewer").send_keys("A. K.")
        # Each parasitized cell one by one; the first is a ring (a stage is two taps: open the list, pick).
        plan = ("parasite", "not_parasite", "not_cell")
        parasitized = [k for k in cells if k["verdict"] == "parasitized"]
        for i, k in enumerate(parasitized):
            after = plan[i % 3]
            tap(card(k).find_element(By.CSS_SELECTOR, f'button[data-after="{after}"]'))
            called(k, after)
            if i == 0:
                select = card(k).find_element(By.CSS_SELECTOR, "select.stage")
                tap(select)
                Select(select).select_by_value("ring")
                taps += 1
                wait.until(lambda d, k=k: "(ring)" in card(k).find_element(By.CSS_SELECTOR, ".rnow").text)
        uncertain = [k for k in cells if k["verdict"] == "uncertain"]
        if uncertain:  # one uncertain cell called by hand, then the rest with one tap
            tap(card(uncertain[0]).find_element(By.CSS_SELECTOR, 'button[data-after="not_cell"]'))
            called(uncertain[0], "not_cell")
            if len(uncertain) > 1:
                tap(driver.find_element(By.ID, "review-rest"))
                for k in uncertain[1:]:
                    called(k, "not_parasite")
        # The white cells counted in these fields: a density per white cell appears with its basis.
        tap(driver.find_element(By.ID, "wbc-count"))
        driver.find_element(By.ID, "wbc-count").send_keys("14")
        tap(driver.find_element(By.ID, "wbc-save"))
        wait.until(lambda d: "per 14 white cells" in d.find_element(By.ID, "review-result").text)
        done = driver.find_element(By.ID, "review-done")
        assert done.is_enabled()
        tap(done)
        wait.until(lambda d: "Reviewed by A. K." in d.find_element(By.ID, "review-banner").text)
        after = s.json(f"/api/cases/{case_id}")["review"]
        assert after["reviewed"] and after["called"] == after["offered"]
        shown = driver.find_element(By.ID, "review-result").text
        assert after["result"]["message"] in shown and after["machine"]["message"] in shown
        if parasitized or uncertain:  # the reviewed result differs from the machine's
            assert (after["result"]["parasitized"], after["result"]["red_cells"]) != \
                (after["machine"]["parasitized"], after["machine"]["red_cells"])
        driver.execute_script("document.getElementById('review-result').scrollIntoView(); window.scrollBy(0, -60)")
        driver.save_screenshot(str(shots / "review-after.png"))
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(str(shots / "review-after-top.png"))

        # Reload: the review is on the device; the name is remembered on the phone.
        driver.refresh()
        wait.until(lambda d: "Reviewed by A. K." in d.find_element(By.ID, "review-banner").text)
        assert driver.find_element(By.ID, "reviewer").get_attribute("value") == "A. K."
        assert all(c.get_attribute("data-call") for c in driver.find_elements(By.CSS_SELECTOR, ".rcell"))
        # The case list says who reviewed it.
        driver.get(s.url + "/#/cases")
        wait.until(lambda d: any("reviewed by A. K." in b.text
                                 for b in d.find_elements(By.CSS_SELECTOR, "#case-list .badge")))
        console = driver.get_log("browser")
        assert assert_matches_store(s, data) == 1
    finally:
        driver.quit()
        s.stop()
    errors = [e for e in console if e.get("level") == "SEVERE"]
    assert not errors, errors
    assert taps <= 25, taps
    print(f"\nreview of a {len(ts.smear_fields())}-field case ({[f.name for f in ts.smear_fields()]}): "
          f"{before['offered']} cells offered ({len(parasitized)} parasitized, {len(uncertain)} uncertain), "
          f"{taps} taps (name 1, parasitized {len(parasitized)}, stage 2, one uncertain 1, the rest 1, white cells 2, "
          f"mark 1); machine: {after['machine']['message']}; reviewed: {after['result']['message']}; "
          f"screenshots in {shots}")


# ---------------------------------------------------------------- the CLI on a report folder


def run_cli(*args) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    p = subprocess.run([sys.executable, "-m", "edge_runtime", *map(str, args)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout, p.stderr


def test_cli_review_of_a_report_folder(tmp_path):
    ts = need_app()
    out = tmp_path / "report"
    fields = ts.smear_fields()
    code, _, err = run_cli("smear", MODEL, *fields, "--out", out)
    assert code in (0, 1, 3, 4), err  # any decision; 4 = cells to review
    code, text, err = run_cli("review", out, "--list")
    assert code == 0, err
    listed = [ln.split()[0] for ln in text.splitlines() if ln.startswith("  ") and "->" in ln]
    assert listed and "no call yet" in text and "machine:" in text and "reviewed: no call yet" in text
    first, second = listed[0], listed[1]
    code, text, err = run_cli("review", out, "--set", f"{first}=parasite", "--stage", "ring", "--set",
                              f"{second}=not_cell", "--reviewer", "A. K.")
    assert code == 0 and "recorded 2 row(s)" in text, err
    # Bad input: exit 2 and a message naming what is wrong; nothing written.
    for args, words in ((["--set", f"{first}=maybe", "--reviewer", "x"], "one of parasite"),
                        (["--set", "NOFIELD:1=parasite", "--reviewer", "x"], "no field 'NOFIELD'"),
                        (["--set", f"{first.split(':')[0]}:999999=parasite", "--reviewer", "x"], "not among"),
                        (["--set", f"{first}=parasite"], "--reviewer NAME is needed"),
                        (["--reviewed", "--reviewer", "x"], "no call yet"),
                        (["--wbc", "0", "--reviewer", "x"], "positive integer")):
        code, _, err = run_cli("review", out, *args)
        assert code == 2 and words in err, (args, code, err)
    code, _, err = run_cli("review", tmp_path / "nowhere")
    assert code == 2 and "not a folder" in err
    code, _, err = run_cli("review", tmp_path)
    assert code == 2 and "no summary.json" in err
    code, text, err = run_cli("review", out, "--rest-not-parasites", "--wbc", "12", "--reviewer", "A. K.", "--json")
    doc = json.loads(text)
    assert code == 0 and doc["review"]["wbc_count"]["value"] == 12, err
    left = [c for c in doc["review"]["cells"] if c["call"] is None]
    sets = [a for c in left for a in ("--set", f"{Path(fields[c['field']]).stem}:{c['cell']}=not_parasite")]
    code, text, err = run_cli("review", out, *sets, "--reviewed", "--reviewer", "A. K.")
    assert code == 0 and "status: reviewed by A. K." in text, err
    # The file holds every row, appended; the database refuses a change; a script over it gives the same result.
    with sqlite3.connect(out / "reviews.sqlite") as con:
        rows = con.execute("SELECT id, kind, field, cell, before, after, value FROM reviews ORDER BY id").fetchall()
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            con.execute("DELETE FROM reviews")
    summary = json.loads((out / "summary.json").read_text())
    code, text, _ = run_cli("review", out, "--json")
    got = json.loads(text)["review"]
    record = {"result": {"summary": summary, "fields": [{"readable": True}] * len(fields),
                         "crops": [{"field": c["field"], "cell": c["cell"], "verdict": c["verdict"]}
                                   for c in got["cells"]]}}
    want = recompute(record, rows)
    assert len(rows) == got["rows"] == 2 + (doc["review"]["rows"] - 2) + len(left) + 1
    for key in ("message", "parasitized", "uncertain", "red_cells"):
        assert got["result"][key] == want[key], key
    assert got["result"]["density"]["per_ul"] == want["density"]["per_ul"]
