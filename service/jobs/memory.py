"""Jobs held in memory: work on a ``Runner`` thread whose events are kept for late readers.

- ``Job``: a running or finished piece of work with an ordered event log (``progress`` events as
  they happen, then exactly one ``result`` or ``error``); ``wait(after, timeout)`` blocks until
  there are events after the given id (ids start at 1) or the job is done; ``stop`` is the flag
  the work's ``should_stop`` reads; ``run(work, on_error)`` runs the work and records its end.
- ``MemoryJobs(ttl_s, max_running)``: a ``JobKind`` whose jobs live in this process.
  ``start(work, on_error, key)`` (``create`` with a ``MemoryJobRequest``) runs
  ``work(emit_progress, should_stop) -> result`` on the runner; an exception becomes the job's
  ``error`` event through ``on_error(exc) -> (state, data)``. One job's failure never touches
  another. Finished jobs are kept ``ttl_s`` seconds, then forgotten. ``key`` returns the job
  already started for it instead of starting a second one, unless that one failed or was
  cancelled. Nothing survives a restart, so ``resume`` finds nothing. ``close()`` stops every job.

The gRPC streams run their work as a ``Job`` of their own (``server.servicers``), the editor's
rewrites as jobs of ``editor.Jobs``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import secrets
import threading
import time
from typing import Any, Callable

from rulewright.service.jobs.errors import JobNotFound, TooManyJobs
from rulewright.service.jobs.protocol import FAILED, RUNNING, SUCCEEDED, Runner

log = logging.getLogger(__name__)

Work = Callable[[Callable[[Any], None], Callable[[], bool]], Any]     # (emit_progress, should_stop) -> result
OnError = Callable[[BaseException], "tuple[str, Any]"]                 # an exception -> (final state, error data)
INTERNAL_ERROR = {"error": {"code": "INTERNAL", "message": "internal error; see the server log"}}


class Job:
    """One job: its id, state, event log and stop flag."""

    def __init__(self, job_id: str, key: Any = None, info: dict | None = None):
        self.id = job_id
        self.key = key
        self.info = dict(info or {})            # what the job is about (model, parent), for status answers
        self.state = RUNNING
        self.created = time.time()
        self.finished: float | None = None      # monotonic time it ended
        self.stop = threading.Event()
        self.events: list[tuple[str, Any]] = []
        self._cond = threading.Condition()
        self._closed = False

    @property
    def done(self) -> bool:
        """Whether the job has stopped for good (succeeded, cancelled or failed)."""
        return self.state != RUNNING

    def emit(self, name: str, data: Any) -> None:
        """Append event ``name`` and wake the readers."""
        with self._cond:
            self.events.append((name, data))
            self._cond.notify_all()

    def finish(self, state: str, name: str, data: Any) -> None:
        """Append the last event and enter the final ``state``, under one lock: a reader sees both or neither."""
        with self._cond:
            self.events.append((name, data))
            self.state = state
            self.finished = time.monotonic()
            self._cond.notify_all()

    def run(self, work: Work, on_error: OnError) -> None:
        """``work`` to its end: its result as the ``result`` event, or its exception mapped by ``on_error``."""
        try:
            result = work(lambda data: self.emit("progress", data), self.stop.is_set)
            self.finish(SUCCEEDED, "result", result)
        except BaseException as exc:  # noqa: BLE001 -- every failure becomes this job's error event, nothing more
            try:
                state, data = on_error(exc)
            except BaseException:  # noqa: BLE001 -- a broken error mapper must not leave the job running
                log.exception("job error mapping failed", extra={"event": "web_job_error", "job": self.id})
                state, data = FAILED, INTERNAL_ERROR
            self.finish(state, "error", data)

    def close(self) -> None:
        """Wake every waiter for good (server shutdown)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wait(self, after: int, timeout: float | None) -> tuple[list[tuple[int, str, Any]], bool]:
        """Events with id > ``after`` (waiting up to ``timeout`` for one), and whether no more will come."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.events) > after or self.done or self._closed, timeout)
            new = [(i + 1, name, data) for i, (name, data) in enumerate(self.events[after:], start=after)]
            return new, self.done or self._closed

    def last(self) -> tuple[str, Any] | None:
        """The final event once the job is done; None before."""
        with self._cond:
            return self.events[-1] if self.done and self.events else None


@dataclasses.dataclass(frozen=True)
class MemoryJobRequest:
    """What ``MemoryJobs.create`` runs: ``work``, how its errors read, its idempotency ``key`` and ``info``."""

    work: Work
    on_error: OnError
    key: Any = None
    info: dict | None = None


class MemoryJobs:
    """Jobs by id, in this process: run on a ``Runner``, kept ``ttl_s`` after they finish."""

    noun = "rewrite"

    def __init__(self, ttl_s: float = 600.0, max_running: int = 4, name: str = "web-job"):
        self.ttl_s = ttl_s
        self.max_running = max_running
        self.runner = Runner(name)
        self._jobs: dict[str, Job] = {}
        self._by_key: dict[Any, Job] = {}
        self._lock = threading.Lock()
        self._seq = itertools.count(1)

    def create(self, request: MemoryJobRequest) -> Job:
        """A new job running ``request.work``, or the live one already started for ``request.key``."""
        return self.start(request.work, request.on_error, request.key, request.info)[0]

    def start(self, work: Work, on_error: OnError, key: Any = None, info: dict | None = None) -> tuple[Job, bool]:
        """(job, started): a new job running ``work``, or the live one already started for ``key``."""
        with self._lock:
            self._expire()
            if key is not None:
                prior = self._by_key.get(key)
                if prior is not None and prior.state in (RUNNING, SUCCEEDED):
                    return prior, False
            running = sum(1 for j in self._jobs.values() if not j.done)
            if running >= self.max_running:
                raise TooManyJobs(f"{running} {self.noun} jobs are running already (at most {self.max_running}); "
                                  "wait for one to finish", max_jobs=self.max_running)
            job = Job(f"j{next(self._seq)}-{secrets.token_hex(6)}", key, info)
            self._jobs[job.id] = job
            if key is not None:
                self._by_key[key] = job
        if self.runner.start(job.id, lambda stop: job.run(work, on_error), stop=job.stop) is None:
            job.stop.set()              # closed: the work stops at its first check, here
            job.run(work, on_error)
        return job, True

    def get(self, job_id: str) -> Job:
        """The job by id; ``JobNotFound`` if it never was or was forgotten."""
        with self._lock:
            self._expire()
            job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"{self.noun} job {job_id!r} not found (finished jobs are kept {self.ttl_s:g} s)",
                              job=job_id)
        return job

    def cancel(self, job_id: str) -> Job:
        """Ask the job to stop at its next check; the job."""
        job = self.get(job_id)
        job.stop.set()
        return job

    def resume(self) -> list[str]:
        """Nothing: jobs held in memory end with the process that ran them."""
        return []

    def wait(self, job_id: str, timeout_s: float, should_stop: Callable[[], bool] | None = None) -> Job:
        """The job once it is done, or as it stands after ``timeout_s`` (or once ``should_stop()``)."""
        job = self.get(job_id)
        deadline = time.monotonic() + max(0.0, timeout_s)
        while not job.done and (left := deadline - time.monotonic()) > 0 and not (should_stop and should_stop()):
            job.wait(len(job.events), min(left, 0.2))
        return job

    def _expire(self) -> None:
        now = time.monotonic()
        for job_id, job in list(self._jobs.items()):
            if job.finished is not None and now - job.finished > self.ttl_s:
                del self._jobs[job_id]
                if self._by_key.get(job.key) is job:
                    del self._by_key[job.key]

    def running(self) -> list[threading.Thread]:
        """The threads of jobs still running."""
        return self.runner.running()

    def close(self, timeout: float = 5.0) -> None:
        """Stop every running job, wake every subscriber, and wait up to ``timeout`` for the threads."""
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.close()
        self.runner.close(timeout)
