"""The editor's rewrites as jobs of the HTTP side: ``Jobs`` (jobs held in memory) and their names.

- ``Job``: a running or finished rewrite with its ordered event log (``memory.Job``).
- ``Jobs(ttl_s, max_running)``: ``start(work, on_error, key, info)``, ``get``, ``cancel``,
  ``running``, ``close`` (``memory.MemoryJobs``, the ``JobKind`` of jobs that live in this process).
- ``RUNNING``, ``SUCCEEDED``, ``FAILED``, ``CANCELLED``; ``JobNotFound``, ``TooManyJobs``: the
  states and errors every kind of job shares.

Nothing here knows about HTTP or the domain; the HTTP side feeds it.
"""

from __future__ import annotations

from rulewright.service.jobs.errors import JobNotFound, TooManyJobs
from rulewright.service.jobs.memory import Job, MemoryJobRequest, MemoryJobs
from rulewright.service.jobs.protocol import CANCELLED, FAILED, RUNNING, SUCCEEDED

__all__ = ["CANCELLED", "FAILED", "RUNNING", "SUCCEEDED", "Job", "JobNotFound", "Jobs", "MemoryJobRequest",
           "TooManyJobs"]


class Jobs(MemoryJobs):
    """The editor's rewrite jobs by id: each on its own thread, kept ``ttl_s`` after it finishes."""

    noun = "rewrite"

    def __init__(self, ttl_s: float = 600.0, max_running: int = 4):
        super().__init__(ttl_s, max_running, name="web-job")
