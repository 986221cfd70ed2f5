// On-phone inference: the field app's malaria model run in this browser with LiteRT.js (WebAssembly, CPU).
//
// The app serves LiteRT.js from its own web-runtime folder (`python -m edge_runtime webruntime fetch`), the model
// file and its medge metadata; nothing comes from the internet. Preprocessing follows the metadata exactly as
// edge_runtime does it with Pillow (edge_runtime/images.py): decode, RGB or L, resize to the input size with the
// metadata's method (Pillow's own fixed-point resampling, reimplemented below, because the canvas' drawImage
// scaling differs from Pillow's), then pixel * scale + offset in float32.
//
//   const m = await loadModel(info);   // info: /api/ondevice's "malaria" entry
//   const r = await m.classify(file);  // {label, confidence, uncertain, probabilities, preprocess_ms, inference_ms}
"use strict";

// ------------------------------------------------------------ Pillow's resize (libImaging/Resample.c, Geometry.c)

const PRECISION_BITS = 32 - 8 - 2;
const ONE = 2 ** PRECISION_BITS;
const FILTERS = {
  bilinear: { support: 1.0, f: (x) => { x = Math.abs(x); return x < 1.0 ? 1.0 - x : 0.0; } },
  bicubic: {
    support: 2.0,
    f: (x) => {
      const a = -0.5;
      x = Math.abs(x);
      if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
      if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
      return 0.0;
    },
  },
};

// Per output index: the first input index, the count, and fixed-point weights (Pillow's precompute_coeffs and
// normalize_coeffs_8bpc).
function coefficients(inSize, outSize, filter) {
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1.0);
  const support = filter.support * filterscale;
  const out = [];
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const ss = 1.0 / filterscale;
    const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
    const xmax = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
    const w = [];
    let ww = 0.0;
    for (let x = 0; x < xmax; x++) { const v = filter.f((x + xmin - center + 0.5) * ss); w.push(v); ww += v; }
    const k = w.map((v) => {
      const n = ww !== 0.0 ? v / ww : v;
      return n < 0 ? Math.trunc(-0.5 + n * ONE) : Math.trunc(0.5 + n * ONE);
    });
    out.push({ min: xmin, k });
  }
  return out;
}

function clip8(v) {
  if (v >= ONE * 256) return 255;
  if (v <= 0) return 0;
  return Math.floor(v / ONE);
}

// One separable pass along x (horizontal) or y; channels interleaved, 8-bit in and out, as Pillow does it.
function pass(src, w, h, ch, outW, outH, coeffs, horizontal) {
  const dst = new Uint8Array(outW * outH * ch);
  for (let y = 0; y < outH; y++) {
    for (let x = 0; x < outW; x++) {
      const c = coeffs[horizontal ? x : y];
      for (let b = 0; b < ch; b++) {
        let ss = ONE / 2;
        for (let i = 0; i < c.k.length; i++) {
          const sx = horizontal ? c.min + i : x, sy = horizontal ? y : c.min + i;
          ss += src[(sy * w + sx) * ch + b] * c.k[i];
        }
        dst[(y * outW + x) * ch + b] = clip8(ss);
      }
    }
  }
  return dst;
}

// Pillow's NEAREST resize is an affine scale with the source coordinate accumulated in doubles.
function nearest(src, w, h, ch, outW, outH) {
  const index = (n, outN) => {
    const a = n / outN, t = [];
    let o = a * 0.5;
    for (let i = 0; i < outN; i++) { t.push(Math.min(o < 0 ? 0 : Math.trunc(o), n - 1)); o += a; }
    return t;
  };
  const xs = index(w, outW), ys = index(h, outH);
  const dst = new Uint8Array(outW * outH * ch);
  for (let y = 0; y < outH; y++)
    for (let x = 0; x < outW; x++)
      for (let b = 0; b < ch; b++) dst[(y * outW + x) * ch + b] = src[(ys[y] * w + xs[x]) * ch + b];
  return dst;
}

/** Resize 8-bit interleaved pixels as Pillow's Image.resize(size, method) does (no reducing_gap). */
export function resize(src, w, h, ch, outW, outH, method) {
  if (w === outW && h === outH) return src;
  if (method === "nearest") return nearest(src, w, h, ch, outW, outH);
  const filter = FILTERS[method];
  if (!filter) throw new Error(`resize method ${method} is not one of nearest, bilinear, bicubic`);
  // Horizontal first, over every row; then vertical (Pillow crops the rows the vertical pass never reads,
  // which changes no output value).
  let img = src, cw = w;
  if (outW !== w) { img = pass(img, w, h, ch, outW, h, coefficients(w, outW, filter), true); cw = outW; }
  if (outH !== h) img = pass(img, cw, h, ch, cw, outH, coefficients(h, outH, filter), false);
  return img;
}

// ------------------------------------------------------------ decoding and preprocessing

