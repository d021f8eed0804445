// A small Node.js client of the rulewright gRPC API (GeneratorService, RegistryService, and
// dataset and statistics jobs through JobService and google.longrunning.Operations).
//
// The .proto files under protos/ are loaded at runtime with @grpc/proto-loader, so this client
// never drifts from the API it is checked out with and needs no code generation step.

import { readdirSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import protobuf from 'protobufjs';

const here = dirname(fileURLToPath(import.meta.url));

/** The root the .proto files import each other from (`rulewright/v1/...`). */
export const PROTO_ROOT = resolve(here, '..', '..', 'protos');

/** Default deadline of a call, in milliseconds. */
export const DEFAULT_TIMEOUT_MS = 30_000;

/** Options every load uses; exported so that callers decoding messages see the same shapes. */
export const LOADER_OPTIONS = Object.freeze({
  keepCase: true, // field names as the .proto spells them (parent_version, create_time)
  longs: String, // int64 seeds reach 2^63: a Number would round them silently
  enums: String, // 'KIND_EDIT' rather than 2
  bytes: Buffer,
  defaults: true, // absent scalars read as their zero value, as in every other language
  oneofs: true, // a virtual field names which member of a oneof is set
  includeDirs: [PROTO_ROOT],
});

let cachedRoot;
let cachedTypes;

function protoFiles() {
  return readdirSync(join(PROTO_ROOT, 'rulewright', 'v1'))
    .filter((f) => f.endsWith('.proto'))
    .sort()
    .map((f) => `rulewright/v1/${f}`);
}

/**
 * Every package the .proto files define (`rulewright.v1`, `google.longrunning`), loaded once.
 * @returns {grpc.GrpcObject}
 */
export function loadRoot() {
  if (!cachedRoot) {
    cachedRoot = grpc.loadPackageDefinition(protoLoader.loadSync(protoFiles(), LOADER_OPTIONS));
  }
  return cachedRoot;
}

/**
 * The `rulewright.v1` package: service constructors and message types, loaded once.
 * @returns {grpc.GrpcObject}
 */
export function loadPackage() {
  return loadRoot().rulewright.v1;
}

/**
 * Decodes a google.protobuf.Any (an Operation's metadata or response) into a plain object, with
 * the same conventions as every other message here (keepCase, int64 as strings, enum names).
 * @param {{type_url: string, value: Buffer}} any
 * @returns {object|null} null when unset
 */
export function unpackAny(any) {
  if (!any || !any.type_url) return null;
  if (!cachedTypes) {
    cachedTypes = new protobuf.Root();
    cachedTypes.resolvePath = (_origin, target) => join(PROTO_ROOT, target);
    cachedTypes.loadSync(protoFiles(), { keepCase: true });
  }
  const type = cachedTypes.lookupType(any.type_url.slice(any.type_url.lastIndexOf('/') + 1));
  return type.toObject(type.decode(any.value), { longs: String, enums: String, defaults: true, oneofs: true });
}

/**
 * Attaches `authorization: Bearer <token>` to every call. An interceptor rather than call
 * credentials because grpc-js refuses call credentials on an insecure channel, and a loopback
 * server with auth on still wants the token.
 * @param {string} token
 * @returns {grpc.Interceptor}
 */
function bearerInterceptor(token) {
  return (options, nextCall) =>
    new grpc.InterceptingCall(nextCall(options), {
      start(metadata, listener, next) {
        metadata.set('authorization', `Bearer ${token}`);
        next(metadata, listener);
      },
    });
}

/**
 * @typedef {object} ClientOptions
 * @property {string} [token] bearer token sent with every call
 * @property {boolean} [insecure=true] plaintext; false: TLS with the system roots (or rootCerts)
 * @property {Buffer} [rootCerts] PEM roots to verify the server with, when not insecure
 * @property {number} [timeoutMs] deadline of each helper call (default 30 s)
 */

/**
 * @typedef {object} Client
 * @property {grpc.Client & Record<string, Function>} generator GeneratorService stub
 * @property {grpc.Client & Record<string, Function>} registry RegistryService stub
 * @property {grpc.Client & Record<string, Function>} jobs JobService stub
 * @property {grpc.Client & Record<string, Function>} operations google.longrunning.Operations stub
 * @property {number} timeoutMs deadline of each helper call
 * @property {() => void} close closes both channels
 */

/**
 * Stubs of both services on one address.
 * @param {string} address host:port
 * @param {ClientOptions} [options]
 * @returns {Client}
 */
export function createClient(address, { token, insecure = true, rootCerts, timeoutMs = DEFAULT_TIMEOUT_MS } = {}) {
  const pkg = loadPackage();
  const channelOptions = {
    // Sample responses carry images; the server allows more than grpc-js's 4 MiB default.
    'grpc.max_receive_message_length': 64 * 1024 * 1024,
  };
  const interceptors = [];
  let credentials;
  if (insecure) {
    credentials = grpc.credentials.createInsecure();
    if (token) interceptors.push(bearerInterceptor(token));
  } else {
    credentials = grpc.credentials.createSsl(rootCerts ?? null);
    if (token) {
      const call = grpc.credentials.createFromMetadataGenerator((_params, callback) => {
        const md = new grpc.Metadata();
        md.set('authorization', `Bearer ${token}`);
        callback(null, md);
      });
      credentials = grpc.credentials.combineChannelCredentials(credentials, call);
    }
  }
  const generator = new pkg.GeneratorService(address, credentials, { ...channelOptions, interceptors });
  // A second stub on the same channel: one connection for both services.
  const shared = { ...channelOptions, interceptors, channelOverride: generator.getChannel() };
  const registry = new pkg.RegistryService(address, credentials, shared);
  const jobs = new pkg.JobService(address, credentials, shared);
  const operations = new (loadRoot().google.longrunning.Operations)(address, credentials, shared);
  return {
    generator,
    registry,
    jobs,
    operations,
    timeoutMs,
    close() {
      generator.close();
    },
  };
}

/**
 * Calls a unary method with a deadline, as a promise; rejects with the grpc-js ServiceError
 * (`code`, `details`, `metadata`).
 * @param {grpc.Client & Record<string, Function>} stub
 * @param {string} method
 * @param {object} request
 * @param {number} timeoutMs
 * @returns {Promise<any>}
 */
export function unary(stub, method, request, timeoutMs = DEFAULT_TIMEOUT_MS) {
  return new Promise((resolvePromise, reject) => {
    const deadline = new Date(Date.now() + timeoutMs);
    stub[method](request, new grpc.Metadata(), { deadline }, (err, response) =>
      err ? reject(err) : resolvePromise(response),
    );
  });
}

/**
 * @typedef {object} Image
 * @property {'IMAGE_FORMAT_PNG'|'IMAGE_FORMAT_RAW_RGB8'} format
 * @property {number} width pixels
 * @property {number} height pixels
 * @property {Buffer} data the encoded pixels
 * @property {string} [seed] decimal int64; absent for an image rendered from raw latents
 */

/**
 * Renders seeds.
 * @param {Client} client
 * @param {string} model model reference: `faces` (the server's default alias, `production` unless
 *   configured otherwise), `faces@staging` (an alias) or `faces/3` (a version)
 * @param {Array<number|string|bigint>} seeds each 0 <= seed < 2^63
 * @param {{format?: 'png'|'raw'|string, truncation?: number, strength?: number}} [options] `strength`:
 *   the version's own edit drawn at that strength (-10 to 10; default: the version's own), no fit
 * @returns {Promise<{version: string, images: Image[], strength: number|null}>} `version`: the version
 *   the reference resolved to, `models/{model}/versions/{n}`; `strength`: its own edit's strength as
 *   drawn (null for an import)
 */
export async function sample(client, model, seeds, { format = 'png', truncation, strength } = {}) {
  const image_format =
    { png: 'IMAGE_FORMAT_PNG', raw: 'IMAGE_FORMAT_RAW_RGB8' }[String(format).toLowerCase()] ?? format;
  const request = { model, seeds: seeds.map(String), image_format };
  if (truncation !== undefined) request.truncation = truncation;
  if (strength !== undefined) request.strength = strength;
  const response = await unary(client.generator, 'Sample', request, client.timeoutMs);
  // The image's own width and height fields, not the PNG header: they also hold for raw RGB.
  // An optional field is set when its synthetic oneof names it.
  const drawn = response._strength === 'strength' ? response.strength : null;
  return { version: response.version, images: response.images, strength: drawn };
}

/**
 * Every item of a paginated List method, following next_page_token.
 * @param {Client} client
 * @param {string} method
 * @param {object} request
 * @param {string} field the repeated field of the response
 */
async function listAll(client, method, request, field) {
  const items = [];
  let page_token = '';
  do {
    const response = await unary(client.registry, method, { ...request, page_token }, client.timeoutMs);
    items.push(...response[field]);
    page_token = response.next_page_token;
  } while (page_token);
  return items;
}

/**
 * A model's live versions, oldest first.
 * @param {Client} client
 * @param {string} model the model id (`faces`) or its resource name (`models/faces`)
 * @returns {Promise<object[]>} rulewright.v1.Version messages
 */
export function listVersions(client, model) {
  const parent = model.startsWith('models/') ? model : `models/${model}`;
  return listAll(client, 'ListVersions', { parent }, 'versions');
}

/**
 * Every registered model, with its aliases, in name order.
 * @param {Client} client
 * @returns {Promise<object[]>} rulewright.v1.Model messages
 */
export function listModels(client) {
  return listAll(client, 'ListModels', {}, 'models');
}

/**
 * One model, with its aliases.
 * @param {Client} client
 * @param {string} model the model id or its resource name
 * @returns {Promise<object>} a rulewright.v1.Model message
 */
export function getModel(client, model) {
  const name = model.startsWith('models/') ? model : `models/${model}`;
  return unary(client.registry, 'GetModel', { name }, client.timeoutMs);
}

/**
 * A region of an edit spec as text: `seed [x0,y0,x1,y1]`, or `seed (mask WxH)`.
 * @param {{seed: string, box: number[], mask?: {width: number, height: number}|null}} region
 */
function regionText(region) {
  return region.box.length ? `${region.seed} [${region.box.join(',')}]` : `${region.seed} (mask ${region.mask.width}x${region.mask.height})`;
}

/**
 * How a version was made, in one line: an edit's op, layer and regions (its structured `spec`,
 * rulewright.v1.EditSpec), or where an import's weights came from (`source_json`).
 * @param {object} version a rulewright.v1.Version message
 * @returns {string}
 */
export function describeOrigin(version) {
  if (version.origin !== 'spec') return `imported from ${version.source_json || '{}'}`;
  const spec = version.spec;
  const parts = [`${spec.op || 'rewrite'} layer ${spec.layer || '(default)'}`];
  if (spec.copy) parts.push(`copy ${regionText(spec.copy)}`);
  if (spec.paste.length) parts.push(`paste ${spec.paste.map(regionText).join('; ')}`);
  if (spec.context.length) parts.push(`context ${spec.context.map(regionText).join('; ')}`);
  return parts.join(', ');
}

/**
 * A google.protobuf.Timestamp as an ISO 8601 string ('' when unset).
 * @param {{seconds: string, nanos: number} | null | undefined} ts
 */
export function timestampToISO(ts) {
  if (!ts) return '';
  return new Date(Number(ts.seconds) * 1000 + Math.floor(ts.nanos / 1e6)).toISOString();
}

/**
 * The canonical name of a gRPC status code (5 -> 'NOT_FOUND').
 * @param {number} code
 */
export function statusName(code) {
  return Object.keys(grpc.status).find((k) => grpc.status[k] === code) ?? String(code);
}

export { grpc };

/**
 * @typedef {object} Job
 * @property {string} name the operation's name, `operations/{id}`
 * @property {boolean} done whether it has stopped (succeeded, cancelled or failed)
 * @property {object} metadata DatasetJobMetadata or StatisticsJobMetadata: state, shards_done, ...
 * @property {object|null} response DatasetJob or StatisticsJob once it succeeded
 * @property {object|null} error google.rpc.Status ({code, message}) once it failed or was cancelled
 */

/**
 * An Operation with its metadata and response decoded.
 * @param {object} op google.longrunning.Operation
 * @returns {Job}
 */
export function operationToJob(op) {
  return {
    name: op.name,
    done: op.done,
    metadata: unpackAny(op.metadata),
    response: op.result === 'response' ? unpackAny(op.response) : null,
    error: op.result === 'error' ? op.error : null,
  };
}

function operationName(name) {
  return name.startsWith('operations/') ? name : `operations/${name}`;
}

/**
 * Starts a dataset job: WebDataset shards of one version for `count` seeds from `start`.
 * @param {Client} client
 * @param {string} model model reference (resolved once, at creation)
 * @param {{start?: number|string, count: number, shardSize?: number, truncation?: number, requestId?: string}} options
 * @returns {Promise<Job>}
 */
export async function createDatasetJob(
  client,
  model,
  { start = 0, count, shardSize = 1000, truncation, requestId = '' },
) {
  const seeds = { start: String(start), count: String(count) };
  return createJob(client, 'CreateDatasetJob', { model, seeds }, { shardSize, truncation, requestId });
}

/**
 * Starts a statistics job: a layer's key moment over `samples` seeds from `seedStart`, merged into
 * the statistics cache where a rewrite whose stats name the same samples finds it.
 * @param {Client} client
 * @param {string} model model reference (resolved once, at creation)
 * @param {{samples: number, seedStart?: number|string, layer?: string, shardSize?: number, truncation?: number, requestId?: string}} options
 * @returns {Promise<Job>}
 */
export async function createStatisticsJob(
  client,
  model,
  { samples, seedStart = 0, layer = '', shardSize = 10_000, truncation, requestId = '' },
) {
  const stats = { samples: String(samples), seed_start: String(seedStart) };
  return createJob(client, 'CreateStatisticsJob', { model, layer, stats }, { shardSize, truncation, requestId });
}

// The fields every job's create shares, added to what names the work; the job as created.
async function createJob(client, method, work, { shardSize, truncation, requestId }) {
  const request = { ...work, shard_size: shardSize, request_id: requestId };
  if (truncation !== undefined) request.truncation = truncation;
  return operationToJob(await unary(client.jobs, method, request, client.timeoutMs));
}

/**
 * A job (of either kind) as it stands.
 * @param {Client} client
 * @param {string} name `operations/{id}` or the bare id
 * @returns {Promise<Job>}
 */
export async function getJob(client, name) {
  const op = await unary(client.operations, 'GetOperation', { name: operationName(name) }, client.timeoutMs);
  return operationToJob(op);
}

/**
 * Asks a job to stop between shards.
 * @param {Client} client
 * @param {string} name `operations/{id}` or the bare id
 * @returns {Promise<Job>} the job as it stands after the request
 */
export async function cancelJob(client, name) {
  await unary(client.operations, 'CancelOperation', { name: operationName(name) }, client.timeoutMs);
  return getJob(client, name);
}

/**
 * The job once it is done, by WaitOperation calls of up to `pollMs` each (bounded by `timeoutMs`
 * in all); the last state seen if the time runs out. `onProgress` hears every state on the way.
 * @param {Client} client
 * @param {string} name `operations/{id}` or the bare id
 * @param {{timeoutMs?: number, pollMs?: number, onProgress?: (job: Job) => void}} [options]
 * @returns {Promise<Job>}
 */
export async function waitJob(client, name, { timeoutMs = 600_000, pollMs = 2_000, onProgress } = {}) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const wait = Math.max(0, Math.min(pollMs, deadline - Date.now()));
    const timeout = { seconds: String(Math.floor(wait / 1000)), nanos: (wait % 1000) * 1e6 };
    const request = { name: operationName(name), timeout };
    const job = operationToJob(await unary(client.operations, 'WaitOperation', request, wait + client.timeoutMs));
    if (onProgress) onProgress(job);
    if (job.done || Date.now() >= deadline) return job;
  }
}
