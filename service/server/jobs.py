"""Thin servicers over ``service.jobs``: JobService and the standard ``google.longrunning.Operations``.

- ``JobServicer``: CreateDatasetJob and CreateStatisticsJob → a ``google.longrunning.Operation``
  (AIP-151) named ``operations/{job_id}``, metadata ``DatasetJobMetadata`` or
  ``StatisticsJobMetadata``, response ``DatasetJob`` or ``StatisticsJob`` once done.
- ``OperationsServicer``: GetOperation, ListOperations, WaitOperation, CancelOperation and
  DeleteOperation over the jobs of every kind (one id space: an id names one kind's job), so
  standard LRO helpers (``google.api_core.operation``, the generated LRO clients of other
  languages) can poll, wait for and cancel them.
- ``operation_pb(jobs, status)``: a job's status as an Operation.
"""

from __future__ import annotations

from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import any_pb2, empty_pb2, timestamp_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from rulewright.service.errors import InvalidArgument
from rulewright.service.jobs.dataset import DatasetJobRequest, DatasetJobs
from rulewright.service.jobs.errors import JobNotFound
from rulewright.service.jobs.protocol import CANCELLED, FAILED, RUNNING, SUCCEEDED
from rulewright.service.jobs.statistics import (DEFAULT_SHARD_SIZE as STATS_SHARD_SIZE, StatisticsJobRequest,
                                                StatisticsJobs)
from rulewright.service.jobs.stored import JobStatus, StoredJobs
from rulewright.v1 import edit_pb2, generator_service_pb2 as gen, images_pb2, jobs_service_pb2 as jobs_pb
from rulewright.v1 import jobs_service_pb2_grpc as jobs_grpc

from rulewright.service.server import convert
from rulewright.service.server.auth import current_principal
from rulewright.service.server.errors import DOMAIN, rpc

OPERATIONS = "operations/"
WAIT_DEFAULT_S = 60.0              # WaitOperation without a timeout (the call's deadline still applies)
WAIT_MAX_S = 600.0
_STATES = {RUNNING: jobs_pb.DatasetJobMetadata.STATE_RUNNING, SUCCEEDED: jobs_pb.DatasetJobMetadata.STATE_SUCCEEDED,
           CANCELLED: jobs_pb.DatasetJobMetadata.STATE_CANCELLED, FAILED: jobs_pb.DatasetJobMetadata.STATE_FAILED}


def _timestamp(text: str) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromJsonString(text.replace("+00:00", "Z"))
    return ts


def _packed(msg) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


def dataset_job_pb(jobs: DatasetJobs, status: JobStatus) -> jobs_pb.DatasetJob:
    """A job's spec, and its shards once the manifest lists them, as a DatasetJob."""
    spec = status.spec
    msg = jobs_pb.DatasetJob(name=f"datasetJobs/{spec.id}", version=spec.version_name,
                             seeds=gen.SeedRange(start=spec.seed_start, count=spec.count),
                             truncation=spec.truncation, image_format=images_pb2.IMAGE_FORMAT_PNG,
                             shard_size=spec.shard_size, manifest_uri=status.manifest_uri,
                             output_uri=spec.output_uri)
    for s in (status.manifest or {}).get("shards", []):
        msg.shards.add(name=s["name"], uri=jobs.shard_uri(spec, s["name"]), samples=s["samples"],
                       first_seed=s["first_seed"], sha256=s["sha256"], size_bytes=s["size_bytes"])
    return msg


def statistics_job_pb(jobs: StatisticsJobs, status: JobStatus) -> jobs_pb.StatisticsJob:
    """A statistics job's spec, and its merged statistic once the manifest names it, as a StatisticsJob."""
    spec, manifest = status.spec, status.manifest or {}
    return jobs_pb.StatisticsJob(name=f"statisticsJobs/{spec.id}", version=spec.version_name, layer=spec.layer,
                                 stats=edit_pb2.StatisticsSpec(samples=spec.count, seed_start=spec.seed_start),
                                 truncation=spec.truncation, shard_size=spec.shard_size, shards=spec.shards,
                                 cache_key=manifest.get("cache_key", ""), statistic_uri=jobs.statistic_uri(status),
                                 size_bytes=manifest.get("size_bytes", 0), sha256=manifest.get("sha256", ""),
                                 manifest_uri=status.manifest_uri)


def operation_pb(jobs: StoredJobs, status: JobStatus) -> operations_pb2.Operation:
    """A job as an Operation: metadata always; the DatasetJob (StatisticsJob) or the error once done (AIP-151)."""
    spec = status.spec
    if isinstance(jobs, StatisticsJobs):
        meta = jobs_pb.StatisticsJobMetadata(job=f"statisticsJobs/{spec.id}", version=spec.version_name,
                                             layer=spec.layer, state=_STATES[status.state],
                                             shards_done=status.shards_done, shards_total=spec.shards,
                                             samples_done=status.images_done, samples_total=spec.count,
                                             create_time=_timestamp(spec.created),
                                             update_time=_timestamp(status.updated))
    else:
        meta = jobs_pb.DatasetJobMetadata(job=f"datasetJobs/{spec.id}", version=spec.version_name,
                                          state=_STATES[status.state], shards_done=status.shards_done,
                                          shards_total=spec.shards, images_done=status.images_done,
                                          images_total=spec.count, create_time=_timestamp(spec.created),
                                          update_time=_timestamp(status.updated))
    op = operations_pb2.Operation(name=OPERATIONS + spec.id, metadata=_packed(meta), done=status.done)
    if status.state == SUCCEEDED:
        body = statistics_job_pb(jobs, status) if isinstance(jobs, StatisticsJobs) else dataset_job_pb(jobs, status)
        op.response.CopyFrom(_packed(body))
    elif status.state == CANCELLED:
        op.error.CopyFrom(_error(code_pb2.CANCELLED, "JOB_CANCELLED", "the job was cancelled; the shards "
                                 "written before are whole and stay until the operation is deleted", spec.id))
    elif status.state == FAILED:
        err = status.error or {}
        op.error.CopyFrom(_error(code_pb2.Code.Value(err.get("code", "INTERNAL")), err.get("reason", "INTERNAL"),
                                 err.get("message", ""), spec.id))
    return op


