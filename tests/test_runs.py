"""RunConfig, the one reading of a run's config.json: what the trainers write round-trips, anything else is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_runtime.spec import MALARIA_SPEC, OCT_INCEPTION_SPEC
from train import runs
from train.runs import RunConfig

ROOT = Path(__file__).resolve().parent.parent

# What train/malaria/fit.py writes (a real tiny run's config.json, versions shortened).
MALARIA_CONFIG = {
    "task": "malaria", "model": "malaria_resnet", "labels": ["Parasitized", "Uninfected"],
    "positive_label": "Parasitized", "preprocess": MALARIA_SPEC.to_dict(),
    "preset": {"name": "tiny", "model": {"stages": [1, 1], "filters": [8, 16, 32], "l2": 0.0005, "bn_epsilon": 2e-05,
                                         "bn_momentum": 0.9, "pool": 4},
               "epochs": 1, "batch_size": 16, "learning_rate": 0.01, "momentum": 0.9, "schedule": "linear",
               "augment": True},
    "seed": 42, "manifest": "/data/sample.csv", "images": {"train": 280, "val": 40},
    "size": {"weights": 6486, "trainable_weights": 6320, "macs": 4296704}, "replicas": 1,
    "versions": {"python": "3.11.7", "tensorflow": "2.21.0"}, "created": "2026-11-22T14:52:52+00:00",
}


def test_malaria_config_round_trips_and_defaults_to_best_keras(tmp_path):
    cfg = RunConfig.from_dict(MALARIA_CONFIG)
    assert cfg.labels == ("Parasitized", "Uninfected") and cfg.preprocess == MALARIA_SPEC
    assert cfg.model_file == runs.BEST and cfg.head_file is None and cfg.preset["model"]["pool"] == 4
    runs.write_config(tmp_path, cfg)
    assert runs.is_run(tmp_path) and runs.read_config(tmp_path) == cfg
    # Older malaria runs carry no model_file or synthetic: writing their defaults now changes nothing else.
    assert cfg.to_dict() == {**MALARIA_CONFIG, "model_file": "best.keras", "synthetic": False}


def test_unknown_key_is_refused_naming_the_file_and_key(tmp_path):
    (tmp_path / runs.CONFIG).write_text(json.dumps({**MALARIA_CONFIG, "lerning_rate": 0.1, "zeta": 1}))
    with pytest.raises(ValueError, match=r"config\.json.*\['lerning_rate', 'zeta'\]") as e:
        runs.read_config(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_missing_or_broken_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a medge run directory"):
        runs.read_config(tmp_path)
    (tmp_path / runs.CONFIG).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        runs.read_config(tmp_path)
    (tmp_path / runs.CONFIG).write_text(json.dumps({"task": "malaria", "labels": ["a", "b"]}))
    with pytest.raises(ValueError, match=r"lacks \['preprocess'\]"):
        runs.read_config(tmp_path)


def test_oct_configs_of_every_mode_round_trip(tmp_path):
    pytest.importorskip("keras")
    from train.oct.fit import _config

    head = _config("head", ["CNV", "DME", "DRUSEN", "NORMAL"], OCT_INCEPTION_SPEC, "none", 0, "0" * 64, True,
                   store="/s.h5", manifest="/m.csv", seed=1, epochs=2, batch_size=8,
                   images={"train": 8, "val": 2, "test": 0}, weights_trainable=1000)
    e2e = _config("end-to-end", ["CNV", "DME", "DRUSEN", "NORMAL"], OCT_INCEPTION_SPEC, "imagenet", 0, "1" * 64,
                  False, store="/s.h5", manifest="/m.csv", seed=1, epochs=2, batch_size=8, images={},
                  weights_trainable=1)
    imported = _config("imported-head", ["A", "B"], OCT_INCEPTION_SPEC, "imagenet", 0, "2" * 64, False,
                       imported_from="/h.h5")
    assert head.model_file == "fused.keras" and head.head_file == "head.keras" and head.referral["DME"] == "urgent"
    assert head.synthetic and head.synthetic_note and e2e.head_file is None and imported.referral is None
    for i, cfg in enumerate((head, e2e, imported)):
        runs.write_config(tmp_path / str(i), cfg)
        assert runs.read_config(tmp_path / str(i)) == cfg
    # Files written before RunConfig spelled "not set" as null: still read.
    older = json.loads((tmp_path / "1" / runs.CONFIG).read_text())
    assert RunConfig.from_dict({**older, "head_file": None, "positive_label": None}) == e2e


def test_runs_module_imports_without_tensorflow():
    code = ("import sys; import train.runs; "
            "heavy = [m for m in ('tensorflow', 'keras') if m in sys.modules]; print(heavy); "
            "sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_calibration_folder_is_named_by_basename_and_listing_hash(tmp_path):
    from convert.calibration import _folder_items

    (tmp_path / "cells" / "A").mkdir(parents=True)
    for name in ("1.png", "2.png"):
        (tmp_path / "cells" / "A" / name).write_bytes(b"x")
    items, digest = _folder_items(tmp_path / "cells")
    assert [l for _, l in items] == ["A", "A"] and len(digest) == 64
    (tmp_path / "cells" / "A" / "3.png").write_bytes(b"x")
    assert _folder_items(tmp_path / "cells")[1] != digest
