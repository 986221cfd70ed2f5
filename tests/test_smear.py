"""edge_runtime.smear: cells from real field photos, crops, slide report, CLI, and the benchmark's matcher.

Runs in the main environment and in the edge-only one (`MEDGE_EDGE_ARTIFACTS`,
see tests/test_edge_runtime.py); skips where OpenCV (the `smear` extra) is not
installed, e.g. the legacy tflite-runtime environment of .ci/run.

The recall floor (>= 80% of annotated cells at IoU >= 0.5 on the two bundled
fields) guards against regressions; it is not a tuned target.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("cv2", reason="smear needs the `smear` extra (opencv-python-headless)")

from benchmarks.smear import load_annotations, match  # noqa: E402
from edge_runtime.clinical import REFER_UNCERTAIN_SHARE, slide_referral, slide_summary  # noqa: E402
from edge_runtime.model import Prediction  # noqa: E402
from edge_runtime.smear import SmearError, analyse_slide, crop, segment  # noqa: E402
from helpers import MALARIA_FILES, ROOT, run_cli  # noqa: E402

SMEAR_SAMPLE = ROOT / "tests" / "data" / "iml_malaria_sample"
RECALL_FLOOR = 0.80


@pytest.fixture(scope="module")
def fields() -> list[Path]:
    return sorted((SMEAR_SAMPLE / "fields").glob("*.JPG"))


@pytest.fixture(scope="module")
def model(art):
    import edge_runtime

    return edge_runtime.load(art / MALARIA_FILES["tflite-int8"], threads=2)


def test_segmentation_finds_the_annotated_cells():
    found = []
    for ann in load_annotations(SMEAR_SAMPLE):
        seg = segment(Image.open(ann["image"]), ann["image"].name)
        found += (match(ann["boxes"], [c.bbox for c in seg.cells]) >= 0).tolist()
        assert seg.counts()["rbc"] > 50 and 20 < seg.radius < 50
        c = seg.cells[0]
        x, y, w, h = c.bbox
        assert c.mask.shape == (h, w) and c.area == int(c.mask.sum())
        arr = crop(seg, c)
        assert arr.dtype == np.uint8 and (arr[0] == 0).all()  # black margin, NIH-style
    assert np.mean(found) >= RECALL_FLOOR, f"{np.mean(found):.3f} of {len(found)} annotated cells found"


def test_matcher_is_one_to_one():
    truth = [[0, 0, 10, 10], [1, 1, 10, 10]]
    assert match(truth, [[0, 0, 10, 10]]).tolist() == [0, -1]
    assert match(truth, [[1, 1, 10, 10], [0, 0, 10, 10]]).tolist() == [1, 0]
    assert match(truth, []).tolist() == [-1, -1]
    assert match(truth, [[50, 50, 10, 10]]).tolist() == [-1, -1]


@pytest.mark.parametrize("kind", ["blank", "black", "noise", "gradient", "oct"])
def test_no_cells_is_an_error_not_a_crash(kind):
    rng = np.random.default_rng(0)
    arr = {"blank": np.full((480, 640, 3), 230, np.uint8), "black": np.zeros((480, 640, 3), np.uint8),
           "noise": rng.integers(0, 256, (480, 640, 3), dtype=np.uint8),
           "gradient": np.repeat(np.linspace(0, 255, 640, dtype=np.uint8)[None, :, None], 480, 0).repeat(3, 2),
           "oct": np.asarray(Image.open(sorted((ROOT / "tests" / "data" / "malaria_sample").glob("*/*.png"))[0])
                             .convert("L").resize((640, 480)).convert("RGB"))}[kind]
    with pytest.raises(SmearError, match="no cells found"):
        segment(arr, kind)


def _p(label, conf, uncertain=False):
    return Prediction(source="c", label=label, confidence=conf, uncertain=uncertain,
                      decision="uncertain" if uncertain else label)


def test_slide_report_arithmetic():
    preds = [_p("Parasitized", 0.95)] * 2 + [_p("Uninfected", 0.9)] * 196 + [_p("Parasitized", 0.6, True)] * 2
    s = slide_referral(slide_summary(preds), rbc_per_ul=5_000_000, wbc_count=50, wbc_per_ul=8000, min_cells=500)
    assert s["cells"] == 200 and s["parasitemia_percent"] == round(100 * 2 / 198, 2)
    assert s["parasitemia_max_percent"] == 2.0
    assert s["parasites_per_ul_from_rbc"] == round(s["parasitemia_percent"] / 100 * 5_000_000)
    assert s["parasites_per_ul_from_rbc_max"] == 100_000
    assert s["parasites_per_ul_from_wbc"] == 2 / 50 * 8000 and s["parasites_per_ul_from_wbc_max"] == 640
    assert s["refer"] and s["enough_cells"] is False and s["min_cells"] == 500
    clean = slide_referral(slide_summary([_p("Uninfected", 0.9)] * 100), min_cells=100)
    assert not clean["refer"] and clean["enough_cells"] is True and clean["parasites_per_ul_from_rbc"] is None
    unsure = int(100 * REFER_UNCERTAIN_SHARE) + 1
    doubt = slide_referral(slide_summary([_p("Uninfected", 0.9)] * (100 - unsure)
                                         + [_p("Uninfected", 0.6, True)] * unsure))
    assert doubt["refer"] and "uncertain" in doubt["refer_reasons"][0] and doubt["enough_cells"] is None


def test_analyse_slide_writes_what_a_person_checks(model, fields, tmp_path):
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    report = analyse_slide(model, [fields[0], bad, fields[1]], out=tmp_path / "out", min_cells=10)
    assert [f.error is None for f in report.fields] == [True, False, True]
    assert report.fields[1].field.endswith("corrupt.jpg") and report.fields[1].cells == []
    s = report.summary
    assert s["fields"] == 3 and s["fields_without_cells"] == 1 and s["cells"] > 150 and s["enough_cells"]
    out = tmp_path / "out"
    cells = json.loads((out / "cells.json").read_text())["fields"]
    assert len(cells) == 3 and cells[0]["cells"][0].keys() >= {"bbox", "kind", "label", "confidence", "uncertain"}
    assert json.loads((out / "summary.json").read_text())["cells"] == s["cells"]
    lines = (out / "cells.csv").read_text().splitlines()
    assert lines[0].startswith("field,index,x,y,w,h,kind") and len(lines) == 1 + sum(len(f.cells) for f in report.fields)
    overlays = sorted(out.glob("*_overlay.png"))
    assert len(overlays) == 2 and Image.open(overlays[0]).size == (1280, 960)
    if s["parasitized"] + s["uncertain"]:
        assert Image.open(out / "contact_sheet.png").width >= 160
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temp files


def test_cli_json_exit_codes_and_no_cells(art, fields, tmp_path):
    m = art / MALARIA_FILES["tflite-int8"]
    code, out, err = run_cli("smear", m, fields[1], "--json", "--rbc-per-ul", "5e6", "--threads", "1")
    assert code == 0, err
    doc = json.loads(out)
    assert len(doc["fields"]) == 1 and doc["fields"][0]["error"] is None
    cell = doc["fields"][0]["cells"][0]
    assert set(cell) == {"index", "bbox", "kind", "label", "confidence", "uncertain"} and len(cell["bbox"]) == 4
    assert {"cells", "parasitized", "uncertain", "parasitemia_percent", "parasitemia_max_percent", "refer",
            "enough_cells", "parasites_per_ul_from_rbc"} <= set(doc["summary"])
    folder = tmp_path / "slide"
    folder.mkdir()
    shutil.copy(fields[1], folder / "f1.jpg")
    Image.new("RGB", (640, 480), (235, 235, 235)).save(folder / "blank.png")
    code, out, err = run_cli("smear", m, folder, "--out", tmp_path / "o", "--min-cells", "100000")
    assert code == 1 and "no cells found" in out and "NOT ENOUGH CELLS" in out and "Traceback" not in err
    assert run_cli("smear", tmp_path / "missing.tflite", fields[0])[0] == 2
    assert run_cli("smear", m, tmp_path / "nothing_here_dir_empty")[0] == 1  # a missing file is a rejected field
    assert run_cli("smear", m, fields[0], "--wbc-count", "0")[0] == 2


def test_smear_imports_no_tensorflow(art, fields):
    code = ("import sys, edge_runtime\nfrom edge_runtime.smear import analyse_slide\n"
            f"m = edge_runtime.load({str(art / MALARIA_FILES['tflite-int8'])!r})\n"
            f"analyse_slide(m, [{str(fields[0])!r}])\n"
            "heavy = sorted(k for k in sys.modules if k.split('.')[0] in ('tensorflow', 'keras', 'tf_keras'))\n"
            "print(heavy); sys.exit(1 if heavy else 0)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
