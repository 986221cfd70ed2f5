// onnxruntime-node as a Node.js app uses it, in its own node_modules (not medge's): a client of test_clients.
//
//     mkdir ort && cd ort && ONNXRUNTIME_NODE_INSTALL=skip npm install onnxruntime-node@1.30.0
//     NODE_PATH=ort/node_modules node tests/onnxruntime_node_client.mjs MODEL.onnx INPUTS.f32 N H W C > answers.json
//
// ONNXRUNTIME_NODE_INSTALL=skip: the package's install script would fetch GPU libraries from a host outside the
// npm registry; the CPU runtime this client needs ships inside the package.
//
// INPUTS.f32 holds N preprocessed images (float32, little-endian, N x H x W x C, as edge_runtime's preprocessing
// makes them from the file's `medge` metadata): a Node app reads those numbers from the same metadata_props.
// For each image it runs the model alone (batch 1, what an app does) and prints, as JSON, the runtime's version,
// the model's input and output names and the output row per image.

import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import { join } from "node:path";

const [model, inputs, n, h, w, c] = process.argv.slice(2);
if (!c) {
  console.error("usage: onnxruntime_node_client.mjs MODEL.onnx INPUTS.f32 N H W C");
  process.exit(2);
}
// ESM import ignores NODE_PATH: resolve the package from there (or from beside this file) with require's rules.
const require = createRequire(join(process.env.NODE_PATH || process.cwd(), "noop.js"));
const ort = require("onnxruntime-node");

const [N, H, W, C] = [n, h, w, c].map(Number);
const raw = readFileSync(inputs);
const all = new Float32Array(raw.buffer, raw.byteOffset, raw.byteLength / 4);
const per = H * W * C;
if (all.length !== N * per) {
  console.error(`${inputs} holds ${all.length} floats, not ${N} x ${H} x ${W} x ${C}`);
  process.exit(2);
}
const session = await ort.InferenceSession.create(model, { executionProviders: ["cpu"], intraOpNumThreads: 1 });
const [inputName] = session.inputNames;
const [outputName] = session.outputNames;
const rows = [];
for (let i = 0; i < N; i++) {
  const x = new ort.Tensor("float32", all.slice(i * per, (i + 1) * per), [1, H, W, C]);
  const out = await session.run({ [inputName]: x });
  rows.push(Array.from(out[outputName].data));
}
const pkg = require("onnxruntime-node/package.json");
process.stdout.write(JSON.stringify({ onnxruntime_node: pkg.version, input: inputName, output: outputName, rows }));
