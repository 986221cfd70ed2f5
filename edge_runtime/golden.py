"""The golden set an artifact carries, and the device's self-test against it (numpy and zlib only).

    python -m edge_runtime selftest export/malaria-edge_tflite-int8.tflite [--json]

`python -m convert` embeds in every artifact a few preprocessed proof inputs
and the probabilities the artifact itself gave on them right after
conversion, through `edge_runtime` (the device's path, not Keras), with a
tolerance. `selftest` runs them again on this device's runtime: same answers
within the tolerance and the same top class on every input, or drift.

Where it lives: a second metadata entry beside `medge`, named `medge-golden`
(`.tflite`: a `Model.metadata` entry; `.onnx`/`.ort`: a `metadata_props`
key). Readers that do not know it ignore it, so older medge versions still
open these files, and files made before it simply have no golden set.

Inputs are stored compactly and exactly: each as uint8 codes `q` with a
`scale` and `offset`, the input being `q * scale + offset` in float32. For
images that is the model's own preprocessing (`pixel = uint8 * scale +
offset`), so a golden input is a real preprocessed image, stored as a
lossless PNG (about 5 KB per 64x64 cell, base64 in the JSON); a head's
feature map gets its own range and is zlib-compressed.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import platform
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from edge_runtime.spec import GOLDEN_KEY
from edge_runtime.tflite_file import tflite_metadata_entries

GOLDEN_SCHEMA = "medge-golden/1"


class GoldenMissing(LookupError):
    """The artifact carries no golden set (made before medge wrote one, or by another tool)."""


def to_codes(x: np.ndarray, scale: float | None = None, offset: float | None = None
             ) -> tuple[np.ndarray, float, float]:
    """One input -> (uint8 codes, scale, offset); without `scale`/`offset`, the input's own range."""
    x = np.asarray(x, np.float32)
    if scale is None or offset is None:
        lo, hi = float(x.min()), float(x.max())
        offset, scale = lo, (hi - lo) / 255.0 if hi > lo else 1.0
    q = np.clip(np.round((x - np.float32(offset)) / np.float32(scale)), 0, 255).astype(np.uint8)
    return q, float(scale), float(offset)


def from_codes(q: np.ndarray, scale: float, offset: float) -> np.ndarray:
    """uint8 codes -> the float32 input, computed as the preprocessing computes a pixel."""
    return q.astype(np.float32) * np.float32(scale) + np.float32(offset)


@dataclasses.dataclass(frozen=True)
class GoldenSet:
    """Proof inputs and the outputs the artifact gave on them.

    Attributes:
        codes: (N, *input_shape) uint8; the inputs are `codes * scales[i] + offsets[i]`.
        scales, offsets: per input.
        outputs: (N, classes) float32 probabilities the artifact gave at conversion.
        atol: largest allowed |probability difference| on this or another device.
        sources: what each input was (file basenames), for messages.
        made_on: runtime, its version and the machine that computed `outputs`.
    """

    codes: np.ndarray
    scales: tuple[float, ...]
    offsets: tuple[float, ...]
    outputs: np.ndarray
    atol: float
    sources: tuple[str, ...] = ()
    made_on: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.codes)
        if not (len(self.scales) == len(self.offsets) == len(self.outputs) == n) or n == 0:
            raise ValueError(f"golden set needs 1+ inputs with one scale, offset and output each; got {n} inputs, "
                             f"{len(self.scales)} scales, {len(self.offsets)} offsets, {len(self.outputs)} outputs")
        if not self.atol > 0:
            raise ValueError(f"golden set tolerance must be > 0, got {self.atol}")

    def __len__(self) -> int:
        return len(self.codes)

    @property
    def inputs(self) -> np.ndarray:
        """The float32 inputs exactly as they were run at conversion."""
        return decode_inputs(self.codes, self.scales, self.offsets)

    def to_dict(self) -> dict[str, Any]:
        codes = np.ascontiguousarray(self.codes, np.uint8)
        return {
            "schema": GOLDEN_SCHEMA,
            "shape": list(codes.shape),
            **encode_codes(codes),
            "scales": [float(s) for s in self.scales],
            "offsets": [float(o) for o in self.offsets],
            "outputs": [[float(v) for v in row] for row in np.asarray(self.outputs, np.float32)],
            "atol": float(self.atol),
            "sources": list(self.sources),
            "made_on": dict(self.made_on),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GoldenSet:
        if str(d.get("schema", "")).split(".")[0] != GOLDEN_SCHEMA:
            raise ValueError(f"golden set schema {d.get('schema')!r} is not {GOLDEN_SCHEMA!r}; upgrade medge")
        shape = tuple(int(v) for v in d["shape"])
        codes = decode_codes(d, shape)
        return cls(codes=codes, scales=tuple(d["scales"]),
                   offsets=tuple(d["offsets"]), outputs=np.asarray(d["outputs"], np.float32),
                   atol=float(d["atol"]), sources=tuple(d.get("sources", ())), made_on=dict(d.get("made_on", {})))

    @classmethod
    def from_json(cls, text: str | bytes) -> GoldenSet:
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"golden set is not valid JSON: {e}") from None
        try:
            return cls.from_dict(d)
        except (KeyError, TypeError) as e:
            raise ValueError(f"golden set lacks or mistypes a field ({e})") from None


