"""`--bundle`: one folder (and zip) per model with everything an app needs.

    python -m convert runs/malaria-edge --out export --bundle

writes `export/{model}_bundle/` and `export/{model}_bundle.zip`:

    {model}_{format}.{ext} + .json   every artifact that passed, with its sidecar
    labels.txt                       one class name a line, in output order
    manifest.json                    model, labels, preprocessing, and per file: format,
                                     runtime, precision, I/O tensors, size, sha256, proof
    INTEGRATION.md                   Android (Kotlin) and iOS (Swift) notes: MediaPipe Tasks'
                                     ImageClassifier on the .tflite files (their standard
                                     metadata), LiteRT directly, ONNX Runtime Mobile; the input
                                     size, normalisation, labels, threshold and referral logic
                                     all read from the artifacts' metadata
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from convert.report import ConversionReport
from edge_runtime.clinical import UNCERTAIN_REFERRAL, is_oct, referral_map
from edge_runtime.fileio import _umask, publish, sha256_file
from edge_runtime.metadata import ArtifactMetadata, read_sidecar, sidecar_path
from edge_runtime.model import UNCERTAIN, EdgeModel
from edge_runtime.standard_metadata import read as read_standard


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


def _decision_text(meta: ArtifactMetadata) -> list[str]:
    """How edge_runtime turns the outputs into an answer, with the file's threshold and referral map."""
    threshold = EdgeModel.default_threshold(meta)
    lines = [
        "## The answer, as edge_runtime gives it",
        "",
        f"- Top class: the label with the highest {'probability' if meta.output_kind == 'probabilities' else 'score'}"
        "; its value is the confidence.",
        f"- Confidence below **{threshold:g}** (the file's `confidence_threshold`): answer \"{UNCERTAIN}\", "
        "never a class.",
    ]
    referral = referral_map(meta.labels) if is_oct(meta) else None
    if referral:
        lines.append("- Referral level: " + ", ".join(f"{l} -> {r}" for l, r in referral.items())
                     + f"; an uncertain answer -> {UNCERTAIN_REFERRAL}.")
    if meta.positive_label:
        lines.append(f"- A screening flags `{meta.positive_label}`; "
                     "the model card says how to treat uncertain answers.")
    return lines + [""]


def _kotlin_decision(meta: ArtifactMetadata, score: str, label: str, indent: str = "") -> list[str]:
    lines = [f"{indent}val threshold = {EdgeModel.default_threshold(meta):g}f  // the file's confidence_threshold",
             f'{indent}val decision = if ({score} < threshold) "{UNCERTAIN}" else {label}']
    referral = referral_map(meta.labels) if is_oct(meta) else None
    if referral:
        pairs = ", ".join(f'"{l}" to "{r}"' for l, r in referral.items())
        lines += [f"{indent}val referral = if ({score} < threshold) \"{UNCERTAIN_REFERRAL}\" "
                  f"else mapOf({pairs}).getValue({label})"]
    return lines


def _swift_decision(meta: ArtifactMetadata, score: str, label: str) -> list[str]:
    lines = [f"let threshold: Float = {EdgeModel.default_threshold(meta):g}  // the file's confidence_threshold",
             f'let decision = {score} < threshold ? "{UNCERTAIN}" : {label}']
    referral = referral_map(meta.labels) if is_oct(meta) else None
    if referral:
        pairs = ", ".join(f'"{l}": "{r}"' for l, r in referral.items())
        lines += [f'let referral = {score} < threshold ? "{UNCERTAIN_REFERRAL}" : [{pairs}][{label}]!']
    return lines


def mediapipe_files(metas: list[tuple[str, ArtifactMetadata]],
                    standard: dict[str, dict[str, Any]]) -> list[tuple[str, ArtifactMetadata, dict[str, Any]]]:
    """The .tflite files MediaPipe Tasks' ImageClassifier takes: standard metadata, float32 or uint8 input."""
    return [(f, m, standard[f]) for f, m in metas
            if f.endswith(".tflite") and standard.get(f) and m.input.dtype.name in ("float32", "uint8")]


