"""Crash safety: a process killed (SIGKILL) right after a chosen write, then retried or restarted.

Each crash point is a write the registry makes; the killed process is a real child process, so
nothing it held in memory survives. After the kill, a retry with the same request id must end
with exactly one live version for it, and a half-done import must be finishable and never
garbage-collected away.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import signal

import pytest

from rulewright.registry import Registry
from rulewright.registry.gc import collect, scan
from rulewright.registry.manifests import Version, dumps, utc_now

from .conftest import store_spec
from .test_registry import WEIGHTS, faces
from .test_faults import run_cli
from .workers import bootstrap_killed_at, import_killed_at, rewrite_killed_at, rewrite_killed_in_statistics

CTX = multiprocessing.get_context("spawn")

# Where a Rewrite's version creation can be cut short: after the delta blob, after the request's
# claim, after the version manifest, after the request record.
REWRITE_POINTS = {
    "blob": "blob",
    "claim": r"/requests/[0-9a-f]{64}\.claim\.json$",
    "manifest": r"/versions/\d{10}\.json$",
    "record": r"/requests/[0-9a-f]{64}\.json$",
}


def run_killed(target, *args) -> None:
    """Run ``target(*args)`` in a spawned process and check that it died by SIGKILL."""
    proc = CTX.Process(target=target, args=args)
    proc.start()
    proc.join(timeout=60)
    if proc.is_alive():
        proc.kill()
        proc.join()
    assert proc.exitcode == -signal.SIGKILL, f"the child was not killed at its crash point (exit {proc.exitcode})"


def live_for(registry: Registry, request_id: str, model: str = "faces") -> list[int]:
    """Numbers of the live versions of ``model`` that carry ``request_id``."""
    return [v.number for v in registry.list_versions(model, page_size=1000).items if v.request_id == request_id]


@pytest.mark.parametrize("point", list(REWRITE_POINTS))
def test_retry_after_a_kill_at_any_write_creates_exactly_one_version(store, point):
    registry = faces(Registry(store))
    registry.create_version("faces", parent=1, delta=b"an earlier edit", spec={})
    run_killed(rewrite_killed_at, store_spec(store), "faces", 1, b"the edit", "req-1", REWRITE_POINTS[point])

    retry = Registry(store)  # a fresh process's view: no hints
    found = retry.find_version_by_request_id("faces", "req-1")
    version = retry.create_version("faces", parent=1, delta=b"the edit", spec={"request": "req-1"}, request_id="req-1")
    again = Registry(store).create_version(
        "faces", parent=1, delta=b"the edit", spec={"request": "req-1"}, request_id="req-1"
    )
    assert live_for(registry, "req-1") == [version.number] == [again.number]
    if point in ("manifest", "record"):  # the killed attempt's version is the one kept
        assert found is not None and found.number == version.number == 3
    else:
        assert found is None
    assert store.get_blob(version.blobs["delta"].sha256) == b"the edit"
    # Later requests are unaffected, and the store is clean apart from a killed upload's blob.
    later = registry.create_version("faces", parent=1, delta=b"next", spec={}, request_id="req-2")
    assert later.number == version.number + 1
    assert scan(store).ok


def test_twins_killed_before_withdrawing_leave_one_version_after_a_retry(store):
    """Two attempts of one request each published a manifest and died: a retry keeps the lowest."""
    registry = faces(Registry(store))
    ref = store.put_blob(b"twin")
    # The state two twins leave when both are killed right after their manifests.
    store.create(Registry._claim_key("faces", "req-t"), dumps({"request_id": "req-t", "after": 1}))
    for n in (2, 3):
        twin = Version("faces", n, 1, "edit", {}, {"delta": ref}, {}, "w", utc_now(), "req-t")
        store.create(f"models/faces/versions/{n:010d}.json", dumps(twin.to_dict()))
    assert live_for(registry, "req-t") == [2, 3]
    kept = Registry(store).create_version("faces", parent=1, delta=b"twin", spec={}, request_id="req-t")
    assert kept.number == 2 and live_for(registry, "req-t") == [2]
    assert registry.find_version_by_request_id("faces", "req-t").number == 2


def test_import_retried_after_a_kill_between_model_and_version_1(store):
    run_killed(import_killed_at, store_spec(store), "faces", WEIGHTS, "imp-1", r"/model\.json$")
    registry = Registry(store)
    assert registry.find_version_by_request_id("faces", "imp-1") is None
    v1 = registry.import_model("faces", arch="dcgan", config={}, weights=WEIGHTS, request_id="imp-1")
    assert v1.number == 1 and v1.request_id == "imp-1"
    assert registry.find_version_by_request_id("faces", "imp-1") == v1
    assert live_for(registry, "imp-1") == [1]


def test_import_killed_before_version_1_is_reported_kept_by_gc_and_finished_by_a_retry(store):
    run_killed(import_killed_at, store_spec(store), "faces", WEIGHTS, "imp-2", r"/model\.json$")
    weights = hashlib.sha256(WEIGHTS).hexdigest()
    report = scan(store)
    assert report.incomplete_imports == ["faces"] and report.orphans == [] and report.ok
    result = run_cli(store, "check")
    assert result.returncode == 1 and "incomplete import: model 'faces' has no version 1" in result.stdout
    # However old the blob, gc keeps what the retry needs.
    assert collect(store, grace_s=0).removed == [] and store.has_blob(weights)
    v1 = Registry(store).import_model("faces", arch="dcgan", config={}, weights=WEIGHTS, request_id="imp-2")
    assert v1.number == 1 and v1.blobs["weights"].sha256 == weights
    after = scan(store)
    assert after.incomplete_imports == [] and after.orphans == [] and after.ok
    assert run_cli(store, "check").returncode == 0


@pytest.mark.parametrize("point", ["model", "version"])
def test_first_start_killed_mid_bootstrap_starts_next_time(store, tmp_path, point):
    """The server's bootstrap import killed after model.json (or version 1): the next start finishes it."""
    from safetensors.torch import save_file

    from rulewright.registry.stats_cache import LocalStatsCache
    from rulewright.service.domain.core import Domain
    from tests.builders import dcgan_state

    path = tmp_path / "small.safetensors"
    save_file(dcgan_state(), str(path))
    where = r"/model\.json$" if point == "model" else r"/versions/0000000001\.json$"
    run_killed(bootstrap_killed_at, store_spec(store), "small", str(path), where)

    domain = Domain(Registry(store), LocalStatsCache(), device="cpu", dynamic_batching=False)
    try:
        version = domain.bootstrap("small", path)
        assert (version.model, version.number, version.kind) == ("small", 1, "import")
        assert domain.registry.get_alias("small", "production").version == 1
        assert [v.number for v in domain.registry.list_versions("small").items] == [1]
        assert domain.generator(version).model.z_dim == 16  # the weights load
        assert domain.bootstrap("small", path) == version  # and a third start changes nothing
    finally:
        domain.close()
    assert scan(store).ok and scan(store).incomplete_imports == []


