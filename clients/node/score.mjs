#!/usr/bin/env node
// Example Node.js client of the opd teacher gRPC API (opd.teacher.v1.TeacherService).
//
// Loads the one .proto file at run time (no generated code), calls GetInfo and Score with the bearer
// token as metadata `authorization: Bearer <token>`, decodes the packed little-endian arrays and prints
// one JSON object on stdout:
//
//   node score.mjs --target 127.0.0.1:50051 --token "$TOKEN" \
//       --sequences '[[1, 5, 6, 7], [2, 3, 4]]' --score-from '[2, 1]' --top-k 4
//
//   {"info": {...TeacherInfo}, "model_id": "...",
//    "results": [{"rows": 2, "k": 4, "topk_ids": [[...], [...]], "topk_logprobs": [[...], [...]],
//                 "target_logprobs": [..., ...]}, ...]}
//
// Row t of a result is the teacher's distribution over token t given the tokens before it, for
// t = score_from .. n-1 (see the comments in teacher.proto). On a gRPC error it prints
// {"error": {"code": "UNAUTHENTICATED", "details": "..."}} on stderr and exits with status 1.

import { readFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const HERE = dirname(fileURLToPath(import.meta.url));
const DEFAULT_PROTO = resolve(HERE, "../../proto/opd/teacher/v1/teacher.proto");

const { values: args } = parseArgs({
  options: {
    target: { type: "string", default: "127.0.0.1:50051" },
    token: { type: "string", default: process.env.OPD_TEACHER_TOKEN ?? "" },
    proto: { type: "string", default: DEFAULT_PROTO },
    sequences: { type: "string", default: "[[1, 5, 6, 7]]" }, // JSON: a list of token-id lists
    "score-from": { type: "string", default: "" }, // JSON: one start per sequence (default: all 1)
    "top-k": { type: "string", default: "4" },
    "ca-file": { type: "string", default: "" }, // PEM of the CA that signed the server's certificate
    "timeout-s": { type: "string", default: "60" },
  },
});

function loadService(protoPath) {
  const definition = protoLoader.loadSync(protoPath, {
    keepCase: true, // field names as in the .proto: token_ids, score_from, topk_ids, ...
    longs: Number,
    enums: String,
    defaults: true, // absent scalars read as 0 / "" / empty bytes, as in every other protobuf runtime
  });
  return grpc.loadPackageDefinition(definition).opd.teacher.v1.TeacherService;
}

// Packed little-endian arrays (the bytes fields) -> nested JS arrays, checked against rows x cols.
function unpack(buffer, rows, cols, read) {
  if (buffer.length !== 4 * rows * cols) {
    throw new Error(`expected ${4 * rows * cols} bytes for [${rows}, ${cols}], got ${buffer.length}`);
  }
  return Array.from({ length: rows }, (_, r) =>
    Array.from({ length: cols }, (_, c) => read.call(buffer, 4 * (r * cols + c))),
  );
}

function decode(scored) {
  const { rows, k } = scored;
  return {
    rows,
    k,
    topk_ids: unpack(scored.topk_ids, rows, k, Buffer.prototype.readInt32LE),
    topk_logprobs: unpack(scored.topk_logprobs, rows, k, Buffer.prototype.readFloatLE),
    target_logprobs: unpack(scored.target_logprobs, rows, 1, Buffer.prototype.readFloatLE).map((r) => r[0]),
  };
}

// One unary call as a promise, with the token and a deadline.
function call(client, method, request, metadata, timeoutS) {
  return new Promise((ok, fail) => {
    const deadline = new Date(Date.now() + 1000 * timeoutS);
    client[method](request, metadata, { deadline }, (err, response) => (err ? fail(err) : ok(response)));
  });
}

async function main() {
  const sequences = JSON.parse(args.sequences);
  const scoreFrom = args["score-from"] ? JSON.parse(args["score-from"]) : sequences.map(() => 1);
  const topK = Number.parseInt(args["top-k"], 10);
  const timeoutS = Number.parseFloat(args["timeout-s"]);
  if (scoreFrom.length !== sequences.length) {
    throw new Error(`--score-from has ${scoreFrom.length} entries for ${sequences.length} sequences`);
  }

  const TeacherService = loadService(args.proto);
  const credentials = args["ca-file"]
    ? grpc.credentials.createSsl(readFileSync(args["ca-file"]))
    : grpc.credentials.createInsecure();
  const client = new TeacherService(args.target, credentials, {
    "grpc.max_receive_message_length": -1,
    "grpc.max_send_message_length": -1,
  });
  const metadata = new grpc.Metadata();
  if (args.token) metadata.set("authorization", `Bearer ${args.token}`);

  try {
    const info = await call(client, "GetInfo", {}, metadata, timeoutS);
    const response = await call(
      client,
      "Score",
      {
        sequences: sequences.map((ids, i) => ({ token_ids: ids, score_from: scoreFrom[i] })),
        top_k: topK,
        temperature: 1.0,
        request_id: "node-example",
      },
      metadata,
      timeoutS,
    );
    const results = response.results.map(decode);
    results.forEach((r, i) => {
      if (r.rows !== sequences[i].length - scoreFrom[i]) {
        throw new Error(`sequence ${i}: teacher answered ${r.rows} rows`);
      }
    });
    process.stdout.write(`${JSON.stringify({ info, model_id: response.model_id, results })}\n`);
  } finally {
    client.close();
  }
}

main().catch((err) => {
  const code = err.code !== undefined ? (grpc.status[err.code] ?? String(err.code)) : "CLIENT";
  process.stderr.write(`${JSON.stringify({ error: { code, details: err.details ?? err.message } })}\n`);
  process.exit(1);
});
