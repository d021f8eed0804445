"""Shards: how a job of any kind cuts its seeds, commits each piece, and where the pieces run.

- ``SeedShards``: what every job spec shares: a version, ``count`` seeds from ``seed_start`` cut
  into shards of ``shard_size``, the store prefix of its kind, and the two ways its kind makes a
  shard's bytes: ``compute_shard(domain, index, progress)`` in the server, through the domain,
  and ``render_shard(model, index, batch_size, progress)`` in a worker that holds a generator of
  its own (a Ray worker). A dataset shard is a WebDataset tar, a statistics shard a moment.
- ``publish_shard``: one shard's commit, shared by every kind and every executor: publish, read
  back, verify sha256, then write the commit record (the only thing that counts as progress).
- ``Executor``: the seam where shards run. ``LocalExecutor`` (the embedded default) is a bounded
  ``concurrent.futures`` thread pool in the server; a distributed backend (Ray tasks) implements
  the same ``run_shards`` (``ray_executor.RayExecutor``). Both run the shards of every kind.
"""

from __future__ import annotations

import abc
import concurrent.futures as cf
import dataclasses
import datetime as dt
import hashlib
import json
import logging
from typing import ClassVar, Iterator

from rulewright.registry.blobstore import BlobStore, sha256_hex
from rulewright.registry.errors import AlreadyExists, DataLoss, Reason

from rulewright.service.engine.errors import InvalidArgument
from rulewright.service.engine.progress import Progress
from rulewright.service.jobs.outputs import OutputStores

log = logging.getLogger(__name__)


