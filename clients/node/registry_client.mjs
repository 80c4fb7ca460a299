#!/usr/bin/env node
// A Node client of the Mnemosyne optimizer registry, written from
// protos/mnemosyne/registry/v1/registry.proto alone (loaded at run time with
// @grpc/proto-loader; no generated code).
//
//   node registry_client.mjs --target 127.0.0.1:50051 --token T demo --file ckpt.bin --name my-opt
//   node registry_client.mjs --target grpc://HOST:PORT publish --file F --name N [--metadata JSON]
//   node registry_client.mjs --target ... list [--name N]
//   node registry_client.mjs --target ... alias --name N --alias A --version V
//   node registry_client.mjs --target ... fetch --name N [--ref REF] --out FILE [--offset K]
//   node registry_client.mjs --target ... watch --name N --alias A [--count C]
//
// Every command prints JSON lines on stdout (field names as in the .proto;
// 64-bit integers as decimal strings, as in the proto3 JSON mapping). On
// failure it prints one line on stderr and exits 1 (gRPC error, with the
// status code name), 2 (bad usage) or 3 (sha256 mismatch).
// The token comes from --token or $MNEMOSYNE_REGISTRY_TOKEN.
import { createHash } from "node:crypto";
import { once } from "node:events";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const PROTO_ROOT = path.resolve(HERE, "../../protos");
const PROTO_FILE = "mnemosyne/registry/v1/registry.proto";
const CHUNK = 1 << 20; // the server's default (and largest) chunk: 1 MiB
const RETRYABLE = new Set(["UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL"]);
const STATUS_NAME = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

export class UsageError extends Error {}
export class IntegrityError extends Error {}

// -- connection -------------------------------------------------------------------
export function loadService(protoRoot = PROTO_ROOT) {
  const definition = protoLoader.loadSync(PROTO_FILE, {
    includeDirs: [protoRoot],
    keepCase: true, // field names as in the .proto (chunk_size, not chunkSize)
    longs: String, // uint64/int64 as decimal strings: no precision lost above 2^53
    enums: String,
    defaults: true, // unset scalars read as their zero value (e.g. deleted: false)
    oneofs: true, // a virtual field names the oneof member that is set (payload: "chunk")
  });
  return grpc.loadPackageDefinition(definition).mnemosyne.registry.v1.RegistryService;
}

export function connect({ target, token, ca }) {
  if (!target) throw new UsageError("--target HOST:PORT is required (or $MNEMOSYNE_REGISTRY)");
  let address = target;
  let tls = Boolean(ca);
  if (address.startsWith("grpcs://")) {
    address = address.slice("grpcs://".length);
    tls = true;
  } else if (address.startsWith("grpc://")) {
    address = address.slice("grpc://".length);
  }
  address = address.replace(/\/+$/, "");
  const credentials = tls
    ? grpc.credentials.createSsl(ca ? fs.readFileSync(ca) : null)
    : grpc.credentials.createInsecure();
  const Service = loadService();
  const client = new Service(address, credentials);
  const metadata = new grpc.Metadata();
  if (token) metadata.set("authorization", `Bearer ${token}`);
  return { client, metadata };
}

const deadline = (seconds) => new Date(Date.now() + seconds * 1000);

function unary(conn, method, request, seconds = 30) {
  return new Promise((resolve, reject) => {
    conn.client[method](request, conn.metadata, { deadline: deadline(seconds) }, (err, reply) =>
      err ? reject(err) : resolve(reply),
    );
  });
}

// A version selector: digits mean a version number, anything else an alias, nothing `latest`.
export function versionRef(name, ref) {
  if (ref === undefined || ref === null || ref === "") return { name, alias: "latest" };
  return /^[0-9]+$/.test(String(ref)) ? { name, number: String(ref) } : { name, alias: String(ref) };
}

// -- operations -------------------------------------------------------------------
async function sha256OfFile(file) {
  const hash = createHash("sha256");
  for await (const piece of fs.createReadStream(file, { highWaterMark: CHUNK })) hash.update(piece);
  return hash.digest("hex");
}