def test_retry_after_a_crash_in_the_statistics_phase_takes_over_the_dead_holders_lock(file_store, tmp_path, redis_url):
    """A Rewrite killed while computing C holds the Redis lock; its retry waits (with progress)
    at most one short lease, then computes C itself and creates the one version."""
    import redis
    from safetensors.torch import save_file

    from rulewright.registry.stats_cache import open_stats_cache
    from rulewright.service.domain.core import Domain
    from tests.builders import TINY_SPEC, dcgan_state
    from rulewright.service.engine.progress import Progress
    from rulewright.service.domain.requests import RewriteRequest

    path = tmp_path / "tiny.safetensors"
    save_file(dcgan_state(), str(path))
    edit = dict(TINY_SPEC, steps=30)          # fewer leave the fit at no edit, which is refused
    domain = Domain(Registry(file_store), open_stats_cache(redis_url), device="cpu", dynamic_batching=False)
    try:
        domain.bootstrap("tiny", path)
        pttl = tmp_path / "pttl"
        run_killed(rewrite_killed_in_statistics, store_spec(file_store), redis_url, "tiny", edit, "req-s", str(pttl))
        # The dead holder's lock blocks its retry for one short lease at most, not half a minute.
        assert 0 < int(pttl.read_text()) <= 10_000

        events: list = []
        result = domain.rewrite(RewriteRequest("tiny/1", edit, request_id="req-s"), Progress(events.append))
        assert result.version is not None and result.version.number == 2 and not result.replayed
        assert any(e.waiting for e in events)  # the client heard it was waiting, not hung
        assert any(e.stage == "statistics" and e.done > 0 for e in events)  # then computed C here
        assert list(redis.Redis.from_url(redis_url).scan_iter(match="rulewright:stats:*:lock")) == []
        assert live_for(domain.registry, "req-s", "tiny") == [2]
    finally:
        domain.close()

