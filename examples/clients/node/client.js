#!/usr/bin/env node
// A SplitExit client on Node's standard gRPC stack (@grpc/grpc-js + @grpc/proto-loader), with no generated code:
// the contract, proto/splitexit.proto, is loaded at run time.
//
//   node client.js --target 127.0.0.1:50051 --images images.u8 --shape 64,3,32,32 [--unary] [--batch-size 32]
//
// --images is a file of raw uint8 pixels in NCHW order (sample, channel, row, column), C-contiguous: exactly what a
// device tier takes. The client checks the standard health service, asks Describe what the tier accepts, sends the
// images in batches, and prints one JSON object: the tier's description and one answer per sample.
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const HERE = __dirname;
const CONTRACT = path.resolve(HERE, '..', '..', '..', 'proto', 'splitexit.proto');
const HEALTH = path.join(path.dirname(require.resolve('grpc-health-check/package.json')), 'proto', 'health', 'v1',
  'health.proto');

// int64 fields (sample ids, shapes) arrive as strings, so ids beyond 2^53 survive; enums as their names.
const LOADER_OPTIONS = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };

function parseArgs(argv) {
  const args = { target: '127.0.0.1:50051', images: null, shape: null, unary: false, batchSize: 64, timeout: 60 };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new Error(`${flag} needs a value`);
      return argv[++i];
    };
    if (flag === '--target') args.target = value();
    else if (flag === '--images') args.images = value();
    else if (flag === '--shape') args.shape = value().split(',').map(Number);
    else if (flag === '--unary') args.unary = true;
    else if (flag === '--batch-size') args.batchSize = Number(value());
    else if (flag === '--timeout') args.timeout = Number(value());
    else throw new Error(`unknown flag ${flag}`);
  }
  if (!args.images || !args.shape || args.shape.length !== 4 || !args.shape.every(Number.isInteger)) {
    throw new Error('give --images FILE and --shape N,C,H,W');
  }
  if (!Number.isInteger(args.batchSize) || args.batchSize < 1) throw new Error('--batch-size must be a positive integer');
  return args;
}

function load(file) {
  return grpc.loadPackageDefinition(protoLoader.loadSync(file, LOADER_OPTIONS));
}

function deadline(seconds) {
  return new Date(Date.now() + seconds * 1000);
}

function call(fn, request, seconds) {
  return new Promise((resolve, reject) => fn(request, { deadline: deadline(seconds) },
    (err, reply) => (err ? reject(err) : resolve(reply))));
}

// One InferRequest built by hand: the tensor is self-describing (dtype, shape, raw little-endian bytes).
function request(modelId, firstId, pixels, shape) {
  const n = shape[0];
  return {
    request_id: `node-${firstId}`,
    model_id: modelId,
    sample_ids: Array.from({ length: n }, (_, k) => String(firstId + k)),
    tensor: { dtype: 'uint8', shape: shape.map(String), data: pixels, codec: 'raw' },
  };
}

// Streamed: one reply as each tier decides its samples (the device's exits arrive first).
function inferStream(stub, req, seconds) {
  return new Promise((resolve, reject) => {
    const answers = [];
    const stream = stub.InferStream(req, { deadline: deadline(seconds) });
    stream.on('data', (reply) => {
      const at = Date.now();
      for (const p of reply.predictions) answers.push({ ...p, received_ms: at });
    });
    stream.on('error', reject);
    stream.on('end', () => resolve(answers));
  });
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const { splitexit } = load(CONTRACT);
  const health = load(HEALTH).grpc.health.v1;
  const credentials = grpc.credentials.createInsecure();
  const tier = new splitexit.v1.Tier(args.target, credentials);
  const checker = new health.Health(args.target, credentials);

  const status = await call(checker.Check.bind(checker), { service: '' }, args.timeout);
  const info = await call(tier.Describe.bind(tier), {}, args.timeout);
  const [n, c, h, w] = args.shape;
  const expected = info.input_shape.map(Number);
  if (info.input_dtype !== 'uint8' || [c, h, w].join() !== expected.join()) {
    throw new Error(`the tier takes ${info.input_dtype} ${expected}, not uint8 ${[c, h, w]}`);
  }
  const perSample = c * h * w;
  const pixels = fs.readFileSync(args.images);
  if (pixels.length !== n * perSample) throw new Error(`${args.images} has ${pixels.length} bytes, not ${n * perSample}`);
  const batchSize = Math.min(args.batchSize, info.max_batch || args.batchSize);

  const answers = [];
  for (let lo = 0; lo < n; lo += batchSize) {
    const m = Math.min(batchSize, n - lo);
    const req = request(info.model_id, lo, pixels.subarray(lo * perSample, (lo + m) * perSample), [m, c, h, w]);
    if (args.unary) answers.push(...(await call(tier.Infer.bind(tier), req, args.timeout)).predictions);
    else answers.push(...(await inferStream(tier, req, args.timeout)));
  }
  tier.close();
  checker.close();
  process.stdout.write(JSON.stringify({
    health: status.status,
    model_id: info.model_id,
    tiers: info.tiers,
    max_batch: info.max_batch,
    call: args.unary ? 'Infer' : 'InferStream',
    predictions: answers.map((p) => ({ sample_id: Number(p.sample_id), label: p.label, exit_tier: p.exit_tier,
      exit_index: p.exit_index, confidence: p.confidence, degraded: p.degraded })),
  }) + '\n');
}

main().catch((err) => {
  process.stderr.write(`client.js: error: ${err.message}\n`);
  process.exit(1);
});
