#!/usr/bin/env node
// Samples a few seeds of a model and lists its versions and aliases.
//
//   node clients/node/example.js --address 127.0.0.1:50051 [--token T] [--model faces] [--seeds 0,1,2]

import { parseArgs } from 'node:util';

import { createClient, describeOrigin, getModel, listVersions, sample, statusName, timestampToISO } from './index.js';

const USAGE = 'usage: node example.js --address HOST:PORT [--token T] [--model faces] [--seeds 0,1,2] [--tls]';

async function main() {
  const { values } = parseArgs({
    options: {
      address: { type: 'string', default: process.env.RULEWRIGHT_ADDRESS ?? '127.0.0.1:50051' },
      token: { type: 'string', default: process.env.RULEWRIGHT_TOKEN },
      model: { type: 'string', default: 'faces' },
      seeds: { type: 'string', default: '0,1,2' },
      tls: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    console.log(USAGE);
    return 0;
  }
  const seeds = values.seeds.split(',').map((s) => s.trim()).filter(Boolean);
  // Seeds stay strings: int64 values above 2^53 must reach the server exactly.
  if (seeds.length === 0 || !seeds.every((s) => /^\d+$/.test(s))) {
    console.error(`error: --seeds must be comma-separated non-negative integers, got ${JSON.stringify(values.seeds)}`);
    return 2;
  }

  const client = createClient(values.address, { token: values.token, insecure: !values.tls });
  try {
    const { version, images } = await sample(client, values.model, seeds);
    console.log(`sampled ${values.model} -> ${version}`);
    images.forEach((image, i) => {
      const seed = image.seed ?? seeds[i];
      const format = image.format.replace('IMAGE_FORMAT_', '').replace('RAW_RGB8', 'raw RGB8');
      console.log(`seed ${seed}: ${image.width}x${image.height} ${format}, ${image.data.length} bytes`);
    });

    // The sampled reference may be `faces@production` or `faces/3`; versions belong to the model.
    const modelId = values.model.split(/[@/]/)[0];
    const versions = await listVersions(client, modelId);
    console.log(`versions of models/${modelId}:`);
    for (const v of versions) {
      const parent = Number(v.parent_version) ? `parent ${v.parent_version}` : 'no parent';
      const kind = v.kind.replace('KIND_', '').toLowerCase();
      console.log(`  ${v.name}  ${kind}  ${parent}  ${timestampToISO(v.create_time)}  by ${v.author || '?'}`);
      console.log(`    ${describeOrigin(v)}`);
    }

    const model = await getModel(client, modelId);
    console.log(`aliases of models/${modelId}:`);
    if (model.aliases.length === 0) console.log('  (none)');
    for (const a of model.aliases) {
      const alias = a.name.split('/').pop();
      console.log(`  ${alias} -> ${Number(a.version) ? `version ${a.version}` : 'unset'}`);
    }
    return 0;
  } finally {
    client.close();
  }
}

// exitCode rather than exit(): let piped stdout drain before the process ends.
main().then(
  (code) => {
    process.exitCode = code;
  },
  (err) => {
    // A ServiceError carries the status code and the server's own message in `details`.
    if (typeof err?.code === 'number' && 'details' in err) {
      console.error(`error: ${statusName(err.code)}: ${err.details}`);
    } else {
      console.error(`error: ${err?.message ?? err}`);
    }
    process.exitCode = 1;
  },
);