def _mediapipe_text(model: str, metas, standard) -> list[str]:
    files = mediapipe_files(metas, standard)
    others = [f for f, m in metas if f.endswith(".tflite") and f not in {x[0] for x in files}]
    if not files:
        return ["## MediaPipe Tasks", "", "- not for MediaPipe (its ImageClassifier takes float32 or uint8 input): "
                + ", ".join(f"`{f}`" for f in others) + "; use LiteRT below.", ""] if others else []
    f0, m0, s0 = files[0]
    norm = s0["inputs"][0]["normalization"]
    labels_file = s0["outputs"][0]["associated_files"][0]["name"]
    n = len(m0.labels)
    stem = f0.rsplit(".", 1)[0]
    out = [
        "## Android and iOS with MediaPipe Tasks (.tflite): no glue code",
        "",
        "These files carry the standard TFLite Model Metadata, so MediaPipe Tasks' `ImageClassifier` "
        "(Android, iOS, web, Python) reads the normalisation and the labels from the file itself:",
        "",
    ]
    for f, m, s in files:
        nm = s["inputs"][0]["normalization"]
        out.append(f"- `{f}`: {m.precision}, input {m.input.dtype}; normalisation mean {nm['mean']} std "
                   f"{nm['std']} (`(pixel - mean) / std`), "
                   f"labels from the packed `{s['outputs'][0]['associated_files'][0]['name']}`")
    if others:
        out.append("- not for MediaPipe (its ImageClassifier takes float32 or uint8 input): "
                   + ", ".join(f"`{f}`" for f in others) + "; use LiteRT below.")
    out += [
        "",
        f"MediaPipe resizes the whole image to {m0.preprocess.input_size[1]}x{m0.preprocess.input_size[0]} with its "
        f"own bilinear sampler (no antialiasing) where edge_runtime uses Pillow's {m0.preprocess.resize_method} "
        "(antialiased): answers near the threshold may differ.",
        "",
        "Android (Kotlin), dependency `com.google.mediapipe:tasks-vision:0.10.21`, the file in `assets/`:",
        "",
        "```kotlin",
        "import com.google.mediapipe.framework.image.BitmapImageBuilder",
        "import com.google.mediapipe.tasks.core.BaseOptions",
        "import com.google.mediapipe.tasks.vision.core.RunningMode",
        "import com.google.mediapipe.tasks.vision.imageclassifier.ImageClassifier",
        "",
        "val options = ImageClassifier.ImageClassifierOptions.builder()",
        f'    .setBaseOptions(BaseOptions.builder().setModelAssetPath("{f0}").build())',
        "    .setRunningMode(RunningMode.IMAGE)",
        f"    .setMaxResults({n})  // every class, best first",
        "    .build()",
        "val classifier = ImageClassifier.createFromOptions(context, options)",
        f"// Normalisation (mean {norm['mean']}, std {norm['std']}) and labels ({labels_file}) come from the file.",
        "val top = classifier.classify(BitmapImageBuilder(bitmap).build())",
        "    .classificationResult().classifications()[0].categories()[0]",
        *_kotlin_decision(m0, "top.score()", "top.categoryName()"),
        "```",
        "",
        "iOS (Swift), pod `MediaPipeTasksVision` 0.10.21, the file in the app bundle:",
        "",
        "```swift",
        "import MediaPipeTasksVision",
        "",
        "let options = ImageClassifierOptions()",
        f'options.baseOptions.modelAssetPath = Bundle.main.path(forResource: "{stem}", ofType: "tflite")!',
        "options.runningMode = .image",
        f"options.maxResults = {n}",
        "let classifier = try ImageClassifier(options: options)",
        "let result = try classifier.classify(image: try MPImage(uiImage: image))",
        "let top = result.classificationResult.classifications[0].categories[0]",
        *_swift_decision(m0, "top.score", '(top.categoryName ?? "")'),
        "```",
        "",
        "Web: `@mediapipe/tasks-vision`, `ImageClassifier.createFromOptions(vision, {baseOptions: {modelAssetPath}})`, "
        "the same file and the same decision. Python: `mediapipe.tasks.python.vision.ImageClassifier`.",
        "",
    ]
    return out


