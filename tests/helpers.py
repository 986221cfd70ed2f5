"""What several test files share: the bundled sample, the one tiny trained run, the artifacts
edge_runtime is tested on, and the "same class unless it was a near-tie" check.

Make the artifacts for an edge-only environment (needs TensorFlow, ~40 s on 2 cores):

    python -m tests.helpers --make-artifacts DIR

Nothing here imports TensorFlow at module level: the edge-only environment imports
this module for the file names.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

import edge_runtime
from edge_runtime import tflite_file
from edge_runtime.backends import open_session
from edge_runtime.clinical import OCT_LABELS
from edge_runtime.spec import CONTENT_HASH_KEY, GOLDEN_KEY, METADATA_KEY, STANDARD_KEY, PreprocessSpec

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "data" / "malaria_sample"
# The one tiny run every test file uses: `tiny` for 3 epochs on the bundled sample (~15 s on 2 cores),
# graded (lr 0.01) and trained with deterministic TF ops (conftest), so it is the same model every session.
TINY_EPOCHS = 3
MALARIA_FORMATS = ("tflite-float32", "tflite-int8", "onnx-float32", "onnx-int8", "ort-int8")
MALARIA_FILES = {f: f"malaria_{f}.{f.split('-')[0]}" for f in MALARIA_FORMATS}
INT8_IO_FILE = "malaria-io8_tflite-int8.tflite"  # int8 input and output tensors
# A small OCT stand-in: same head as the paper's approach B, a 3-conv "base" giving 8x8x2048 features.
OCT_SPEC = PreprocessSpec(input_size=(64, 64), color_mode="rgb", scale=1.0 / 127.5, offset=-1.0)
OCT_FILES = {"float32": "oct_tflite-float32.tflite", "int8": "oct_tflite-int8.tflite"}
GRADCAM_FILE = "oct_gradcam.npz"
ARTIFACT_FILES = (*MALARIA_FILES.values(), INT8_IO_FILE, *OCT_FILES.values(), GRADCAM_FILE)


def assert_same_class_off_ties(reference: np.ndarray, candidate: np.ndarray, margin: float) -> None:
    """Top-1 of `candidate` equals `reference`'s wherever reference's top two are more than `margin` apart.

    A tiny test model sits near its decision fence, where rounding (float16, int8,
    another resize) may legitimately flip a class; a flip anywhere else is a bug.
    """
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    top2 = np.sort(reference, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > margin
    flipped = np.flatnonzero(clear & (reference.argmax(1) != candidate.argmax(1)))
    assert flipped.size == 0, (
        f"{flipped.size} of {clear.sum()} inputs off the fence (margin > {margin}) changed class: "
        f"rows {flipped[:10].tolist()}"
    )


def write_sample_manifest(out: Path) -> Path:
    """The bundled sample split by patient, as `python -m train split` writes it."""
    from train.split import build_split, write_manifest

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(build_split(SAMPLE, progress=False).records, out)
    return out


def train_tiny(manifest: Path, out: Path) -> Path:
    """The tiny malaria run (needs TensorFlow)."""
    from train.malaria.fit import train_malaria

    return train_malaria(manifest, "tiny", out, epochs=TINY_EPOCHS, verbose=0)


def cells(n: int, step: int = 1) -> list[Path]:
    """n real cells spread over both classes and all 20 patients."""
    files = sorted(SAMPLE.glob("*/*.png"))
    return files[::step][:n]


def run_python(argv, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python ARGV` in a subprocess from the repository root, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_cli(*argv) -> tuple[int, str, str]:
    """The edge_runtime CLI in a subprocess (as a user runs it): (exit code, stdout, stderr)."""
    res = run_python(["-m", "edge_runtime", *argv])
    return res.returncode, res.stdout, res.stderr


def first_conv_weights(buf: bytes) -> tuple[int, int, np.dtype]:
    """(file offset, byte length, dtype) of the first CONV_2D's weight buffer, found through the flatbuffer schema."""
    from ai_edge_litert import schema_py_generated as schema

    m = schema.Model.GetRootAs(buf, 0)
    sg = m.Subgraphs(0)
    builtin = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    for i in range(sg.OperatorsLength()):
        op = sg.Operators(i)
        code = m.OperatorCodes(op.OpcodeIndex())
        kind = builtin[max(code.BuiltinCode(), code.DeprecatedBuiltinCode())]
        if kind != "CONV_2D":
            continue
        t = sg.Tensors(op.Inputs(1))
        b = m.Buffers(t.Buffer())
        assert not b.DataIsNone(), "the conv's weights are not a constant buffer"
        start = b._tab.Vector(b._tab.Offset(4))  # where the buffer's bytes sit in the file
        dtype = {schema.TensorType.INT8: np.int8, schema.TensorType.FLOAT32: np.float32,
                 schema.TensorType.FLOAT16: np.float16}[t.Type()]
        return start, b.DataLength(), np.dtype(dtype)
    raise AssertionError("no CONV_2D with constant weights")