def _is_image(shape: Sequence[int]) -> bool:
    return len(shape) == 3 and shape[2] in (1, 3)


def encode_codes(codes: np.ndarray) -> dict[str, Any]:
    """{"encoding", "codes"}: lossless PNG per input for images (about 5 KB per 64x64 cell), else zlib of all."""
    if _is_image(codes.shape[1:]):
        out = []
        for q in codes:
            buf = io.BytesIO()
            Image.fromarray(q[:, :, 0] if q.shape[2] == 1 else q).save(buf, "PNG", optimize=True)
            out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
        return {"encoding": "png", "codes": out}
    return {"encoding": "zlib", "codes": base64.b64encode(zlib.compress(codes.tobytes(), 9)).decode("ascii")}


def decode_codes(d: Mapping[str, Any], shape: tuple[int, ...]) -> np.ndarray:
    """The uint8 codes of a stored golden set, checked against `shape`."""
    encoding = d.get("encoding", "zlib")
    try:
        if encoding == "png":
            arrays = [np.asarray(Image.open(io.BytesIO(base64.b64decode(c, validate=True))), np.uint8)
                      for c in d["codes"]]
            if len(arrays) != shape[0]:
                raise ValueError(f"{len(arrays)} PNG inputs for a set of {shape[0]}")
            codes = np.stack([a.reshape(shape[1:]) for a in arrays])
        elif encoding == "zlib":
            raw = zlib.decompress(base64.b64decode(d["codes"], validate=True))
            codes = np.frombuffer(raw, np.uint8).reshape(shape)
        else:
            raise ValueError(f"unknown encoding {encoding!r}")
    except (ValueError, OSError, zlib.error) as e:  # bad base64, PNG, zlib stream or size
        raise ValueError(f"golden inputs do not decode ({e})") from None
    if codes.shape != shape:
        raise ValueError(f"golden inputs decode to {codes.shape}, the set says {shape}")
    return codes


ANY_MARGIN = -1.0  # a `pick` floor every input passes (margins are >= 0): for a model whose answers are all ties


def tie_free(outputs: np.ndarray, atol: float) -> np.ndarray:
    """bool per golden input: its top two probabilities are more than 2 x `atol` apart, so a difference
    within the tolerance cannot change its top class."""
    top2 = np.sort(np.asarray(outputs), axis=1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) > 2 * atol


