"""The domain layer over a real filesystem registry: references, residency, sampling, rewrites."""

from __future__ import annotations

import pytest
import torch

from rulewright.service.engine.edit import render_edited
from rulewright.service.engine.errors import Cancelled
from rulewright.service.engine.progress import Progress
from rulewright.service.engine.sampling import latents, to_uint8
from rulewright.service.domain.requests import RewriteRequest, SampleRequest
from tests.builders import TINY_SPEC, store_edited_versions, tiny_domain

SPEC = TINY_SPEC


@pytest.fixture
def domain(tmp_path):
    return tiny_domain(tmp_path, max_resident=2)


def test_bootstrap_is_idempotent_and_sets_production(domain, tmp_path):
    v = domain.resolve("tiny@production")
    assert (v.model, v.number, v.kind) == ("tiny", 1, "import")
    assert domain.bootstrap("tiny", tmp_path / "missing-is-not-read.safetensors").number == 1


def test_sample_echoes_the_version_and_is_deterministic(domain):
    first = domain.sample(SampleRequest("tiny@production", seeds=[3, 4]))
    version, a = first.version, first.images
    b = domain.sample(SampleRequest("tiny/1", seeds=[3, 4])).images
    assert version.number == 1 and a.dtype == torch.uint8 and a.shape == (2, 32, 32, 3)
    assert torch.equal(a, b)


def test_rewrite_creates_a_child_version_that_samples_differently(domain):
    events = []
    result = domain.rewrite(RewriteRequest("tiny@production", SPEC, author="alice", preview_seeds=[5]), Progress(events.append))
    v2 = result.version
    assert (v2.number, v2.parent, v2.kind, v2.author) == (2, 1, "edit", "alice")
    assert v2.spec["layer"] == "main.6" and v2.metrics["goal_loss_after"] < v2.metrics["goal_loss_before"]
    base = domain.sample(SampleRequest("tiny/1", seeds=[5])).images
    edited = domain.sample(SampleRequest("tiny/2", seeds=[5])).images
    assert not torch.equal(base, edited)
    assert torch.equal(result.previews, edited)
    model1 = domain.generator(domain.resolve("tiny/1")).model
    expected = to_uint8(render_edited(model1, [result.edit], latents([5], 16)))
    assert (expected.int() - edited.int()).abs().max() <= 1
    assert any(e.stage == "optimize" for e in events)


def test_an_edited_version_holds_only_its_factors_and_hooked_work_gets_its_dense_weights(domain):
    domain.rewrite(RewriteRequest("tiny/1", SPEC))
    r1 = domain.generator(domain.resolve("tiny/1"))
    base_bytes = domain.resident_bytes()
    r2 = domain.generator(domain.resolve("tiny/2"))
    assert r2.model is r1.model                                    # one generator for the base
    delta = domain.registry.store.get_blob(r2.version.blobs["delta"].sha256)
    assert 0 < r2.nbytes() <= len(delta) < r1.model.main[6].weight.numel() * 4
    assert domain.resident_bytes() == base_bytes + r2.nbytes()      # factors, not a dense copy
    dense = r2.hookable()
    assert dense.main[3].weight.data_ptr() == r1.model.main[3].weight.data_ptr()   # untouched: shared
    assert not torch.equal(dense.main[6].weight, r1.model.main[6].weight)         # edited: its own, privately


def test_request_id_replay_dry_run_and_cancel_create_nothing_new(domain):
    first = domain.rewrite(RewriteRequest("tiny/1", SPEC, request_id="req-1"))
    again = domain.rewrite(RewriteRequest("tiny/1", SPEC, request_id="req-1"))
    assert again.replayed and again.version.number == first.version.number == 2
    dry = domain.rewrite(RewriteRequest("tiny/1", SPEC, dry_run=True, preview_seeds=[1]))
    assert dry.version is None and dry.previews.shape == (1, 32, 32, 3)
    with pytest.raises(Cancelled):
        domain.rewrite(RewriteRequest("tiny/1", SPEC), Progress(None, lambda: True))
    assert [v.number for v in domain.registry.list_versions("tiny").items] == [1, 2]


