"""Releasing a model with the package (convert.release) and the committed release itself."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

import edge_runtime
from edge_runtime import registry
from edge_runtime.metadata import read_metadata, read_tflite
from edge_runtime.spec import CONTENT_HASH_KEY, METADATA_KEY
from tests.helpers import (
    ROOT,
    SAMPLE,
    nearly_equal,
    onnx_without_metadata,
    ort_content,
    same_network,
    tflite_without_metadata,
)
from train.split import read_manifest

RELEASE = ROOT / "releases" / "malaria"
SHARED_MALARIA = ROOT.parent / "shared" / "data" / "malaria"


def _tree_of(records, out: Path) -> Path:
    for r in records:
        (out / r.label).mkdir(parents=True, exist_ok=True)
        shutil.copy(r.path, out / r.label / Path(r.path).name)
    return out


@pytest.fixture(scope="module")
def released(tiny_run, sample_manifest, tmp_path_factory):
    """The tiny run released into a temporary package folder, scored on its unseen test patients."""
    from convert.release import release

    tmp = tmp_path_factory.mktemp("release")
    unseen = _tree_of(read_manifest(sample_manifest, "test"), tmp / "unseen")
    # The tiny model sits near 0.5 on most cells (3 epochs), so any int8 flips many of their classes (its ONNX
    # int8 agreed with Keras on 73.75% once): a bound is given, as a release may, and recorded for the rebuild.
    entry = release(tiny_run, "tinymal", "0.0.1", unseen, dest=tmp / "rel", package=tmp / "pkg", calib_n=40,
                    min_agreement=0.5, log=lambda *a, **k: None)
    return entry, tmp


def same_files(made: Path, shipped: dict[str, Path], other_machine: bool = False) -> None:
    """Each shipped file is what `python -m convert` made in `made` (by format): the same network and weights,
    everything but the metadata's creation time (and the content hash over it) byte for byte; the .ort, whose
    tables ONNX Runtime writes in a varying order, table for table (`ort_content`). `other_machine`: the shipped
    files were made on another machine, whose CPU rounds the calibration's floats otherwise: quantization scales
    equal within float32 rounding, every other byte equal (`same_network`)."""
    for fmt, path in shipped.items():
        made_file = next(made.glob(f"*_{fmt}{path.suffix}"))
        new = made_file.read_bytes()
        old = path.read_bytes()
        if other_machine:
            assert same_network(fmt, new, old), fmt
        elif fmt == "tflite-int8":
            assert tflite_without_metadata(new) == tflite_without_metadata(old), fmt
        elif fmt == "onnx-int8":
            assert onnx_without_metadata(new) == onnx_without_metadata(old), fmt
        else:
            keys = (METADATA_KEY, CONTENT_HASH_KEY)  # medge's entry is compared below, its time aside
            assert ort_content(new, keys) == ort_content(old, keys), fmt
        a, b = read_metadata(made_file).to_dict(), read_metadata(path).to_dict()
        a, b = {**a, "created": None}, {**b, "created": None}
        if other_machine:  # figures measured on the int8 file are this CPU's (per-layer SQNR: 20.469 against 20.468 dB)
            assert nearly_equal(a, b, 1e-4), fmt
        else:
            assert a == b, fmt  # the same contract, version included


def test_release_writes_artifact_registry_and_card(released, monkeypatch):
    entry, tmp = released
    pkg, dest = tmp / "pkg", tmp / "rel"
    assert (dest / "model.keras").is_file() and (dest / "config.json").is_file()
    assert [r.name for r in registry.read_registry(pkg)] == ["tinymal"]
    assert entry.sha256 == registry.sha256_file(pkg / "tinymal.tflite") and entry.format == "tflite-int8"
    # One int8 file per ecosystem, each in the registry with its runtime and sha256.
    assert [(f.file, f.runtime, f.format) for f in entry.files] == [
        ("tinymal.tflite", "litert", "tflite-int8"), ("tinymal.onnx", "onnxruntime", "onnx-int8"),
        ("tinymal.ort", "onnxruntime", "ort-int8")]
    assert all(f.sha256 == registry.sha256_file(pkg / f.file) for f in entry.files)
    for f in entry.files:  # the release's version in each file; sealed; proven against Keras like every artifact
        meta = read_metadata(pkg / f.file)
        assert meta.version == "0.0.1" and meta.format == f.format and meta.labels == entry.labels
        model = edge_runtime.load(pkg / f.file, warmup=False)
        assert model.content_hash is not None
    for fmt in ("onnx-int8", "ort-int8"):
        assert entry.metrics["sample_by_format"][fmt]["cells"] == 80
    s = entry.metrics["sample"]
    assert s["cells"] == 80 and s["patients"] == 4 and 0.0 <= s["accuracy"] <= 1.0
    card = (pkg / "tinymal.md").read_text()
    assert card == (dest / "MODEL_CARD.md").read_text()
    assert f"{100 * s['accuracy']:.2f}%" in card and "Intended use" in card and "not a diagnosis" in card
    assert f"`tinymal.tflite` sha256 `{entry.sha256}`" in card  # the shipped file's, named, and the Keras model's
    assert f"(`model.keras`): `{registry.sha256_file(dest / 'model.keras')}`" in card
    calib = read_manifest(dest / "calibration.csv")
    assert sum(r.split == "train" for r in calib) == 40 and sum(r.split == "test" for r in calib) == 80
    # By name, through the registry of that folder.
    monkeypatch.setattr(registry, "RELEASED_DIR", pkg)
    model = edge_runtime.load("tinymal")
    assert model.path == pkg / "tinymal.tflite" and model.metadata.format == "tflite-int8"
    # The released file carries the standard metadata MediaPipe Tasks reads, with its labels packed in.
    from edge_runtime.standard_metadata import read as read_standard

    standard = read_standard(model.path.read_bytes())
    assert standard is not None and standard["packed_files"] == ["labels.txt"]
    assert standard["version"] == "0.0.1"  # the release's, not a source hash
    onnx_model = edge_runtime.load("tinymal", runtime="onnxruntime", warmup=False)
    assert onnx_model.path == pkg / "tinymal.onnx" and onnx_model.backend == "onnxruntime"
    assert "## Files" in card and "`tinymal.ort`" in card


def test_release_refuses_a_sample_the_run_trained_on(tiny_run, tmp_path):
    from convert.release import release

    with pytest.raises(ValueError, match="patients the run trained on"):
        release(tiny_run, "x", "0.0.1", SAMPLE, dest=tmp_path / "rel", package=tmp_path / "pkg", calib_n=10,
                log=lambda *a, **k: None)
    assert not (tmp_path / "pkg" / "x.tflite").exists()


def test_a_failed_release_leaves_the_previous_one_as_it_was(released, tiny_run):
    """A conversion that fails its agreement bound changes neither the release folder nor the package."""
    from convert.release import release

    entry, tmp = released
    dest, pkg = tmp / "rel", tmp / "pkg"
    before = {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    registry_before = (pkg / registry.REGISTRY).read_bytes()
    unseen = tmp / "unseen"
    with pytest.raises(ValueError, match="agreement"):
        release(tiny_run, "tinymal", "0.0.2", unseen, dest=dest, package=pkg, calib_n=40, min_agreement=1.01,
                log=lambda *a, **k: None)
    assert {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == before
    assert (pkg / registry.REGISTRY).read_bytes() == registry_before
    assert sorted(p.name for p in tmp.iterdir()) == ["pkg", "rel", "unseen"]  # no staging folder left


def test_convert_remakes_the_released_artifact_exactly(released, tmp_path):
    """What the release shipped is what the ordinary `python -m convert` call makes from the committed files."""
    from convert.cli import main
    from convert.release import reproduce_command

    entry, tmp = released
    argv = reproduce_command(tmp / "rel", str(tmp_path / "made"))
    assert "--onnx-activations" in argv and argv[argv.index("--model-version") + 1] == "0.0.1"
    assert main(argv[3:]) == 0  # in-process: `python -m convert` ARGS
    same_files(tmp_path / "made", {f.format: tmp / "pkg" / f.file for f in entry.files})


def test_a_release_folder_is_released_again_with_the_same_network(released, tmp_path, monkeypatch):
    """`python -m convert release releases/NAME --version NEW`: the committed model.keras, the same calibration
    cells and figures, new files carrying the new version; refused for a model its figures do not describe."""
    from convert.release import release

    entry, tmp = released
    dest, pkg = tmp_path / "rel", tmp_path / "pkg"
    for part in ("rel", "pkg", "unseen"):  # calibration.csv points at the sample beside the folder
        shutil.copytree(tmp / part, tmp_path / part)
    with pytest.raises(ValueError, match="already released"):
        release(dest, "tinymal", "0.0.1", dest=dest, package=pkg, log=lambda *a, **k: None)
    with pytest.raises(ValueError, match="released again where it is"):
        release(dest, "tinymal", "0.0.2", dest=tmp_path / "elsewhere", package=pkg, log=lambda *a, **k: None)
    # Held-out measurements of the recipe give the release its false-call rate (here two made-up blocks).
    row = {"error": None, "readable": True, "red_cells": 100, "calls_off_parasites": 1}
    smear = tmp_path / "smear.json"
    smear.write_text(json.dumps({"command": "python -m benchmarks smear ...", "fields": [
        {**row, "field": "B2.JPG"}, {**row, "field": "B1.JPG"}, {**row, "field": "B3.JPG", "readable": False}]}))
    fold = tmp_path / "result.json"
    fold.write_text(json.dumps({"rows": [{**row, "field": "C1.JPG", "calls_off_parasites": 3}]}))
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"rows": [{"error": None, "field": "D1.JPG", "red_cells": 5}]}))
    with pytest.raises(ValueError, match="lack calls_off_parasites"):
        release(dest, "tinymal", "0.0.2", dest=dest, package=pkg, false_calls=[old], log=lambda *a, **k: None)
    again = release(dest, "tinymal", "0.0.2", dest=dest, package=pkg, changes=["formats"], false_calls=[smear, fold],
                    notes=["a limitation of 0.0.2"], replace_notes=True, log=lambda *a, **k: None)
    assert again.trained["notes"] == ["a limitation of 0.0.2"]
    fc = again.metrics["false_calls"]
    assert (fc["calls"], fc["red_cells"], fc["fields"], fc["blocks"]) == (5, 300, 3, ["B1", "C1"])
    assert fc["per_1000"] == pytest.approx(16.667, abs=1e-3) and "held-out blocks B1, C1" in fc["source"]
    assert "**False parasitized calls**" not in (pkg / "tinymal.md").read_text()  # a cell model's card: no field
    assert again.trained["source_sha256"] == entry.trained["source_sha256"]
    assert again.metrics["sample"] == entry.metrics["sample"] and again.metrics["cv"] == entry.metrics["cv"]
    assert again.trained["commands"][:-1] == entry.trained["commands"]
    assert again.trained["commands"][-1].startswith(f"python -m convert release {dest}")
    for old, new in zip(entry.files, again.files):
        a, b = (tmp / "pkg" / old.file).read_bytes(), (pkg / new.file).read_bytes()
        if new.format == "tflite-int8":
            assert tflite_without_metadata(a) == tflite_without_metadata(b)
        elif new.format == "onnx-int8":
            assert onnx_without_metadata(a) == onnx_without_metadata(b)
        assert read_metadata(pkg / new.file).version == "0.0.2"
    card = (pkg / "tinymal.md").read_text()
    assert card.startswith("# Model card: `tinymal` 0.0.2") and "## Changes in 0.0.2\n\n- formats" in card
    # A model.keras that is not the one measured: its figures would not describe it.
    (dest / "model.keras").write_bytes((dest / "model.keras").read_bytes() + b"\0")
    with pytest.raises(ValueError, match="not the model tinymal 0.0.2 was measured on"):
        release(dest, "tinymal", "0.0.3", dest=dest, package=pkg, log=lambda *a, **k: None)


@pytest.mark.skipif(not (RELEASE / "model.keras").is_file(), reason="no committed release")
@pytest.mark.skipif(not SHARED_MALARIA.is_dir(), reason="the calibration cells live in ../shared/data/malaria")
@pytest.mark.parametrize("name", [r.name for r in registry.read_registry()])
def test_committed_release_is_what_convert_makes_from_the_committed_model(name, tmp_path):
    from convert.cli import main
    from convert.release import reproduce_command

    entry = registry.get(name)
    rel = ROOT / "releases" / name
    assert main(reproduce_command(rel, str(tmp_path / "made"))[3:]) == 0  # in-process: `python -m convert` ARGS
    assert all(registry.sha256_file(f.path) == f.sha256 for f in entry.all_files)  # as shipped
    # made here, shipped from the machine that released it: scales within float32 rounding (`same_network`)
    same_files(tmp_path / "made", {f.format: f.path for f in entry.all_files}, other_machine=True)
    meta = read_tflite(registry.verified_path(entry))
    assert meta.source_sha256 == entry.trained["source_sha256"] == registry.sha256_file(rel / "model.keras")
    if entry.inputs == "fields":  # its field calibration crops are committed, not in a git-ignored run folder
        calib = read_manifest(rel / "calibration.csv", "train")
        assert any(Path(r.path).is_relative_to(rel / "calibration") for r in calib)
        assert all(Path(r.path).is_relative_to(rel) or Path(r.path).is_relative_to(SHARED_MALARIA.resolve())
                   for r in calib)


def test_default_benchmark_uses_the_release_and_its_int8_row_is_the_shipped_file(released, tmp_path, monkeypatch):
    from benchmarks import cache
    from convert.formats import parse_formats

    entry, tmp = released
    monkeypatch.setattr(cache, "RELEASE", tmp / "rel")
    builder = cache.Builder(tmp_path / "cache", log=lambda s: None)
    p = builder.prepare(cache.MODELS["malaria-edge"], parse_formats("tflite-int8"))
    assert p.error is None and p.run == tmp / "rel" and p.manifest == tmp / "rel" / "calibration.csv"
    made = p.artifacts["tflite-int8"].read_bytes()
    assert tflite_without_metadata(made) == tflite_without_metadata((tmp / "pkg" / entry.file).read_bytes())
    scratch = cache.Builder(tmp_path / "cache2", log=lambda s: None, from_scratch=True)
    assert not scratch.uses_release(cache.MODELS["malaria-edge"])


def test_calibration_sample_does_not_depend_on_where_the_checkout_lies():
    """A release's manifest names its own crops and the shared data relative to itself; the seeded sample must be
    the same when the checkout and the data sit elsewhere (it once sorted absolute paths: a release rebuilt byte
    for byte in one checkout differed in another)."""
    from convert.calibration import _sample

    def items(checkout: str, shared: str) -> tuple[list[tuple[str, str]], Path]:
        base = Path(checkout) / "releases" / "field"
        own = [(str(base / "calibration" / f"c{k}.png"), "Parasitized") for k in range(5)]
        data = [(f"{shared}/data/malaria/cell_{k}.png", "Uninfected") for k in range(5)]
        return own + data, base

    def sample(checkout: str, shared: str) -> list[tuple[str, str]]:
        found, base = items(checkout, shared)
        return [(os.path.relpath(p, base), label) for p, label in _sample(found, 6, 0, base)]

    here = sample("/work/main", "/work/shared")
    assert here == sample("/ci/x/medge", "/ci/x/shared") == sample("/work/wt/release", "/work/wt/shared")
    assert sample("/work/wt/release", "/work/shared") == [  # one level deeper: the same cells in the same order
        (p.replace("../../../", "../../../../") if p.startswith("..") else p, label) for p, label in here]


def test_a_card_shows_paths_as_a_reader_of_a_clone_types_them():
    """Commands are recorded as run, from snapshots and scratch folders; the card shows them from `runs/`, as
    `../shared/data/...`, from `releases/` on, or relative to the project (issue 27: no developer data path)."""
    from convert.release import shown_paths

    made = ("python -m train field-cv --crops /work/wt/field/runs/field-crops-ot --data /work/shared/data/iml_malaria "
            f"--init /tmp/code-abc/releases/malaria/model.keras --sample {ROOT}/tests/data/malaria_sample "
            "--copy-calib /work/wt/field/runs")
    assert shown_paths(made) == ("python -m train field-cv --crops runs/field-crops-ot --data "
                                 "../shared/data/iml_malaria --init releases/malaria/model.keras --sample "
                                 "tests/data/malaria_sample --copy-calib runs")
    kept = "1/1/1 modules, https://lhncbc.nlm.nih.gov/publication/pub9932, /usr/lib/libusb-1.0.so, 3/4 of (a/b)"
    assert shown_paths(kept) == kept
    # Every committed card already reads so (a release renders it through shown_paths).
    for card in [*(ROOT / "edge_runtime" / "released").glob("*.md"), *(ROOT / "releases").glob("*/MODEL_CARD.md")]:
        text = card.read_text()
        assert shown_paths(text) == text, card


def test_same_network_allows_another_cpus_rounding_and_nothing_more():
    """`same_network` (a release remade on another machine): scales a float32 step apart and a bias rounded the
    other way pass; a changed weight, a scale moved by 0.1% or a changed bias do not."""
    from edge_runtime import tflite_file
    from tests.helpers import flip_strongest_first_conv_weights

    fb = tflite_file.schema()
    shipped = (ROOT / "edge_runtime" / "released" / "malaria-field.tflite").read_bytes()

    def edited(scale_factor: float = 1.0, bias_step: int = 0) -> bytes:
        m = fb.ModelT.InitFromPackedBuf(bytearray(shipped), 0)
        t = next(t for t in m.subgraphs[0].tensors if t.type == fb.TensorType.INT32 and t.quantization is not None
                 and t.quantization.scale is not None and m.buffers[t.buffer].data is not None)  # a bias
        t.quantization.scale = np.asarray(t.quantization.scale, np.float32) * np.float32(scale_factor)
        bias = np.asarray(m.buffers[t.buffer].data, np.uint8).view(np.int32).copy()
        bias[0] += bias_step
        m.buffers[t.buffer].data = bias.view(np.uint8)
        return tflite_file.pack_model(m, len(shipped))

    assert same_network("tflite-int8", edited(1 + 2 ** -23, 1), shipped)
    assert not same_network("tflite-int8", edited(1.001), shipped)
    assert not same_network("tflite-int8", edited(bias_step=2), shipped)
    assert not same_network("tflite-int8", flip_strongest_first_conv_weights(shipped), shipped)