def pick(probs: np.ndarray, n: int, floor: float) -> list[int]:
    """Indices of up to `n` inputs for a golden set: every predicted class in turn, least confident first.

    Only inputs whose top two probabilities are more than `floor` apart
    qualify, so a legitimate difference within the tolerance cannot change
    their top class; among those, the least confident move most when a
    weight changes (a saturated 0.9999 hides tampering).
    """
    probs = np.asarray(probs)
    top2 = np.sort(probs, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    pred = probs.argmax(1)
    queues = [sorted(np.flatnonzero((pred == c) & (margin > floor)), key=lambda i: margin[i])
              for c in range(probs.shape[1])]
    chosen: list[int] = []
    while len(chosen) < n and any(queues):
        for q in queues:
            if q and len(chosen) < n:
                chosen.append(int(q.pop(0)))
    return chosen


def compare(golden: GoldenSet, outputs: np.ndarray) -> dict[str, Any]:
    """The self-test verdict for `outputs` (this device's probabilities on `golden.inputs`)."""
    outputs = np.asarray(outputs, np.float32)
    if outputs.shape != golden.outputs.shape:
        return {"ok": False, "inputs": len(golden), "atol": golden.atol, "max_abs_diff": None,
                "worst_input": None, "worst_source": None, "top1_changed": [],
                "reason": f"outputs have shape {outputs.shape}, the golden set {golden.outputs.shape}"}
    diff = np.abs(outputs - golden.outputs)
    per_input = diff.max(axis=1)
    worst = int(per_input.argmax())
    # A near-tie (kept only when a model has no other answers) may flip within the tolerance: held to |dprob|.
    changed = [int(i) for i in np.flatnonzero((outputs.argmax(1) != golden.outputs.argmax(1))
                                               & tie_free(golden.outputs, golden.atol))]
    ok = bool(per_input.max() <= golden.atol and not changed)
    reasons = []
    if per_input.max() > golden.atol:
        reasons.append(f"max |dprob| {per_input.max():.3g} > tolerance {golden.atol:g}")
    if changed:
        reasons.append(f"top class changed on {len(changed)} of {len(golden)} input(s)")
    return {
        "ok": ok, "inputs": len(golden), "atol": golden.atol, "max_abs_diff": float(per_input.max()),
        "worst_input": worst, "worst_source": golden.sources[worst] if worst < len(golden.sources) else None,
        "top1_changed": changed, "reason": "; ".join(reasons) or None,
        "per_input_max_abs_diff": [float(v) for v in per_input],
        "worst_expected": [float(v) for v in golden.outputs[worst]], "worst_got": [float(v) for v in outputs[worst]],
    }


def golden_entry(entries: Mapping[str, Any] | None, where: str) -> GoldenSet:
    """The golden set from a file's metadata entries (as `metadata.tflite_metadata_entries` or onnxruntime
    give them)."""
    if not entries or GOLDEN_KEY not in entries:
        raise GoldenMissing(f"{where} carries no golden set (no '{GOLDEN_KEY}' entry); re-export it with "
                            "`python -m convert` to give it one")
    return GoldenSet.from_json(entries[GOLDEN_KEY])


def read_golden(model) -> GoldenSet:
    """The golden set of a loaded `EdgeModel`: from its session's metadata (onnxruntime) or its flatbuffer (.tflite).

    Raises:
        GoldenMissing: none in the file.
        ValueError: one that does not parse.
        ImportError: a .tflite on a device without the flatbuffer schema (tflite-runtime only).
    """
    entries = model.session.metadata()
    if entries is None:  # TFLite interpreters expose no metadata: read the flatbuffer's entries
        entries = tflite_metadata_entries(model.path.read_bytes())
    return golden_entry(entries, str(model.path))


def selftest(model, golden: GoldenSet | None = None) -> dict[str, Any]:
    """Run the golden inputs on `model` (an `EdgeModel`) and compare; see `compare` for the fields."""
    golden = read_golden(model) if golden is None else golden
    inputs = golden.inputs
    if tuple(inputs.shape[1:]) != tuple(model.input_shape):
        return {"ok": False, "inputs": len(golden), "atol": golden.atol, "max_abs_diff": None, "worst_input": None,
                "worst_source": None, "top1_changed": [],
                "reason": f"golden inputs are {inputs.shape[1:]}, the model takes {model.input_shape}"}
    return compare(golden, model.run(inputs))


def made_on(session) -> dict[str, str]:
    """Where golden outputs were computed: runtime, version, machine."""
    return {"runtime": session.backend, "runtime_version": session.runtime_version(),
            "machine": platform.machine(), "platform": platform.platform()}


def encode_inputs(x: np.ndarray, scale: float | None, offset: float | None
                  ) -> tuple[np.ndarray, list[float], list[float]]:
    """(codes, scales, offsets) of a batch; `scale`/`offset` None: each input's own range (features)."""
    out = [to_codes(xi, scale, offset) for xi in np.asarray(x, np.float32)]
    return np.stack([o[0] for o in out]), [o[1] for o in out], [o[2] for o in out]


def decode_inputs(codes: np.ndarray, scales: Sequence[float], offsets: Sequence[float]) -> np.ndarray:
    """The float32 inputs of (codes, scales, offsets)."""
    return np.stack([from_codes(q, s, o) for q, s, o in zip(codes, scales, offsets)])