def test_lru_keeps_at_most_max_resident(domain):
    domain.rewrite(RewriteRequest("tiny/1", SPEC))
    domain.rewrite(RewriteRequest("tiny/2", SPEC))
    for ref in ("tiny/1", "tiny/2", "tiny/3"):
        domain.sample(SampleRequest(ref, seeds=[0]))
    assert domain.resident_versions() == [("tiny", 2), ("tiny", 3)]


def test_memory_budget_counts_the_base_once_and_each_versions_factors(domain):
    for seed in (2, 3, 4):                 # three sibling edits: versions 2, 3 and 4
        domain.rewrite(RewriteRequest("tiny/1", {**SPEC, "paste": [{"seed": seed, "box": [8, 8, 16, 16]}]}))
    domain.max_resident = 10
    domain.sample(SampleRequest("tiny/1", seeds=[0]))
    base = domain.resident_bytes()
    for ref in ("tiny/2", "tiny/3", "tiny/4"):
        domain.sample(SampleRequest(ref, seeds=[0]))
    factors = {n: domain.generator(domain.resolve(f"tiny/{n}")).nbytes() for n in (2, 3, 4)}
    assert domain.resident_bytes() == base + sum(factors.values()) and sum(factors.values()) < base
    domain.memory_budget_bytes = base + max(factors.values()) + min(factors.values()) // 2   # the base and one edit
    assert domain.resident_versions() == [("tiny", 4)]      # applied at once, least recently used first
    domain.sample(SampleRequest("tiny/1", seeds=[0]))
    domain.sample(SampleRequest("tiny/2", seeds=[0]))
    assert domain.resident_versions() == [("tiny", 1), ("tiny", 2)]
    assert domain.resident_bytes() == base + factors[2] <= domain.memory_budget_bytes
    five = domain.rewrite(RewriteRequest("tiny/2", SPEC)).version        # 1 + Δ2 + Δ5, built on resident 2
    domain.sample(SampleRequest("tiny/5", seeds=[0]))
    # Over the budget, only the newest stays; it holds every delta along its lineage (2's among them).
    assert domain.resident_versions() == [("tiny", 5)]
    assert domain.resident_bytes() == base + factors[2] + domain.generator(five).lineage[1][0].nbytes()


