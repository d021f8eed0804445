"""The Node.js client (clients/node) against a live server: its example samples and lists versions."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from rulewright.service.domain.requests import RewriteRequest
from tests.builders import TINY_SPEC
from tests.support import missing

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "node"
EXAMPLE = CLIENT / "example.js"


@pytest.fixture(scope="module")
def node() -> str:
    binary = shutil.which("node")
    if binary is None:
        missing("node")
    # `make test` runs `npm ci --prefix clients/node` first; the test never installs anything.
    for package in ("@grpc/grpc-js", "@grpc/proto-loader"):
        if not (CLIENT / "node_modules" / package / "package.json").is_file():
            missing(f"clients/node/node_modules ({package}; run `npm ci --prefix clients/node`)")
    return binary


def run_example(node: str, address: str, *args: str) -> subprocess.CompletedProcess:
    # Run from the repository root, as the README does, so the example must find protos/ by
    # its own location rather than the working directory.
    return subprocess.run([node, str(EXAMPLE), "--address", address, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_example_prints_sizes_versions_and_aliases(node, live):
    address, domain = live
    edit = domain.rewrite(RewriteRequest("tiny", TINY_SPEC))
    edited = f"models/tiny/versions/{edit.version.number}"

    proc = run_example(node, address, "--model", "tiny", "--seeds", "0,1,2")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout

    images = re.findall(r"^seed (\d+): (\d+)x(\d+) PNG, (\d+) bytes$", out, re.M)
    assert [seed for seed, *_ in images] == ["0", "1", "2"], out
    # The tiny DCGAN (four transposed convolutions from 1x1) renders 32x32.
    assert all((w, h) == ("32", "32") for _, w, h, _ in images), out
    # A real PNG of 32x32 RGB is well over its 8-byte signature and 25-byte IHDR.
    assert all(int(n) > 50 for *_, n in images), out

    # The bare reference means the production alias: still the import, not the newer edit.
    assert "sampled tiny -> models/tiny/versions/1" in out

    versions = re.findall(r"^  (models/tiny/versions/\d+)  (\w+)  (.+?)  (\S+)  by (.+)$", out, re.M)
    names = [name for name, *_ in versions]
    assert names == ["models/tiny/versions/1", edited], out
    (_, kind1, parent1, time1, _), (_, kind2, parent2, time2, _) = versions
    assert (kind1, parent1) == ("import", "no parent")
    assert (kind2, parent2) == ("edit", "parent 1")
    # Each version's origin, read from its structured spec (an edit) or source_json (an import).
    origins = re.findall(r"^    (.+)$", out, re.M)
    assert origins[0].startswith("imported from {") and origins[1] == "rewrite layer main.6, copy 1 [8,8,16,16], " \
        "paste 2 [8,8,16,16]", out
    # Timestamps are decoded from google.protobuf.Timestamp, not printed as "[object Object]".
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", time2), time2
    assert time1 <= time2

    # The alias bootstrap set still points at version 1: the edit did not move it.
    assert re.search(r"^aliases of models/tiny:\n  production -> version 1$", out, re.M), out


def test_example_seeds_above_2_53_round_trip(node, live):
    address, _ = live
    # 2^53 + 1 is the first integer a JavaScript Number cannot hold; it must not come back as 2^53.
    seed = str(2**53 + 1)
    proc = run_example(node, address, "--model", "tiny", "--seeds", seed)
    assert proc.returncode == 0, proc.stderr
    assert re.search(rf"^seed {seed}: 32x32 PNG, \d+ bytes$", proc.stdout, re.M), proc.stdout


def test_example_unknown_model_exits_with_the_servers_message(node, live):
    address, _ = live
    proc = run_example(node, address, "--model", "nosuchmodel", "--seeds", "0")
    assert proc.returncode != 0
    assert "NOT_FOUND" in proc.stderr, proc.stderr
    # The server's own message, naming what was not found, not just the status code.
    assert "nosuchmodel" in proc.stderr, proc.stderr
    # Nothing was sampled before the failure.
    assert "seed " not in proc.stdout


def test_example_unreachable_server_fails_within_its_deadline(node):
    from tests.support import free_port

    # Nothing listens there: the call must fail (UNAVAILABLE), not hang until the test times out.
    proc = run_example(node, f"127.0.0.1:{free_port()}", "--model", "tiny", "--seeds", "0")
    assert proc.returncode != 0
    assert "UNAVAILABLE" in proc.stderr, proc.stderr


def test_example_sends_its_token(node, tmp_path):
    from rulewright.service.server import auth
    from rulewright.service.server.app import create_server
    from tests.builders import tiny_domain

    reader = "rd-node-5c1e0a9b"
    domain = tiny_domain(tmp_path)
    server, port = create_server(domain, tokens=auth.parse_tokens(f"{reader} reader alice\n"))
    try:
        address = f"127.0.0.1:{port}"
        # The token travels as call metadata even on a plaintext channel, where grpc-js refuses
        # call credentials: without it the server turns the client away.
        proc = run_example(node, address, "--model", "tiny", "--seeds", "0", "--token", reader)
        assert proc.returncode == 0, proc.stderr
        assert re.search(r"^seed 0: 32x32 PNG", proc.stdout, re.M), proc.stdout

        proc = run_example(node, address, "--model", "tiny", "--seeds", "0")
        assert proc.returncode != 0
        assert "UNAUTHENTICATED" in proc.stderr, proc.stderr
    finally:
        server.stop(0).wait()
        domain.close()


JOBS_SCRIPT = """
import { pathToFileURL } from 'node:url';
const rw = await import(pathToFileURL(process.argv[1]).href);
const client = rw.createClient(process.argv[2]);
try {
  const data = await rw.createDatasetJob(client, 'tiny', { start: 0, count: 4, shardSize: 2, requestId: 'node-data' });
  const stats = await rw.createStatisticsJob(client, 'tiny', { samples: 2048, layer: 'main.6', shardSize: 1024 });
  const seen = [];
  const done = await rw.waitJob(client, stats.name, { timeoutMs: 60_000, pollMs: 500, onProgress: (j) => seen.push(j) });
  const dataDone = await rw.waitJob(client, data.name, { timeoutMs: 60_000, pollMs: 500 });
  console.log(JSON.stringify({ data, stats, done, dataDone, progressCalls: seen.length,
                               got: await rw.getJob(client, data.name.split('/')[1]) }));
  try {
    await rw.createStatisticsJob(client, 'tiny', { samples: 0 });
  } catch (err) {
    console.error(`refused ${rw.statusName(err.code)}: ${err.details}`);
  }
} finally {
  client.close();
}
"""


def test_node_client_runs_dataset_and_statistics_jobs(node, live):
    import json

    address, _ = live
    proc = subprocess.run([node, "--input-type=module", "-e", JOBS_SCRIPT, str(CLIENT / "index.js"), address],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["data"]["name"].startswith("operations/") and out["data"]["metadata"]["images_total"] == "4"
    assert out["stats"]["metadata"]["shards_total"] == 2 and out["stats"]["metadata"]["layer"] == "main.6"
    done = out["done"]
    assert done["done"] and done["metadata"]["state"] == "STATE_SUCCEEDED" and done["error"] is None
    assert done["response"]["stats"]["samples"] == "2048" and '"samples":2048' in done["response"]["cache_key"]
    assert out["progressCalls"] >= 1
    assert out["dataDone"]["response"]["shards"][1]["first_seed"] == "2"
    assert out["got"]["name"] == out["data"]["name"] and out["got"]["metadata"]["shards_done"] == 2
    assert "refused INVALID_ARGUMENT" in proc.stderr and "stats.samples" in proc.stderr


def test_sample_takes_a_strength_as_the_python_client_does(node, live, tmp_path):
    """``sample(client, ref, seeds, {strength})`` draws the version's own edit at that strength: the
    same PNG bytes as the Python client's, and the strength drawn comes back (null for an import)."""
    from rulewright.client import Client

    address, domain = live
    n = domain.rewrite(RewriteRequest("tiny/1", {**TINY_SPEC, "steps": 20, "strength": 0.5})).version.number
    script = tmp_path / "strength.mjs"
    script.write_text(f"""
import {{ createClient, sample }} from {str((CLIENT / 'index.js').as_uri())!r};
const client = createClient({address!r});
const at = await sample(client, 'tiny/{n}', [3], {{ strength: 1.5 }});
const own = await sample(client, 'tiny/{n}', [3]);
const base = await sample(client, 'tiny/1', [3]);
console.log(JSON.stringify([at.strength, own.strength, base.strength, Buffer.from(at.images[0].data).toString('hex')]));
client.close();
""")
    proc = subprocess.run([node, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import json

    at, own, base, png = json.loads(proc.stdout)
    assert (at, own, base) == (1.5, 0.5, None)
    with Client(address) as py:
        assert bytes.fromhex(png) == py.sample(f"tiny/{n}", [3], strength=1.5)[0].png
        assert bytes.fromhex(png) != py.sample(f"tiny/{n}", [3])[0].png
