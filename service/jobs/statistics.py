"""Statistics jobs: a layer's key moment C = E[k kᵀ] over up to 10^7 samples, as shards merged exactly.

- ``StatisticsJobRequest``: model reference, layer, samples and first seed, truncation, shard size,
  idempotency key; ``check(limits)`` refuses bad input (``max_job_samples``) before any work.
- ``StatisticsJobs(domain, executor)``: the ``stored.StoredJobs`` kind of statistics jobs
  (``create``, ``get``, ``list``, ``cancel``, ``wait``, ``delete``, ``resume``, ``close``), under
  ``jobs/statistics/{id}/``; its shards run on the executors dataset shards run on
  (``LocalExecutor``, one shard at a time by default; ``RayExecutor``).
- ``StatsJobSpec``: a created job (``job.json``), its reference resolved to one version.
- ``alignment(rows)``: the samples per float32 block of ``SecondMoment`` at a layer with ``rows`` key
  locations per sample; shard sizes are multiples of it.
- ``merge_shards(blobs)``: the shards' ``SecondMoment`` partials summed in seed order.

Store layout (``jobs/statistics/{id}/``): ``job.json``; ``shard-{i:06d}.safetensors``, shard ``i``'s
``SecondMoment`` (count, float64 sum and outer product, ``Stat.to_bytes``) over its seeds;
``done/{i:06d}.json``, its commit record (written by ``shards.publish_shard`` only after the shard
was read back with the expected sha256); ``manifest.json`` once merged. The merged moment goes to
``statistics/{digest}.safetensors`` (``statistics.store_durable``) and into the statistics cache
under ``Statistics.key`` of the version, layer, seeds and truncation, the key a Rewrite with the
same ``stats`` looks up; ``Statistics.get`` reads the store's copy when the cache has dropped it.

Why the merge equals one process's ``key_moment`` up to float64 rounding: ``SecondMoment`` sums
``_CHUNK_ROWS`` rows of keys in float32, then adds that block into float64 totals. A shard starts
and ends on a block boundary (its size is a multiple of ``alignment``) and uses the job's batch
size, so every float32 block is the one a single process over the same seeds and batch size
forms; only the order of the float64 additions of blocks differs (shard sums first, then the
shards in seed order), which is float64 rounding. A shard's bytes depend only on (version, layer,
seeds, truncation, batch size), so a retried shard meets its earlier self and is verified.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import secrets
import time
from typing import ClassVar, Iterable, Iterator

from rulewright.registry.errors import DataLoss, NotFound as RegistryNotFound, Reason

from rulewright.service.domain.limits import Limits
from rulewright.service.domain.requests import MAX_SEED
from rulewright.service.domain.statistics import KEY_MOMENT, durable_key, store_durable
from rulewright.service.engine.errors import InvalidArgument
from rulewright.service.engine.progress import Progress
from rulewright.service.engine.stats import _CHUNK_ROWS, SecondMoment, key_moment, load_stat
from rulewright.service.jobs.protocol import RUNNING
from rulewright.service.jobs.shards import Executor, SeedShards, check_job_request, now
from rulewright.service.jobs.stored import JobStatus, StoredJobs

log = logging.getLogger(__name__)

PREFIX = "jobs/statistics/"
DEFAULT_SHARD_SIZE = 10_000
MAX_SHARD_SIZE = 1_000_000        # a shard's memory is its moment (dim² float64), not its samples
BATCH_SIZE = 256                  # samples per forward pass (fixed per job: it shapes the float32 sums)


def alignment(rows: int) -> int:
    """Samples whose keys fill one float32 block of ``SecondMoment`` (``rows`` locations each); 1
    when ``rows`` does not divide the block (then shards merge exactly only up to float32 blocks)."""
    return _CHUNK_ROWS // rows if 0 < rows <= _CHUNK_ROWS and _CHUNK_ROWS % rows == 0 else 1


def merge_shards(blobs: Iterable[bytes]) -> SecondMoment:
    """The ``SecondMoment`` partials (``to_bytes`` of each shard), summed in the order given."""
    total: SecondMoment | None = None
    for data in blobs:
        stat = load_stat(data)
        if not isinstance(stat, SecondMoment):
            raise TypeError(f"a statistics shard holds a {type(stat).__name__}")
        total = stat if total is None else total.merge(stat)
    if total is None:
        raise ValueError("no shards to merge")
    return total


@dataclasses.dataclass(frozen=True)
class StatisticsJobRequest:
    """C at ``layer`` of ``model`` over seeds ``seed_start`` .. ``seed_start + samples - 1``, as a job."""

    model: str                                   # faces, faces@production or faces/3
    samples: int
    layer: str = ""                              # empty: the model's default layer
    seed_start: int = 0
    truncation: float = 1.0
    shard_size: int = DEFAULT_SHARD_SIZE         # rounded up to a multiple of the layer's ``alignment``
    request_id: str = ""                         # a retry with the same id returns the first call's job
    author: str = "anonymous"

    def check(self, limits: Limits) -> None:
        """Samples (at most ``max_job_samples``), seeds, truncation, shard size and request id."""
        check_job_request(self, MAX_SHARD_SIZE)
        if not isinstance(self.layer, str):
            raise InvalidArgument("layer", f"must be a layer name or empty, got {self.layer!r}")
        n = self.samples
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidArgument("stats.samples", f"must be a positive integer, got {n!r}")
        if n > limits.max_job_samples:
            raise InvalidArgument("stats.samples", f"at most {limits.max_job_samples:,} samples per statistics job "
                                                   f"(server setting max_job_samples), got {n:,}")
        s0 = self.seed_start
        if isinstance(s0, bool) or not isinstance(s0, int) or s0 < 0 or s0 + n - 1 > MAX_SEED:
            raise InvalidArgument("stats.seed_start", f"the seeds must lie in [0, 2**63), got start {s0!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StatsJobSpec(SeedShards):
    """A created statistics job: the request with its reference and layer resolved (``job.json``); its
    ``shard_size`` is rounded to the layer's alignment."""

    kind: ClassVar[str] = "statistics"
    prefix: ClassVar[str] = PREFIX
    suffix: ClassVar[str] = "safetensors"
    layer: str
    batch_size: int

    def compute_shard(self, domain, index: int, progress: Progress) -> bytes:
        """Shard ``index``'s moment over a private module of the version; the bytes an earlier attempt
        published but did not record, if there are any (they are verified and recorded, not recomputed)."""
        try:
            return domain.registry.store.read(self.doc(self.shard_name(index)))
        except RegistryNotFound:
            pass
        res = domain.generator(domain.registry.get_version(self.model, self.number))
        return self.render_shard(res.hookable(), index, self.batch_size, progress)     # key_moment hooks the layer

    def render_shard(self, model, index: int, batch_size: int, progress: Progress) -> bytes:
        """Shard ``index``'s moment over ``model`` in passes of the job's own batch size (it shapes the sums)."""
        stat = key_moment(model, self.layer, self.shard_seeds(index), self.truncation, batch_size=self.batch_size,
                          progress=Progress(should_stop=progress.stopped))
        return stat.to_bytes()