def test_dynamic_batching_coalesces_concurrent_samples_without_changing_pixels(domain):
    import threading

    sizes = []
    domain.metrics = type("M", (), {"observe_batch": lambda self, n: sizes.append(n),
                                    "observe_stats_cache": lambda self, kind, hit: None})()
    alone = {s: domain.sample(SampleRequest("tiny", seeds=[s])).images[0] for s in range(12)}
    sizes.clear()
    domain.batcher.max_delay_s = 0.2         # long enough that all twelve threads arrive first
    out, barrier = {}, threading.Barrier(12)

    def one(s):
        barrier.wait()
        out[s] = domain.sample(SampleRequest("tiny", seeds=[s])).images[0]
    threads = [threading.Thread(target=one, args=(s,)) for s in range(12)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert all(torch.equal(out[s], alone[s]) for s in range(12))
    assert max(sizes) > 1 and sum(sizes) == 12          # shared forward passes, every image once
    assert len(sizes) < 12


def test_batcher_separates_keys_and_reports_errors_to_their_callers():
    from rulewright.service.domain.batching import BatcherClosed, SampleBatcher
    from rulewright.service.engine.generators.dcgan import DCGANGenerator
    from tests.builders import dcgan_state

    model = DCGANGenerator.from_state_dict(dcgan_state())
    batcher = SampleBatcher(max_batch=4, max_delay_s=0.0)
    z = torch.randn(6, model.z_dim)
    assert batcher.submit("a", model, z).shape[0] == 6       # larger than max_batch: chunked, all returned
    with pytest.raises(ValueError, match="truncation"):
        batcher.submit("b", model, z[:1], truncation=0.5)      # DCGAN has no truncation
    assert batcher.submit("a", model, z[:1]).shape[0] == 1    # the worker survived
    batcher.close()
    with pytest.raises(BatcherClosed):
        batcher.submit("a", model, z[:1])


def test_concurrent_requests_for_different_versions_share_passes_and_get_their_own_bytes(domain):
    import threading

    domain.max_resident = 16
    refs = ["tiny/1"] + store_edited_versions(domain, 5)
    work = [(refs[i % len(refs)], 40 + i) for i in range(12)]
    alone = {w: domain.sample(SampleRequest(w[0], seeds=[w[1]])).images[0] for w in work}
    base = domain.sample(SampleRequest("tiny/1", seeds=[7])).images
    assert torch.equal(domain.sample(SampleRequest(refs[2], seeds=[7])).images, base)        # strength 0 draws the parent
    assert not torch.equal(domain.sample(SampleRequest(refs[1], seeds=[7])).images, base)
    sizes = []
    domain.metrics = type("M", (), {"observe_batch": lambda self, n: sizes.append(n),
                                    "observe_stats_cache": lambda self, kind, hit: None})()
    domain.batcher.max_delay_s = 0.2         # long enough that all twelve threads arrive first
    out, barrier = {}, threading.Barrier(len(work))

    def one(w):
        barrier.wait()
        out[w] = domain.sample(SampleRequest(w[0], seeds=[w[1]])).images[0]
    threads = [threading.Thread(target=one, args=(w,)) for w in work]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert all(torch.equal(out[w], alone[w]) for w in work)
    assert max(sizes) > 1 and sum(sizes) == len(work) and len(sizes) < len(work)   # versions shared passes


def test_images_are_the_same_bytes_without_dynamic_batching(domain):
    from rulewright.service.domain.core import Domain

    refs = store_edited_versions(domain, 3)
    plain = Domain(domain.registry, domain.stats_cache, device="cpu", dynamic_batching=False)
    for ref in ["tiny/1"] + refs:
        assert torch.equal(plain.sample(SampleRequest(ref, seeds=[3, 9])).images, domain.sample(SampleRequest(ref, seeds=[3, 9])).images)


def test_statistics_of_an_edited_version_are_named_and_computed_from_its_own_weights(domain):
    """An edited version's resident module is its base's; its statistics must still see its edit."""
    from rulewright.service.engine.stats import key_moment
    from rulewright.service.domain.requests import StatisticsRequest

    domain.rewrite(RewriteRequest("tiny/1", SPEC))                         # edits main.6
    at = {(n, layer): domain.compute_statistic(StatisticsRequest(f"tiny/{n}", layer=layer, samples=16))
          for n in (1, 2) for layer in ("main.6", "main.9")}
    assert at[(1, "main.6")].key == at[(2, "main.6")].key                  # upstream of the edit: shared
    assert at[(2, "main.6")].cached
    assert at[(1, "main.9")].key != at[(2, "main.9")].key                  # downstream: the edit's own
    dense = domain.generator(domain.resolve("tiny/2")).hookable()
    expected = key_moment(dense, "main.9", range(16)).moment()
    assert torch.allclose(at[(2, "main.9")].stat.moment(), expected, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(at[(1, "main.9")].stat.moment(), expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("change, field, message", [
    ({"strength": "high"}, "spec.strength", "must be a number, got 'high'"),
    ({"paste": [{"seed": 2, "bbox": [8, 8, 16, 16]}]}, "spec.paste[0].bbox", "unknown field"),
    ({"stats": {"samples": 64, "seed_begin": 0}}, "spec.stats.seed_begin", "unknown field"),
])
def test_a_dict_specs_mistyped_or_unknown_field_is_named_by_its_path(domain, change, field, message):
    from rulewright.service.engine.errors import InvalidArgument

    for attempt in (lambda spec: domain.check_edit(spec, "tiny"),
                    lambda spec: domain.rewrite(RewriteRequest("tiny", spec, dry_run=True))):
        with pytest.raises(InvalidArgument) as err:
            attempt({**SPEC, **change})
        assert (err.value.field, err.value.description) == (field, message)
