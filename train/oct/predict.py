"""Classify OCT B-scans from local paths or image URLs with a run (or a head trained elsewhere).

    python -m train oct predict runs/oct-head scan1.jpeg https://example.org/scan2.jpeg
    python -m train oct predict --head keras2_head.h5 --base-weights imagenet scan.jpeg --format json

Same preprocessing as training (the run's spec, applied with Pillow as on the
device), then base and head, argmax over the run's labels, and the referral
level of Kermany et al. URLs are fetched with a timeout and a size limit; an
offline machine gets an error saying so, not a hang.
"""

from __future__ import annotations

import dataclasses
import io
import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.clinical import OCT_LABELS, referral_map
from edge_runtime.images import load_image, preprocess
from edge_runtime.spec import PreprocessSpec
from train import runs
from train.evaluate import load_model

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_BYTES = 20 * 2**20


@dataclasses.dataclass
class Loaded:
    """A base and a head ready for inference, with what they expect and mean."""

    base: Any
    head: Any
    labels: list[str]
    spec: PreprocessSpec
    referral: dict[str, str] | None
    source: str
    synthetic: bool = False


def load_for_inference(run: Path | None = None, head: Path | None = None, base_weights: str = "imagenet",
                       base_seed: int = 0, preprocess_name: str = "inception",
                       labels: Sequence[str] | None = None) -> Loaded:
    """From a run directory (its fused model) or from `--head PATH` plus a base built here."""
    # loads TensorFlow: imported only when this runs
    from train.oct.models import FEATURE_SHAPE, build_base, load_head, preprocess_spec

    if (run is None) == (head is None):
        raise ValueError("give either a run directory or --head PATH (not both)")
    if run is not None:
        run = Path(run)
        cfg = runs.read_config(run)
        if cfg.task != "oct":
            raise ValueError(f"{run} is a {cfg.task!r} run, not an OCT run")
        path = runs.model_file(run)
        fused = load_model(path)
        subs = [l for l in fused.layers if hasattr(l, "layers")]
        bases = [l for l in subs if tuple(l.output.shape[1:]) == FEATURE_SHAPE]
        if len(subs) != 2 or not bases:
            raise ValueError(f"{path} is not a base+head OCT model (nested models: {[l.name for l in subs]})")
        base = bases[0]
        top = [l for l in subs if l is not base][0]
        return Loaded(base, top, list(cfg.labels), cfg.preprocess, dict(cfg.referral) if cfg.referral else None,
                      str(run), cfg.synthetic)
    labels = list(labels or OCT_LABELS)
    h = load_head(head, len(labels))
    base = build_base(base_weights, base_seed)
    return Loaded(base, h, labels, preprocess_spec(preprocess_name), referral_map(labels), str(head))


def is_url(s: str) -> bool:
    return s.lower().startswith(("http://", "https://"))


def fetch(url: str, timeout: float = DEFAULT_TIMEOUT_S, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The body of an http(s) URL, refusing slow, failing or oversized downloads with a clear ValueError."""
    if not is_url(url):
        raise ValueError(f"{url!r} is not an http(s) URL")
    req = urllib.request.Request(url, headers={"User-Agent": "medge-oct-predict/0.1"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise ValueError(f"{url}: {int(length):,} bytes exceeds the {max_bytes:,}-byte limit (--max-bytes)")
            data = resp.read(max_bytes + 1)
    except urllib.error.HTTPError as e:
        raise ValueError(f"{url}: server answered HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        raise ValueError(
            f"could not fetch {url} ({reason}) within {timeout:g} s: this machine may be offline or the host "
            "unreachable. Download the image elsewhere and pass its local path instead"
        ) from None
    if len(data) > max_bytes:
        raise ValueError(f"{url}: more than the {max_bytes:,}-byte limit (--max-bytes); refusing to read further")
    if not data:
        raise ValueError(f"{url}: empty response")
    return data


def open_source(src: str, timeout: float = DEFAULT_TIMEOUT_S, max_bytes: int = DEFAULT_MAX_BYTES):
    """A loaded RGB PIL image from a path or URL (ImageError, a ValueError, for non-images)."""
    if is_url(src):
        img = load_image(io.BytesIO(fetch(src, timeout, max_bytes)), "rgb")
        img.filename = src  # for messages
        return img
    return load_image(src, "rgb")


def predict_images(model: Loaded, images: Sequence, batch_size: int = 8) -> np.ndarray:
    """Probabilities for PIL images (any size): spec preprocessing, base, head."""
    out = []
    for i in range(0, len(images), batch_size):
        x = np.stack([preprocess(im, model.spec) for im in images[i:i + batch_size]])
        feats = model.base.predict_on_batch(x)
        out.append(np.asarray(model.head.predict_on_batch(feats)))
    return np.concatenate(out) if out else np.zeros((0, len(model.labels)), np.float32)


def predict(model: Loaded, sources: Sequence[str], timeout: float = DEFAULT_TIMEOUT_S,
            max_bytes: int = DEFAULT_MAX_BYTES) -> list[dict[str, Any]]:
    """One result dict per source (label, confidence, referral, probabilities)."""
    if not sources:
        raise ValueError("no images given; pass paths or http(s) URLs")
    images = [open_source(s, timeout, max_bytes) for s in sources]
    probs = predict_images(model, images)
    rows = []
    for s, p in zip(sources, probs):
        k = int(p.argmax())
        rows.append({
            "source": s,
            "label": model.labels[k],
            "confidence": float(p[k]),
            "referral": (model.referral or {}).get(model.labels[k]),
            "probabilities": {l: float(v) for l, v in zip(model.labels, p)},
        })
    return rows


def run(run_dir: Path | None, sources: Sequence[str], head: Path | None, base_weights: str, base_seed: int,
        preprocess_name: str, fmt: str, timeout: float, max_bytes: int) -> int:
    """CLI body of `python -m train oct predict`."""
    for s in sources:  # a missing or broken local file fails before the model (seconds) is loaded
        if not is_url(s):
            load_image(s, "rgb")
    model = load_for_inference(run_dir, head, base_weights, base_seed, preprocess_name)
    rows = predict(model, sources, timeout, max_bytes)
    if fmt == "json":
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            probs = "  ".join(f"{l} {v:.3f}" for l, v in r["probabilities"].items())
            ref = f"  referral: {r['referral']}" if r["referral"] else ""
            print(f"{r['source']}: {r['label']} ({r['confidence']:.3f}){ref}  [{probs}]")
    if model.synthetic:
        print("note: this model was trained on SYNTHETIC OCT-like images; its predictions mean nothing clinically")
    return 0
