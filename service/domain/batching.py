"""Dynamic batching: concurrent Sample requests for versions of one base share forward passes.

- ``SampleBatcher(max_batch, max_delay_s, observe)``: one worker thread; ``submit`` blocks the
  caller until its images are ready. Requests with the same key (the domain uses the base:
  every version of one import, whatever its edits and truncation) are coalesced in arrival
  order up to ``max_batch`` images; each request's images carry its own low-rank ``change``
  and truncation (``sampling.sample``). The first waits at most ``max_delay_s`` for company,
  and requests that arrive while a batch runs join the next one without waiting. While the
  callers a pass just served are expected back (as many rows of the key were in flight when it
  ended), the next batch waits for them too, up to ``FILL_SHARE`` of that pass's time (at most
  ``FILL_MAX_S``): steady clients then share full passes instead of splitting into groups that
  alternate (a pass is padded to its bucket, so half a batch costs nearly a whole one). A wait
  that comes up short lowers the expectation to what came. ``max_delay_s`` 0: never wait.
- ``BatcherClosed``: ``submit`` after ``close``.
- ``submit(..., should_stop)``: a caller whose client went away (cancelled, deadline passed)
  leaves the queue at once (``Cancelled``; queued jobs are matched by identity, never by their
  tensors), and a batch about to run leaves out callers that have gone; if its batch already
  runs, the caller stops waiting and its images are dropped.

Images do not depend on the company they are batched with: ``sampling.sample`` pads every
forward pass to a fixed bucket size, and each version's low-rank terms run grouped and padded
the same way (``engine.factored``), so any composition gives the same bits.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Callable, Hashable

import torch

from rulewright.service.engine.errors import Cancelled
from rulewright.service.engine.factored import Change
from rulewright.service.engine.generators.base import Generator
from rulewright.service.engine.sampling import sample


class BatcherClosed(RuntimeError):
    """The batcher was closed (the server is shutting down)."""


@dataclasses.dataclass(eq=False)     # identity: comparing fields would compare tensors
class _Job:
    key: Hashable
    model: Generator
    z: torch.Tensor
    truncation: float
    change: Change | None
    arrived: float
    should_stop: Callable[[], bool] | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    images: torch.Tensor | None = None
    error: BaseException | None = None


class SampleBatcher:
    """Coalesces concurrent sampling of one key (versions of one base) into shared forward passes."""

    POLL_S = 0.05                         # how often a waiting caller checks whether its client left
    # Longest wait for expected callers, as a share of the last pass: at 0.5, 16 clients on 2 cores
    # still split into batches of about 10.
    FILL_SHARE = 1.0
    FILL_MAX_S = 0.1                      # and never longer than this

    def __init__(
        self,
        max_batch: int = 16,              # most images in one forward pass
        max_delay_s: float = 0.002,       # longest a request waits for others to join its batch
        observe: Callable[[int], None] | None = None,   # called with each forward pass's image count
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be positive, got {max_batch}")
        if max_delay_s < 0:
            raise ValueError(f"max_delay_s must not be negative, got {max_delay_s}")
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.observe = observe
        self._pending: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._inflight: collections.Counter = collections.Counter()   # rows inside submit, by key
        self._expected: dict[Hashable, int] = {}    # rows of a key in flight when its last pass ended
        self._last_pass_s = 0.0
        self._free_at = 0.0                          # when the worker last finished a pass
        self._worker = threading.Thread(target=self._run, name="sample-batcher", daemon=True)
        self._worker.start()

    def submit(self, key: Hashable, model: Generator, z: torch.Tensor, truncation: float = 1.0,
               should_stop: Callable[[], bool] | None = None, change: Change | None = None) -> torch.Tensor:
        """(N, 3, R, R) images in [-1, 1] for latents ``z``, computed in a batch shared with others of ``key``.

        Every request of one key must name the same ``model``; ``change`` is this request's
        low-rank change of it (its version), None for the model's own weights.
        ``should_stop()`` true (the client cancelled or its deadline passed): ``Cancelled``, and
        the request leaves the queue if its batch has not started.
        """
        job = _Job(key, model, z, truncation, change, time.monotonic(), should_stop)
        with self._cond:
            if self._closed:
                raise BatcherClosed("the server is shutting down")
            self._pending.append(job)
            self._inflight[key] += z.shape[0]
            self._cond.notify()
        try:
            self._wait(job, should_stop)
        finally:
            with self._cond:
                self._inflight[key] -= z.shape[0]
                if not self._inflight[key]:
                    del self._inflight[key]
        if job.error is not None:
            raise job.error
        assert job.images is not None
        return job.images

    def _wait(self, job: _Job, should_stop: Callable[[], bool] | None) -> None:
        """Until ``job`` is done; ``Cancelled`` (and out of the queue) once ``should_stop()`` is true."""
        while not job.done.wait(None if should_stop is None else self.POLL_S):
            if should_stop():
                with self._cond:
                    if job in self._pending:           # not taken yet: its batch goes on without it
                        self._pending.remove(job)
                        self._cond.notify()
                raise Cancelled("sampling cancelled: the client went away or its deadline passed")

    def close(self) -> None:
        """Finish what is queued, then stop the worker; later submits raise ``BatcherClosed``."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._worker.join()

    def _take(self) -> list[_Job] | None:
        """The next batch: the oldest job and the jobs of its key behind it, up to max_batch images."""
        with self._cond:
            while not self._pending:
                if self._closed:
                    return None
                self._cond.wait()
            first = self._pending[0]
            rows = self._rows(first.key)
            expected = min(self.max_batch, self._expected.get(first.key, 0)) if self.max_delay_s > 0 else 0
            deadline = first.arrived + self.max_delay_s
            if rows < expected:                        # callers of the last pass are on their way back
                fill = min(self.FILL_SHARE * self._last_pass_s, self.FILL_MAX_S)
                deadline = max(deadline, max(first.arrived, self._free_at) + fill)
            while not self._closed and self._pending:
                rows = self._rows(first.key)
                left = deadline - time.monotonic()
                if rows >= self.max_batch or left <= 0 or (rows >= expected and
                                                           time.monotonic() >= first.arrived + self.max_delay_s):
                    break
                self._cond.wait(left)
            if rows < expected:
                self._expected[first.key] = rows       # fewer came back: expect no more next time
            batch, rows, rest = [], 0, collections.deque()
            for job in self._pending:
                n = job.z.shape[0]
                if job.key == first.key and (not batch or rows + n <= self.max_batch):
                    batch.append(job)
                    rows += n
                else:
                    rest.append(job)
            self._pending = rest
            return batch

    def _rows(self, key: Hashable) -> int:
        """Rows queued for ``key`` (call holding the lock)."""
        return sum(j.z.shape[0] for j in self._pending if j.key == key)

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            batch = [job for job in self._admissible(batch) if not _left(job)]
            if not batch:
                continue
            # Versions with the same ranks side by side, the base's own rows last: each layer's
            # low-rank term then runs on one window of rows (the order changes no bits).
            batch.sort(key=_by_ranks)
            try:
                z = torch.cat([j.z for j in batch])
                if self.observe is not None:
                    self.observe(z.shape[0])
                rows = [(j.change, float(j.truncation)) for j in batch for _ in range(j.z.shape[0])]
                started = time.monotonic()
                images = sample(batch[0].model, z=z, truncation=[t for _, t in rows], batch_size=self.max_batch,
                                changes=[c for c, _ in rows])
                self._passed(batch[0].key, time.monotonic() - started)
                start = 0
                for job in batch:
                    job.images = images[start:start + job.z.shape[0]]
                    start += job.z.shape[0]
            except BaseException as exc:  # noqa: BLE001 -- every waiting caller gets the error
                for job in batch:
                    job.error = exc
            finally:
                for job in batch:
                    job.done.set()

    def _passed(self, key: Hashable, seconds: float) -> None:
        """Note a finished pass of ``key``: its time, and the rows of ``key`` in flight now (whose callers,
        this pass's among them, are expected in the next batch)."""
        with self._cond:
            self._last_pass_s = seconds
            self._free_at = time.monotonic()
            self._expected[key] = self._inflight.get(key, 0)
            for gone in [k for k in self._expected if k not in self._inflight]:
                del self._expected[gone]               # keys nobody samples now: forget them

    @staticmethod
    def _admissible(batch: list[_Job]) -> list[_Job]:
        """The jobs whose truncation the model takes; the others get their error now, alone."""
        ok = []
        for job in batch:
            try:
                job.model.check_truncation(job.truncation)
                ok.append(job)
            except ValueError as exc:
                job.error = exc
                job.done.set()
        return ok


def _left(job: _Job) -> bool:
    """Whether ``job``'s caller has stopped waiting (its client left); if so it is answered ``Cancelled`` now,
    so that a batch about to run computes no images nobody will take."""
    if job.should_stop is None or not job.should_stop():
        return False
    job.error = Cancelled("sampling cancelled: the client went away or its deadline passed")
    job.done.set()
    return True


def _by_ranks(job: _Job) -> tuple:
    """Sort key: edited rows grouped by their ranks per weight, unedited rows last."""
    if not job.change:
        return (1, ())
    return (0, tuple(sorted((k, sum(d.rank for d in ds)) for k, ds in job.change.parts.items())))
