"""A stored statistic whose bytes went bad: never served, dropped, recomputed or refused, rewritten by a job.

On the embedded default and on S3 + Redis (the ``domain`` fixture). A server restart is a fresh
``Domain`` over the same registry with an empty in-process cache, so the store's copy is all it has.
"""

from __future__ import annotations

import pytest

from rulewright.registry.errors import NotFound
from rulewright.registry.stats_cache import LocalStatsCache
from rulewright.service.domain import statistics as statistics_module
from rulewright.service.domain.core import Domain
from rulewright.service.errors import Code, Error
from rulewright.service.domain.limits import Limits
from rulewright.service.domain.requests import RewriteRequest
from rulewright.service.jobs.statistics import StatisticsJobRequest, StatisticsJobs
from rulewright.service.domain.statistics import durable_key, store_durable
from tests.builders import TINY_SPEC

BOUND_S = 120.0
LAYER = "main.6"
SAMPLES = 2048                 # two shards of 1,024 (one float32 block each at this layer)
SPEC = {**TINY_SPEC, "stats": {"samples": SAMPLES, "seed_start": 0}}


def run_job(domain) -> dict:
    """A fresh statistics job over the test's seeds, run to the end; its manifest."""
    jobs = StatisticsJobs(domain)
    try:
        status = jobs.create(StatisticsJobRequest(model="tiny", layer=LAYER, samples=SAMPLES, shard_size=1024))
        status = jobs.wait(status.spec.id, BOUND_S)
        assert status.state == "succeeded", status
        return status.manifest
    finally:
        jobs.close()


def damage(store, stats_key, good: bytes, bad: bytes) -> None:
    """The job's copy as it stood (with its record), then ``bad`` in its place, as a bad disk or a
    partial copy would leave it."""
    store_durable(store, stats_key, good)
    key = durable_key(stats_key)
    store.delete(key)
    store.create(key, bad)


def restarted(domain, max_stats_samples: int) -> Domain:
    """The same registry behind a new process: an empty in-process statistics cache."""
    return Domain(domain.registry, LocalStatsCache(), device="cpu", limits=Limits(max_stats_samples=max_stats_samples))


def rewrite_hits(again: Domain) -> list[bool]:
    """Run a dry-run Rewrite over the job's samples on ``again``; whether each statistic lookup hit."""
    hits: list[bool] = []
    again.stats.observe = lambda kind, hit: hits.append(hit)
    out = again.rewrite(RewriteRequest(model="tiny", spec=SPEC, dry_run=True))
    assert out.edit is not None
    return hits


@pytest.mark.parametrize("how", ["truncated", "one byte flipped"])
def test_a_damaged_stored_statistic_is_recomputed_refused_or_rewritten_never_served(domain, how):
    manifest = run_job(domain)
    store = domain.registry.store
    stats_key = domain.stats.key(domain.generator(domain.resolve("tiny/1")).hookable, LAYER,
                                 statistics_module.KEY_MOMENT, range(SAMPLES), 1.0)
    key = manifest["statistic_key"]
    assert key == durable_key(stats_key)
    good = store.read(key)
    bad = good[: len(good) // 2] if how == "truncated" else good[:-1] + bytes([good[-1] ^ 0x40])

    # A server that may compute the statistic itself drops the bad copy and computes it.
    damage(store, stats_key, good, bad)
    again = restarted(domain, max_stats_samples=100_000)
    try:
        assert rewrite_hits(again) == [False]
        with pytest.raises(NotFound):
            store.read(key)                              # dropped, not left to fail the next reader
        assert again.stats.get(again.generator(again.resolve("tiny/1")).hookable, LAYER,
                               statistics_module.KEY_MOMENT, range(SAMPLES)).stat.count == SAMPLES * 64
    finally:
        again.close()

    # One that may not (over max_stats_samples) refuses with DATA_LOSS naming the stored statistic.
    damage(store, stats_key, good, bad)
    again = restarted(domain, max_stats_samples=1000)
    try:
        with pytest.raises(Error) as err:
            again.rewrite(RewriteRequest(model="tiny", spec=SPEC, dry_run=True))
        assert err.value.code == Code.DATA_LOSS and key in err.value.message, err.value
        assert "rulewright stats create" in err.value.message
    finally:
        again.close()

    # The statistics job run again rewrites it, whether or not a reader dropped the bad copy first.
    damage(store, stats_key, good, bad)
    assert run_job(domain)["sha256"] == manifest["sha256"]
    assert store.read(key) == good
    again = restarted(domain, max_stats_samples=1000)
    try:
        assert rewrite_hits(again) == [True]            # the job's copy, verified; nothing computed
    finally:
        again.close()