export async function publish(conn, file, name, metadata = {}) {
  const size = fs.statSync(file).size;
  if (size === 0) throw new UsageError(`refusing to publish an empty artifact: ${file}`);
  const sha256 = await sha256OfFile(file); // the header, sent first, must carry it
  const seconds = 30 + size / (50 << 20);
  let call;
  const reply = new Promise((resolve, reject) => {
    call = conn.client.Publish(conn.metadata, { deadline: deadline(seconds) }, (err, r) =>
      err ? reject(err) : resolve(r),
    );
  });
  let sendError = null;
  (async () => {
    call.write({ header: { name, metadata, size: String(size), sha256 } });
    // highWaterMark caps every read, so every chunk is at most 1 MiB.
    for await (const chunk of fs.createReadStream(file, { highWaterMark: CHUNK })) {
      if (!call.write({ chunk })) await once(call, "drain");
    }
    call.end();
  })().catch((err) => {
    sendError = err; // e.g. the file could not be read: end the call, report this error
    call.cancel();
  });
  let result;
  try {
    result = await reply; // settles early when the server refuses (e.g. UNAUTHENTICATED)
  } catch (err) {
    // CANCELLED is our own cancel after a send error: report the cause instead.
    throw sendError && err.code === grpc.status.CANCELLED ? sendError : err;
  }
  return result.version;
}

async function collectPages(conn, method, request, field) {
  const rows = [];
  let page_token = "";
  do {
    const page = await unary(conn, method, { ...request, page_token });
    rows.push(...page[field]);
    page_token = page.next_page_token;
  } while (page_token);
  return rows;
}

export const listOptimizers = (conn, prefix = "") =>
  collectPages(conn, "ListOptimizers", { name_prefix: prefix }, "optimizers");
export const listVersions = (conn, name) => collectPages(conn, "ListVersions", { name }, "versions");
export const getVersion = (conn, name, ref) => unary(conn, "GetVersion", { ref: versionRef(name, ref) });
export const setAlias = (conn, name, alias, version) =>
  unary(conn, "SetAlias", { name, alias, version: String(version) });

// One Fetch stream from `offset`; calls onChunk(buffer) for each chunk; returns the Version.
async function fetchStream(conn, ref, offset, onChunk) {
  const call = conn.client.Fetch({ ref, offset: String(offset), chunk_size: 0 }, conn.metadata);
  let version = null;
  for await (const message of call) {
    if (message.payload === "version") {
      version = message.version;
    } else if (message.payload === "chunk") {
      if (version === null) throw new IntegrityError("registry sent chunks before the version header");
      onChunk(message.chunk);
    }
  }
  if (version === null) throw new IntegrityError("registry ended the Fetch stream without a version header");
  return version;
}

// Download `name`@`ref` into `out`, sha256-verified. With offset K, the first K
// bytes already in `out` are kept and only the rest is fetched. The version is
// resolved to its number first and every stream (also a resume after a broken
// stream) asks for that number: an alias that moves meanwhile can't mix two artifacts.
export async function fetchToFile(conn, name, ref, out, { offset = 0, retries = 3 } = {}) {
  const version = await getVersion(conn, name, ref);
  const size = Number(version.size);
  const hash = createHash("sha256");
  if (offset > 0) {
    const held = fs.existsSync(out) ? fs.statSync(out).size : 0;
    if (held < offset) throw new UsageError(`resume from offset ${offset} needs that many bytes in ${out}, it has ${held}`);
    for await (const piece of fs.createReadStream(out, { start: 0, end: offset - 1, highWaterMark: CHUNK })) {
      hash.update(piece);
    }
  }
  const fd = fs.openSync(out, offset > 0 ? "r+" : "w");
  let position = offset;
  try {
    fs.ftruncateSync(fd, offset);
    for (let attempt = 0; ; attempt++) {
      try {
        const header = await fetchStream(conn, { name, number: version.number }, position, (chunk) => {
          fs.writeSync(fd, chunk, 0, chunk.length, position);
          hash.update(chunk);
          position += chunk.length;
        });
        if (header.sha256 !== version.sha256) throw new IntegrityError(`${name}:${version.number} changed during the download`);
        break;
      } catch (err) {
        if (attempt >= retries || !RETRYABLE.has(STATUS_NAME[err.code])) throw err;
      }
    }
  } finally {
    fs.closeSync(fd);
  }
  const digest = hash.digest("hex");
  if (position !== size || digest !== version.sha256) {
    fs.rmSync(out, { force: true }); // never leave a corrupt file for the next resume
    throw new IntegrityError(
      `sha256 mismatch for ${name}:${version.number}: got ${digest} over ${position} bytes, ` +
        `expected ${version.sha256} over ${size}; ${out} removed`,
    );
  }
  return { version, offset, received: position - offset };
}

