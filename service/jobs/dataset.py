"""Dataset jobs: images of one version for a range of seeds, as WebDataset shards in the object store.

- ``DatasetJobRequest``: what a caller asks for (model reference, seeds, truncation, image format,
  shard size, idempotency key, output location); ``check(limits)`` refuses bad input before any work.
- ``DatasetJobs(domain, executor)``: the ``stored.StoredJobs`` kind of dataset jobs (``create``,
  ``get``, ``list``, ``cancel``, ``wait``, ``delete``, ``resume``, ``close``), under
  ``jobs/datasets/{id}/``; its shards run on any ``Executor`` (``LocalExecutor``, ``RayExecutor``).
- ``JobSpec``: a created job (``job.json``), its reference resolved to one version.
- ``shard_tar``: one shard's bytes; ``render_pngs``: a shard's images from a generator an executor
  holds itself; ``sample_pngs``: through ``Domain.sample`` (both give Sample's bytes).
- ``output_bytes(count, shards, resolution)`` (``outputs``): the most a job's shards can take,
  checked at create against ``Limits.max_job_output_bytes`` and the free space of the filesystem
  it writes to; a server runs at most ``Limits.max_running_jobs`` jobs of a kind.

Shards (``shard-{i:06d}.tar``): ``{key}.png`` and ``{key}.json`` per sample, key ``%09d`` of the
seed (the WebDataset convention: files sharing a key form one sample).

A job with an output location (``JobSpec.output_uri``) claims it when it is created: ``job.json``
in the output store, written with the store's conditional create (a link on a filesystem, a
conditional PutObject on S3) right after the job's own ``job.json``, so of two jobs naming one
location exactly one gets it; the other is refused (FAILED_PRECONDITION, OUTPUT_IN_USE) and its
record removed before it did any work. Deleting the job releases the location.

It keeps the registry layout for its own records
(``job.json``, ``done/``, the markers and a copy of the manifest, so get, list and resume work as
for any job), but publishes its shards and its manifest into the store the location names, at
that store's document keys ``shard-{i:06d}.tar`` and ``manifest.json`` (the registry layout puts
documents under ``docs/``: ``{output_uri}/docs/shard-000000.tar``). The output location is part of
the spec, so a resumed or retried shard goes to the same place, and a commit record is still
written only after the shard was read back from the output store with the expected sha256.

Why it is safe to retry or resume anything: a shard's bytes depend only on (version, seeds,
truncation) (the sampling is deterministic, the PNG encoder and the tar headers too), and the
store's ``create`` publishes the whole document or nothing (a temporary file linked into place,
or one conditional PutObject). A retried shard meets its earlier self (ALREADY_EXISTS) and is
verified instead of written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import secrets
import shutil
import tarfile
import time
from typing import ClassVar, Iterable

from rulewright.registry.blobstore import BlobStore
from rulewright.registry.errors import AlreadyExists, NotFound as RegistryNotFound
from rulewright.registry.manifests import Version

from rulewright.service.domain.limits import Limits
from rulewright.service.domain.requests import MAX_SEED, SampleRequest
from rulewright.service.engine.errors import InvalidArgument
from rulewright.service.engine.progress import Progress
from rulewright.service.engine.sampling import png_bytes, sample, to_uint8
from rulewright.service.jobs.errors import JobNotFound, OutputRefused
from rulewright.service.jobs.outputs import (OutputStores, allowed_prefix, existing_folder, output_bytes,
                                             output_location)
from rulewright.service.jobs.protocol import CANCELLED, FAILED, RUNNING, SUCCEEDED
from rulewright.service.jobs.shards import Executor, LocalExecutor, SeedShards, check_job_request, now, publish_shard
from rulewright.service.jobs.stored import JobStatus, StoredJobs, store_uri

__all__ = ["CANCELLED", "FAILED", "RUNNING", "SUCCEEDED", "DatasetJobRequest", "DatasetJobs", "Executor", "JobNotFound",
           "JobSpec", "JobStatus", "LocalExecutor", "publish_shard", "render_pngs", "sample_pngs", "shard_tar"]

log = logging.getLogger(__name__)

PREFIX = "jobs/datasets/"
IMAGE_FORMATS = ("png",)
DEFAULT_SHARD_SIZE = 1000
MAX_SHARD_SIZE = 10_000              # a shard is built in memory: 10^4 faces PNGs is about 1 GB
MAX_DATASET_IMAGES = 10_000_000      # one job; more is several jobs (shards are per job)
CLAIM = "job.json"                   # in an output location: the job it belongs to (one conditional create)


# ---- request and status ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DatasetJobRequest:
    """Images of ``model`` for seeds ``seed_start`` .. ``seed_start + count - 1`` as WebDataset shards."""

    model: str                                   # faces, faces@production or faces/3
    seed_start: int
    count: int
    truncation: float = 1.0
    image_format: str = "png"
    shard_size: int = DEFAULT_SHARD_SIZE
    request_id: str = ""                         # a retry with the same id returns the first call's job
    author: str = "anonymous"
    output_uri: str = ""                         # where shards and manifest go; empty: the registry's store

    def check(self, limits: Limits | None = None) -> None:
        """Seeds, truncation, image format, shard size and request id against their bounds."""
        check_job_request(self, MAX_SHARD_SIZE)
        if isinstance(self.count, bool) or not isinstance(self.count, int) or not 1 <= self.count <= MAX_DATASET_IMAGES:
            raise InvalidArgument("seeds.count", f"must be an integer from 1 to {MAX_DATASET_IMAGES}, got {self.count!r}")
        if (isinstance(self.seed_start, bool) or not isinstance(self.seed_start, int) or self.seed_start < 0
                or self.seed_start + self.count - 1 > MAX_SEED):
            raise InvalidArgument("seeds.start", f"the seeds must lie in [0, 2**63), got start {self.seed_start!r}")
        if self.image_format not in IMAGE_FORMATS:
            raise InvalidArgument("image_format", f"must be one of {', '.join(IMAGE_FORMATS)}, got {self.image_format!r}")
        if self.output_uri:
            output_location(self.output_uri)


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobSpec(SeedShards):
    """A created job: the request with its reference resolved to one version (``job.json``)."""

    kind: ClassVar[str] = "dataset"
    prefix: ClassVar[str] = PREFIX
    suffix: ClassVar[str] = "tar"
    image_format: str
    output_uri: str = ""                         # normalized output location; empty: the registry's store
    output_prefix: str = ""                      # the allowed prefix it lies under (links below it are refused)

    def compute_shard(self, domain, index: int, progress: Progress) -> bytes:
        """Shard ``index``'s tar, its images drawn through ``Domain.sample``."""
        seeds = self.shard_seeds(index)
        return shard_tar(self, seeds, sample_pngs(domain, self, seeds, progress))

    def render_shard(self, model, index: int, batch_size: int, progress: Progress) -> bytes:
        """Shard ``index``'s tar, its images drawn from ``model`` (the same bytes)."""
        seeds = self.shard_seeds(index)
        return shard_tar(self, seeds, render_pngs(model, seeds, self.truncation, batch_size, progress))


