"""The one job protocol from the gRPC streams' side and the editor's: a stream's work runs as a job
on the servicer's runner, and the call ends only once that work has; every kind of job shares one
set of states and one ``JobNotFound``.

The streams are driven here through ``servicers._streamed`` with a stand-in for the gRPC context
(what a server hands a streaming method), so where the call stops is decided by the test, not by
a race with the network; the real-channel paths are in test_generator and test_more_rpcs.
"""

from __future__ import annotations

import threading
import time

import pytest

from rulewright.service.engine.errors import Cancelled
from rulewright.service.errors import Code
from rulewright.service.jobs import dataset, editor, statistics
from rulewright.service.jobs.errors import JobNotFound
from rulewright.service.jobs.protocol import STATES, JobKind
from rulewright.service.server.servicers import GeneratorServicer, _streamed

BOUND_S = 60.0                 # every wait below gives up after this long


class Context:
    """What ``_streamed`` uses of a gRPC servicer context: callbacks on the call's end, and ``is_active``."""

    def __init__(self):
        self.callbacks: list = []
        self.active = True

    def add_callback(self, callback) -> bool:
        self.callbacks.append(callback)
        return True

    def is_active(self) -> bool:
        return self.active

    def cancel(self) -> None:
        """The client went away: gRPC runs the callbacks and the call is no longer active."""
        self.active = False
        for callback in self.callbacks:
            callback()


def _until_stopped(seen: list):
    """Work that sends one message, then runs until its progress says stop (at most ``BOUND_S``)."""
    def work(emit, progress):
        emit("first")
        deadline = time.monotonic() + BOUND_S
        while not progress.stopped() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)                   # still busy a moment after it was told: the call must wait for it
        seen.append(progress.stopped())
    return work


def test_a_closed_stream_returns_only_once_its_worker_has_finished():
    """What gRPC does to a call whose client cancelled: it stops reading the stream and closes it."""
    servicer = GeneratorServicer(None)
    seen: list = []
    stream = _streamed(servicer.workers, Context(), _until_stopped(seen))
    assert next(stream) == "first"
    assert [t for t in servicer.workers if t.is_alive()]
    stream.close()
    assert not [t for t in servicer.workers if t.is_alive()], "the call ended while its worker still ran"
    assert seen == [True]                 # the worker was told to stop, and it did


def test_a_cancelled_call_stops_its_worker_and_ends_with_the_cancel():
    servicer = GeneratorServicer(None)
    context, seen = Context(), []

    def work(emit, progress):
        _until_stopped(seen)(emit, progress)
        progress.check("the work")

    stream = _streamed(servicer.workers, context, work)
    assert next(stream) == "first"
    context.cancel()
    with pytest.raises(Cancelled):
        next(stream)
    assert seen == [True] and not list(servicer.workers)


def test_messages_come_in_order_and_the_error_last():
    servicer = GeneratorServicer(None)

    def work(emit, progress):
        for n in range(3):
            emit(n)
        raise ValueError("the work failed")

    stream = _streamed(servicer.workers, Context(), work)
    got = [next(stream) for _ in range(3)]
    with pytest.raises(ValueError, match="the work failed"):
        next(stream)
    assert got == [0, 1, 2] and not list(servicer.workers)


def test_a_stream_started_while_the_server_stops_is_stopped_at_its_first_check():
    servicer = GeneratorServicer(None)
    servicer.workers.close()
    ran: list = []

    def work(emit, progress):
        ran.append(threading.current_thread())
        progress.check("the work")
        emit("never")

    with pytest.raises(Cancelled):
        list(_streamed(servicer.workers, Context(), work))
    assert len(ran) == 1 and not list(servicer.workers)


def test_every_kind_of_job_shares_the_states_errors_and_protocol():
    assert (editor.RUNNING, editor.SUCCEEDED, editor.CANCELLED, editor.FAILED) == \
        (dataset.RUNNING, dataset.SUCCEEDED, dataset.CANCELLED, dataset.FAILED) == STATES
    assert editor.JobNotFound is dataset.JobNotFound is JobNotFound
    assert JobNotFound.code is Code.NOT_FOUND and JobNotFound.reason == "JOB_NOT_FOUND"
    with pytest.raises(JobNotFound) as err:
        editor.Jobs().get("nope")
    assert err.value.reason == "JOB_NOT_FOUND" and err.value.metadata == {"job": "nope"}
    for kind in (editor.Jobs, dataset.DatasetJobs, statistics.StatisticsJobs):
        assert all(callable(getattr(kind, m, None)) for m in JobKind.__dict__ if not m.startswith("_")
                   and callable(JobKind.__dict__[m])), kind


def test_editor_jobs_run_to_a_result_and_cancel_through_the_protocol():
    jobs = editor.Jobs(ttl_s=60, max_running=1)
    try:
        def work(emit, should_stop):
            emit({"step": 1})
            return {"answer": 42}
        job = jobs.wait(jobs.create(editor.MemoryJobRequest(work, lambda exc: (editor.FAILED, {}))).id, BOUND_S)
        assert job.state == editor.SUCCEEDED and job.events == [("progress", {"step": 1}), ("result", {"answer": 42})]
        assert jobs.resume() == []

        gate = threading.Event()

        def held(emit, should_stop):
            deadline = time.monotonic() + BOUND_S
            while not should_stop() and time.monotonic() < deadline:
                gate.wait(0.01)
            raise Cancelled("held work cancelled")
        job, started = jobs.start(held, lambda exc: (editor.CANCELLED, {"error": str(exc)}))
        assert started and jobs.cancel(job.id) is job
        job = jobs.wait(job.id, BOUND_S)
        assert job.state == editor.CANCELLED and job.last() == ("error", {"error": "held work cancelled"})
    finally:
        jobs.close()
