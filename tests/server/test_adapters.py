"""Adapters through real servers: exported from one, imported into another holding the same base
weights in its own data dir (pixels equal), refused on another base or when malformed (nothing
stored), the CLI's round trip as a subprocess, and the plain-PyTorch snippet of docs/adapters.md
run against ``export``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load, load_file, save, save_file

from rulewright.client import Client, RulewrightError
from rulewright.service.domain.core import Domain
from rulewright.service.domain.requests import RewriteRequest
from rulewright.service.server.app import create_server
from tests.builders import TINY_SPEC, dcgan_state, tiny_domain

REPO = Path(__file__).resolve().parents[2]
EXE = Path(sys.executable).with_name("rulewright")
# A draft fit: few steps and a given strength (no strength curve to measure).
DRAFT = {**TINY_SPEC, "steps": 20, "strength": 0.8}
SEEDS = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """(address of A, address of B, folder): A holds tiny 1 ← 2 ← 3 (two stacked edits); B, in a
    data dir of its own, holds tiny imported from A's export of version 1, and ``other`` (another base)."""
    tmp = tmp_path_factory.mktemp("adapters")
    (tmp / "a").mkdir()
    a = tiny_domain(tmp / "a")
    a.rewrite(RewriteRequest("tiny/1", DRAFT))
    a.rewrite(RewriteRequest("tiny/2", {**DRAFT, "strength": 1.2, "paste": [{"seed": 3, "box": [0, 0, 8, 8]}]}))
    b = Domain.open(tmp / "b", device="cpu", max_resident=4)
    running = [create_server(d) for d in (a, b)]
    addresses = [f"127.0.0.1:{port}" for _, port in running]
    other = tmp / "other.safetensors"
    save_file({k: v.contiguous() for k, v in dcgan_state(z_dim=16, widths=(32, 16, 8, 3), seed=1).items()},
              str(other))
    with Client(addresses[0]) as ca, Client(addresses[1]) as cb:
        ca.export("tiny", 1, tmp / "base.safetensors")       # the same tensors in other bytes than A imported
        cb.import_model("tiny", tmp / "base.safetensors", arch="dcgan", config={})
        cb.import_model("other", other, arch="dcgan", config={})
    yield addresses[0], addresses[1], tmp
    for (server, _), domain in zip(running, (a, b)):
        server.stop(0).wait()
        domain.close()


@pytest.fixture(scope="module")
def clients(servers):
    with Client(servers[0]) as a, Client(servers[1]) as b:
        yield a, b


@pytest.fixture(scope="module")
def adapter(servers, clients):
    """A's version 3 exported as an adapter: (path, AdapterExport)."""
    path = servers[2] / "v3.adapter.safetensors"
    return path, clients[0].export_adapter("tiny/3", path)


def _png(client: Client, ref: str) -> list[bytes]:
    return [im.png for im in client.sample(ref, SEEDS)]


def _refused(call) -> RulewrightError:
    with pytest.raises(RulewrightError) as err:
        call()
    return err.value


def test_the_imported_version_draws_what_the_exported_one_drew(clients, adapter):
    a, b = clients
    path, done = adapter
    assert done.version.name == "models/tiny/versions/3" and len(done.base_fingerprint) == 64
    meta = _metadata(path)
    assert meta["base_fingerprint"] == done.base_fingerprint
    assert [e["version"] for e in json.loads(meta["edits"])] == [2, 3]             # every edit below the import
    assert json.loads(meta["strength"]) == 1.2 and json.loads(meta["spec"])["strength"] == 1.2

    version = b.import_adapter("tiny", path, description="from A")
    assert version.kind == "edit" and version.lineage == [1, version.number]     # one edit, on B's import
    assert version.spec["description"] == "from A" and version.spec["paste"] == a.version("tiny", 3).spec["paste"]
    assert version.adapter == {"source_version": "models/tiny/versions/3", "source_lineage": [1, 2, 3],
                               "base_fingerprint": done.base_fingerprint, "sha256": done.sha256}
    assert b.version("tiny", version.number).adapter == version.adapter          # recorded, not only returned
    assert _png(b, f"tiny/{version.number}") == _png(a, "tiny/3")
    assert _png(b, f"tiny/{version.number}") != _png(b, "tiny/1")                # the edit changes pictures


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_a_retry_with_the_same_request_id_returns_the_first_version(clients, adapter):
    b = clients[1]
    first = b.import_adapter("tiny", adapter[0], request_id="adapter-once")
    again = b.import_adapter("tiny", adapter[0], request_id="adapter-once")
    assert again.number == first.number