def shard_tar(spec: JobSpec, seeds: range, pngs: Iterable[bytes]) -> bytes:
    """The WebDataset tar of one shard: ``{key}.png`` and ``{key}.json`` per seed, deterministic bytes.

    Headers carry no time, owner or order that depends on the run, so a retry writes the same bytes.
    """
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for seed, png in zip(seeds, pngs, strict=True):
            key = f"{seed:09d}"
            meta = json.dumps({"seed": seed, "version": spec.version_name, "truncation": spec.truncation},
                              sort_keys=True).encode()
            for name, data in ((f"{key}.png", png), (f"{key}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()

def render_pngs(model, seeds: range, truncation: float, batch_size: int, progress: Progress) -> list[bytes]:
    """PNGs of ``seeds`` drawn straight from a generator, byte-identical to what ``Domain.sample`` gives.

    For executors that hold a generator of their own (a Ray worker): ``sampling.sample`` pads every
    forward pass to a fixed bucket, so the images do not depend on ``batch_size`` or on what Sample
    batched them with, and ``png_bytes`` is the encoder Sample uses.
    """
    out: list[bytes] = []
    for start in range(seeds.start, seeds.stop, batch_size):
        progress.check(f"seeds from {start}")
        chunk = list(range(start, min(start + batch_size, seeds.stop)))
        images = sample(model, seeds=chunk, truncation=truncation, batch_size=batch_size)
        out += [png_bytes(img) for img in to_uint8(images).numpy()]
    return out

def sample_pngs(domain, spec: JobSpec, seeds: range, progress: Progress) -> list[bytes]:
    """PNGs of ``seeds``, drawn through ``Domain.sample`` in passes of at most one Sample request."""
    step = max(1, min(domain.max_batch, domain.limits.max_images))
    ref = f"{spec.model}/{spec.number}"
    out: list[bytes] = []
    for start in range(seeds.start, seeds.stop, step):
        chunk = list(range(start, min(start + step, seeds.stop)))
        result = domain.sample(SampleRequest(model=ref, seeds=chunk, truncation=spec.truncation), progress)
        out += [png_bytes(img) for img in result.images.cpu().numpy()]
    return out


def _in_use(spec: JobSpec, holder: str) -> OutputRefused:
    return OutputRefused("OUTPUT_IN_USE", f"output_uri: {spec.output_uri} belongs to {holder}; name another location "
                         f"(or delete that job)", field="output_uri", uri=spec.output_uri, job=holder.split("/")[-1])


class DatasetJobs(StoredJobs):
    """Dataset jobs over a domain's registry store, their shards run by an ``Executor``."""

    noun = "dataset"
    resource = "datasetJobs"
    spec_type = JobSpec

    def __init__(self, domain, executor: Executor | None = None, max_workers: int = 2,
                 output_prefixes: Iterable[str] = ()):
        super().__init__(domain, executor, max_workers)
        # What a caller may name as output_uri: the server writes there with its own credentials.
        self.output_prefixes = tuple(output_location(p, "job_output_prefixes") for p in output_prefixes)
        self.outputs: OutputStores = (getattr(self.executor, "outputs", None)
                                      or OutputStores(getattr(domain, "s3_config", None)))

    def create(self, request: DatasetJobRequest) -> JobStatus:
        """Resolve the reference, record the job in the store and start it; a known ``request_id``
        returns its job as it stands."""
        request.check(self.domain.limits)
        prefix = allowed_prefix(request.output_uri, self.output_prefixes) if request.output_uri else ""
        output = output_location(request.output_uri) if request.output_uri else ""
        version: Version = self.domain.resolve(request.model)
        res = self.domain.generator(version)
        try:
            res.model.check_truncation(request.truncation)
        except ValueError as exc:
            raise InvalidArgument("truncation", str(exc)) from None
        job_id = (hashlib.sha256(request.request_id.encode()).hexdigest()[:24] if request.request_id
                  else f"{time.time_ns() // 1_000_000:013x}{secrets.token_hex(6)}")
        spec = JobSpec(id=job_id, model=version.model, number=version.number, seed_start=request.seed_start,
                       count=request.count, truncation=float(request.truncation), image_format=request.image_format,
                       shard_size=request.shard_size, created=now(), author=request.author,
                       request_id=request.request_id, output_uri=output, output_prefix=prefix)
        if not self.store.list_keys(self._doc(job_id, "job.json"), limit=1):      # a new job, not a retry
            self._check_output_size(spec, res.model.resolution)
            if output:
                self._check_output_free(spec)
        return self._create(spec)

    def _check_output_size(self, spec: JobSpec, resolution: int) -> None:
        """Refuse a job whose worst-case output is over ``max_job_output_bytes``, or over the free
        space of the filesystem it writes to (the registry's folder or its output location)."""
        need = output_bytes(spec.count, spec.shards, resolution)
        limit = getattr(self.domain.limits, "max_job_output_bytes", 0)
        if limit and need > limit:
            raise InvalidArgument("seeds.count", f"{spec.count:,} images of {resolution}x{resolution} make up to "
                                                 f"{need / 2**30:.2f} GiB of shards, over the {limit / 2**30:g} GiB "
                                                 f"one job may write (server setting max_job_output_gb)")
        folder = existing_folder(spec.output_uri or self.store.uri)
        if folder is None:
            return                      # S3: no free space to ask about
        free = shutil.disk_usage(folder).free
        if need > free:
            raise OutputRefused("OUTPUT_SPACE", f"{spec.count:,} images of {resolution}x{resolution} make up to "
                                f"{need / 2**30:.2f} GiB of shards, but {folder} has {free / 2**30:.2f} GiB free; "
                                f"free space or ask for fewer images", field="seeds.count", needed_bytes=need,
                                free_bytes=free)

    def _check_output_free(self, spec: JobSpec) -> None:
        """Refuse a new job's output location that another job claimed, or that holds other documents:
        another job's shards there would meet this job's (same names, other bytes) only after the work."""
        out = self.output_store(spec)
        holder = self._claimant(out)
        if holder:
            raise _in_use(spec, holder)
        if out.list_keys("", limit=1):
            raise OutputRefused("OUTPUT_NOT_EMPTY", f"output_uri: {spec.output_uri} already holds documents; name an "
                                f"empty prefix (or delete the job that wrote there)", field="output_uri",
                                uri=spec.output_uri)

    @staticmethod
    def _claimant(out: BlobStore) -> str:
        """The job (``datasetJobs/{id}``) whose claim the output store holds; empty if none."""
        try:
            return json.loads(out.read(CLAIM)).get("job", "")
        except RegistryNotFound:
            return ""

    def _claim(self, spec) -> None:
        """Make the job's output location its own with one conditional create in the output store,
        so that of two jobs naming it exactly one gets it, on a filesystem as on S3; a job that holds
        it already (a retry, a resumed job) keeps it. OUTPUT_IN_USE if another job holds it."""
        out = self.output_store(spec)
        if out is None:
            return
        mine = f"{self.resource}/{spec.id}"
        try:
            out.create(CLAIM, json.dumps({"job": mine, "created": spec.created}, sort_keys=True).encode())
            return
        except AlreadyExists:
            holder = self._claimant(out)
        if holder != mine:
            raise _in_use(spec, holder)

    def output_store(self, spec) -> BlobStore | None:
        """The store of the job's output location; None when it writes into the registry's store."""
        uri = getattr(spec, "output_uri", "")
        return self.outputs.open(uri, spec.output_prefix) if uri else None

    def _finish(self, spec: JobSpec) -> None:
        """The manifest: the caller's copy first (a succeeded job always has it), then the registry's."""
        manifest = {
            "job": f"{self.resource}/{spec.id}", "version": spec.version_name, "model": spec.model,
            "number": spec.number, "lineage": self._lineage(spec), "created": spec.created,
            "seeds": {"start": spec.seed_start, "count": spec.count}, "truncation": spec.truncation,
            "image_format": spec.image_format, "shard_size": spec.shard_size, "samples": spec.count,
            "shards": [{**{k: r[k] for k in ("name", "key", "samples", "first_seed", "sha256", "size_bytes")},
                        "uri": self.shard_uri(spec, r["name"])} for r in self._records(spec)],
            "output_uri": spec.output_uri,
        }
        out = self.output_store(spec)
        if out is not None:
            data = json.dumps(manifest, indent=1, sort_keys=True).encode()
            try:
                out.create("manifest.json", data)
            except AlreadyExists:
                prior = json.loads(out.read("manifest.json"))
                if prior.get("job") != manifest["job"]:
                    raise OutputRefused("OUTPUT_CONFLICT", f"{spec.output_uri} holds the manifest of "
                                        f"{prior.get('job')}, not of {manifest['job']}", field="output_uri",
                                        job=spec.id) from None
        self._write_manifest(spec, manifest)

    def shard_uri(self, spec: JobSpec, name: str) -> str:
        """Where shard ``name`` of a job can be read (``file://`` or ``s3://``): in its output location
        if it names one, else in the registry's store."""
        out = self.output_store(spec)
        return store_uri(out, name) if out is not None else self._uri(self._doc(spec.id, name))

    def manifest_uri(self, spec: JobSpec) -> str:
        """Where a finished job's manifest can be read: its output location's copy if it names one."""
        return self.shard_uri(spec, "manifest.json")

    def _release(self, status: JobStatus) -> None:
        """Remove what the job verified as its own from its output location (recorded shards, and the
        manifest once it succeeded), then the claim: the location is free once nothing of the job is left."""
        out = self.output_store(status.spec)
        if out is None:
            return
        job_id = status.spec.id
        names = [json.loads(self.store.read(k))["name"] for k in self.store.list_keys(self._doc(job_id, "done/"))]
        for name in names + (["manifest.json"] if status.state == SUCCEEDED else []):
            out.delete(name)
        if self._claimant(out) == f"{self.resource}/{job_id}":
            out.delete(CLAIM)

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop this process's runners between shards (their jobs stay resumable), the executor and the outputs."""
        super().close(timeout_s)
        self.outputs.close()
