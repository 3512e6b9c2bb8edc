// Decode a serialized splitexit.v1.InferRequest (read from the file named by argv[3]) with protobufjs, loading the
// .proto named by argv[2], and print what a JavaScript receiver sees as one JSON line. Run by tests/test_interop_node.py.
"use strict";
const fs = require("fs");
const protobuf = require("protobufjs");

const root = protobuf.loadSync(process.argv[2]);
const InferRequest = root.lookupType("splitexit.v1.InferRequest");
const message = InferRequest.decode(fs.readFileSync(process.argv[3]));
const t = message.tensor || {};
console.log(JSON.stringify({
  version: require("protobufjs/package.json").version,
  request_id: message.requestId,
  model_id: message.modelId,
  sample_ids: (message.sampleIds || []).map(Number),
  queued_ms: message.queuedMs,
  dtype: t.dtype || "",
  shape: (t.shape || []).map(Number),
  codec: t.codec || "",
  compression: t.compression || "",
  scale: t.scale || [],
  data: Buffer.from(t.data || []).toString("base64"),
}));