def test_stacked_on_a_named_version(clients, adapter):
    b = clients[1]
    onto = b.import_adapter("tiny", adapter[0])
    stacked = b.import_adapter(f"tiny/{onto.number}", adapter[0])
    assert stacked.lineage == [1, onto.number, stacked.number]


def test_another_base_is_refused_before_anything_is_stored(clients, adapter):
    b = clients[1]
    before = [v.number for v in b.versions("other")]
    err = _refused(lambda: b.import_adapter("other", adapter[0]))
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION and err.reason == "BASE_MISMATCH"
    assert err.metadata["field"] == "metadata.parent" and err.metadata["expected"] == adapter[1].base_fingerprint
    assert err.metadata["found"] != adapter[1].base_fingerprint and "fingerprint" in err.message
    assert [v.number for v in b.versions("other")] == before


def _tampered(path: Path, out: Path, **changes) -> Path:
    """The adapter with metadata keys replaced (None: removed) and tensors dropped (``drop``)."""
    meta, tensors = _metadata(path), load(path.read_bytes())
    for name in changes.pop("drop", ()):
        del tensors[name]
    for key, value in changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    out.write_bytes(save(tensors, metadata=meta))
    return out


def test_malformed_files_name_what_is_wrong_and_store_nothing(clients, adapter, tmp_path):
    b = clients[1]
    path = adapter[0]
    parts = json.loads(_metadata(path)["parts"])
    wrong_shape = json.dumps([{**parts[0], "weight_shape": [1, 2, 3, 4]}] + parts[1:])
    unknown_layer = json.dumps([{**parts[0], "weight_key": "main.99.weight"}] + parts[1:])
    cases = {
        "adapter.format": _tampered(path, tmp_path / "f", format="something/2"),
        "adapter.base_fingerprint": _tampered(path, tmp_path / "g", base_fingerprint=None),
        "adapter.parts[0].weight_shape": _tampered(path, tmp_path / "s", parts=wrong_shape),
        "adapter.parts[0].weight_key": _tampered(path, tmp_path / "k", parts=unknown_layer),
        "adapter.parts[1]": _tampered(path, tmp_path / "m", drop=["parts.1.lambda"]),
        "adapter.spec.rank": _tampered(path, tmp_path / "r", spec=json.dumps({**json.loads(_metadata(path)["spec"]),
                                                                             "rank": "high"})),
    }
    (tmp_path / "junk").write_bytes(b"not an adapter at all")
    cases["adapter"] = tmp_path / "junk"
    before = [v.number for v in b.versions("tiny")]
    for field, bad in cases.items():
        err = _refused(lambda: b.import_adapter("tiny", bad))
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT, (field, err)
        assert [f for f, _ in err.field_violations] == [field], (field, err)
    assert [v.number for v in b.versions("tiny")] == before


def test_an_import_has_no_adapter(clients, tmp_path):
    err = _refused(lambda: clients[0].export_adapter("tiny/1", tmp_path / "x"))
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION and err.reason == "NOT_AN_EDIT"
    assert not (tmp_path / "x").exists()


