"""What every kind of job shares: its states, the protocol it follows, and the runner its work runs on.

- ``RUNNING``, ``SUCCEEDED``, ``CANCELLED``, ``FAILED``: a job's one set of states (``STATES``);
  every state but ``RUNNING`` is final.
- ``JobKind``: the protocol a kind of job follows (dataset and statistics jobs in the store, the
  editor's rewrites in memory): ``create`` a job, read its ``get`` (progress and state),
  ``cancel`` it, ``resume`` what a stopped server left unfinished, ``wait`` for its result, and
  ``close`` this process's share of the work.
- ``Runner``: work on threads of their own, by key, each with a stop flag and tracked until it
  returns; the jobs of every kind and the gRPC streams run their work on one (``workers``).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Callable, Iterator, Protocol

RUNNING, SUCCEEDED, CANCELLED, FAILED = "running", "succeeded", "cancelled", "failed"
STATES = (RUNNING, SUCCEEDED, CANCELLED, FAILED)


class JobKind(Protocol):
    """One kind of job: how it is created, watched, stopped, picked up again and awaited."""

    noun: str                                          # in messages, log events and progress

    def create(self, request: Any) -> Any:
        """Start a job for ``request`` (a replayed request returns its job as it stands); its status."""

    def get(self, job_id: str) -> Any:
        """The job's state and progress; ``JobNotFound`` if there is none by that id."""

    def cancel(self, job_id: str) -> Any:
        """Ask the job to stop; its status (a finished job stays as it is)."""

    def resume(self) -> list[str]:
        """Start the unfinished jobs a stopped server left; their ids."""

    def wait(self, job_id: str, timeout_s: float, should_stop: Callable[[], bool] | None = None) -> Any:
        """The job once it has a result (or as it stands after ``timeout_s``, or once ``should_stop()``)."""

    def close(self, timeout_s: float) -> None:
        """Stop this process's work on the kind's jobs and wait up to ``timeout_s`` for it."""


@dataclasses.dataclass
class Task:
    """One piece of work on its own thread, and the flag that asks it to stop."""

    key: str
    thread: threading.Thread
    stop: threading.Event


class Runner:
    """Work on threads of their own, by key: at most one task per key, each stopped on ``close``.

    Iterating gives the threads still running (what a shutdown waits for); it is true while any runs.
    """

    def __init__(self, name: str):
        self.name = name
        self._tasks: dict[str, Task] = {}
        self._lock = threading.Lock()
        self._closed = False

    def start(self, key: str, work: Callable[[threading.Event], None],
              stop: threading.Event | None = None) -> Task | None:
        """Run ``work(stop)`` on a new thread; None (nothing started) once closed or while ``key`` runs."""
        with self._lock:
            if self._closed or key in self._tasks:
                return None
            stop = stop or threading.Event()
            thread = threading.Thread(target=self._run, args=(key, work, stop), daemon=True, name=f"{self.name}-{key}")
            task = self._tasks[key] = Task(key, thread, stop)
        task.thread.start()
        return task

    def _run(self, key: str, work: Callable[[threading.Event], None], stop: threading.Event) -> None:
        try:
            work(stop)
        finally:
            with self._lock:
                self._tasks.pop(key, None)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._tasks

    def __len__(self) -> int:
        with self._lock:
            return len(self._tasks)

    def __iter__(self) -> Iterator[threading.Thread]:
        return iter(self.running())

    def running(self) -> list[threading.Thread]:
        """The threads of the tasks still running."""
        with self._lock:
            return [t.thread for t in self._tasks.values() if t.thread.is_alive()]

    def join(self, key: str, timeout_s: float | None = None) -> bool:
        """Wait until ``key`` no longer runs (at most ``timeout_s``; None: as long as it takes); whether it stopped."""
        with self._lock:
            task = self._tasks.get(key)
        if task is None or task.thread is threading.current_thread():
            return True
        task.thread.join(timeout_s)
        return not task.thread.is_alive()

    def close(self, timeout_s: float = 30.0) -> None:
        """Start nothing more, ask every task to stop and wait up to ``timeout_s`` in all for them."""
        with self._lock:
            self._closed = True
            tasks = list(self._tasks.values())
        for task in tasks:
            task.stop.set()
        deadline = time.monotonic() + timeout_s
        for task in tasks:
            task.thread.join(max(0.0, deadline - time.monotonic()))
