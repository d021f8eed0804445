"""Dynamic batching: concurrent Sample requests for versions of one base share forward passes.

- ``SampleBatcher(max_batch, max_delay_s, observe)``: one worker thread; ``submit`` blocks the
  caller until its images are ready. Requests with the same key (the domain uses the base:
  every version of one import, whatever its edits and truncation) are coalesced in arrival
  order up to ``max_batch`` images; each request's images carry its own low-rank ``change``
  and truncation (``sampling.sample``). The first waits at most ``max_delay_s`` for company,
  and requests that arrive while a batch runs join the next one without waiting.
- ``BatcherClosed``: ``submit`` after ``close``.
- ``submit(..., should_stop)``: a caller whose client went away (cancelled, deadline passed)
  leaves the queue at once (``Cancelled``); if its batch already runs, the caller stops waiting
  and its images are dropped.

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

from .engine.errors import Cancelled
from .engine.factored import Change
from .engine.generators.base import Generator
from .engine.sampling import sample


class BatcherClosed(RuntimeError):
    """The batcher was closed (the server is shutting down)."""


@dataclasses.dataclass
class _Job:
    key: Hashable
    model: Generator
    z: torch.Tensor
    truncation: float
    change: Change | None
    arrived: float
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    images: torch.Tensor | None = None
    error: BaseException | None = None


class SampleBatcher:
    """Coalesces concurrent sampling of one key (versions of one base) into shared forward passes."""

    POLL_S = 0.05                         # how often a waiting caller checks whether its client left

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
        job = _Job(key, model, z, truncation, change, time.monotonic())
        with self._cond:
            if self._closed:
                raise BatcherClosed("the server is shutting down")
            self._pending.append(job)
            self._cond.notify()
        while not job.done.wait(None if should_stop is None else self.POLL_S):
            if should_stop():
                with self._cond:
                    try:
                        self._pending.remove(job)      # not taken yet: its batch goes on without it
                    except ValueError:
                        pass                           # running: its images are dropped
                raise Cancelled("sampling cancelled: the client went away or its deadline passed")
        if job.error is not None:
            raise job.error
        assert job.images is not None
        return job.images

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
            deadline = first.arrived + self.max_delay_s
            while not self._closed:
                rows = sum(j.z.shape[0] for j in self._pending if j.key == first.key)
                left = deadline - time.monotonic()
                if rows >= self.max_batch or left <= 0:
                    break
                self._cond.wait(left)
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

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            batch = self._admissible(batch)
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
                images = sample(batch[0].model, z=z, truncation=[t for _, t in rows], batch_size=self.max_batch,
                                changes=[c for c, _ in rows])
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


def _by_ranks(job: _Job) -> tuple:
    """Sort key: edited rows grouped by their ranks per weight, unedited rows last."""
    if not job.change:
        return (1, ())
    return (0, tuple(sorted((k, sum(d.rank for d in ds)) for k, ds in job.change.parts.items())))
