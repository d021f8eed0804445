"""Background jobs for the HTTP side: one thread per job, its events kept for late subscribers.

- ``Job``: a running or finished piece of work with an ordered event log (``progress`` events as
  they happen, then exactly one ``result`` or ``error``); ``wait(after, timeout)`` blocks until
  there are events after the given id (ids start at 1) or the job is done; ``stop`` is the flag
  the work's ``should_stop`` reads.
- ``Jobs(ttl_s, max_running)``: the registry. ``start(work, on_error, key)`` runs
  ``work(emit_progress, should_stop) -> result dict`` on its own thread; an exception becomes the
  job's ``error`` event through ``on_error(exc) -> (state, data)``. One job's failure never
  touches another. Finished jobs are kept ``ttl_s`` seconds, then forgotten. ``key`` (e.g. a
  rewrite's model, request id and body digest) returns the job already started for it instead of
  starting a second one, unless that one failed. ``close()`` stops every job.

Nothing here knows about HTTP or the domain; ``web.py`` feeds it.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
from typing import Any, Callable

from rulewright.service.errors import Code, Error

log = logging.getLogger(__name__)

RUNNING, SUCCEEDED, FAILED, CANCELLED = "running", "succeeded", "failed", "cancelled"


class JobNotFound(Error):
    """No job by that id (never started, or finished longer ago than the registry keeps jobs)."""

    code = Code.NOT_FOUND
    reason = "NOT_FOUND"


class TooManyJobs(Error):
    """``max_running`` jobs are running already (→ RESOURCE_EXHAUSTED)."""

    code = Code.RESOURCE_EXHAUSTED
    reason = "TOO_MANY_JOBS"


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
        self.events: list[tuple[str, dict]] = []
        self._cond = threading.Condition()
        self._closed = False

    @property
    def done(self) -> bool:
        return self.state != RUNNING

    def emit(self, name: str, data: dict) -> None:
        with self._cond:
            self.events.append((name, data))
            self._cond.notify_all()

    def finish(self, state: str, name: str, data: dict) -> None:
        with self._cond:
            self.events.append((name, data))
            self.state = state
            self.finished = time.monotonic()
            self._cond.notify_all()

    def close(self) -> None:
        """Wake every waiter for good (server shutdown)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wait(self, after: int, timeout: float) -> tuple[list[tuple[int, str, dict]], bool]:
        """(events with id > ``after``, whether no more will come); waits up to ``timeout`` for news."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.events) > after or self.done or self._closed, timeout)
            new = [(i + 1, name, data) for i, (name, data) in enumerate(self.events[after:], start=after)]
            return new, self.done or self._closed

    def last(self) -> tuple[str, dict] | None:
        with self._cond:
            return self.events[-1] if self.done and self.events else None


class Jobs:
    """Jobs by id: started on their own threads, kept ``ttl_s`` after they finish."""

    def __init__(self, ttl_s: float = 600.0, max_running: int = 4):
        self.ttl_s = ttl_s
        self.max_running = max_running
        self._jobs: dict[str, Job] = {}
        self._by_key: dict[Any, Job] = {}
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._seq = itertools.count(1)

    def start(self, work: Callable[[Callable[[dict], None], Callable[[], bool]], dict],
              on_error: Callable[[BaseException], tuple[str, dict]], key: Any = None,
              info: dict | None = None) -> tuple[Job, bool]:
        """(job, started): a new job running ``work``, or the live one already started for ``key``."""
        with self._lock:
            self._expire()
            if key is not None:
                prior = self._by_key.get(key)
                if prior is not None and prior.state in (RUNNING, SUCCEEDED):
                    return prior, False
            running = sum(1 for j in self._jobs.values() if not j.done)
            if running >= self.max_running:
                raise TooManyJobs(f"{running} rewrite jobs are running already (at most {self.max_running}); "
                                  "wait for one to finish", max_jobs=self.max_running)
            job = Job(f"j{next(self._seq)}-{secrets.token_hex(6)}", key, info)
            self._jobs[job.id] = job
            if key is not None:
                self._by_key[key] = job
            thread = threading.Thread(target=self._run, args=(job, work, on_error), daemon=True,
                                      name=f"web-job-{job.id}")
            self._threads.add(thread)
        thread.start()
        return job, True

    def _run(self, job: Job, work, on_error) -> None:
        try:
            result = work(lambda data: job.emit("progress", data), job.stop.is_set)
            job.finish(SUCCEEDED, "result", result)
        except BaseException as exc:  # noqa: BLE001 -- every failure becomes this job's error event, nothing more
            try:
                state, data = on_error(exc)
            except BaseException:  # noqa: BLE001 -- a broken error mapper must not leave the job running
                log.exception("job error mapping failed", extra={"event": "web_job_error", "job": job.id})
                state, data = FAILED, {"error": {"code": "INTERNAL", "message": "internal error; see the server log"}}
            job.finish(state, "error", data)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def get(self, job_id: str) -> Job:
        with self._lock:
            self._expire()
            job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"rewrite job {job_id!r} not found (finished jobs are kept {self.ttl_s:g} s)")
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        job.stop.set()
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
        with self._lock:
            return [t for t in self._threads if t.is_alive()]

    def close(self, timeout: float = 5.0) -> None:
        """Stop every running job, wake every subscriber, and wait up to ``timeout`` for the threads."""
        with self._lock:
            jobs, threads = list(self._jobs.values()), list(self._threads)
        for job in jobs:
            job.stop.set()
            job.close()
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
