"""A resident version named by number while the store is marked down: served from memory, no store call.

The S3 server is this module's own ``moto_server``, paused with SIGSTOP (a hung store, not a
refusing one). Store round trips are counted at boto's ``before-call`` event, so the assertion is
about calls, not time.
"""

from __future__ import annotations

import signal

import pytest

from rulewright.registry.errors import Unavailable
from rulewright.service.domain.requests import SampleRequest
from tests.backends import start_moto

from .conftest import s3_redis_domain


@pytest.fixture
def own_moto():
    server = start_moto()             # its own: this test pauses it
    yield server
    server.proc.send_signal(signal.SIGCONT)
    server.stop()


def test_a_resident_version_serves_without_touching_a_store_marked_down(tmp_path, own_moto, redis_url):
    domain = s3_redis_domain(tmp_path, own_moto, redis_url, store_timeout_s="1", s3_connect_timeout_s="0.5",
                             s3_read_timeout_s="0.5", s3_max_attempts="1")
    try:
        before = domain.sample(SampleRequest(model="tiny/1", seeds=[5]))          # now resident
        store = domain.registry.store
        calls: list[str] = []
        store._client.meta.events.register("before-call.s3", lambda event_name, **_: calls.append(event_name))

        own_moto.proc.send_signal(signal.SIGSTOP)
        assert not store.probe(timeout_s=1.0)          # what the server's store watch does: now marked down
        # Its retry interval has passed, as it has for the first request a few seconds into an
        # outage: a request that needs the store may try the server itself now.
        store.RETRY_S = 0.0
        calls.clear()
        during = domain.sample(SampleRequest(model="tiny/1", seeds=[5]))
        assert calls == []                               # no round trip to the hung store
        assert during.version == before.version and torch_equal(during.images, before.images)

        with pytest.raises(Unavailable):
            domain.resolve("tiny@production")            # an alias still needs the store
        assert calls                                     # (and the counter does see store calls)
    finally:
        domain.close()


def test_a_resident_version_does_not_wait_for_a_store_not_yet_marked_down(tmp_path, own_moto, redis_url):
    """The first request to meet a hung store: it cannot know yet, but it need not wait to find out."""
    domain = s3_redis_domain(tmp_path, own_moto, redis_url, store_timeout_s="30", s3_connect_timeout_s="30",
                             s3_read_timeout_s="30", s3_max_attempts="1")
    try:
        before = domain.sample(SampleRequest(model="tiny/1", seeds=[5]))          # now resident
        store = domain.registry.store
        own_moto.proc.send_signal(signal.SIGSTOP)
        during = domain.sample(SampleRequest(model="tiny/1", seeds=[5]))
        # Served while the store's call still runs toward its 30 s timeout (ending it marks the store
        # down), so the request did not wait for the store to time out.
        assert store.available()
        assert during.version == before.version and torch_equal(during.images, before.images)
    finally:
        domain.close()


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())
