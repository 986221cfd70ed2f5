"""On-phone inference, the server's side: what the page needs to run a model in the phone's browser.

    ondevice = OnDevice(slots, web_runtime_dir=None)   # None: $MEDGE_WEB_RUNTIME or ~/.cache/medge/web-runtime
    ondevice.describe()        # GET /api/ondevice: the runtime's URLs, and per tab the model file and its metadata
    ondevice.model_bytes("cells")                      # GET /api/ondevice/cells/model.tflite
    ondevice.setup_note        # what an administrator could do (server log and start banner, never the page)

The page's Cells tab (static/ondevice.js) runs the cell model with LiteRT.js, which the
app serves at /web-runtime/ from the cache `python -m edge_runtime webruntime
fetch` fills (edge_runtime.webruntime); without it, or on a phone that cannot
(no WebAssembly, a load failure), the page sends the cells to this device
instead (POST /api/cells). Only a .tflite image model with float32 or uint8
input and output can go to the phone: LiteRT.js has no int8 tensors.

The file a phone gets is the served model's own bytes with one change:
every tensor's `shape_signature` has its dynamic batch (-1) set to the
tensor's static shape (1). LiteRT.js cannot resize inputs and refuses a
one-image tensor against a -1 signature; the operators, weights and
metadata are untouched (`static_batch`; a test checks only those int32s
differ and that the outputs are the same).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from typing import Any

from edge_runtime import content_hash, webruntime
from edge_runtime.tflite_file import check_tflite, tflite_model

RUNTIME_URL = "/web-runtime/"
# The tabs whose model a phone may run: the Cells tab's. Field photos need OpenCV (segmentation) and OCT needs
# Grad-CAM and a 299x299 InceptionV3: both stay on the device.
PHONE_KINDS = ("cells",)
# What the page and the unauthenticated /healthz say when a phone cannot run the model: no path, no command.
UNAVAILABLE = "on-phone analysis is not available on this device"
SWITCHED_OFF = "on-phone analysis is switched off on this device"
PHONE_DTYPES = ("float32", "uint8")
IMPORT_MAP_SLOT = "<!-- medge:importmap -->"


def static_batch(model: bytes) -> bytes:
    """The .tflite with every dynamic dimension (-1) of every `shape_signature` set to the tensor's static shape.

    Written in place with `tflite_file`'s flatbuffer reader (no schema package: the Pi's legacy tflite-runtime
    has none). A sealed file is checked first and resealed after (`content_hash.reseal`): the phone's copy
    carries a record that matches it.

    Raises:
        ContentHashError: a sealed `model` whose bytes no longer match its record.
    """
    check_tflite(bytes(model[:8]), "model")
    was_sealed = content_hash.check(model, "model") is not None
    buf = bytearray(model)
    view = bytes(buf)
    for graph in tflite_model(view).tables(2):  # Model.subgraphs
        for tensor in graph.tables(0):  # SubGraph.tensors
            sig_at, n_sig = tensor.vector(7)  # Tensor.shape_signature
            shape_at, n_shape = tensor.vector(0)  # Tensor.shape
            if n_sig != n_shape:
                continue
            for k in range(n_sig):
                if struct.unpack_from("<i", view, sig_at + 4 * k)[0] == -1:
                    struct.pack_into("<i", buf, sig_at + 4 * k, struct.unpack_from("<i", view, shape_at + 4 * k)[0])
    return content_hash.reseal(buf) if was_sealed else bytes(buf)


def phone_unfit(slot, tab: str | None = None) -> str | None:
    """Why this model cannot run in a phone's browser for `tab` (default: the slot's kind), or None when it can."""
    meta = slot.model.metadata
    tab = tab or slot.kind
    if tab not in PHONE_KINDS:
        return f"the {tab} tab's model runs on this device only"
    if slot.model.path.suffix != ".tflite":
        return f"{slot.model.path.name}: the phone runtime (LiteRT.js) runs .tflite files"
    if meta.part != "model":
        return f"{slot.model.path.name} takes features, not images"
    for t in (meta.input, meta.output):
        if t.dtype.name not in PHONE_DTYPES:
            return f"{slot.model.path.name}: tensor {t.name} is {t.dtype.name}; LiteRT.js takes float32 or uint8"
    return None


class OnDevice:
    """The runtime (or why there is none) and, per tab a phone can run, the model file it gets.

    `reason` and `unavailable` are what a phone user reads (no server path, no command); the administrator's
    version, with the fix, is `setup_note`, which `serve` prints in its start banner and logs.
    """

    def __init__(self, slots, web_runtime_dir: str | None = None):
        self.runtime, self.reason, self.admin_reason = None, None, None
        if web_runtime_dir == "off":
            self.reason = SWITCHED_OFF
            self.admin_reason = "switched off (--web-runtime off)"
        else:
            try:
                self.runtime = webruntime.find(web_runtime_dir)
            except webruntime.WebRuntimeError as e:
                self.reason = UNAVAILABLE
                self.admin_reason = f"the phone runtime is not installed: {e}"
        self.models: dict[str, dict[str, Any]] = {}
        self.unfit: dict[str, str] = {}
        for kind, slot in slots.items():
            if kind not in PHONE_KINDS:
                continue
            why = phone_unfit(slot, kind)
            if why:
                self.unfit[kind] = why
                continue
            data = static_batch(slot.model.path.read_bytes())
            self.models[kind] = {"bytes": data, "sha256": hashlib.sha256(data).hexdigest(), "slot": slot}

    @property
    def ready(self) -> bool:
        return self.runtime is not None and bool(self.models)

    @property
    def setup_note(self) -> str | None:
        """For the administrator (start banner, server log): why phones cannot run a model here and what to do;
        None when they can."""
        if self.ready:
            return None
        return "; ".join(filter(None, [self.admin_reason, *(f"{k} tab: {v}" for k, v in self.unfit.items())])) \
            or "no model a phone can run"

    def import_map(self) -> str:
        """The page's import map (LiteRT.js imports its helper package by bare name), or "" without a runtime."""
        if self.runtime is None:
            return ""
        imports = {k: RUNTIME_URL + v for k, v in self.runtime.lock.import_map.items()}
        return json.dumps({"imports": imports}, separators=(",", ":"))

    def page(self, html: str) -> tuple[str, str | None]:
        """index.html with the import map in its slot, and the CSP source that allows that inline script."""
        text = self.import_map()
        if not text:
            return html.replace(IMPORT_MAP_SLOT, ""), None
        digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
        return html.replace(IMPORT_MAP_SLOT, f'<script type="importmap">{text}</script>'), f"'sha256-{digest}'"

    def health(self) -> dict[str, Any]:
        rt = self.runtime
        return {"runtime": f"{rt.lock.name} {rt.lock.version}" if rt else None, "kinds": sorted(self.models),
                "reason": self.reason}

    def describe(self) -> dict[str, Any]:
        rt = self.runtime
        runtime = None if rt is None else {
            "name": rt.lock.name, "version": rt.lock.version, "bytes": rt.bytes,
            "module": RUNTIME_URL + rt.lock.entry, "wasm_dir": RUNTIME_URL + rt.lock.wasm_dir}
        models = {}
        for kind, m in self.models.items():
            slot = m["slot"]
            models[kind] = {"url": f"/api/ondevice/{kind}/model.tflite", "sha256": m["sha256"],
                            "bytes": len(m["bytes"]),
                            "source_sha256": slot.info["sha256"], "name": slot.info["name"],
                            "version": slot.info["version"], "threshold": slot.model.threshold,
                            "metadata": slot.model.metadata.to_dict()}
        # The page shows these to a phone user: plain words, never the administrator's detail (`setup_note`).
        return {"runtime": runtime, "reason": self.reason, "models": models,
                "unavailable": dict.fromkeys(self.unfit, UNAVAILABLE)}

    def model_bytes(self, kind: str) -> bytes | None:
        m = self.models.get(kind)
        return m["bytes"] if m else None

