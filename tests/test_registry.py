"""Released models by name (edge_runtime.registry): no TensorFlow, runs in the edge-only environment too."""

from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest

import edge_runtime
from edge_runtime import registry
from edge_runtime.model import ModelError
from tests.helpers import SAMPLE, run_cli

RELEASED = {r.name: r for r in registry.read_registry()}
needs_release = pytest.mark.skipif("malaria" not in RELEASED, reason="no malaria model released yet")


def test_names_and_paths_are_told_apart():
    assert registry.is_name("malaria") and registry.is_name("oct")
    assert not registry.is_name("malaria.tflite") and not registry.is_name("export/malaria")


def test_an_unknown_name_lists_the_released_ones():
    with pytest.raises(ModelError, match="no released model named 'nosuch'"):
        edge_runtime.load("nosuch")
    code, out, err = run_cli("predict", "nosuch", SAMPLE)
    assert code == 2 and "no released model named 'nosuch'" in err


def test_a_server_without_models_serves_one_per_task_the_field_one_for_malaria(tmp_path):
    def entry(name, task, **kw):
        return registry.Release(name=name, version="1.0.0", file=f"{name}.tflite", sha256="0" * 64, bytes=1,
                                format="tflite-int8", task=task, labels=("a", "b"), **kw)

    (tmp_path / registry.REGISTRY).write_text(registry.registry_json(
        [entry("malaria", "malaria"), entry("malaria-field", "malaria", inputs="fields"), entry("oct", "oct")]))
    assert sorted(registry.serving_defaults(tmp_path)) == ["malaria-field", "oct"]
    old = json.loads((tmp_path / registry.REGISTRY).read_text())
    for d in old["models"]:
        d.pop("inputs")  # a registry written before `inputs` existed: every model is a cell model
    (tmp_path / registry.REGISTRY).write_text(json.dumps(old))
    assert {r.inputs for r in registry.read_registry(tmp_path)} == {"cells"}
    assert sorted(registry.serving_defaults(tmp_path)) == ["malaria", "oct"]


@needs_release
def test_released_malaria_loads_by_name_and_is_intact():
    r = RELEASED["malaria"]
    model = edge_runtime.load("malaria")
    assert model.path == registry.RELEASED_DIR / r.file
    assert model.metadata.format == r.format == "tflite-int8" and list(model.labels) == list(r.labels)
    assert registry.card_text(r).startswith("# Model card: `malaria`")


@needs_release
def test_released_malaria_classifies_the_sample_as_its_card_says():
    """The CLI, by name, on the bundled sample of unseen patients: the accuracy the release recorded."""
    code, out, err = run_cli("predict", "malaria", SAMPLE, "--csv", "--threads", "1")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 400
    truth = [("Parasitized" if "/Parasitized/" in row["source"] else "Uninfected") for row in rows]
    accuracy = float(np.mean([row["label"] == t for row, t in zip(rows, truth)]))
    assert accuracy == pytest.approx(RELEASED["malaria"].metrics["sample"]["accuracy"], abs=1e-9)


@needs_release
def test_models_verb_lists_version_sha_and_figures():
    code, out, err = run_cli("models")
    assert code == 0, err
    r = RELEASED["malaria"]
    line = next(l for l in out.splitlines() if l.startswith("malaria "))
    assert r.version in line and r.sha256[:12] in line and f"{100 * r.metrics['sample']['accuracy']:.2f}%" in line
    code, out, _ = run_cli("models", "--json")
    entry = next(d for d in json.loads(out) if d["name"] == "malaria")
    assert entry["intact"] is True and entry["sha256"] == r.sha256
    code, out, _ = run_cli("models", "--card", "malaria")
    assert code == 0 and "## Intended use" in out


@needs_release
def test_each_release_lists_its_files_per_runtime_and_the_models_verb_shows_them():
    for r in RELEASED.values():
        assert [(f.format, f.runtime, f.file) for f in r.files] == [
            ("tflite-int8", "litert", f"{r.name}.tflite"), ("onnx-int8", "onnxruntime", f"{r.name}.onnx"),
            ("ort-int8", "onnxruntime", f"{r.name}.ort")]
        assert all(registry.sha256_file(f.path) == f.sha256 and f.path.stat().st_size == f.bytes for f in r.files)
    code, out, err = run_cli("models")
    assert code == 0, err
    for f in RELEASED["malaria"].files:
        line = next(l for l in out.splitlines() if l.rstrip().endswith(f.file))
        assert f.format in line and f.runtime in line and f.sha256[:12] in line and "ALTERED" not in line