def _error(code: int, reason: str, message: str, job_id: str) -> status_pb2.Status:
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata={"job": job_id})
    return status_pb2.Status(code=code, message=message, details=[_packed(info)])


def job_id(name: str, field: str = "name") -> str:
    """The job id of an operation name ``operations/{job_id}``."""
    if not name.startswith(OPERATIONS) or "/" in name[len(OPERATIONS):] or name == OPERATIONS:
        raise InvalidArgument(field, f"must be an operation name operations/{{id}}, got {name!r}")
    return name[len(OPERATIONS):]


def dataset_job_request(request: jobs_pb.CreateDatasetJobRequest) -> DatasetJobRequest:
    """A CreateDatasetJobRequest as the domain's request (which checks it)."""
    fmt = convert.image_format(request.image_format)
    return DatasetJobRequest(
        model=request.model, seed_start=request.seeds.start, count=request.seeds.count,
        truncation=request.truncation if request.HasField("truncation") else 1.0,
        image_format="png" if fmt in (images_pb2.IMAGE_FORMAT_UNSPECIFIED, images_pb2.IMAGE_FORMAT_PNG)
        else images_pb2.ImageFormat.Name(fmt).removeprefix("IMAGE_FORMAT_").lower(),
        shard_size=request.shard_size or 1000, request_id=request.request_id, author=current_principal(),
        output_uri=request.output_uri)


def statistics_job_request(request: jobs_pb.CreateStatisticsJobRequest) -> StatisticsJobRequest:
    """A CreateStatisticsJobRequest as the domain's request (which checks it)."""
    return StatisticsJobRequest(
        model=request.model, layer=request.layer, samples=request.stats.samples, seed_start=request.stats.seed_start,
        truncation=request.truncation if request.HasField("truncation") else 1.0,
        shard_size=request.shard_size or STATS_SHARD_SIZE, request_id=request.request_id, author=current_principal())


class JobServicer(jobs_grpc.JobServiceServicer):
    """JobService over ``DatasetJobs`` and ``StatisticsJobs``."""

    def __init__(self, jobs: DatasetJobs, stat_jobs: StatisticsJobs | None = None):
        self.jobs = jobs
        self.stat_jobs = stat_jobs

    @rpc()
    def CreateDatasetJob(self, request, context):
        return operation_pb(self.jobs, self.jobs.create(dataset_job_request(request)))

    @rpc()
    def CreateStatisticsJob(self, request, context):
        if self.stat_jobs is None:
            raise InvalidArgument("model", "this server runs no statistics jobs")
        return operation_pb(self.stat_jobs, self.stat_jobs.create(statistics_job_request(request)))


class OperationsServicer(operations_pb2_grpc.OperationsServicer):
    """``google.longrunning.Operations`` over the jobs of every kind in the store."""

    def __init__(self, jobs: StoredJobs, *more: StoredJobs | None):
        self.jobs = jobs
        self.kinds = (jobs, *(m for m in more if m is not None))

    def _owner(self, job: str) -> StoredJobs:
        """The kind of job that holds ``job`` (``JobNotFound`` from the first if none does)."""
        for kind in self.kinds[1:]:
            try:
                kind.get(job)
                return kind
            except JobNotFound:
                continue
        return self.kinds[0]

    @rpc()
    def GetOperation(self, request, context):
        owner = self._owner(job_id(request.name))
        return operation_pb(owner, owner.get(job_id(request.name)))

    @rpc()
    def ListOperations(self, request, context):
        if request.name not in ("", "operations"):
            raise InvalidArgument("name", f"must be 'operations' (or empty), got {request.name!r}")
        if request.filter:
            raise InvalidArgument("filter", "filters are not supported; list without one")
        size = request.page_size if 0 < request.page_size <= 1000 else 50
        # Each kind's next page after the token, merged by id: ids are the order across kinds too.
        found, more = [], False
        for kind in self.kinds:
            page, token = kind.list(size, request.page_token)
            found += [(s.spec.id, kind, s) for s in page]
            more = more or bool(token)
        found.sort(key=lambda t: t[0])
        page = found[:size]
        token = page[-1][0] if page and (more or len(found) > size) else ""
        return operations_pb2.ListOperationsResponse(operations=[operation_pb(k, s) for _, k, s in page],
                                                     next_page_token=token)

    @rpc()
    def WaitOperation(self, request, context):
        timeout = request.timeout.ToTimedelta().total_seconds() if request.HasField("timeout") else WAIT_DEFAULT_S
        if timeout < 0:
            raise InvalidArgument("timeout", "must not be negative")
        remaining = context.time_remaining()
        limit = min(timeout, WAIT_MAX_S, max(0.0, remaining - 0.5) if remaining is not None else WAIT_MAX_S)
        owner = self._owner(job_id(request.name))
        status = owner.wait(job_id(request.name), limit, should_stop=lambda: not context.is_active())
        return operation_pb(owner, status)

    @rpc()
    def CancelOperation(self, request, context):
        self._owner(job_id(request.name)).cancel(job_id(request.name))
        return empty_pb2.Empty()

    @rpc()
    def DeleteOperation(self, request, context):
        self._owner(job_id(request.name)).delete(job_id(request.name))
        return empty_pb2.Empty()