def flip_strongest_first_conv_weights(data: bytes, n: int = 1) -> bytes:
    """`data` (a .tflite) with its first conv's `n` strongest weights changed: int8 sign bit flipped
    (127 -> -1), float32 a high exponent bit; everything else byte for byte the same."""
    buf = bytearray(data)
    start, length, dtype = first_conv_weights(data)
    w = np.frombuffer(data[start: start + length], dtype)
    ks = np.argsort(-np.abs(w.astype(np.float32)), kind="stable")[:n]
    for k in ks:
        buf[start + int(k) * dtype.itemsize + (dtype.itemsize - 1)] ^= 0x80 if dtype == np.int8 else 0x40
    assert np.all(np.frombuffer(bytes(buf[start: start + length]), dtype)[ks] != w[ks])
    return bytes(buf)


# ---------------------------------------------------------------- making the artifacts (needs TensorFlow)


def build_oct_model(seed: int = 0):
    """Fused tiny base + the paper's head (1x1 conv 64 no bias, BN, ReLU, dropout, flatten, dense 4 softmax).

    Every weight is drawn from a numpy generator (no global Keras seed is
    touched, so other tests' training is unaffected). The BN gets non-trivial
    moving statistics and the dense layer random weights, so the Grad-CAM
    closed form is exercised on every term.
    """
    import keras

    L = keras.layers
    img = keras.Input((*OCT_SPEC.input_size, 3), name="image")
    x = L.Conv2D(16, 3, strides=2, padding="same", activation="relu")(img)
    x = L.Conv2D(32, 3, strides=2, padding="same", activation="relu")(x)
    feats = L.Conv2D(2048, 3, strides=2, padding="same", activation="relu", name="mixed10")(x)
    base = keras.Model(img, feats, name="inception_v3")
    f_in = keras.Input((8, 8, 2048), name="features")
    h = L.Conv2D(64, 1, use_bias=False, name="head_conv")(f_in)
    h = L.BatchNormalization(name="head_bn")(h)
    h = L.Activation("relu", name="head_relu")(h)
    h = L.Dropout(0.5, name="head_dropout")(h)
    h = L.Flatten(name="head_flatten")(h)
    out = L.Dense(len(OCT_LABELS), activation="softmax", name="head_probs")(h)
    head = keras.Model(f_in, out, name="head")
    rng = np.random.default_rng(seed)
    for layer in [*base.layers, head.get_layer("head_conv")]:
        if isinstance(layer, L.Conv2D):  # He-normal, so the features stay O(1) through the ReLUs
            k = layer.kernel.shape
            std = np.sqrt(2.0 / (k[0] * k[1] * k[2]))
            layer.set_weights([(rng.standard_normal(k) * std).astype("float32")]
                              + ([np.zeros(k[-1], "float32")] if layer.use_bias else []))
    bn = head.get_layer("head_bn")
    bn.set_weights([rng.uniform(0.5, 1.5, 64).astype("float32"), rng.normal(0, 0.3, 64).astype("float32"),
                    rng.normal(0, 0.2, 64).astype("float32"), rng.uniform(0.05, 0.3, 64).astype("float32")])
    dense = head.get_layer("head_probs")
    dense.set_weights([rng.normal(0, 0.05, dense.kernel.shape).astype("float32"),
                       rng.normal(0, 0.1, len(OCT_LABELS)).astype("float32")])
    inp = keras.Input((*OCT_SPEC.input_size, 3), name="image")
    return keras.Model(inp, head(base(inp)), name="oct_fused")


