"""The batcher's queue: a caller that stops waiting (cancelled, deadline passed) leaves the queue
with ``Cancelled`` however many requests wait beside it, and the batch goes on without it."""

from __future__ import annotations

import threading

import pytest
import torch

from rulewright.service.domain import batching
from rulewright.service.domain.batching import SampleBatcher
from rulewright.service.engine.errors import Cancelled


class Model:
    """Stands in for a generator: every truncation is fine."""

    def check_truncation(self, truncation: float) -> None:
        pass


@pytest.fixture
def held(monkeypatch):
    """``batching.sample`` that records each pass's size and waits for ``release`` before answering."""
    entered, release, sizes = threading.Event(), threading.Event(), []

    def sample(model, z, **kw):
        sizes.append(z.shape[0])
        entered.set()
        release.wait(20)
        return torch.zeros(z.shape[0], 3, 4, 4)

    monkeypatch.setattr(batching, "sample", sample)
    yield entered, release, sizes
    release.set()


def test_a_caller_that_stops_behind_others_leaves_the_queue_with_cancelled(held):
    entered, release, sizes = held
    batcher = SampleBatcher(max_batch=16, max_delay_s=0.0)
    model, results, errors = Model(), {}, {}
    stop = threading.Event()

    def call(name: str, rows: int, should_stop=None) -> None:
        try:
            results[name] = batcher.submit("k", model, torch.randn(rows, 8), should_stop=should_stop)
        except BaseException as exc:  # noqa: BLE001 -- inspected below
            errors[name] = exc

    try:
        running = threading.Thread(target=call, args=("running", 1))
        running.start()
        assert entered.wait(20)                       # the worker is inside the first pass
        queued = threading.Thread(target=call, args=("queued", 2))
        queued.start()
        while len(batcher._pending) < 1:
            threading.Event().wait(0.01)
        leaving = threading.Thread(target=call, args=("leaving", 3, stop.is_set))
        leaving.start()
        while len(batcher._pending) < 2:
            threading.Event().wait(0.01)
        stop.set()
        leaving.join(10)
        assert not leaving.is_alive()
        assert isinstance(errors.get("leaving"), Cancelled), errors
        assert [j.z.shape[0] for j in batcher._pending] == [2]       # only the one still waiting
        release.set()
        running.join(10)
        queued.join(10)
        assert results["running"].shape[0] == 1 and results["queued"].shape[0] == 2, errors
        assert sizes == [1, 2]                                        # no pass carried the 3 rows that left
    finally:
        release.set()
        batcher.close()

