"""Long work: every kind of job follows one protocol (``protocol.JobKind``: create, get its progress,
cancel, resume, wait for its result, close) with one set of states and one set of errors.

- ``protocol``: the states, ``JobKind`` and the ``Runner`` every job's work (and every gRPC
  stream's) runs on; ``errors``: ``JobNotFound``, ``JobNotFinished``, ``TooManyJobs``,
  ``OutputRefused``.
- Jobs in the object store (``stored.StoredJobs``), their shards on an ``Executor``
  (``shards.LocalExecutor`` or ``ray_executor.RayExecutor``): ``dataset`` (WebDataset shards of
  images, ``outputs`` for caller-named output locations) and ``statistics`` (a layer's key moment).
- Jobs in memory (``memory.MemoryJobs``, ``memory.Job``): the editor's rewrites (``editor``) and,
  one job per call, the gRPC streams.
"""