def oct_scans(out: Path, n: int = 6) -> list[Path]:
    """Synthetic grayscale B-scan-like JPEGs (layered bands with a bump), various sizes."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for i in range(n):
        h, w = 180 + 20 * i, 240 + 30 * i
        yy, xx = np.mgrid[0:h, 0:w]
        band = np.sin(yy / (6 + i)) * 60 + 90
        bump = 120 * np.exp(-(((xx - w * (0.3 + 0.1 * i)) / 25) ** 2 + ((yy - h / 2) / 15) ** 2))
        img = np.clip(band + bump + rng.normal(0, 12, (h, w)), 0, 255).astype(np.uint8)
        p = out / f"{OCT_LABELS[i % 4]}-{1000 + i}-1.jpeg"
        Image.fromarray(img, "L").save(p, quality=92)
        paths.append(p)
    return paths


def _oct_artifact(model, fmt: str, dest: Path, calib: np.ndarray, sha: str) -> None:
    from convert.tflite import convert_keras, int8_config
    from edge_runtime.metadata import ArtifactMetadata, embed_tflite

    raw = convert_keras(model, int8_config(calib, False) if fmt == "int8" else None)
    dest.write_bytes(raw)
    session = open_session(dest, "litert")
    inp, out = session.input, session.output
    meta = ArtifactMetadata(
        model="oct", task="oct", labels=OCT_LABELS, preprocess=OCT_SPEC, format=f"tflite-{fmt}", precision=fmt,
        input=inp, output=out, quantization={"weights": "int8 per-channel"} if fmt == "int8" else {},
        source_sha256=sha, source_name="oct_fused.keras", medge_version=edge_runtime.__version__,
    )
    dest.write_bytes(embed_tflite(raw, meta))
    dest.with_suffix(".json").write_text(meta.to_json())


def make_artifacts(out: Path, run: Path | None = None) -> Path:
    """Every artifact these tests read, into `out` (needs TensorFlow; ~40 s on 2 cores)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from convert.export import Options, run_export
    from convert.formats import parse_formats
    from convert.gradcam_export import write_for_export
    from convert.sources import Source
    from edge_runtime.fileio import sha256_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if run is None:
        run = train_tiny(write_sample_manifest(out / "work" / "sample.csv"), out / "work" / "run")
    quiet = dict(log=lambda *a: None)
    opts = dict(calib_n=48, eval_n=20, min_agreement=0.0, allow_drop=True, force=True)
    run_export(run, out, parse_formats(",".join(MALARIA_FORMATS)), Options(**opts), name="malaria", **quiet)
    run_export(run, out, parse_formats("tflite-int8"), Options(int8_io=True, **opts), name="malaria-io8", **quiet)
    shutil.copy(Path(run) / "best.keras", out / "malaria.keras")

    model = build_oct_model()
    keras_path = out / "oct_fused.keras"
    model.save(keras_path)
    sha = sha256_file(keras_path)
    scans = oct_scans(out / "oct_scans")
    from edge_runtime.images import load_and_preprocess

    calib = np.stack([load_and_preprocess(p, OCT_SPEC) for p in scans] * 4)
    for fmt, name in OCT_FILES.items():
        _oct_artifact(model, fmt, out / name, calib, sha)
    src = Source(path=keras_path, name="oct", labels=OCT_LABELS, spec=OCT_SPEC, task="oct", positive_label=None,
                 sha256=sha)
    assert write_for_export(model, src, out, log=lambda *a: None) == out / GRADCAM_FILE
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="make the artifacts an edge-only environment tests against")
    ap.add_argument("--make-artifacts", type=Path, required=True, metavar="DIR")
    print(make_artifacts(ap.parse_args().make_artifacts))


# ---------------------------------------------------------------- comparing two .tflite files

# The entries `python -m convert` writes: medge's contract, the golden set, the standard metadata made from them,
# the content hash sealing them.
CONVERT_KEYS = (METADATA_KEY, GOLDEN_KEY, STANDARD_KEY, CONTENT_HASH_KEY)