class StatisticsJobs(StoredJobs):
    """Statistics jobs over a domain's registry store, their shards run by an ``Executor`` (by default
    one at a time in this server: a forward pass already uses every core through torch's own threads)."""

    noun = "statistics"
    resource = "statisticsJobs"
    spec_type = StatsJobSpec

    def __init__(self, domain, executor: Executor | None = None, batch_size: int = BATCH_SIZE, max_workers: int = 1):
        super().__init__(domain, executor, max_workers)
        self.batch_size = batch_size

    def create(self, request: StatisticsJobRequest) -> JobStatus:
        """Resolve the reference and layer, record the job in the store and start it; a known
        ``request_id`` returns its job as it stands."""
        request.check(self.domain.limits)
        version = self.domain.resolve(request.model)
        model = self.domain.generator(version).model
        try:
            model.check_truncation(request.truncation)
        except ValueError as exc:
            raise InvalidArgument("truncation", str(exc)) from None
        layer = request.layer or model.default_layer()
        info = next((i for i in model.layer_infos() if i.name == layer), None)
        if info is None:
            raise InvalidArgument("layer", f"{model.arch} has no rewritable layer {layer!r}; layers: "
                                           f"{', '.join(i.name for i in model.layer_infos())}")
        step = alignment(info.key_shape[1] * info.key_shape[2])
        shard_size = -(-request.shard_size // step) * step
        # A batch's rows must divide the float32 block, or one process's blocks would straddle shards.
        batch = math.gcd(self.batch_size, step) if step > 1 else self.batch_size
        job_id = (hashlib.sha256(f"statistics:{request.request_id}".encode()).hexdigest()[:24] if request.request_id
                  else f"{time.time_ns() // 1_000_000:013x}{secrets.token_hex(6)}")
        spec = StatsJobSpec(id=job_id, model=version.model, number=version.number, layer=layer,
                            seed_start=request.seed_start, count=request.samples, truncation=float(request.truncation),
                            shard_size=shard_size, batch_size=batch, created=now(), author=request.author,
                            request_id=request.request_id)
        return self._create(spec)

    def _finish(self, spec: StatsJobSpec) -> None:
        """The shards' moments merged in seed order, stored and cached, then the manifest."""
        records = self._records(spec)

        def blobs() -> Iterator[bytes]:
            for r in records:
                data = self.store.read(r["key"])
                if hashlib.sha256(data).hexdigest() != r["sha256"]:
                    raise DataLoss(Reason.BLOB_CORRUPT, f"shard {r['key']} no longer matches its record",
                                   key=r["key"], sha256=r["sha256"])
                yield data
        total = merge_shards(blobs())
        if total.count == 0 or sum(r["samples"] for r in records) != spec.count:
            raise DataLoss(Reason.BLOB_CORRUPT, f"the shards of statistics job {spec.id} do not cover its seeds")
        data = total.to_bytes()
        version = self.domain.registry.get_version(spec.model, spec.number)
        res = self.domain.generator(version)
        # Named by the version's own weights: an edited version's resident module is its base's.
        key = self.domain.stats.key(res.hookable, spec.layer, KEY_MOMENT, spec.seeds, spec.truncation,
                                    memo=(version.model, version.number), arch=res.model.arch)
        stored = store_durable(self.store, key, data)        # first: the cache may drop it, the store keeps it
        self.domain.stats.cache.put(key, data)
        manifest = {
            "job": f"{self.resource}/{spec.id}", "version": spec.version_name, "model": spec.model,
            "number": spec.number, "layer": spec.layer, "created": spec.created, "kind": KEY_MOMENT,
            "seeds": {"start": spec.seed_start, "count": spec.count}, "truncation": spec.truncation,
            "shard_size": spec.shard_size, "batch_size": spec.batch_size, "samples": spec.count,
            "cache_key": key.canonical(), "statistic_key": durable_key(key), "sha256": hashlib.sha256(data).hexdigest(),
            "size_bytes": len(data), "lineage": self._lineage(spec),
            "shards": [{k: r[k] for k in ("name", "key", "samples", "first_seed", "sha256", "size_bytes")}
                       for r in records],
        }
        self._write_manifest(spec, manifest, samples=spec.count, cache_key=key.digest(), stored=stored)

    def statistic_uri(self, status: JobStatus) -> str:
        """Where the merged statistic of a finished job is kept (empty until it is)."""
        if status.state == RUNNING or not status.manifest:
            return ""
        return self._uri(status.manifest["statistic_key"])