def integration_note(model: str, metas: list[tuple[str, ArtifactMetadata]],
                     standard: dict[str, dict[str, Any]] | None = None) -> str:
    """INTEGRATION.md for the bundle's artifacts.

    Every number in it comes from the artifacts' metadata: `metas` (file name,
    medge metadata) and `standard` (file name -> the standard TFLite metadata
    read from that .tflite, `edge_runtime.standard_metadata.read`).
    """
    standard = standard or {}
    first = metas[0][1]
    p = first.preprocess
    in_shape = [int(d) for d in first.input.shape[1:]]
    tfl = [(f, m) for f, m in metas if f.endswith(".tflite")]
    onx = [(f, m) for f, m in metas if f.endswith((".onnx", ".ort"))]
    labels = ", ".join(f"{i}: {l}" for i, l in enumerate(first.labels))
    labels_kt = ", ".join(f'"{l}"' for l in first.labels)
    out = [
        f"# {model}: integrating the exported models",
        "",
        f"Task: {first.task}. Classes (output index: label): {labels}."
        + (f" A screening flags `{first.positive_label}`." if first.positive_label else ""),
        "",
        "Every file carries its own metadata (LiteRT: the `medge` metadata entry; ONNX/ORT: "
        "`metadata_props['medge']`), also in the `.json` beside it"
        + ("; the `.tflite` files also carry the standard TFLite Model Metadata (`TFLITE_METADATA`, "
           "with `labels.txt` packed in the file) that MediaPipe Tasks reads" if standard else "")
        + ". Pick one file per app; `manifest.json` lists size and agreement with the Keras original for each. "
        "Every number below is read from that metadata.",
        "",
        "## Input and output (all files)",
        "",
        _input_text(first),
        "",
        *_decision_text(first),
    ]
    if first.part == "model":
        out += _mediapipe_text(model, metas, standard)
    if tfl:
        f0, m0 = tfl[0]
        out += ["## Android and iOS with LiteRT directly (.tflite)", ""]
        for f, m in tfl:
            out.append(f"- `{f}`: {m.precision}, input {m.input.dtype}, output {m.output.dtype}"
                       + (f" (input quantized: scale {m.input.scale:.6g}, zero point {m.input.zero_point})"
                          if m.input.quantized else ""))
        pixel = (f"putFloat(c * {p.scale:.10g}f + {p.offset:.10g}f)" if not m0.input.quantized
                 else f"put(((c * {p.scale:.10g} + {p.offset:.10g}) / {m0.input.scale:.10g} + "
                      f"{m0.input.zero_point}).roundToInt().coerceIn(-128, 127).toByte())")
        out += [
            "",
            "Android (Kotlin), dependency `com.google.ai.edge.litert:litert`:",
            "",
            "```kotlin",
            f'val interpreter = Interpreter(FileUtil.loadMappedFile(context, "{f0}"), '
            'Interpreter.Options().setNumThreads(2))',
            f"val input = ByteBuffer.allocateDirect({m0.input.dtype.itemsize} * {'*'.join(map(str, in_shape))})"
            ".order(ByteOrder.nativeOrder())",
        ]
        if first.part == "model":
            h, w = p.input_size
            out += [
                f"val scaled = Bitmap.createScaledBitmap(bitmap, {w}, {h}, true)  // {p.resize_method}",
                f"val px = IntArray({w * h}).also {{ scaled.getPixels(it, 0, {w}, 0, 0, {w}, {h}) }}",
                "for (argb in px) for (c in intArrayOf((argb shr 16) and 0xFF, (argb shr 8) and 0xFF, argb and 0xFF)) "
                f"input.{pixel}" if p.channels == 3 else
                "for (argb in px) { val c = (((argb shr 16) and 0xFF) * 299 + ((argb shr 8) and 0xFF) * 587 + "
                f"(argb and 0xFF) * 114) / 1000; input.{pixel} }}",
            ]
        out += [
            f"val output = Array(1) {{ FloatArray({len(first.labels)}) }}"
            + ("  // an int8 output: read bytes and dequantize as above" if m0.output.quantized else ""),
            "input.rewind()",
            "interpreter.run(input, output)",
            "val probs = output[0]",
            "val k = probs.indices.maxBy { probs[it] }",
            f"val labels = arrayOf({labels_kt})",
            *_kotlin_decision(first, "probs[k]", "labels[k]"),
            "```",
            "",
            "iOS (Swift), pod `TensorFlowLiteSwift` (LiteRT's iOS package): create "
            "`Interpreter(modelPath:)`, `allocateTensors()`, `copy(Data, toInputAt: 0)` with the NHWC bytes above, "
            "`invoke()`, read `output(at: 0)`, then the same decision:",
            "",
            "```swift",
            *_swift_decision(first, "probs[k]", "labels[k]"),
            "```",
            "",
        ]
    if onx:
        fo, mo = onx[-1]
        out += ["## ONNX Runtime / ONNX Runtime Mobile (.onnx, .ort)", ""]
        for f, m in onx:
            q = m.quantization
            out.append(f"- `{f}`: {m.precision}" + (f", {q.get('format', '')} int8 weights, {q.get('activations')} "
                                                     "activations" if q else "")
                       + (" (ORT format for the minimal mobile runtime)" if f.endswith(".ort") else ""))
        out += [
            "",
            "Android: `com.microsoft.onnxruntime:onnxruntime-android`; iOS: pod `onnxruntime-objc` "
            "(or `onnxruntime-c`). Both open `.onnx` and `.ort` files. The input layout is NHWC (channels last), "
            "not the NCHW many ONNX examples assume.",
            "",
            "```kotlin",
            "val env = OrtEnvironment.getEnvironment()",
            f'val session = env.createSession(modelBytes)  // "{fo}"',
        ]
        if first.part == "model":
            h, w = p.input_size
            grey = ("val c = (((argb shr 16) and 0xFF) * 299 + ((argb shr 8) and 0xFF) * 587 + (argb and 0xFF) * 114) "
                    "/ 1000; ")
            out += [
                f"val scaled = Bitmap.createScaledBitmap(bitmap, {w}, {h}, true)  // {p.resize_method}",
                f"val px = IntArray({w * h}).also {{ scaled.getPixels(it, 0, {w}, 0, 0, {w}, {h}) }}",
                f"val floats = FloatBuffer.allocate({w * h * p.channels})",
                ("for (argb in px) for (c in intArrayOf((argb shr 16) and 0xFF, (argb shr 8) and 0xFF, argb and 0xFF)) "
                 if p.channels == 3 else f"for (argb in px) {{ {grey}") +
                f"floats.put(c * {p.scale:.10g}f + {p.offset:.10g}f)" + ("" if p.channels == 3 else " }"),
                "floats.rewind()",
            ]
        else:
            out.append(f"val floats: FloatBuffer = featureMap  // {[1, *in_shape]} float32, from the base")
        out += [
            f"val tensor = OnnxTensor.createTensor(env, floats, longArrayOf({', '.join(map(str, [1, *in_shape]))}))",
            f'val probs = (session.run(mapOf("{mo.input.name}" to tensor))[0].value as Array<FloatArray>)[0]',
            "val k = probs.indices.maxBy { probs[it] }",
            f"val labels = arrayOf({labels_kt})",
            *_kotlin_decision(first, "probs[k]", "labels[k]"),
            "```",
            "",
            f"iOS (Swift): `ORTSession(env:modelPath:sessionOptions:)`, an `ORTValue(tensorData:elementType: .float, "
            f"shape: {[1, *in_shape]})` of the same floats, `run(withInputs: [\"{mo.input.name}\": value], "
            f"outputNames: [\"{mo.output.name}\"], runOptions: nil)`, then the same decision:",
            "",
            "```swift",
            *_swift_decision(first, "probs[k]", "labels[k]"),
            "```",
            "",
        ]
    return "\n".join(out)


