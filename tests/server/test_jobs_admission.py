"""Bounds on dataset jobs and cancellation that always ends CANCELLED, over a real gRPC channel.

- ``max_running_jobs``: a server runs at most that many jobs of a kind at once; one more is refused
  with RESOURCE_EXHAUSTED before anything is recorded, and admitted again once one has stopped.
- ``max_job_output_gb``: a job whose worst-case output exceeds it is refused (INVALID_ARGUMENT on
  ``seeds.count``); a job that cannot fit the free space of the filesystem it writes to is refused
  with RESOURCE_EXHAUSTED; both before any work.
- A cancelled job ends CANCELLED whatever its shards raise on their way out, and a real job
  cancelled mid-run, round after round, always does.
"""

from __future__ import annotations

import collections
import shutil
import time

import grpc
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.rpc import code_pb2

from rulewright.service.jobs import dataset as jobs_module
from rulewright.service.jobs.dataset import PREFIX, LocalExecutor
from rulewright.service.domain.limits import Limits
from rulewright.service.server.config import resolve
from rulewright.v1 import jobs_service_pb2 as jobs_pb
from rulewright.v1 import jobs_service_pb2_grpc as jobs_grpc

from .conftest import error_info
from .test_job_output import _serve, embedded, out_dir  # noqa: F401 -- fixtures
from .test_jobs import BOUND_S, GatedExecutor, create, metadata, wait_done


def _limits(**settings: str) -> Limits:
    """The caps a server started with ``RULEWRIGHT_<SETTING>`` values gets."""
    return Limits.from_config(resolve(environ={f"RULEWRIGHT_{k.upper()}": v for k, v in settings.items()}))


def test_running_jobs_are_bounded_and_a_stopped_job_frees_its_slot(embedded):
    embedded.limits = _limits(max_running_jobs="2")
    executor = GatedExecutor(embedded, hold_from=0)          # every job holds before its first shard
    server, channel = _serve(embedded, (), executor)
    try:
        jobs, ops = jobs_grpc.JobServiceStub(channel), operations_pb2_grpc.OperationsStub(channel)
        held = [create(jobs, count=4, shard_size=2, request_id=f"run-{i}") for i in range(2)]
        with pytest.raises(grpc.RpcError) as err:
            create(jobs, count=4, shard_size=2, request_id="run-2")
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
        info = error_info(err.value)
        assert info.reason == "TOO_MANY_JOBS" and info.metadata["limit"] == "2"
        assert "max_running_jobs" in err.value.details()
        assert len(embedded.registry.store.list_children(PREFIX)) == 2     # refused before it was recorded
        again = create(jobs, count=4, shard_size=2, request_id="run-0")
        assert again.name == held[0].name                                  # a retry of a running job is no new job
        ops.CancelOperation(operations_pb2.CancelOperationRequest(name=held[0].name))
        assert wait_done(ops, held[0].name).error.code == code_pb2.CANCELLED
        assert server.jobs.join(held[0].name.split("/")[1], BOUND_S)
        third = create(jobs, count=4, shard_size=2, request_id="run-2")    # its slot is free again
        assert not third.done
    finally:
        executor.gate.set()
        channel.close()
        server.stop(0).wait()


def test_the_default_bounds_running_jobs():
    assert 1 <= resolve(environ={}).max_running_jobs <= 16


def test_a_job_over_the_output_size_bound_is_refused_with_its_field(embedded):
    embedded.limits = _limits(max_job_output_gb="0.001")              # about 1 MiB
    server, channel = _serve(embedded, ())
    try:
        with pytest.raises(grpc.RpcError) as err:
            create(jobs_grpc.JobServiceStub(channel), count=1000, shard_size=100)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert error_info(err.value).metadata["field"] == "seeds.count"
        assert "max_job_output_gb" in err.value.details()
    finally:
        channel.close()
        server.stop(0).wait()
    assert not embedded.registry.store.list_children(PREFIX)


def test_the_default_output_bound_refuses_ten_million_images_of_the_faces_size(embedded):
    limit = resolve(environ={}).max_job_output_gb
    assert 0 < limit < 10**7 * 128 * 128 * 3 / 2**30


