"""Dataset jobs over a real gRPC channel, on the embedded default and on S3 + Redis (the ``domain`` fixture).

The shards are read back with the ``webdataset`` library, the way a training loop reads them, and
their images compared byte for byte with what Sample returns for the same (version, seed,
truncation). Cancellation and a restart (a new server over the same store) are driven through a
gated executor, so where a job stops is decided by the test, not by timing.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import grpc
import pytest
import webdataset as wds
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2

from rulewright.service.domain.core import Domain
from rulewright.service.engine.errors import Cancelled
from rulewright.service.jobs.dataset import PREFIX, LocalExecutor
from rulewright.service.server.app import create_server
from rulewright.v1 import generator_service_pb2 as gen, jobs_service_pb2 as jobs_pb
from rulewright.v1 import jobs_service_pb2_grpc as jobs_grpc

from .conftest import error_info

BOUND_S = 60.0                 # every wait below gives up after this long


@pytest.fixture
def job_service(channel):
    return jobs_grpc.JobServiceStub(channel)


@pytest.fixture
def operations(channel):
    return operations_pb2_grpc.OperationsStub(channel)


def create(job_service, count=40, shard_size=10, truncation=1.0, model="tiny", **kw) -> operations_pb2.Operation:
    return job_service.CreateDatasetJob(jobs_pb.CreateDatasetJobRequest(
        model=model, seeds=gen.SeedRange(start=kw.pop("start", 0), count=count), truncation=truncation,
        shard_size=shard_size, **kw), timeout=BOUND_S)


def metadata(op, kind=jobs_pb.DatasetJobMetadata):
    """The operation's metadata as ``kind`` (a dataset job's unless told)."""
    meta = kind()
    assert op.metadata.Unpack(meta)
    return meta


def result(op, kind=jobs_pb.DatasetJob):
    """The finished operation's response as ``kind`` (a dataset job's unless told)."""
    job = kind()
    assert op.response.Unpack(job), op
    return job


def wait_done(operations, name: str, bound_s: float = BOUND_S) -> operations_pb2.Operation:
    """WaitOperation until done (bounded: a few calls of a few seconds, at most ``bound_s``)."""
    deadline = time.monotonic() + bound_s
    while True:
        op = operations.WaitOperation(operations_pb2.WaitOperationRequest(
            name=name, timeout=duration_pb2.Duration(seconds=5)), timeout=10)
        if op.done or time.monotonic() > deadline:
            return op


def local_shards(store, job: jobs_pb.DatasetJob, tmp_path: Path) -> list[str]:
    """Paths webdataset can open: the files themselves (file://) or copies of the S3 objects."""
    out = []
    for shard in job.shards:
        if shard.uri.startswith("file://"):
            out.append(unquote(urlparse(shard.uri).path))
        else:
            key = shard.uri.split("/docs/", 1)[1]
            path = tmp_path / shard.name
            path.write_bytes(store.read(key))
            out.append(str(path))
    return out


def job_keys(store, job_id: str) -> list[str]:
    return store.list_keys(f"{PREFIX}{job_id}/")


def test_dataset_job_writes_shards_and_manifest_identical_to_sample(domain, job_service, operations, generator,
                                                                    tmp_path):
    op = create(job_service)
    assert op.name.startswith("operations/")
    assert metadata(op).shards_total == 4 and metadata(op).images_total == 40
    op = wait_done(operations, op.name)
    assert op.done and op.WhichOneof("result") == "response", op
    meta, job = metadata(op), result(op)
    assert (meta.state, meta.shards_done, meta.images_done) == (jobs_pb.DatasetJobMetadata.STATE_SUCCEEDED, 4, 40)
    assert job.version == "models/tiny/versions/1" and len(job.shards) == 4
    assert [s.name for s in job.shards] == [f"shard-{i:06d}.tar" for i in range(4)]
    store = domain.registry.store
    for shard in job.shards:
        assert hashlib.sha256(store.read(shard.uri.split("/docs/", 1)[1])).hexdigest() == shard.sha256

    manifest = json.loads(store.read(job.manifest_uri.split("/docs/", 1)[1]))
    assert manifest["version"] == "models/tiny/versions/1" and manifest["seeds"] == {"start": 0, "count": 40}
    assert manifest["lineage"][0]["version"] == "models/tiny/versions/1" and manifest["lineage"][0]["kind"] == "import"
    assert [s["sha256"] for s in manifest["shards"]] == [s.sha256 for s in job.shards]

    samples = list(wds.WebDataset(local_shards(store, job, tmp_path), shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [f"{seed:09d}" for seed in range(40)]
    picked = [0, 9, 10, 23, 39]
    reply = generator.Sample(gen.SampleRequest(model="tiny/1", seeds=picked, truncation=1.0), timeout=BOUND_S)
    for seed, image in zip(picked, reply.images):
        assert samples[seed]["png"] == image.data, f"seed {seed}: the shard's PNG is not Sample's"
        assert json.loads(samples[seed]["json"]) == {"seed": seed, "version": "models/tiny/versions/1",
                                                     "truncation": 1.0}


def test_operations_list_get_and_delete(job_service, operations):
    first = wait_done(operations, create(job_service, count=3, shard_size=2).name)
    second = wait_done(operations, create(job_service, count=2, shard_size=2, truncation=1.0).name)
    listed = operations.ListOperations(operations_pb2.ListOperationsRequest(name="operations", page_size=1))
    assert [o.name for o in listed.operations] == [first.name] and listed.next_page_token
    rest = operations.ListOperations(operations_pb2.ListOperationsRequest(name="operations",
                                                                          page_token=listed.next_page_token))
    assert [o.name for o in rest.operations] == [second.name] and not rest.next_page_token
    got = operations.GetOperation(operations_pb2.GetOperationRequest(name=first.name))
    assert got.done and result(got).shards == result(first).shards
    operations.DeleteOperation(operations_pb2.DeleteOperationRequest(name=first.name))
    with pytest.raises(grpc.RpcError) as err:
        operations.GetOperation(operations_pb2.GetOperationRequest(name=first.name))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and error_info(err.value).reason == "JOB_NOT_FOUND"


def test_request_id_returns_the_same_job(job_service, operations):
    a = create(job_service, count=4, shard_size=2, request_id="retry-me")
    b = create(job_service, count=4, shard_size=2, request_id="retry-me")
    assert a.name == b.name
    assert wait_done(operations, a.name).done


@pytest.mark.parametrize("change, field", [
    (dict(count=0), "seeds.count"),
    (dict(shard_size=-1), "shard_size"),
    (dict(truncation=1.5), "truncation"),
    (dict(image_format=2), "image_format"),
    (dict(start=-1), "seeds.start"),
])
def test_bad_requests_name_their_field(job_service, domain, change, field):
    from google.rpc import error_details_pb2

    from .conftest import detail

    with pytest.raises(grpc.RpcError) as err:
        create(job_service, **{"count": 4, "shard_size": 2, **change})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in detail(err.value, error_details_pb2.BadRequest).field_violations] == [field]
    assert not domain.registry.store.list_keys(PREFIX)           # refused before any work


def test_unknown_model_and_operation(job_service, operations):
    with pytest.raises(grpc.RpcError) as err:
        create(job_service, model="nope")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        operations.GetOperation(operations_pb2.GetOperationRequest(name="operations/0123456789abcdef"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        operations.GetOperation(operations_pb2.GetOperationRequest(name="jobs/x"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


class GatedExecutor(LocalExecutor):
    """Shards from ``hold_from`` on wait for ``gate`` (or a stop, which cancels them unwritten)."""

    def __init__(self, domain, hold_from: int, max_workers: int = 1):
        super().__init__(domain, max_workers)
        self.hold_from = hold_from
        self.gate = threading.Event()
        self.held = threading.Event()            # a shard is waiting at the gate

    def _shard(self, spec, index, progress):
        if index >= self.hold_from:
            self.held.set()
            deadline = time.monotonic() + BOUND_S
            while not self.gate.wait(0.02):
                if progress.stopped() or time.monotonic() > deadline:
                    raise Cancelled(f"shard {index} stopped at the gate")
        return super()._shard(spec, index, progress)


def _server(domain, executor):
    server, port = create_server(domain, job_executor=executor)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return server, channel


def test_cancel_stops_between_shards_and_leaves_no_partial_shard(domain):
    executor = GatedExecutor(domain, hold_from=2)
    server, channel = _server(domain, executor)
    try:
        jobs, ops = jobs_grpc.JobServiceStub(channel), operations_pb2_grpc.OperationsStub(channel)
        op = create(jobs)
        assert executor.held.wait(BOUND_S)
        ops.CancelOperation(operations_pb2.CancelOperationRequest(name=op.name))
        op = wait_done(ops, op.name)
        assert op.done and op.error.code == code_pb2.CANCELLED
        assert metadata(op).state == jobs_pb.DatasetJobMetadata.STATE_CANCELLED
        assert server.jobs.join(op.name.split("/")[1], BOUND_S)
        executor.gate.set()                                   # nothing may be written after the runner stopped
        keys = job_keys(domain.registry.store, op.name.split("/")[1])
        tars = sorted(k for k in keys if k.endswith(".tar"))
        records = sorted(k for k in keys if "/done/" in k)
        assert len(tars) == len(records) == 2 == metadata(op).shards_done
        for key, record in zip(tars, records):
            assert json.loads(domain.registry.store.read(record))["sha256"] == \
                hashlib.sha256(domain.registry.store.read(key)).hexdigest()
        assert not any(k.endswith("manifest.json") for k in keys)
    finally:
        channel.close()
        server.stop(0).wait()


def test_restart_resumes_without_duplicating_shards(domain, tmp_path):
    # A clean single-worker run over another job gives every shard's expected sha256.
    server, channel = _server(domain, LocalExecutor(domain, max_workers=1))
    try:
        clean = result(wait_done(operations_pb2_grpc.OperationsStub(channel),
                                 create(jobs_grpc.JobServiceStub(channel)).name))
    finally:
        channel.close()
        server.stop(0).wait()

    executor = GatedExecutor(domain, hold_from=2)
    server, channel = _server(domain, executor)
    try:
        op = create(jobs_grpc.JobServiceStub(channel))
        assert executor.held.wait(BOUND_S)
    finally:
        channel.close()
        server.stop(0).wait()                                 # the server goes away mid-job
    job_id = op.name.split("/")[1]
    assert sorted(k.rsplit("/", 1)[1] for k in job_keys(domain.registry.store, job_id) if k.endswith(".tar")) == \
        ["shard-000000.tar", "shard-000001.tar"]

    # A new server (a new Domain) over the same store resumes the job from its records.
    again = Domain(domain.registry, domain.stats_cache, device="cpu")
    server, channel = _server(again, LocalExecutor(again, max_workers=2))
    try:
        op = wait_done(operations_pb2_grpc.OperationsStub(channel), op.name)
        assert op.done and op.WhichOneof("result") == "response", op
        job = result(op)
        assert [s.sha256 for s in job.shards] == [s.sha256 for s in clean.shards]
        keys = job_keys(domain.registry.store, job_id)
        assert len([k for k in keys if k.endswith(".tar")]) == 4 and len([k for k in keys if "/done/" in k]) == 4
    finally:
        channel.close()
        server.stop(0).wait()
        again.close()


def test_an_unreachable_store_at_start_does_not_keep_the_server_down(domain, monkeypatch):
    from rulewright.registry.errors import Reason, Unavailable

    list_children = domain.registry.store.list_children

    def down(prefix):                  # the jobs' part of the store is unreachable
        if prefix.startswith(PREFIX):
            raise Unavailable(Reason.STORE_UNAVAILABLE, "store down")
        return list_children(prefix)
    monkeypatch.setattr(domain.registry.store, "list_children", down)
    server, channel = _server(domain, LocalExecutor(domain, max_workers=1))
    try:
        with pytest.raises(grpc.RpcError) as err:
            operations_pb2_grpc.OperationsStub(channel).ListOperations(operations_pb2.ListOperationsRequest(),
                                                                      timeout=BOUND_S)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        channel.close()
        server.stop(0).wait()
