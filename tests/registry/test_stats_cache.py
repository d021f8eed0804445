"""The statistics cache: keys, the in-process LRU, and Redis (single-flight, dead holders, outages)."""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time

import pytest
import redis

from rulewright.registry import errors
from rulewright.registry.stats_cache import LocalStatsCache, RedisStatsCache, StatsKey, open_stats_cache

from .conftest import free_port
from .workers import redis_get_or_compute, redis_hold_lock_and_die

CTX = multiprocessing.get_context("spawn")
FP = "ab" * 32


def key(
    n: int = 1000, layer: str = "main.6", fingerprint: str = FP, truncation: float = 1.0, start: int = 0
) -> StatsKey:
    return StatsKey.create(fingerprint, layer, "key_moment", range(start, start + n), truncation)


class Counter:
    """A compute callback that counts its calls (thread-safe) and can be slow or fail."""

    def __init__(self, value: bytes = b"C", delay_s: float = 0.0, fail: bool = False):
        self.value, self.delay_s, self.fail = value, delay_s, fail
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self) -> bytes:
        with self._lock:
            self.calls += 1
        time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("compute failed")
        return self.value


def run_threads(n: int, fn) -> list:
    out, barrier = [None] * n, threading.Barrier(n)

    def worker(i: int) -> None:
        barrier.wait()
        try:
            out[i] = fn()
        except BaseException as exc:
            out[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return out


# ---- keys -----------------------------------------------------------------------------------


def test_key_names_every_input_deterministically():
    base = key()
    assert base.canonical() == key().canonical() and base.digest() == key().digest()
    assert base.samples == 1000 and base.seeds == "0-1000"
    variants = [
        key(n=999),
        key(layer="main.9"),
        key(fingerprint="cd" * 32),
        key(truncation=0.7),
        key(start=1),
        StatsKey.create(FP, "main.6", "value_quantile", range(1000)),
        StatsKey.create(FP, "main.6", "key_moment", range(1000), capacity=4096),
    ]
    digests = {v.digest() for v in variants}
    assert len(digests) == len(variants) and base.digest() not in digests
    assert StatsKey.create(FP, "main.6", "k", [3, 1, 2]).seeds.startswith("list:")
    assert StatsKey.create(FP, "main.6", "k", [5, 6, 7]).seeds == "5-8"


def test_key_validation():
    with pytest.raises(errors.InvalidArgument):
        StatsKey.create(FP, "main.6", "key_moment", [])
    with pytest.raises(errors.InvalidArgument):
        StatsKey.create(FP, "main.6", "key_moment", [-1])
    with pytest.raises(errors.InvalidArgument):
        StatsKey.create("", "main.6", "key_moment", [1])


# ---- local ----------------------------------------------------------------------------------


def test_local_cache_hits_after_one_compute():
    cache, compute = LocalStatsCache(), Counter(b"moment")
    assert cache.get_or_compute(key(), compute) == b"moment"
    assert cache.get_or_compute(key(), compute) == b"moment"
    assert compute.calls == 1 and cache.get(key()) == b"moment" and cache.get(key(n=5)) is None


def test_local_cache_evicts_least_recently_used_by_bytes():
    cache = LocalStatsCache(max_bytes=10)
    cache.put(key(1), b"aaaa")
    cache.put(key(2), b"bbbb")
    cache.get(key(1))  # 1 is now more recent than 2
    cache.put(key(3), b"cccc")
    assert cache.get(key(2)) is None and cache.get(key(1)) == b"aaaa" and cache.get(key(3)) == b"cccc"


def test_local_single_flight_across_threads():
    cache, compute = LocalStatsCache(), Counter(b"once", delay_s=0.3)
    results = run_threads(8, lambda: cache.get_or_compute(key(), compute))
    assert compute.calls == 1 and results == [b"once"] * 8


def test_local_failure_reaches_every_waiter_and_is_not_cached():
    cache, failing = LocalStatsCache(), Counter(delay_s=0.5, fail=True)
    results = run_threads(4, lambda: cache.get_or_compute(key(), failing))
    assert failing.calls == 1 and all(isinstance(r, RuntimeError) for r in results)
    ok = Counter(b"second try")
    assert cache.get_or_compute(key(), ok) == b"second try" and ok.calls == 1


def test_compute_must_return_bytes():
    with pytest.raises(TypeError):
        LocalStatsCache().get_or_compute(key(), lambda: "text")


def test_open_stats_cache_by_uri(redis_url):
    assert isinstance(open_stats_cache("memory://"), LocalStatsCache)
    assert isinstance(open_stats_cache(redis_url), RedisStatsCache)
    with pytest.raises(errors.InvalidArgument):
        open_stats_cache("memcached://x")


# ---- redis ----------------------------------------------------------------------------------


def test_redis_caches_under_namespace_with_ttl(redis_url):
    cache, compute = RedisStatsCache(redis_url, namespace="ns1", ttl_s=60), Counter(b"C bytes")
    assert cache.get_or_compute(key(), compute) == b"C bytes"
    assert RedisStatsCache(redis_url, namespace="ns1").get_or_compute(key(), compute) == b"C bytes"
    assert compute.calls == 1  # a second client (replica) hit the shared entry
    r = redis.Redis.from_url(redis_url)
    stored = r.keys("ns1:stats:*")
    assert stored == [f"ns1:stats:v2:{key().digest()}".encode()]
    assert 0 < r.pttl(stored[0]) <= 60_000
    assert r.keys("ns1:stats:*:lock") == []  # the lock was released
    other = Counter(b"other")
    assert RedisStatsCache(redis_url, namespace="ns2").get_or_compute(key(), other) == b"other"


def test_redis_single_flight_across_threads(redis_url):
    cache, compute = RedisStatsCache(redis_url), Counter(b"once", delay_s=0.3)
    assert run_threads(8, lambda: cache.get_or_compute(key(), compute)) == [b"once"] * 8
    assert compute.calls == 1


def test_redis_single_flight_across_processes(redis_url, tmp_path):
    counter = tmp_path / "computed"
    n = 4
    barrier, results = CTX.Barrier(n), CTX.Queue()
    procs = [
        CTX.Process(target=redis_get_or_compute, args=(redis_url, FP, str(counter), 0.5, barrier, results))
        for _ in range(n)
    ]
    for p in procs:
        p.start()
    values = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert values == [b"statistic:" + FP.encode()] * n
    assert len(counter.read_text().splitlines()) == 1  # one process computed, three waited


def test_redis_survives_a_lock_holder_that_died(redis_url, tmp_path):
    started = tmp_path / "started"
    proc = CTX.Process(target=redis_hold_lock_and_die, args=(redis_url, FP, str(started)))
    proc.start()
    proc.join(timeout=60)
    assert proc.exitcode == -9 and started.exists()
    r = redis.Redis.from_url(redis_url)
    lock = f"test:stats:v2:{StatsKey.create(FP, 'main.6', 'key_moment', range(100)).digest()}:lock"
    assert r.exists(lock)  # the dead holder's lock is still there …
    cache, compute = RedisStatsCache(redis_url, namespace="test"), Counter(b"recovered")
    t0 = time.monotonic()
    value = cache.get_or_compute(StatsKey.create(FP, "main.6", "key_moment", range(100)), compute)
    assert value == b"recovered" and compute.calls == 1
    assert time.monotonic() - t0 < 10  # … until it expires (2 s TTL), then we take over


def test_redis_lock_is_renewed_while_computing(redis_url):
    # A computation longer than the lock TTL must not let a second process start computing too.
    cache = RedisStatsCache(redis_url, lock_ttl_s=0.9)
    other = RedisStatsCache(redis_url, lock_ttl_s=0.9)
    slow, second = Counter(b"slow", delay_s=2.0), Counter(b"dup")
    t = threading.Thread(target=lambda: cache.get_or_compute(key(), slow))
    t.start()
    time.sleep(0.1)
    assert other.get_or_compute(key(), second) == b"slow"
    t.join()
    assert slow.calls == 1 and second.calls == 0


def test_redis_failed_compute_releases_the_lock_for_the_next_caller(redis_url):
    cache = RedisStatsCache(redis_url, lock_ttl_s=30)
    with pytest.raises(RuntimeError):
        cache.get_or_compute(key(), Counter(fail=True))
    t0 = time.monotonic()
    assert cache.get_or_compute(key(), Counter(b"fine")) == b"fine"
    assert time.monotonic() - t0 < 1  # no wait for a 30 s lock


def test_compute_oserror_is_not_mistaken_for_redis_trouble(redis_url):
    calls = []

    def compute() -> bytes:
        calls.append(1)
        raise OSError("disk full")

    with pytest.raises(OSError):
        RedisStatsCache(redis_url).get_or_compute(key(), compute)
    assert len(calls) == 1


def test_redis_unreachable_from_the_start_computes_and_warns_once(caplog):
    cache = RedisStatsCache(f"redis://127.0.0.1:{free_port()}/0", retry_after_s=0)
    compute = Counter(b"local")
    with caplog.at_level(logging.WARNING, logger="rulewright.registry.stats_cache"):
        assert [cache.get_or_compute(key(), compute) for _ in range(3)] == [b"local"] * 3
    assert compute.calls == 3
    warnings = [r for r in caplog.records if getattr(r, "event", "") == "stats_cache_unavailable"]
    assert len(warnings) == 1 and "127.0.0.1" in warnings[0].cache


def test_redis_stopped_mid_test_then_back(redis_server, redis_url, caplog):
    cache = RedisStatsCache(redis_url, retry_after_s=0.2)
    first = Counter(b"C1")
    assert cache.get_or_compute(key(1), first) == b"C1"
    assert cache.get_or_compute(key(1), first) == b"C1" and first.calls == 1  # cached

    redis_server.stop()
    try:
        with caplog.at_level(logging.INFO, logger="rulewright.registry.stats_cache"):
            during = Counter(b"C1")
            assert cache.get_or_compute(key(1), during) == b"C1"  # served, recomputed, no error
            assert cache.get_or_compute(key(2), Counter(b"C2")) == b"C2"
            assert during.calls == 1 and not cache.available
            time.sleep(0.25)  # past the retry window: still down
            assert cache.get_or_compute(key(2), Counter(b"C2")) == b"C2"
    finally:
        redis_server.start()  # same port, empty (no persistence)
    down = [r for r in caplog.records if getattr(r, "event", "") == "stats_cache_unavailable"]
    assert len(down) == 1 and down[0].levelno == logging.WARNING

    time.sleep(0.25)
    with caplog.at_level(logging.INFO, logger="rulewright.registry.stats_cache"):
        after = Counter(b"C3")
        assert cache.get_or_compute(key(3), after) == b"C3"
        assert cache.get_or_compute(key(3), after) == b"C3"
    assert after.calls == 1 and cache.available  # the cache is used again
    assert redis.Redis.from_url(redis_url).exists(f"rulewright:stats:v2:{key(3).digest()}")
    assert any(getattr(r, "event", "") == "stats_cache_recovered" for r in caplog.records)


@pytest.mark.parametrize("kind", ["local", "redis-thread", "redis-process"])
def test_a_caller_waiting_on_another_computation_hears_on_wait(redis_url, kind):
    """Waiters are told they wait (for progress events), whether the computation runs in another
    thread (single-flight) or in another process sharing Redis (the lock)."""
    cache = LocalStatsCache() if kind == "local" else RedisStatsCache(redis_url)
    waiter = RedisStatsCache(redis_url) if kind == "redis-process" else cache  # its own flights: the lock path
    slow, never, heard = Counter(b"slow", delay_s=1.5), Counter(b"never"), []
    t = threading.Thread(target=lambda: cache.get_or_compute(key(), slow))
    t.start()
    for _ in range(200):  # until the computation has begun (at most 2 s)
        if slow.calls:
            break
        time.sleep(0.01)
    assert waiter.get_or_compute(key(), never, on_wait=lambda: heard.append(1)) == b"slow"
    t.join(timeout=30)
    assert slow.calls == 1 and never.calls == 0 and heard


def test_the_redis_lock_lease_is_short_by_default(redis_url):
    """A crashed holder blocks the others for one lease; the default is a few seconds, renewed while computing."""
    cache = open_stats_cache(redis_url)
    r, seen = redis.Redis.from_url(redis_url), []

    def compute() -> bytes:
        seen.extend(r.pttl(k) for k in r.scan_iter(match="rulewright:stats:*:lock"))
        return b"C"

    assert cache.get_or_compute(key(), compute) == b"C"
    assert len(seen) == 1 and 0 < seen[0] <= 10_000


@pytest.mark.parametrize("damage", ["truncated", "one byte flipped"])
def test_a_damaged_redis_entry_is_dropped_and_computed_again(redis_url, damage):
    cache = RedisStatsCache(redis_url, namespace="damaged")
    assert cache.get_or_compute(key(), Counter(b"the statistic's bytes")) == b"the statistic's bytes"
    r = redis.Redis.from_url(redis_url)
    [stored] = [k for k in r.keys("damaged:stats:*") if not k.endswith(b":lock")]
    value = r.get(stored)
    r.set(stored, value[:-4] if damage == "truncated" else value[:-1] + bytes([value[-1] ^ 0x01]))
    assert cache.get(key()) is None                     # never handed out
    again = Counter(b"the statistic's bytes")
    assert cache.get_or_compute(key(), again) == b"the statistic's bytes" and again.calls == 1
    assert RedisStatsCache(redis_url, namespace="damaged").get(key()) == b"the statistic's bytes"