def test_cli_round_trip(servers, clients, tmp_path):
    file = tmp_path / "cli.safetensors"

    def rw(address: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(EXE), "--address", address, "adapter", *args], capture_output=True, text=True,
                              timeout=120, check=False)

    out = rw(servers[0], "export", "tiny/3", str(file))
    assert out.returncode == 0 and "models/tiny/versions/3" in out.stdout and file.exists(), out.stderr
    out = rw(servers[1], "import", "tiny", str(file), "--description", "by the CLI")
    assert out.returncode == 0, out.stderr
    name = re.match(r"(models/tiny/versions/\d+) \(from models/tiny/versions/3\)", out.stdout)
    assert name, out.stdout
    number = int(name.group(1).rsplit("/", 1)[1])
    assert clients[1].version("tiny", number).spec["description"] == "by the CLI"
    assert _png(clients[1], f"tiny/{number}") == _png(clients[0], "tiny/3")
    shown = subprocess.run([str(EXE), "--address", servers[1], "version", "show", f"tiny/{number}"],
                           capture_output=True, text=True, timeout=120, check=False).stdout.splitlines()
    assert any(line.startswith("adapter: from models/tiny/versions/3 (base ") for line in shown), shown
    out = rw(servers[1], "import", "other", str(file))
    assert out.returncode == 1 and "fingerprint" in out.stderr
    out = rw(servers[1], "export", "Not A Ref", str(tmp_path / "y"))
    assert out.returncode == 2 and "argument ref" in out.stderr


def test_references_by_alias(clients, tmp_path):
    a = clients[0]
    a.set_alias("tiny", "staging", 3)
    assert a.export_adapter("tiny@staging", tmp_path / "s").version.number == 3
    err = _refused(lambda: a.export_adapter("tiny", tmp_path / "p"))      # production: the import
    assert err.reason == "NOT_AN_EDIT"


def test_a_bare_name_exports_the_servers_default_alias(tmp_path):
    """``export_adapter("tiny")`` is whatever the server's default alias (here ``stable``) points
    at, as a bare name is everywhere: the server resolves it, the client does not guess."""
    domain = tiny_domain(tmp_path)
    domain.default_alias = "stable"
    number = domain.rewrite(RewriteRequest("tiny/1", DRAFT)).version.number
    domain.registry.set_alias("tiny", "stable", number, expected_version=None)
    server, port = create_server(domain)
    try:
        with Client(f"127.0.0.1:{port}") as c:
            assert c.export_adapter("tiny", tmp_path / "a.safetensors").version.number == number
            with pytest.raises(ValueError):
                c.export_adapter("Not A Ref", tmp_path / "b.safetensors")      # refused before any call
    finally:
        server.stop(0).wait()
        domain.close()


def test_the_documented_snippet_applies_an_adapter_to_the_exported_base(clients, adapter, tmp_path):
    """docs/adapters.md's code, run as written: the base export plus the adapter is the edited export."""
    a = clients[0]
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "adapters.md").read_text(), re.S)
    namespace: dict = {}
    snippets = [b for b in blocks if "Client(" not in b]       # the client's usage needs two servers
    assert len(snippets) == 2
    for block in snippets:
        exec(compile(block, "docs/adapters.md", "exec"), namespace)
    a.export("tiny", 1, tmp_path / "base.safetensors")
    a.export("tiny", 3, tmp_path / "edited.safetensors")
    namespace["apply_adapter"](str(tmp_path / "base.safetensors"), str(adapter[0]), str(tmp_path / "out.safetensors"))
    ours, theirs = load_file(tmp_path / "out.safetensors"), load_file(tmp_path / "edited.safetensors")
    assert set(ours) == set(theirs)
    for key in theirs:
        assert torch.allclose(ours[key], theirs[key], rtol=0, atol=1e-6), key      # the page's stated tolerance
    changed = [k for k in theirs if not torch.equal(theirs[k], load_file(tmp_path / "base.safetensors")[k])]
    assert changed, "the edit changed no weight"
    assert namespace["fingerprint"](load_file(tmp_path / "base.safetensors")) == adapter[1].base_fingerprint