@pytest.mark.parametrize("where", ["registry", "output"])
def test_a_job_that_cannot_fit_the_free_disk_is_refused_before_work(embedded, out_dir, monkeypatch, where):
    real = shutil.disk_usage
    usage = collections.namedtuple("usage", "total used free")

    def small_disk(path):                     # the disk the job writes to has 1 MiB left
        got = real(path)
        return usage(got.total, got.total - (1 << 20), 1 << 20)
    monkeypatch.setattr(jobs_module.shutil, "disk_usage", small_disk)
    server, channel = _serve(embedded, (out_dir.as_uri(),))
    try:
        extra = {"output_uri": out_dir.as_uri() + "/big"} if where == "output" else {}
        with pytest.raises(grpc.RpcError) as err:
            create(jobs_grpc.JobServiceStub(channel), count=10_000, shard_size=1000, **extra)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
        info = error_info(err.value)
        assert info.reason == "OUTPUT_SPACE" and info.metadata["field"] == "seeds.count"
        small = create(jobs_grpc.JobServiceStub(channel), count=4, shard_size=2,
                       **({"output_uri": out_dir.as_uri() + "/small"} if where == "output" else {}))
        assert wait_done(operations_pb2_grpc.OperationsStub(channel), small.name).WhichOneof("result") == "response"
    finally:
        channel.close()
        server.stop(0).wait()
    assert len(embedded.registry.store.list_children(PREFIX)) == 1     # only the small one
    assert not (out_dir / "big").exists()


class FailingOnStop(LocalExecutor):
    """Shards from ``hold_from`` on wait for a stop, then fail with something other than ``Cancelled``,
    as a component may when its caller goes away (a queue that cannot drop the request, a closed pool)."""

    def __init__(self, domain, hold_from: int):
        super().__init__(domain, max_workers=2)
        self.hold_from = hold_from
        self.waiting = 0

    def _shard(self, spec, index, progress):
        if index >= self.hold_from:
            self.waiting += 1
            deadline = time.monotonic() + BOUND_S
            while not progress.stopped() and time.monotonic() < deadline:
                time.sleep(0.02)
            raise RuntimeError(f"shard {index}: the queue could not drop the request")
        return super()._shard(spec, index, progress)


def test_a_cancelled_job_ends_cancelled_whatever_its_shards_raise(embedded):
    executor = FailingOnStop(embedded, hold_from=1)
    server, channel = _serve(embedded, (), executor)
    try:
        jobs, ops = jobs_grpc.JobServiceStub(channel), operations_pb2_grpc.OperationsStub(channel)
        op = create(jobs, count=8, shard_size=2)
        deadline = time.monotonic() + BOUND_S
        while executor.waiting < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        ops.CancelOperation(operations_pb2.CancelOperationRequest(name=op.name))
        op = wait_done(ops, op.name)
        assert server.jobs.join(op.name.split("/")[1], BOUND_S)
        op = ops.GetOperation(operations_pb2.GetOperationRequest(name=op.name))
        assert op.error.code == code_pb2.CANCELLED, op.error
        assert metadata(op).state == jobs_pb.DatasetJobMetadata.STATE_CANCELLED
    finally:
        channel.close()
        server.stop(0).wait()


@pytest.fixture
def batching(tmp_path):
    """The tiny model on a server whose Samples wait up to 300 ms for a batch of 48 (16 images a
    request): two shards rendering at once spend most of their time queued in the batcher."""
    from safetensors.torch import save_file

    from rulewright.service.domain.core import Domain
    from tests.builders import dcgan_state

    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in dcgan_state(z_dim=16, widths=(32, 16, 8, 3)).items()}, str(path))
    d = Domain.open(tmp_path / "data", device="cpu", max_batch=48, batch_delay_ms=300.0,
                    limits=Limits(max_images=16))
    d.bootstrap("tiny", path)
    yield d
    d.close()


def test_a_job_cancelled_mid_run_always_ends_cancelled(batching):
    """Real shards through the batching Sample path, two at a time, cancelled while they render."""
    server, channel = _serve(batching, (), LocalExecutor(batching, max_workers=2))
    states = []
    try:
        jobs, ops = jobs_grpc.JobServiceStub(channel), operations_pb2_grpc.OperationsStub(channel)
        for _ in range(12):
            op = create(jobs, count=2_000, shard_size=32)
            deadline = time.monotonic() + BOUND_S
            while metadata(op).images_done == 0 and time.monotonic() < deadline:    # mid-run: a shard is done
                time.sleep(0.05)
                op = ops.GetOperation(operations_pb2.GetOperationRequest(name=op.name))
            ops.CancelOperation(operations_pb2.CancelOperationRequest(name=op.name))
            op = wait_done(ops, op.name)
            assert server.jobs.join(op.name.split("/")[1], BOUND_S)
            op = ops.GetOperation(operations_pb2.GetOperationRequest(name=op.name))
            states.append(code_pb2.Code.Name(op.error.code) if op.HasField("error") else "OK")
    finally:
        channel.close()
        server.stop(0).wait()
    assert states == ["CANCELLED"] * 12