def now() -> str:
    """This moment in ISO 8601, UTC, to the millisecond (what job records carry)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def check_job_request(request, max_shard_size: int) -> None:
    """What every job request carries: a model reference, a truncation, a shard size and a request id."""
    if not isinstance(request.model, str) or not request.model:
        raise InvalidArgument("model", "give a model reference (faces, faces@production, faces/3)")
    t = request.truncation
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
        raise InvalidArgument("truncation", f"must lie in [0, 1], got {t!r}")
    s = request.shard_size
    if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= max_shard_size:
        raise InvalidArgument("shard_size", f"must be an integer from 1 to {max_shard_size}, got {s!r}")
    if not isinstance(request.request_id, str) or len(request.request_id) > 128:
        raise InvalidArgument("request_id", "must be a string of at most 128 characters")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SeedShards:
    """What every job spec shares: a version, and ``count`` seeds from ``seed_start`` cut into
    shards of ``shard_size``; a kind's spec adds its own fields (``job.json`` holds them all)."""

    kind: ClassVar[str]                          # the spec types' key (``SPEC_TYPES``)
    prefix: ClassVar[str]                        # where the kind's jobs live in the store
    suffix: ClassVar[str]                        # a shard's file type
    id: str
    model: str
    number: int
    seed_start: int
    count: int
    truncation: float
    shard_size: int
    created: str                                 # ISO 8601, UTC
    author: str = "anonymous"
    request_id: str = ""

    @property
    def version_name(self) -> str:
        """``models/{model}/versions/{number}``."""
        return f"models/{self.model}/versions/{self.number}"

    @property
    def seeds(self) -> range:
        """Every seed of the job."""
        return range(self.seed_start, self.seed_start + self.count)

    @property
    def shards(self) -> int:
        """How many shards the job has."""
        return -(-self.count // self.shard_size)

    def shard_seeds(self, index: int) -> range:
        """The seeds of shard ``index``."""
        start = self.seed_start + index * self.shard_size
        return range(start, min(start + self.shard_size, self.seed_start + self.count))

    def shard_name(self, index: int) -> str:
        """The file name of shard ``index``."""
        return f"shard-{index:06d}.{self.suffix}"

    def doc(self, name: str) -> str:
        """The store key of the job's document ``name``."""
        return f"{self.prefix}{self.id}/{name}"

    def compute_shard(self, domain, index: int, progress: Progress) -> bytes:
        """Shard ``index``'s bytes, made in this server through ``domain``."""
        raise NotImplementedError

    def render_shard(self, model, index: int, batch_size: int, progress: Progress) -> bytes:
        """Shard ``index``'s bytes, made from ``model``, a generator this worker holds (the same bytes)."""
        raise NotImplementedError

    def to_json(self) -> bytes:
        """The stored form."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes):
        """Inverse of ``to_json``."""
        return cls(**json.loads(data))


def publish_shard(store: BlobStore, spec: SeedShards, index: int, data: bytes, *,
                  out: BlobStore | None = None) -> dict:
    """Commit shard ``index``: publish its bytes, read them back, verify sha256, then write its record.

    ``out``: the store of the job's output location, which gets the shard at key
    ``spec.shard_name(index)`` (the record still goes to ``store``, with the job's other records);
    None: ``store`` gets both, under the kind's prefix.

    ``create`` shows all of the shard or none of it; a shard an earlier attempt (a killed worker, a
    previous server) already published is verified, not rewritten. Only verified shards get a
    record, and only records count as progress. DATA_LOSS if the stored bytes differ.
    """
    sha = sha256_hex(data)
    name = spec.shard_name(index)
    target = out if out is not None else store
    key = name if out is not None else spec.doc(name)
    record_key = spec.doc(f"done/{index:06d}.json")
    try:
        target.create(key, data)
    except AlreadyExists:
        log.info("shard already published", extra={"event": "shard_exists", "job": spec.id, "shard": index})
    stored = hashlib.sha256(target.read(key)).hexdigest()
    if stored != sha:
        raise DataLoss(Reason.BLOB_CORRUPT, f"shard {key} holds bytes hashing to {stored}, expected {sha}",
                       key=key, sha256=sha, actual=stored)
    seeds = spec.shard_seeds(index)
    record = {"index": index, "name": name, "key": key, "samples": len(seeds),
              "first_seed": seeds.start, "sha256": sha, "size_bytes": len(data), "written": now()}
    try:
        store.create(record_key, json.dumps(record, sort_keys=True).encode())
    except AlreadyExists:
        prior = json.loads(store.read(record_key))
        if prior["sha256"] != sha:
            raise DataLoss(Reason.BLOB_CORRUPT, f"shard {key} was recorded with sha256 {prior['sha256']}, "
                                                f"now {sha}", key=key) from None
        record = prior
    return record


class Executor(abc.ABC):
    """Where a job's shards run; ``run_shards`` yields each shard's commit record as it completes.

    Several kinds of job may share one executor: each ``attach``es it and ``release``s it when it
    closes, and the last release closes it.
    """

    _users = 0

    def attach(self) -> None:
        """One more kind of job runs its shards here."""
        self._users += 1

    def release(self) -> None:
        """A kind of job is done with this executor; the last one closes it."""
        self._users -= 1
        if self._users <= 0:
            self.close()

    @abc.abstractmethod
    def run_shards(self, spec: SeedShards, indices: list[int], progress: Progress) -> Iterator[dict]:
        """Run shards ``indices`` of ``spec``; stop starting new ones once ``progress`` is stopped."""

    def close(self) -> None:
        """Release workers."""


class LocalExecutor(Executor):
    """The embedded default: shards on a bounded ``concurrent.futures`` thread pool in the server.

    Threads rather than processes: the version stays resident once, torch and zlib release the
    GIL, and a dataset shard's images come from ``Domain.sample`` itself, the path Sample takes.
    """

    def __init__(self, domain, max_workers: int = 2, outputs: OutputStores | None = None):
        self.domain = domain
        self.max_workers = max_workers
        # The stores of output locations, opened with the server's S3 settings (DatasetJobs shares them).
        self.outputs = outputs if outputs is not None else OutputStores(getattr(domain, "s3_config", None))
        self._pool = cf.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="job-shard")

    def _shard(self, spec: SeedShards, index: int, progress: Progress) -> dict:
        progress.check(f"shard {index}")
        data = spec.compute_shard(self.domain, index, progress)
        uri = getattr(spec, "output_uri", "")
        out = self.outputs.open(uri, spec.output_prefix) if uri else None
        return publish_shard(self.domain.registry.store, spec, index, data, out=out)

    def run_shards(self, spec: SeedShards, indices: list[int], progress: Progress) -> Iterator[dict]:
        """At most ``max_workers`` of this job's shards in flight; none started once stopped."""
        todo = list(indices)
        running: set[cf.Future] = set()
        try:
            while todo or running:
                while todo and len(running) < self.max_workers and not progress.stopped():
                    running.add(self._pool.submit(self._shard, spec, todo.pop(0), progress))
                if not running:
                    return
                finished, running = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for f in finished:
                    yield f.result()
        finally:
            for f in running:          # an error or a stop: the rest may finish (whole) or not start
                f.cancel()
            cf.wait(running)

    def close(self) -> None:
        """Stop the pool (queued shards are dropped; a running one finishes whole)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
