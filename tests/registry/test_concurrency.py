"""Concurrent writers in separate processes: no version lost or overwritten, one alias CAS winner."""

from __future__ import annotations

import multiprocessing


from rulewright.registry import Registry
from rulewright.registry.errors import Reason

from .conftest import store_spec
from .test_registry import faces
from .workers import create_same_request, create_versions, move_alias

# spawn, not fork: the test process may hold torch's thread pools and a boto3 connection pool.
CTX = multiprocessing.get_context("spawn")
WORKERS, PER_WORKER = 4, 20


def _run(target, args_for, n: int, timeout_s: float = 120.0) -> list:
    barrier, results = CTX.Barrier(n), CTX.Queue()
    procs = [CTX.Process(target=target, args=args_for(i, barrier, results)) for i in range(n)]
    for p in procs:
        p.start()
    try:
        out = [results.get(timeout=timeout_s) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0] * n
    return out


def test_four_processes_creating_twenty_versions_each_lose_nothing(store):
    registry = faces(Registry(store))
    spec = store_spec(store)
    results = _run(create_versions, lambda i, b, q: (spec, "faces", 1, PER_WORKER, i, b, q), WORKERS)
    numbers = sorted(n for _, ns in results for n in ns)
    assert numbers == list(range(2, 2 + WORKERS * PER_WORKER))  # 80 distinct, no gaps
    listed = []
    page = registry.list_versions("faces", page_size=1000)
    listed = {v.number: v for v in page.items}
    assert sorted(listed) == [1] + numbers
    # Every worker's every edit is stored exactly once, under the number it was told.
    for worker, ns in results:
        for i, n in enumerate(ns):
            version = listed[n]
            assert version.spec == {"worker": worker, "i": i} and version.author == f"w{worker}"
            assert store.get_blob(version.blobs["delta"].sha256) == f"delta of worker {worker} edit {i}".encode()


def test_two_writers_racing_to_move_an_alias_one_wins(store):
    registry = faces(Registry(store))
    registry.create_version("faces", parent=1, delta=b"a", spec={})
    registry.create_version("faces", parent=1, delta=b"b", spec={})
    registry.set_alias("faces", "production", 1, expected_version=None)
    spec = store_spec(store)
    results = _run(move_alias, lambda i, b, q: (spec, "faces", "production", 2 + i, 1, i, b, q), 2)
    outcomes = sorted(results, key=lambda r: r[1] != "ok")
    (winner, ok, moved_to), (loser, reason, current) = outcomes
    assert ok == "ok" and reason == Reason.ALIAS_CONFLICT.value
    assert current == moved_to == str(2 + winner)  # the loser is told where the alias points now
    assert registry.get_alias("faces", "production").version == 2 + winner
    history = registry.alias_history("faces", "production").items
    assert [(e.from_version, e.to_version) for e in history] == [(None, 1), (1, 2 + winner)]


def test_four_twins_with_one_request_id_at_once_leave_one_live_version(store):
    registry = faces(Registry(store))
    spec = store_spec(store)
    results = _run(create_same_request, lambda i, b, q: (spec, "faces", 1, "req-twins", i, b, q), WORKERS)
    live = [v.number for v in registry.list_versions("faces", page_size=1000).items if v.request_id == "req-twins"]
    assert len(live) == 1 and {n for _, n in results} == set(live)  # every twin was told the one kept
    assert registry.find_version_by_request_id("faces", "req-twins").number == live[0]