/** A file or blob -> {data: Uint8Array RGB or L, width, height}, with EXIF orientation and no colour management. */
export async function decode(blob, colorMode) {
  const bitmap = await createImageBitmap(blob, { imageOrientation: "from-image", colorSpaceConversion: "none",
    premultiplyAlpha: "none" });
  const { width, height } = bitmap;
  const canvas = new OffscreenCanvas(width, height);
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  bitmap.close();
  const rgba = ctx.getImageData(0, 0, width, height).data;
  const n = width * height, ch = colorMode === "grayscale" ? 1 : 3;
  const data = new Uint8Array(n * ch);
  for (let i = 0; i < n; i++) {
    const r = rgba[4 * i], g = rgba[4 * i + 1], b = rgba[4 * i + 2];
    if (ch === 1) data[i] = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16;  // Pillow's RGB -> L
    else { data[3 * i] = r; data[3 * i + 1] = g; data[3 * i + 2] = b; }
  }
  return { data, width, height, channels: ch };
}

/** Decoded pixels -> the model's float32 NHWC input, per the metadata's preprocessing contract. */
export function preprocess(img, spec) {
  const [h, w] = spec.input_size;
  const px = resize(img.data, img.width, img.height, img.channels, w, h, spec.resize_method);
  const x = new Float32Array(px.length);
  const scale = Math.fround(spec.scale), offset = Math.fround(spec.offset);
  for (let i = 0; i < px.length; i++) x[i] = Math.fround(Math.fround(px[i] * scale) + offset);
  return x;
}

// ------------------------------------------------------------ the model

function softmax(z) {
  const m = Math.max(...z), e = z.map((v) => Math.exp(v - m)), s = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / s);
}

/**
 * Load LiteRT.js and compile the model for the CPU ('wasm' accelerator).
 *
 * @param info {runtime: {base, module}, model: {url, metadata}} from the app's /api/ondevice.
 * @returns {classify(blob), runtime, loadMs} or throws an Error saying why this phone cannot.
 */
export async function loadModel(info) {
  if (typeof WebAssembly !== "object") throw new Error("this browser has no WebAssembly");
  const meta = info.model.metadata;
  for (const t of [meta.input, meta.output]) {
    if (!["float32", "uint8"].includes(t.dtype)) {
      throw new Error(`LiteRT.js takes float32 or uint8 tensors; this model's ${t.name} is ${t.dtype}`);
    }
  }
  const t0 = performance.now();
  const litert = await import(info.runtime.module);
  if (!litert.getGlobalLiteRtPromise()) {
    // The runtime's own log (INFO lines on stderr, which Emscripten prints with console.error) at its real level:
    // the Emscripten module takes `printErr` from the Module object LiteRT.js' loader passes on.
    self.Module = { printErr: (line) => (/^(INFO|VERBOSE|DEBUG)/.test(line) ? console.debug
      : /^WARNING/.test(line) ? console.warn : console.error)(line) };
    await litert.loadLiteRt(info.runtime.wasm_dir);
  } else {
    await litert.getGlobalLiteRtPromise();
  }
  const resp = await fetch(info.model.url, { credentials: "same-origin" });
  if (!resp.ok) throw new Error(`the model file could not be fetched (${resp.status})`);
  const bytes = new Uint8Array(await resp.arrayBuffer());
  const compiled = await litert.loadAndCompile(bytes, { accelerator: "wasm" });
  const spec = meta.preprocess;
  // One image: LiteRT.js cannot resize inputs, so the app serves the file with its batch dimension fixed to 1
  // (edge_runtime.webruntime.static_batch) and the tensor says so.
  const shape = meta.input.shape.map((d) => (d < 0 ? 1 : d));
  const loadMs = performance.now() - t0;

  async function infer(x) {
    let data = x;
    if (meta.input.dtype === "uint8") {
      data = Uint8Array.from(x, (v) => Math.min(255, Math.max(0, Math.round(v / meta.input.scale) + meta.input.zero_point)));
    }
    const input = new litert.Tensor(data, shape);
    let outputs;
    try {
      outputs = await compiled.run([input]);
    } finally {
      input.delete();
    }
    let y;
    try {
      y = Array.from(await outputs[0].data());
    } finally {
      for (const o of outputs) o.delete();
    }
    if (meta.output.dtype === "uint8") y = y.map((q) => meta.output.scale * (q - meta.output.zero_point));
    return meta.output_kind === "logits" ? softmax(y) : y;
  }

  return {
    runtime: info.runtime, loadMs, labels: meta.labels, threshold: info.model.threshold,
    async classify(blob) {
      const t1 = performance.now();
      const x = preprocess(await decode(blob, spec.color_mode), spec);
      const t2 = performance.now();
      const probs = await infer(x);
      const t3 = performance.now();
      let k = 0;
      for (let i = 1; i < probs.length; i++) if (probs[i] > probs[k]) k = i;
      const confidence = probs[k];
      return {
        label: meta.labels[k], confidence, uncertain: confidence < info.model.threshold,
        probabilities: Object.fromEntries(meta.labels.map((l, i) => [l, probs[i]])),
        preprocess_ms: t2 - t1, inference_ms: t3 - t2,
      };
    },
  };
}