def tflite_without_metadata(model: bytes | bytearray, keys: Sequence[str] = CONVERT_KEYS) -> bytes:
    """The .tflite bytes with the metadata entries convert writes (`keys`) and their buffers' data removed, repacked.

    Two conversions of one model differ in medge's entry (its `created` time)
    and its content hash (which covers that time), and nowhere else (the golden
    set, when both have one, is the same; the standard entry holds no time);
    comparing what this returns tells whether
    they are the same network, weights and quantization. The files packed
    after the flatbuffer (the standard metadata's `labels.txt`) go with the
    standard entry, and stay when it does. Only tests compare files this way,
    so it lives here, not in what a device installs.
    """
    if isinstance(keys, str):
        keys = (keys,)
    fb_schema = tflite_file.schema()
    buf = bytes(model)
    tflite_file.check_tflite(buf, "model")
    entries = tflite_file.tflite_metadata_entries(buf)
    files = tflite_file.packed_files(buf) if STANDARD_KEY in entries and STANDARD_KEY not in keys else {}
    m = fb_schema.ModelT.InitFromPackedBuf(bytearray(buf), 0)
    for e in [e for e in (m.metadata or []) if tflite_file.entry_name(e.name) in keys]:
        m.buffers[e.buffer] = fb_schema.BufferT()
    m.metadata = [e for e in (m.metadata or []) if tflite_file.entry_name(e.name) not in keys]
    # medge's entries are appended after the converter's buffers: drop the emptied tail, so a file with a
    # golden set and one without compare equal when their networks are.
    used = {t.buffer for g in (m.subgraphs or []) for t in (g.tensors or [])} | {e.buffer for e in m.metadata}
    while m.buffers and len(m.buffers) - 1 not in used and m.buffers[-1].data is None:
        m.buffers.pop()
    return tflite_file.pack_files(tflite_file.pack_model(m, len(buf)), files)


def onnx_without_metadata(model: bytes | bytearray) -> bytes:
    """A .onnx's bytes with every `metadata_props` entry removed (medge's, the golden set, the content hash):
    two conversions of one model compare equal this way when their graphs and weights are the same."""
    import onnx  # the toolchain's package: only the comparison needs it

    proto = onnx.load_from_string(bytes(model))
    del proto.metadata_props[:]
    return proto.SerializeToString()


def ort_content(data: bytes | bytearray, drop_props: Sequence[str] = (), floats: bool = False) -> object:
    """What an .ort file holds, read with ONNX Runtime's own schema of the format, as plain data in a canonical
    order: every table's fields, vectors of tables sorted, numeric vectors and tensor bytes by sha256 (with
    `floats`, a float32 tensor's values as a list instead, for `same_network`).

    ONNX Runtime writes an .ort's tables in the order of its internal hash maps, which changes from one
    conversion to the next (three conversions of one .onnx in one process gave three byte strings of one length):
    two .ort files are compared by this, not by their bytes. `drop_props`: `metadata_props` keys left out.
    Union-typed fields (a value's type record) are not followed.
    """
    import hashlib
    import json

    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import InferenceSession

    def walk(obj):
        out = {}
        names = {n for n in dir(obj) if n[:1].isupper() and n != "Init" and not n.startswith("GetRootAs")}
        for n in sorted(names):
            if n.endswith(("Length", "IsNone", "AsNumpy", "BufferHasIdentifier")):
                continue
            if n + "Length" in names:
                if n + "AsNumpy" in names:
                    arr = getattr(obj, n + "AsNumpy")()
                    if floats and n == "RawData" and "DataType" in names and obj.DataType() in (1, 6) and hasattr(
                            arr, "view"):  # TensorDataType FLOAT, INT32 (a bias, quantized by the scales)
                        out[n] = (arr.view(np.float32).tolist() if obj.DataType() == 1
                                  else _Bias(arr.view(np.int32).tolist()))
                        continue
                    out[n] = hashlib.sha256(arr.tobytes()).hexdigest() if hasattr(arr, "tobytes") else None
                    continue
                items = [getattr(obj, n)(j) for j in range(getattr(obj, n + "Length")())]
                items = [walk(x) if hasattr(x, "_tab") else (x.decode() if isinstance(x, bytes) else x) for x in items]
                out[n] = sorted(items, key=lambda x: json.dumps(x, sort_keys=True)) if items and isinstance(
                    items[0], dict) else items
                continue
            try:
                v = getattr(obj, n)()
            except TypeError:  # needs arguments: not a field accessor
                continue
            if hasattr(v, "_tab"):
                out[n] = walk(v)
            elif isinstance(v, bytes):
                out[n] = v.decode("utf-8", "replace")
            elif isinstance(v, (int, float, str)) or v is None:
                out[n] = v
        return out

    doc = walk(InferenceSession.InferenceSession.GetRootAs(bytes(data), 0))
    props = doc.get("Model", {}).get("MetadataProps", [])
    doc["Model"]["MetadataProps"] = [p for p in props if p.get("Key") not in drop_props]
    return doc


