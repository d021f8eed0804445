"""Functions run in separate processes by the registry tests (spawned: no torch, no fork state)."""

from __future__ import annotations

import os
import signal
import time

from rulewright.registry import Registry, RegistryError
from rulewright.registry.stores import open_store


def _registry(spec) -> Registry:
    uri, s3 = spec
    return Registry(open_store(uri, s3=s3))


def create_versions(spec, model: str, parent: int, count: int, worker: int, barrier, results) -> None:
    """Create ``count`` edit versions as fast as possible once every worker is ready."""
    registry = _registry(spec)
    barrier.wait()
    numbers = []
    for i in range(count):
        delta = f"delta of worker {worker} edit {i}".encode()
        v = registry.create_version(
            model, parent=parent, delta=delta, spec={"worker": worker, "i": i}, author=f"w{worker}"
        )
        numbers.append(v.number)
    results.put((worker, numbers))


def move_alias(spec, model: str, alias: str, to: int, expected: int, worker: int, barrier, results) -> None:
    """Try one compare-and-set move; report ("ok", version) or (reason, current_version)."""
    registry = _registry(spec)
    registry.get_alias(model, alias)  # warm the connection so both start the CAS together
    barrier.wait()
    try:
        state = registry.set_alias(model, alias, to, expected_version=expected, author=f"w{worker}")
        results.put((worker, "ok", str(state.version)))
    except RegistryError as exc:
        results.put((worker, exc.reason.value, exc.metadata.get("current_version", "")))


def killed_writer(spec, model: str, parent: int, delta: bytes) -> None:
    """Create a version but die by SIGKILL right before its manifest is written (after the blob)."""
    registry = _registry(spec)
    real_create = registry.store.create

    def create(key: str, data: bytes) -> None:
        if key.startswith(f"models/{model}/versions/") and key.endswith(".json") and key.count(".") == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        real_create(key, data)

    registry.store.create = create
    registry.create_version(model, parent=parent, delta=delta, spec={"doomed": True})


def redis_get_or_compute(url: str, digest_seed: str, counter_path: str, compute_s: float, barrier, results) -> None:
    """Ask a Redis cache for one statistic; the compute callback records that it ran."""
    from rulewright.registry.stats_cache import RedisStatsCache, StatsKey

    cache = RedisStatsCache(url, namespace="test")
    key = StatsKey.create(digest_seed, "main.6", "key_moment", range(100))

    def compute() -> bytes:
        with open(counter_path, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(compute_s)
        return b"statistic:" + digest_seed.encode()

    barrier.wait()
    results.put(cache.get_or_compute(key, compute))


def redis_hold_lock_and_die(url: str, digest_seed: str, started_path: str) -> None:
    """Take the statistic's lock by starting its computation, then get SIGKILLed mid-compute."""
    from rulewright.registry.stats_cache import RedisStatsCache, StatsKey

    cache = RedisStatsCache(url, namespace="test", lock_ttl_s=2.0)
    key = StatsKey.create(digest_seed, "main.6", "key_moment", range(100))

    def compute() -> bytes:
        open(started_path, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
        return b""

    cache.get_or_compute(key, compute)


def crash_after(store, point: str) -> None:
    """Make this process SIGKILL itself right after the write ``point`` names lands in ``store``.

    ``point`` is ``blob`` (any blob upload) or a regular expression searched in document keys
    (``/requests/[0-9a-f]{64}\\.claim\\.json$``, ``/versions/\\d{10}\\.json$``, ``model\\.json$``).
    """
    import re

    real_create, real_put_blob = store.create, store.put_blob

    def create(key: str, data: bytes) -> None:
        real_create(key, data)
        if point != "blob" and re.search(point, key):
            os.kill(os.getpid(), signal.SIGKILL)

    def put_blob(data):
        ref = real_put_blob(data)
        if point == "blob":
            os.kill(os.getpid(), signal.SIGKILL)
        return ref

    store.create, store.put_blob = create, put_blob


def rewrite_killed_at(spec, model: str, parent: int, delta: bytes, request_id: str, point: str) -> None:
    """Create a version for ``request_id`` and die by SIGKILL right after the write ``point``."""
    registry = _registry(spec)
    crash_after(registry.store, point)
    registry.create_version(model, parent=parent, delta=delta, spec={"request": request_id}, request_id=request_id)


def import_killed_at(spec, model: str, weights: bytes, request_id: str, point: str) -> None:
    """Import ``weights`` as ``model`` for ``request_id`` and die by SIGKILL right after ``point``."""
    registry = _registry(spec)
    crash_after(registry.store, point)
    registry.import_model(model, arch="dcgan", config={}, weights=weights, request_id=request_id)


def bootstrap_killed_at(spec, name: str, path: str, point: str) -> None:
    """Run the server's first-start import of ``path`` as ``name`` and die by SIGKILL right after ``point``."""
    from rulewright.registry.stats_cache import LocalStatsCache
    from rulewright.service.domain.core import Domain

    registry = _registry(spec)
    crash_after(registry.store, point)
    Domain(registry, LocalStatsCache(), device="cpu", dynamic_batching=False).bootstrap(name, path)


def rewrite_killed_in_statistics(spec, redis_url: str, model: str, edit: dict, request_id: str, pttl_path: str) -> None:
    """Run a Rewrite as a server would (default Redis cache) and die by SIGKILL while computing C.

    Right before dying it writes the milliseconds left on the statistics lock it holds to ``pttl_path``.
    """
    import redis

    from rulewright.registry.stats_cache import open_stats_cache
    from rulewright.service.domain.core import Domain
    from rulewright.service.engine.progress import Progress
    from rulewright.service.domain.requests import RewriteRequest

    domain = Domain(_registry(spec), open_stats_cache(redis_url), device="cpu", dynamic_batching=False)
    client = redis.Redis.from_url(redis_url)

    def progress(event) -> None:
        if event.stage == "statistics" and event.done > 0:  # inside the computation
            [lock] = list(client.scan_iter(match="rulewright:stats:*:lock"))
            with open(pttl_path, "w") as f:
                f.write(str(client.pttl(lock)))
            os.kill(os.getpid(), signal.SIGKILL)

    domain.rewrite(RewriteRequest(f"{model}/1", edit, request_id=request_id), Progress(progress))


def create_same_request(spec, model: str, parent: int, request_id: str, worker: int, barrier, results) -> None:
    """Create a version for ``request_id`` at the same moment as the other workers (twin retries)."""
    registry = _registry(spec)
    registry.get_version(model, parent)  # warm the connection so the twins start together
    barrier.wait()
    v = registry.create_version(model, parent=parent, delta=b"the twins' edit", spec={}, request_id=request_id)
    results.put((worker, v.number))
