"""Materialization (base + deltas along the lineage), export, resident versions, cached statistics."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save as st_save

from rulewright.registry import LocalStatsCache, Registry, errors
from rulewright.registry.errors import Reason
from rulewright.service.domain.statistics import cached_key_moment, moment_key
from rulewright.service.domain.residency import Residency
from rulewright.service.domain.weights import export_bytes, export_to_file, iter_export, materialize
from rulewright.service.engine.delta import LowRankDelta, apply_to_state_dict, to_bytes
from rulewright.service.engine.loading import load_generator
from rulewright.service.engine.stats import key_moment
from tests.builders import dcgan_state


def random_delta(state: dict, layer: str, rank: int, seed: int) -> LowRankDelta:
    """A random rank-``rank`` change of a ConvTranspose2d weight (input axis 0)."""
    g = torch.Generator().manual_seed(seed)
    weight = state[f"{layer}.weight"]
    lam_shape = (rank,) + tuple(weight.shape[1:])
    return LowRankDelta(
        f"{layer}.weight",
        0,
        torch.randn(weight.shape[0], rank, generator=g),
        0.05 * torch.randn(lam_shape, generator=g),
    )


@pytest.fixture
def chain(store):
    """faces/1 (import) → 2 (main.3, rank 2) → 3 (main.6 and main.3 again) ; 4 (main.9) on 1."""
    base = dcgan_state()
    registry = Registry(store)
    model = load_generator(base)
    registry.import_model("faces", arch=model.arch, config=model.config(), weights=st_save(base))
    d2 = [random_delta(base, "main.3", 2, seed=2)]
    d3 = [random_delta(base, "main.6", 1, seed=3), random_delta(base, "main.3", 1, seed=4)]
    d4 = [random_delta(base, "main.9", 1, seed=5)]
    registry.create_version("faces", parent=1, delta=to_bytes(d2), spec={"layer": "main.3"})
    registry.create_version("faces", parent=2, delta=to_bytes(d3), spec={"layer": "main.6"})
    registry.create_version("faces", parent=1, delta=to_bytes(d4), spec={"layer": "main.9"})
    return registry, base, {2: d2, 3: d3, 4: d4}


def test_materialize_is_base_plus_deltas_in_lineage_order(chain):
    registry, base, deltas = chain
    expected3 = apply_to_state_dict(apply_to_state_dict(base, deltas[2]), deltas[3])
    got3 = materialize(registry, "faces", 3)
    assert got3.keys() == base.keys()
    for k in base:
        torch.testing.assert_close(got3[k], expected3[k], rtol=0, atol=0)
    assert not torch.equal(got3["main.3.weight"], base["main.3.weight"])
    torch.testing.assert_close(got3["main.9.weight"], base["main.9.weight"], rtol=0, atol=0)
    got4 = materialize(registry, "faces", 4)  # a sibling branch does not see 2's or 3's edits
    torch.testing.assert_close(got4["main.3.weight"], base["main.3.weight"], rtol=0, atol=0)
    torch.testing.assert_close(got4["main.9.weight"], apply_to_state_dict(base, deltas[4])["main.9.weight"])
    for k in base:
        torch.testing.assert_close(materialize(registry, "faces", 1)[k], base[k], rtol=0, atol=0)


def test_export_round_trips_through_load_generator(chain, tmp_path):
    registry, base, deltas = chain
    state = materialize(registry, "faces", 3)
    data = export_bytes(registry, "faces", 3)
    assert export_bytes(registry, "faces", 3) == data  # deterministic bytes
    assert b"".join(iter_export(registry, "faces", 3, chunk_size=1000)) == data
    size = export_to_file(registry, "faces", 3, tmp_path / "v3.safetensors")
    assert size == len(data) and (tmp_path / "v3.safetensors").read_bytes() == data
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    meta = json.loads(header["__metadata__"]["rulewright"])
    assert (meta["model"], meta["version"], meta["arch"]) == ("faces", 3, "dcgan")
    loaded = load_generator(tmp_path / "v3.safetensors")
    direct = load_generator(state)
    z = torch.randn(2, loaded.z_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(z), direct(z), rtol=0, atol=0)
        assert not torch.allclose(loaded(z), load_generator(base)(z))


def test_residency_reads_only_what_is_missing_and_counts_factors_not_dense_copies(chain, monkeypatch):
    registry, base, _ = chain
    reads: list[str] = []
    real_get = registry.store.get_blob
    monkeypatch.setattr(registry.store, "get_blob", lambda sha: reads.append(sha) or real_get(sha))
    versions = {n: registry.get_version("faces", n) for n in (1, 2, 3, 4)}
    cpu = torch.device("cpu")
    base_bytes = sum(t.numel() * t.element_size() for t in base.values())
    cache = Residency(registry, cpu)
    r2 = cache.get(versions[2])
    assert reads == [versions[1].blobs["weights"].sha256, versions[2].blobs["delta"].sha256]
    reads.clear()
    r3 = cache.get(versions[3])
    assert reads == [versions[3].blobs["delta"].sha256]      # built on resident version 2
    assert r3.model is r2.model and r3.lineage[0] is r2.lineage[0]   # one base; 2's factors shared
    assert cache.get(versions[3]) is r3
    reads.clear()
    r4 = cache.get(versions[4])
    assert reads == [versions[4].blobs["delta"].sha256]      # its base is resident: its own delta only
    factors = sum(r.nbytes() for r in (r2, r4)) + sum(d.nbytes() for d in r3.lineage[1])
    assert cache.nbytes() == base_bytes + factors             # the base once, each delta's factors once
    assert factors < 0.1 * base_bytes
    dense3 = materialize(registry, "faces", 3)
    for k, t in r3.hookable().public_state_dict().items():
        torch.testing.assert_close(t, dense3[k], rtol=0, atol=0)  # hooked work sees the version's weights
    tight = Residency(registry, cpu, budget_bytes=base_bytes + r4.nbytes())
    tight.get(versions[3])
    tight.get(versions[4])
    assert tight.versions() == [("faces", 4)] and tight.nbytes() == base_bytes + r4.nbytes()
    tight.get(versions[1])                                    # the import adds no bytes: its base is held
    assert tight.versions() == [("faces", 4), ("faces", 1)]


def test_corrupt_delta_blob_is_data_loss_when_materializing(chain):
    from tests.registry.test_store_contract import corrupt_blob

    registry, _, _ = chain
    sha = registry.get_version("faces", 2).blobs["delta"].sha256
    corrupt_blob(registry.store, sha, b"garbage")
    with pytest.raises(errors.DataLoss) as info:
        materialize(registry, "faces", 3)
    assert info.value.reason is Reason.BLOB_CORRUPT


def test_a_delta_that_does_not_fit_is_data_loss(file_store):
    registry = Registry(file_store)
    base = dcgan_state()
    registry.import_model("faces", arch="dcgan", config={}, weights=st_save(base))
    wrong = LowRankDelta("main.3.weight", 0, torch.randn(5, 1), torch.randn(1, 16, 4, 4))
    registry.create_version("faces", parent=1, delta=to_bytes([wrong]), spec={})
    with pytest.raises(errors.DataLoss) as info:
        materialize(registry, "faces", 2)
    assert info.value.reason is Reason.MANIFEST_CORRUPT


def test_cached_statistics_are_shared_by_versions_edited_downstream(chain):
    registry, _, _ = chain
    cache = LocalStatsCache()
    models = {n: load_generator(materialize(registry, "faces", n)) for n in (1, 2, 3, 4)}
    seeds = range(8)
    # 3 edits main.6 itself and main.3 (upstream of main.6's keys); 4 edits only main.9 (downstream).
    assert moment_key(models[1], "main.6", seeds) == moment_key(models[4], "main.6", seeds)
    assert moment_key(models[1], "main.6", seeds) != moment_key(models[2], "main.6", seeds)
    assert moment_key(models[2], "main.6", seeds) != moment_key(models[3], "main.6", seeds)
    assert moment_key(models[1], "main.9", seeds) != moment_key(models[3], "main.9", seeds)
    calls = []
    real = cache.get_or_compute

    def spy(key, compute, **kw):
        return real(key, lambda: calls.append(key) or compute(), **kw)

    cache.get_or_compute = spy
    c1 = cached_key_moment(cache, models[1], "main.6", seeds)
    c4 = cached_key_moment(cache, models[4], "main.6", seeds)
    c2 = cached_key_moment(cache, models[2], "main.6", seeds)
    assert len(calls) == 2  # 1 and 4 share the entry
    torch.testing.assert_close(c1.moment(), key_moment(models[1], "main.6", seeds).moment())
    torch.testing.assert_close(c4.moment(), c1.moment())
    assert not torch.allclose(c2.moment(), c1.moment())
    cached_key_moment(cache, models[1], "main.6", seeds, truncation=1.0)
    cached_key_moment(cache, models[1], "main.6", range(9))
    assert len(calls) == 3  # a different sample is a different entry
