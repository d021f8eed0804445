"""The Node.js client (clients/node) against a live server: its example samples and lists versions."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from rulewright.service.requests import RewriteRequest
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

    # The bare reference resolves to the newest version: the edit, not the import.
    assert f"sampled tiny -> {edited}" in out

    versions = re.findall(r"^  (models/tiny/versions/\d+)  (\w+)  (.+?)  (\S+)  by (.+)$", out, re.M)
    names = [name for name, *_ in versions]
    assert names == ["models/tiny/versions/1", edited], out
    (_, kind1, parent1, time1, _), (_, kind2, parent2, time2, _) = versions
    assert (kind1, parent1) == ("import", "no parent")
    assert (kind2, parent2) == ("edit", "parent 1")
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