@needs_release
def test_load_by_runtime_picks_the_release_s_file(monkeypatch):
    if not edge_runtime.BACKENDS["onnxruntime"].installed():
        pytest.skip("the onnx extra is not installed")
    r = RELEASED["malaria"]
    model = edge_runtime.load("malaria", runtime="onnxruntime", warmup=False)
    assert model.path == registry.RELEASED_DIR / "malaria.onnx" and model.backend == "onnxruntime"
    assert model.metadata.version == r.version and model.content_hash is not None
    tflite = "litert" if edge_runtime.BACKENDS["litert"].installed() else "tflite-runtime"  # the Pi's env: the latter
    assert edge_runtime.load("malaria", backend=tflite, warmup=False).path.name == "malaria.tflite"
    code, out, err = run_cli("predict", "malaria", SAMPLE / "Parasitized", "--backend", "onnxruntime", "--json")
    assert code == 0 and "malaria.onnx" in out, err
    with pytest.raises(edge_runtime.BackendError, match="give one"):
        edge_runtime.load("malaria", runtime="onnxruntime", backend="litert")
    # A device without onnxruntime: the message names the extra.
    installed = type(edge_runtime.BACKENDS["onnxruntime"]).installed
    monkeypatch.setattr(type(edge_runtime.BACKENDS["onnxruntime"]), "installed",
                        lambda self: self.name != "onnxruntime" and installed(self))
    with pytest.raises(edge_runtime.BackendError, match=r"not installed: pip install 'medge\[onnx\]'"):
        edge_runtime.load("malaria", runtime="onnxruntime")
    assert edge_runtime.load("malaria", warmup=False).path.name == "malaria.tflite"


@needs_release
def test_a_device_with_only_onnxruntime_opens_the_onnx_by_name(monkeypatch):
    if not edge_runtime.BACKENDS["onnxruntime"].installed():
        pytest.skip("the onnx extra is not installed")
    monkeypatch.setattr(type(edge_runtime.BACKENDS["onnxruntime"]), "installed",
                        lambda self: self.name == "onnxruntime")
    assert edge_runtime.load("malaria", warmup=False).path.name == "malaria.onnx"


@needs_release
@pytest.mark.parametrize("suffix", [".onnx", ".ort"])
def test_the_onnx_files_carry_medge_s_metadata_in_metadata_props(suffix):
    """What an ONNX Runtime app (web, mobile, Node) reads from the file alone: `metadata_props`."""
    if not edge_runtime.BACKENDS["onnxruntime"].installed():
        pytest.skip("the onnx extra is not installed")
    from edge_runtime.backends import open_session
    from edge_runtime.golden import GoldenSet
    from edge_runtime.metadata import ArtifactMetadata
    from edge_runtime.spec import CONTENT_HASH_KEY, GOLDEN_KEY, METADATA_KEY

    r = RELEASED["malaria"]
    props = open_session(registry.RELEASED_DIR / f"malaria{suffix}", "onnxruntime", optimize=False).metadata()
    assert set(props) >= {METADATA_KEY, GOLDEN_KEY, CONTENT_HASH_KEY}  # beside the quantizer's own
    meta = ArtifactMetadata.from_json(props[METADATA_KEY])
    assert meta.version == r.version and meta.labels == r.labels and meta.format == f"{suffix[1:]}-int8"
    assert meta.preprocess.input_size == (64, 64) and meta.preprocess.scale == pytest.approx(1 / 255)
    assert meta.quantization["activations"] == "int8" and meta.confidence_threshold == 0.8
    assert len(GoldenSet.from_json(props[GOLDEN_KEY])) == 4
    assert props[CONTENT_HASH_KEY].startswith("medge-content-sha256:")


@needs_release
def test_info_shows_the_standard_metadata_beside_medges():
    code, out, err = run_cli("info", "malaria")
    assert code == 0, err
    medge, _, standard = out.partition("standard TFLite metadata (TFLITE_METADATA")
    assert "threshold: 0.8" in medge and "resize_method" in medge
    assert "normalisation mean [0.0, 0.0, 0.0] std [255.0, 255.0, 255.0]" in standard and "labels.txt" in standard
    code, out, _ = run_cli("info", "malaria", "--json")
    d = json.loads(out)
    assert d["labels"] == ["Parasitized", "Uninfected"] and d["tflite_metadata"]["packed_files"] == ["labels.txt"]


@needs_release
def test_an_altered_released_file_is_refused(tmp_path, monkeypatch):
    shutil.copytree(registry.RELEASED_DIR, tmp_path / "released")
    monkeypatch.setattr(registry, "RELEASED_DIR", tmp_path / "released")
    path = tmp_path / "released" / RELEASED["malaria"].file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="altered or replaced"):
        edge_runtime.load("malaria")
    path.unlink()
    with pytest.raises(ModelError, match="missing from this install"):
        edge_runtime.load("malaria")


@pytest.mark.parametrize("name", [r.name for r in registry.read_registry()])
def test_each_card_names_both_hashes_and_no_developer_path(name):
    """A card a user reads: the shipped file's sha256 and the Keras model's, each named; nothing of the machine
    it was made on in its prose; a slide block named once where two figures point at the same one (issue 27)."""
    import re

    entry = registry.get(name)
    card = registry.card_text(entry)
    assert f"`{entry.file}` sha256 `{entry.sha256}`" in card.splitlines()[2]  # under the title
    assert (f"sha256 of the shipped `{entry.file}`: `{entry.sha256}`; of the Keras model it is made from "
            f"(`model.keras`): `{entry.trained['source_sha256']}`") in card
    # The commands that made it give paths as the developer typed them (a recipe); the prose must not.
    prose = re.sub(r"```.*?```|`python -m [^`]*`", "", card, flags=re.S)
    assert "shared/data" not in prose and "/work/" not in prose
    assert not re.search(r"\((PA\d+), \1\)", card)
