"""Statistics through the statistics cache: one place that names a cached statistic.

- ``KEY_MOMENT``, ``VALUE_QUANTILE``: the kinds of statistic the service caches.
- ``stat_key(fingerprint, layer, kind, seeds, truncation, arch)``: the ``StatsKey`` of a statistic
  of weights with that fingerprint (what the domain and ``moment_key`` both use).
- ``moment_key(model, layer, seeds, truncation)``: the ``StatsKey`` of C = E[k kᵀ] at a layer,
  named by the fingerprint of the weights upstream of it (so versions whose edits lie downstream
  share the entry).
- ``cached_key_moment(cache, model, layer, seeds, ...)``: that statistic from the cache, computed
  with ``key_moment`` on a miss.
"""

from __future__ import annotations

from typing import Sequence

from rulewright.registry.stats_cache import StatsCache, StatsKey

from .engine.generators.base import Generator
from .engine.stats import SecondMoment, key_moment, load_stat

KEY_MOMENT = "key_moment"
VALUE_QUANTILE = "value_quantile"


def stat_key(fingerprint: str, layer: str, kind: str, seeds: Sequence[int], truncation: float, arch: str) -> StatsKey:
    """The cache key of a ``kind`` statistic at ``layer`` of weights with ``fingerprint``."""
    return StatsKey.create(fingerprint, layer, kind, seeds, truncation, arch=arch)


def moment_key(model: Generator, layer: str, seeds: Sequence[int], truncation: float = 1.0) -> StatsKey:
    """The cache key of ``key_moment(model, layer, seeds, truncation)``: keys depend only on the
    weights upstream of the layer."""
    return stat_key(model.upstream_fingerprint(layer), layer, KEY_MOMENT, seeds, truncation, model.arch)


def cached_key_moment(
    cache: StatsCache,
    model: Generator,
    layer: str,
    seeds: Sequence[int],
    truncation: float = 1.0,
    batch_size: int = 32,  # samples per forward pass on a miss (does not change the result)
) -> SecondMoment:
    """C at ``layer`` over ``seeds`` from ``cache``; computed once across the cache's users on a miss."""
    seeds = list(seeds)
    key = moment_key(model, layer, seeds, truncation)

    def compute() -> bytes:
        return key_moment(model, layer, seeds, truncation, batch_size=batch_size).to_bytes()

    stat = load_stat(cache.get_or_compute(key, compute))
    if not isinstance(stat, SecondMoment):
        raise TypeError(f"cache entry {key.canonical()} holds a {type(stat).__name__}")
    return stat