// Print `name`@`alias`'s current target (if set) and every later move as JSON
// lines. Stops after `count` events, or after `timeout` seconds (a normal end,
// not an error); with neither, runs until the server ends the stream.
export async function watch(conn, name, alias, { count = 0, timeout = 0, onEvent = printJson } = {}) {
  const options = timeout > 0 ? { deadline: deadline(timeout) } : {};
  const call = conn.client.WatchAlias({ name, alias }, conn.metadata, options);
  const events = [];
  try {
    for await (const event of call) {
      events.push(event);
      onEvent(event);
      if (count > 0 && events.length >= count) break;
    }
  } catch (err) {
    if (!(timeout > 0 && err.code === grpc.status.DEADLINE_EXCEEDED)) throw err;
  } finally {
    call.cancel();
  }
  return events;
}

// -- the scenario -----------------------------------------------------------------
export async function demo(conn, file, name, alias = "best") {
  const published = await publish(conn, file, name, { tags: { client: "node" }, description: "published from Node" });
  const optimizers = await listOptimizers(conn, name);
  const versions = await listVersions(conn, name);
  const moved = await setAlias(conn, name, alias, published.number);
  // Whole fetch by alias (resolved to a number), then a resume from the middle by number.
  const scratch = fs.mkdtempSync(path.join(os.tmpdir(), "mnemosyne-node-"));
  let fetched, resumed, identical;
  try {
    const whole = path.join(scratch, "fetched");
    fetched = await fetchToFile(conn, name, alias, whole);
    const resumeAt = Math.floor(Number(published.size) / 2);
    const partial = path.join(scratch, "resumed");
    fs.copyFileSync(file, partial);
    fs.truncateSync(partial, resumeAt); // as if an earlier download had stopped half-way
    resumed = await fetchToFile(conn, name, published.number, partial, { offset: resumeAt });
    const original = fs.readFileSync(file);
    identical = fs.readFileSync(whole).equals(original) && fs.readFileSync(partial).equals(original);
  } finally {
    fs.rmSync(scratch, { recursive: true, force: true });
  }
  const [event] = await watch(conn, name, alias, { count: 1, timeout: 10, onEvent: () => {} });
  if (!event) throw new Error(`watch of ${name}@${alias} sent no event within 10 s`);
  return {
    name,
    number: published.number,
    sha256: published.sha256,
    size: published.size,
    listed: optimizers.some((o) => o.name === name),
    versions: versions.map((v) => v.number),
    alias: { alias: moved.alias, version: moved.version },
    fetched: { number: fetched.version.number, verified: true, identical },
    resumed: { number: resumed.version.number, offset: String(resumed.offset), received: String(resumed.received) },
    watched: { version: event.version, sequence: event.sequence, deleted: event.deleted },
  };
}

// -- CLI --------------------------------------------------------------------------
function printJson(value) {
  process.stdout.write(JSON.stringify(value, (_key, v) => (Buffer.isBuffer(v) ? v.toString("base64") : v)) + "\n");
}

