"""Which runtime an artifact needs, and what to say when the installed one cannot run it (numpy-free, no schema).

`python -m convert` records in every artifact's metadata (`runtimes`) what
the file requires and where it was proven:

    {"requires": {"min_runtime_version": "2.4.0",          # .tflite: the converter's own statement
                  "op_versions": {"CONV_2D": 5, ...}},      # .tflite: highest version of each op
     "proven_on": [{"runtime": "litert", "version": "2.3.0", "machine": "x86_64"}]}

The converter's `min_runtime_version` metadata entry comes from a table in
TensorFlow (`tflite/tools/versioning/runtime_version.cc`) that does not list
every op version, so it can understate what a file needs: the op versions are
the facts an old runtime checks ("Didn't find op for builtin opcode
'FULLY_CONNECTED' version '12'"). It uses TensorFlow's version numbers, which
tflite-runtime shares and ai-edge-litert does not.

When a runtime refuses a file (`edge_runtime.load`) or fails running it,
`explain` turns the runtime's message into what the file needs, read here from
the .tflite flatbuffer with `tflite_file`'s small reader (the legacy
tflite-runtime ships no flatbuffer schema) or from the sidecar .json.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edge_runtime.tflite_file import tflite_entries

# What runtimes say when a file is newer than they are.
_TOO_NEW = (
    re.compile(r"Didn't find op for builtin opcode '(?P<op>\w+)' version '(?P<version>\d+)'"),
    re.compile(r"Op builtin_code out of range: (?P<code>\d+)"),
    re.compile(r"Unsupported model IR version: (?P<ir>\d+)"),
    re.compile(r"(?i)opset (?P<opset>\d+) is under development"),
    re.compile(r"Could not find an implementation for (?P<onnx_op>\w+)\((?P<onnx_version>\d+)\)"),
    re.compile(r"(?i)older (?:version of this builtin|TFLite binary)|Registration failed"),
)


def tflite_op_versions(buf: bytes) -> dict[str, int]:
    """Highest version of each builtin op in a .tflite file, by name (needs the schema from ai-edge-litert)."""
    from ai_edge_litert import schema_py_generated as schema  # inside: optional (the legacy tflite-runtime has none)

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    m = schema.Model.GetRootAs(buf, 0)
    out: dict[str, int] = {}
    for i in range(m.OperatorCodesLength()):
        c = m.OperatorCodes(i)
        code = max(c.BuiltinCode(), c.DeprecatedBuiltinCode())
        name = (c.CustomCode() or b"").decode() if code == schema.BuiltinOperator.CUSTOM else names.get(code, str(code))
        out[name] = max(out.get(name, 0), int(c.Version()))
    return dict(sorted(out.items()))


def tflite_requirements(buf: bytes) -> dict[str, Any]:
    """{"min_runtime_version": the converter's statement or None, "op_versions": {op: version}}."""
    stated = tflite_entries(buf).get("min_runtime_version", b"").rstrip(b"\0").decode("ascii", "replace") or None
    return {"min_runtime_version": stated, "op_versions": tflite_op_versions(buf)}


def onnx_requirements(proto) -> dict[str, Any]:
    """{"ir_version", "opsets": {domain: version}} of an ONNX ModelProto (what an old onnxruntime checks)."""
    return {"ir_version": int(proto.ir_version),
            "opsets": {(o.domain or "ai.onnx"): int(o.version) for o in proto.opset_import}}


# ---------------------------------------------------------------- the device side


def version_tuple(v: str) -> tuple[int, ...]:
    """"2.14.0" -> (2, 14, 0); a part's non-numeric tail ends the tuple ("2.14.0rc1" -> (2, 14, 0))."""
    out = []
    for part in str(v).split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group()))
        if m.group() != part:
            break
    return tuple(out)


def recorded_runtimes(path: Path) -> tuple[dict[str, Any], str]:
    """(the `runtimes` record of the artifact's medge metadata, where it came from), read without a runtime.

    Embedded (.tflite, by this module's own reader) first, then the sidecar
    .json; a .tflite without the record (made before medge wrote one) still
    gives the converter's `min_runtime_version` entry. ({}, "") when nothing does.
    """
    path = Path(path)
    sources, stated = [], None
    if path.suffix.lower() == ".tflite":
        try:
            entries = tflite_entries(path.read_bytes())
        except (OSError, ValueError):
            entries = {}
        if "medge" in entries:
            sources.append((entries["medge"], "embedded"))
        stated = entries.get("min_runtime_version", b"").rstrip(b"\0").decode("ascii", "replace") or None
    side = path.with_suffix(".json")
    if side.is_file():
        sources.append((side.read_bytes(), "sidecar"))
    for raw, where in sources:
        try:
            d = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(d, dict) and isinstance(d.get("runtimes"), dict) and d["runtimes"]:
            return dict(d["runtimes"]), where
    if stated:
        return {"requires": {"min_runtime_version": stated}}, "converter"
    return {}, ""


def too_new(message: str) -> dict[str, str] | None:
    """What a runtime's error says the file needs (e.g. {"op": "FULLY_CONNECTED", "version": "12"}), else None."""
    for pattern in _TOO_NEW:
        m = pattern.search(message)
        if m:
            return {k: v for k, v in m.groupdict().items() if v is not None}
    return None


def _proven(record: Mapping[str, Any]) -> str:
    runs = [f"{p.get('runtime')} {p.get('version')}" for p in record.get("proven_on", []) if p.get("ok", True)]
    return ", ".join(runs)


def explain(path: Path, backend: str, version: str, error: str, install_hint: str) -> str | None:
    """A message naming what `path` needs when `backend` `version` cannot open or run it, else None.

    None when nothing says the runtime is too old (the error is then about a
    broken file, and the caller says so).
    """
    need = too_new(error)
    record, where = recorded_runtimes(path)
    requires = dict(record.get("requires", {}))
    stated = requires.get("min_runtime_version")
    below = (backend == "tflite-runtime" and stated and version_tuple(version) < version_tuple(stated))
    if need is None and not below:
        return None
    parts = [f"{path.name} needs a newer runtime than the installed {backend} {version}"]
    if need and "op" in need:
        parts.append(f"it uses {need['op']} version {need['version']}, which {backend} {version} does not have")
    elif need and "code" in need:
        parts.append(f"it uses builtin op code {need['code']}, newer than {backend} {version} knows")
    elif need and "ir" in need:
        parts.append(f"its ONNX IR version is {need['ir']}")
    elif need and "opset" in need:
        parts.append(f"it uses ONNX opset {need['opset']}")
    elif need and "onnx_op" in need:
        parts.append(f"it uses ONNX {need['onnx_op']} from opset {need['onnx_version']}")
    if requires.get("opsets"):
        parts.append("it needs " + ", ".join(f"{d} opset {v}" for d, v in requires["opsets"].items())
                     + (f" and IR version {requires['ir_version']}" if requires.get("ir_version") else ""))
    if stated:
        if below:
            parts.append(f"the converter states a minimum TFLite runtime version of {stated}")
        else:
            parts.append(f"the converter states min_runtime_version {stated}, but its table does not know every "
                         "op version, so the file needs more than that")
    proven = _proven(record)
    if proven:
        parts.append(f"it was proven on {proven} when converted")
    if where in ("embedded", "sidecar"):
        parts[-1] += f" (read from its {'embedded' if where == 'embedded' else 'sidecar .json'} metadata)"
    return "; ".join(parts) + f". Install a runtime at least that new: {install_hint}. (runtime said: {error})"
