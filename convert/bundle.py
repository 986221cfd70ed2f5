"""`--bundle`: one folder (and zip) per model with everything an app needs.

    python -m convert runs/malaria-edge --out export --bundle

writes `export/{model}_bundle/` and `export/{model}_bundle.zip`:

    {model}_{format}.{ext} + .json   every artifact that passed, with its sidecar
    labels.txt                       one class name a line, in output order
    manifest.json                    model, labels, preprocessing, and per file: format,
                                     runtime, precision, I/O tensors, size, sha256, proof
    INTEGRATION.md                   Android (LiteRT), iOS, ONNX Runtime Mobile notes with
                                     the input shape, dtype and normalisation spelled out
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from edge_runtime.fileio import sha256_file
from edge_runtime.metadata import ArtifactMetadata, read_sidecar, sidecar_path


def _input_text(meta: ArtifactMetadata) -> str:
    p = meta.preprocess
    if meta.part == "head" and not meta.feature_extractor.get("layer"):  # a bare features model
        return "\n".join([
            f"- Input: features, shape {[1, *meta.input.shape[1:]]}, dtype {meta.input.dtype}, from the feature "
            "extractor the model was trained on (the source file does not name it; no image preprocessing applies).",
            f"- Output: shape [1, {len(meta.labels)}], dtype {meta.output.dtype}, {meta.output_kind} "
            "in the order of labels.txt.",
        ])
    if meta.part == "head":
        fe = meta.feature_extractor
        return "\n".join([
            f"- Input: the feature map of the base's layer `{fe.get('layer')}`, shape {[1, *meta.input.shape[1:]]}, "
            f"dtype {meta.input.dtype}: run the base on the image first ({p.input_size[1]}x{p.input_size[0]} "
            f"{p.color_mode.upper()}, `pixel * {p.scale:.10g} + {p.offset:.10g}`). Base: {fe.get('base')}.",
            f"- Output: shape [1, {len(meta.labels)}], dtype {meta.output.dtype}, {meta.output_kind} "
            "in the order of labels.txt.",
        ])
    h, w = p.input_size
    shape = [1, h, w, p.channels]
    lines = [
        f"- Input: shape {shape} (NHWC: batch, height, width, channels), dtype {meta.input.dtype} "
        "(tensor names differ per file; each file has exactly one input and one output).",
        f"- Image: decode, convert to {p.color_mode.upper()}, resize to {w}x{h} (width x height) with "
        f"{p.resize_method} interpolation (antialiased when shrinking).",
        f"- Pixels: `value = pixel_0_255 * {p.scale:.10g} + {p.offset:.10g}` as float32, channels in "
        f"{'R, G, B' if p.channels == 3 else 'a single grey'} order.",
    ]
    if meta.input.quantized:
        lines.append(
            f"- Then quantize: `q = round(value / {meta.input.scale:.10g}) + {meta.input.zero_point}`, "
            f"clipped to the {meta.input.dtype} range."
        )
    lines.append(
        f"- Output: shape [1, {len(meta.labels)}], dtype {meta.output.dtype}, "
        f"{meta.output_kind} in the order of labels.txt"
        + (f" (dequantize: `(q - {meta.output.zero_point}) * {meta.output.scale:.10g}`)." if meta.output.quantized
           else ".")
    )
    return "\n".join(lines)


def integration_note(model: str, metas: list[tuple[str, ArtifactMetadata]]) -> str:
    """INTEGRATION.md for the bundle's artifacts."""
    first = metas[0][1]
    in_shape = [int(d) for d in first.input.shape[1:]]
    tfl = [(f, m) for f, m in metas if f.endswith(".tflite")]
    onx = [(f, m) for f, m in metas if f.endswith((".onnx", ".ort"))]
    labels = ", ".join(f"{i}: {l}" for i, l in enumerate(first.labels))
    out = [
        f"# {model}: integrating the exported models",
        "",
        f"Task: {first.task}. Classes (output index: label): {labels}."
        + (f" A screening flags `{first.positive_label}`." if first.positive_label else ""),
        "",
        "Every file carries its own metadata (LiteRT: the `medge` metadata entry; ONNX/ORT: "
        "`metadata_props['medge']`), also in the `.json` beside it. Pick one file per app; "
        "`manifest.json` lists size and agreement with the Keras original for each.",
        "",
        "## Input and output (all files)",
        "",
        _input_text(first),
        "",
    ]
    if tfl:
        out += ["## Android and iOS with LiteRT (.tflite)", ""]
        for f, m in tfl:
            out.append(f"- `{f}`: {m.precision}, input {m.input.dtype}, output {m.output.dtype}"
                       + (f" (input quantized: scale {m.input.scale:.6g}, zero point {m.input.zero_point})"
                          if m.input.quantized else ""))
        out += [
            "",
            "Android (Kotlin), dependency `com.google.ai.edge.litert:litert`:",
            "",
            "```kotlin",
            f'val model = FileUtil.loadMappedFile(context, "{tfl[0][0]}")',
            "val interpreter = Interpreter(model, Interpreter.Options().setNumThreads(2))",
            f"val input = ByteBuffer.allocateDirect(4 * {'*'.join(map(str, in_shape))})"
            ".order(ByteOrder.nativeOrder())",
            "// for each pixel row by row: putFloat(r * scale + offset), putFloat(g * ...), putFloat(b * ...)",
            f"val output = Array(1) {{ FloatArray({len(first.labels)}) }}",
            "interpreter.run(input, output)",
            "```",
            "",
            "iOS (Swift), pod `TensorFlowLiteSwift` (LiteRT's iOS package): create "
            "`Interpreter(modelPath:)`, `allocateTensors()`, `copy(Data, toInputAt: 0)` with the float32 "
            "(or quantized) NHWC bytes above, `invoke()`, read `output(at: 0)`.",
            "",
        ]
    if onx:
        out += ["## ONNX Runtime / ONNX Runtime Mobile (.onnx, .ort)", ""]
        for f, m in onx:
            q = m.quantization
            out.append(f"- `{f}`: {m.precision}" + (f", {q.get('format', '')} int8 weights, {q.get('activations')} "
                                                     "activations" if q else "")
                       + (" (ORT format for the minimal mobile runtime)" if f.endswith(".ort") else ""))
        out += [
            "",
            "Android: `com.microsoft.onnxruntime:onnxruntime-android`; iOS: pod `onnxruntime-objc` "
            "(or `onnxruntime-c`). Both open `.onnx` and `.ort` files:",
            "",
            "```kotlin",
            "val env = OrtEnvironment.getEnvironment()",
            f'val session = env.createSession(modelBytes)  // "{onx[-1][0]}"',
            f"val tensor = OnnxTensor.createTensor(env, floatBuffer, longArrayOf({', '.join(map(str, [1, *in_shape]))}))",
            f'val probs = (session.run(mapOf("{onx[-1][1].input.name}" to tensor))[0].value as Array<FloatArray>)[0]',
            "```",
            "",
            "The input layout is NHWC (channels last), not the NCHW many ONNX examples assume.",
            "",
        ]
    return "\n".join(out)