# Relative tolerance of `same_network` on quantization scales: float32 keeps ~7 digits; calibration on another CPU
# moved the released files' scales by under 1e-6 (a Xeon with AVX-512 against the AMD EPYC they were made on).
SCALE_RTOL = 1e-5


class _Bias(list):
    """int32 bias values: quantized by input scale x weight scale, so a scale one float32 step apart can round
    one of them the other way (seen: 1 of the malaria-field file's 256 values of one layer)."""


def nearly_equal(a, b, rtol: float) -> bool:
    """Equal, plain data for plain data (dicts, lists), except floats within `rtol` of each other and `_Bias`
    int32 values within 1."""
    if isinstance(a, _Bias) and isinstance(b, _Bias):
        return len(a) == len(b) and all(abs(x - y) <= 1 for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= rtol * max(abs(a), abs(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(nearly_equal(a[k], b[k], rtol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(nearly_equal(x, y, rtol) for x, y in zip(a, b))
    return a == b


def same_network(fmt: str, new: bytes, old: bytes, rtol: float = SCALE_RTOL) -> bool:
    """Whether two conversions of one model are the same network: graph, int8 weights, zero points and every
    other byte equal (metadata aside, as `tflite_without_metadata` / `onnx_without_metadata` / `ort_content`
    drop it), the float quantization scales equal within `rtol` and the int32 biases within 1.

    Calibration runs the float model on the runtime's CPU kernels, whose rounding differs in the last bits from
    one CPU to another (AVX2 or AVX-512 sum in another order): a release remade on another machine has scales
    one float32 step apart and is otherwise byte for byte the file. A real change (other calibration cells, another
    method, other weights) moves scales by far more than `rtol`, or changes bytes.
    """
    if fmt.startswith("tflite"):
        fb = tflite_file.schema()
        models, scales = [], []
        for data in (new, old):
            m = fb.ModelT.InitFromPackedBuf(bytearray(tflite_without_metadata(data)), 0)
            found = []
            for g in m.subgraphs or []:
                for t in g.tensors or []:
                    if t.quantization is not None and t.quantization.scale is not None:
                        found.append([float(v) for v in np.asarray(t.quantization.scale, np.float32)])
                        t.quantization.scale = None
                        buf = m.buffers[t.buffer]
                        if t.type == fb.TensorType.INT32 and buf.data is not None:
                            found.append(_Bias(np.asarray(buf.data, np.uint8).view(np.int32).tolist()))
                            buf.data = None
            models.append(tflite_file.pack_model(m, len(data)))
            scales.append(found)
        return models[0] == models[1] and nearly_equal(scales[0], scales[1], rtol)
    if fmt.startswith("onnx"):
        import onnx
        from onnx import numpy_helper

        protos, floats = [], []
        for data in (new, old):
            proto = onnx.load_from_string(bytes(data))
            del proto.metadata_props[:]
            found = {}
            for init in proto.graph.initializer:
                if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT32):
                    values = numpy_helper.to_array(init).ravel().tolist()
                    found[init.name] = values if init.data_type == onnx.TensorProto.FLOAT else _Bias(values)
                    for field in ("raw_data", "float_data", "int32_data"):
                        init.ClearField(field)
            protos.append(proto.SerializeToString())
            floats.append(found)
        return protos[0] == protos[1] and nearly_equal(floats[0], floats[1], rtol)
    keys = (METADATA_KEY, CONTENT_HASH_KEY, GOLDEN_KEY)  # the golden answers are this CPU's floats too
    return nearly_equal(ort_content(new, keys, floats=True), ort_content(old, keys, floats=True), rtol)