def write_bundle(out: Path, model: str, report: ConversionReport) -> tuple[Path, Path]:
    """Build `{model}_bundle/` and `{model}_bundle.zip` in `out` from the passed rows of `report`.

    Both are built under temporary names and renamed into place.
    """
    rows = [r for r in report.rows if r.file and not r.failed]
    if not rows:
        raise ValueError("no artifact passed; nothing to bundle")
    folder, zpath = out / f"{model}_bundle", out / f"{model}_bundle.zip"
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{model}_bundle.tmp-", dir=out))
    try:
        metas, files = [], []
        for r in rows:
            src = out / r.file
            shutil.copy2(src, tmp_dir / src.name)
            shutil.copy2(sidecar_path(src), tmp_dir / sidecar_path(src).name)
            meta = read_sidecar(src)
            metas.append((src.name, meta))
            proof = {**(r.proof.to_dict() if r.proof else {}), "criterion": r.criterion}
            files.append({
                "file": src.name, "format": r.format, "runtime": r.runtime, "precision": r.precision,
                "status": r.status, "size_bytes": src.stat().st_size, "sha256": sha256_file(src),
                "input": meta.input.to_dict(), "output": meta.output.to_dict(),
                "proof": {k: proof.get(k) for k in ("images", "top1_agreement", "max_abs_diff", "keras_accuracy",
                                                   "accuracy", "criterion")},
            })
        if report.gradcam_weights:  # OCT head weights for Grad-CAM on the device
            shutil.copy2(out / report.gradcam_weights, tmp_dir / report.gradcam_weights)
        first = metas[0][1]
        (tmp_dir / "labels.txt").write_text("".join(f"{l}\n" for l in first.labels))
        manifest = {
            "model": model, "task": first.task, "labels": list(first.labels),
            "positive_label": first.positive_label, "preprocess": first.preprocess.to_dict(),
            "output_kind": first.output_kind, "source_sha256": first.source_sha256,
            "medge_version": first.medge_version, "created": report.created,
            "proof_images": report.proof, "files": files,
        }
        (tmp_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

        standard = {f: read_standard((tmp_dir / f).read_bytes()) for f, _ in metas if f.endswith(".tflite")}
        (tmp_dir / "INTEGRATION.md").write_text(
            integration_note(model, metas, {k: v for k, v in standard.items() if v}))
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
