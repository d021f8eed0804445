"""``Client.sample(strength=)``, ``Client.rescale`` and the CLI's ``sample --strength`` and ``rescale``
(the installed ``rulewright`` run as a subprocess) against one live server for the module: the
tiny random DCGAN with version 2, a random edit at strength 0.7 stored directly (no fit)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rulewright.client import Client, RulewrightError
from rulewright.service.engine.delta import to_bytes
from rulewright.service.server.app import create_server
from tests.builders import random_deltas, tiny_domain

EXE = Path(sys.executable).with_name("rulewright")


@pytest.fixture(scope="module")
def live_edit(tmp_path_factory):
    """(address, domain, the edited version's number)."""
    domain = tiny_domain(tmp_path_factory.mktemp("strength-client"))
    base = domain.generator(domain.resolve("tiny/1")).model
    edit = domain.registry.create_version("tiny", parent=1, spec={"strength": 0.7, "description": "random"},
                                          delta=to_bytes(random_deltas(base, seed=3, strength=0.7)))
    server, port = create_server(domain)
    yield f"127.0.0.1:{port}", domain, edit.number
    server.stop(0).wait()
    domain.close()


@pytest.fixture(scope="module")
def client(live_edit):
    with Client(live_edit[0], timeout=60) as c:
        yield c


def rulewright(address: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(EXE), "--address", address, *args], capture_output=True, text=True, timeout=120)


def arrays(images) -> list[np.ndarray]:
    return [im.array for im in images]


def test_client_sample_at_a_strength_equals_the_rescaled_version(client, live_edit):
    _, domain, n = live_edit
    own = client.sample(f"tiny/{n}", [0, 1], format="raw")
    assert [im.strength for im in own] == [0.7, 0.7] and client.sample("tiny/1", [0])[0].strength is None
    at = client.sample(f"tiny/{n}", [0, 1], strength=1.5, format="raw")
    assert {im.strength for im in at} == {1.5} and {im.version for im in at} == {f"models/tiny/versions/{n}"}
    blobs = {b.sha256 for b in domain.registry.store.iter_blobs()}
    v = client.rescale(f"tiny/{n}", 1.5, description="stronger")
    assert {b.sha256 for b in domain.registry.store.iter_blobs()} == blobs       # no fit wrote anything
    assert (v.strength, v.rescaled_from, v.parent_version, v.lineage) == (1.5, n, 1, [1, v.number])
    assert v.spec["description"] == "stronger" and v.spec["strength"] == 1.5
    assert client.version("tiny", v.number).rescaled_from == n
    rescaled = client.sample(f"tiny/{v.number}", [0, 1], format="raw")
    assert all(np.array_equal(a, b) for a, b in zip(arrays(at), arrays(rescaled)))
    assert not np.array_equal(arrays(at)[0], arrays(own)[0])


def test_client_errors_name_strength(client, live_edit):
    n = live_edit[2]
    for call in (lambda: client.sample(f"tiny/{n}", [0], strength=12), lambda: client.rescale("tiny/1", 0.5)):
        with pytest.raises(RulewrightError) as err:
            call()
        assert err.value.code.name == "INVALID_ARGUMENT" and [f for f, _ in err.value.field_violations] == ["strength"]


def test_cli_sample_with_strength_and_rescale(client, live_edit, tmp_path):
    address, _, n = live_edit
    proc = rulewright(address, "sample", f"tiny/{n}", "--seeds", "4-5", "--strength", "-0.5", "--out",
                      str(tmp_path / "at"))
    assert proc.returncode == 0, proc.stderr
    expected = client.sample(f"tiny/{n}", [4], strength=-0.5)[0].png
    assert (tmp_path / "at" / "seed-4.png").read_bytes() == expected
    assert expected != client.sample(f"tiny/{n}", [4])[0].png

    proc = rulewright(address, "rescale", f"tiny/{n}", "-0.5", "--description", "inverted")
    assert proc.returncode == 0, proc.stderr
    number = int(proc.stdout.split("models/tiny/versions/")[1].split()[0])
    assert f"strength -0.5; version {n}'s delta, parent 1, no fit" in proc.stdout
    made = client.version("tiny", number)
    assert (made.strength, made.rescaled_from, made.spec["description"]) == (-0.5, n, "inverted")
    assert client.sample(f"tiny/{number}", [4])[0].png == expected
    shown = rulewright(address, "version", "show", f"tiny/{number}").stdout.splitlines()
    assert "strength: -0.5" in shown and f"rescaled from: tiny/{n} (its edit at this strength, no fit)" in shown

    proc = rulewright(address, "rescale", "tiny/1", "0.5")
    assert proc.returncode == 1 and "strength:" in proc.stderr and "import" in proc.stderr
    proc = rulewright(address, "sample", f"tiny/{n}", "--seeds", "0", "--strength", "99", "--out", str(tmp_path))
    assert proc.returncode == 1 and "strength: must be a number from -10 to 10" in proc.stderr