def write_bundle(out: Path, model: str, report: dict[str, Any]) -> tuple[Path, Path]:
    """Build `{model}_bundle/` and `{model}_bundle.zip` in `out` from the passed rows of `report`.

    Both are built under temporary names and renamed into place.
    """
    from edge_runtime.fileio import _umask, publish

    rows = [r for r in report["rows"] if r.get("file") and r["status"] != "failed"]
    if not rows:
        raise ValueError("no artifact passed; nothing to bundle")
    folder, zpath = out / f"{model}_bundle", out / f"{model}_bundle.zip"
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{model}_bundle.tmp-", dir=out))
    try:
        metas, files = [], []
        for r in rows:
            src = out / r["file"]
            shutil.copy2(src, tmp_dir / src.name)
            shutil.copy2(sidecar_path(src), tmp_dir / sidecar_path(src).name)
            meta = read_sidecar(src)
            metas.append((src.name, meta))
            files.append({
                "file": src.name, "format": r["format"], "runtime": r["runtime"], "precision": r["precision"],
                "status": r["status"], "size_bytes": src.stat().st_size, "sha256": sha256_file(src),
                "input": meta.input.to_dict(), "output": meta.output.to_dict(),
                "proof": {k: r.get(k) for k in ("images", "top1_agreement", "max_abs_diff", "keras_accuracy",
                                               "accuracy", "criterion")},
            })
        if report.get("gradcam_weights"):  # OCT head weights for Grad-CAM on the device
            shutil.copy2(out / report["gradcam_weights"], tmp_dir / report["gradcam_weights"])
        first = metas[0][1]
        (tmp_dir / "labels.txt").write_text("".join(f"{l}\n" for l in first.labels))
        manifest = {
            "model": model, "task": first.task, "labels": list(first.labels),
            "positive_label": first.positive_label, "preprocess": first.preprocess.to_dict(),
            "output_kind": first.output_kind, "source_sha256": first.source_sha256,
            "medge_version": first.medge_version, "created": report["created"],
            "proof_images": report["proof"], "files": files,
        }
        (tmp_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp_dir / "INTEGRATION.md").write_text(integration_note(model, metas))
        os.chmod(tmp_dir, 0o777 & ~_umask())

        fd, tmp_zip = tempfile.mkstemp(prefix=f".{model}_bundle.zip.tmp-", dir=out)
        os.close(fd)
        try:
            with zipfile.ZipFile(tmp_zip, "w", zipfile.ZIP_DEFLATED) as zf:
                for p in sorted(tmp_dir.iterdir()):
                    zf.write(p, f"{model}_bundle/{p.name}")
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp_dir, folder)
            publish(Path(tmp_zip), zpath)
        finally:
            Path(tmp_zip).unlink(missing_ok=True)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)
    return folder, zpath