const OPTIONS = {
  target: { type: "string", default: process.env.MNEMOSYNE_REGISTRY },
  token: { type: "string", default: process.env.MNEMOSYNE_REGISTRY_TOKEN },
  ca: { type: "string" },
  file: { type: "string" },
  name: { type: "string" },
  alias: { type: "string" },
  version: { type: "string" },
  ref: { type: "string" },
  out: { type: "string" },
  offset: { type: "string", default: "0" },
  retries: { type: "string", default: "3" },
  count: { type: "string", default: "0" },
  timeout: { type: "string", default: "0" },
  metadata: { type: "string", default: "{}" },
  help: { type: "boolean", short: "h" },
};

const USAGE = `usage: node registry_client.mjs --target HOST:PORT [--token T] COMMAND [options]
  demo    --file F --name N [--alias A]     publish, list, alias, fetch, resume, watch; one JSON summary line
  publish --file F --name N [--metadata JSON]
  list    [--name N]                         optimizers, or the versions of N
  alias   --name N --alias A --version V
  fetch   --name N [--ref NUMBER|ALIAS] --out F [--offset K]   (K: bytes of F already held)
  watch   --name N --alias A [--count C] [--timeout S]`;

function need(values, ...names) {
  for (const n of names) if (values[n] === undefined) throw new UsageError(`--${n} is required`);
}

// A non-negative integer option as a decimal string (uint64 fields take strings: no rounding above 2^53).
function digits(values, name) {
  const text = values[name];
  if (!/^[0-9]+$/.test(text)) throw new UsageError(`--${name} must be a non-negative integer, got ${JSON.stringify(text)}`);
  return text;
}
const integer = (values, name) => Number(digits(values, name));

async function main(argv) {
  const { values, positionals } = parseArgs({ args: argv, options: OPTIONS, allowPositionals: true });
  const [command] = positionals;
  if (values.help || !command) {
    process.stdout.write(USAGE + "\n");
    return values.help ? 0 : 2;
  }
  const conn = connect(values);
  try {
    switch (command) {
      case "demo":
        need(values, "file", "name");
        printJson(await demo(conn, values.file, values.name, values.alias ?? "best"));
        break;
      case "publish": {
        need(values, "file", "name");
        let metadata;
        try {
          metadata = JSON.parse(values.metadata);
        } catch (err) {
          throw new UsageError(`--metadata is not JSON: ${err.message}`);
        }
        printJson(await publish(conn, values.file, values.name, metadata));
        break;
      }
      case "list":
        for (const row of values.name ? await listVersions(conn, values.name) : await listOptimizers(conn)) printJson(row);
        break;
      case "alias":
        need(values, "name", "alias", "version");
        printJson(await setAlias(conn, values.name, values.alias, digits(values, "version")));
        break;
      case "fetch": {
        need(values, "name", "out");
        const r = await fetchToFile(conn, values.name, values.ref, values.out, {
          offset: integer(values, "offset"),
          retries: integer(values, "retries"),
        });
        printJson({ name: r.version.name, number: r.version.number, sha256: r.version.sha256, size: r.version.size,
                    offset: String(r.offset), received: String(r.received), verified: true });
        break;
      }
      case "watch":
        need(values, "name", "alias");
        await watch(conn, values.name, values.alias, { count: integer(values, "count"), timeout: integer(values, "timeout") });
        break;
      default:
        throw new UsageError(`unknown command ${JSON.stringify(command)}; --help lists the commands`);
    }
  } finally {
    conn.client.close();
  }
  return 0;
}

if (process.argv[1] && fs.realpathSync(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (err) => {
      if (err instanceof UsageError || err?.code === "ERR_PARSE_ARGS_UNKNOWN_OPTION" || err?.code === "ERR_PARSE_ARGS_INVALID_OPTION_VALUE") {
        process.stderr.write(`usage error: ${err.message}\n`);
        process.exit(2);
      } else if (err instanceof IntegrityError) {
        process.stderr.write(`integrity error: ${err.message}\n`);
        process.exit(3);
      } else if (typeof err?.code === "number" && STATUS_NAME[err.code]) {
        process.stderr.write(`grpc error: ${STATUS_NAME[err.code]}: ${err.details || err.message}\n`);
        process.exit(1);
      } else {
        process.stderr.write(`error: ${err?.message ?? err}\n`);
        process.exit(1);
      }
    },
  );
}
