"""Output locations stay inside the operator's prefixes and belong to one job, over a real gRPC channel.

- A symbolic link below an allowed ``file://`` prefix is refused (PERMISSION_DENIED) before any
  work, whether it is the location itself or a folder on the way; a link that appears while the
  job runs stops the job's next write, and nothing is ever written where the link points.
- A location is claimed by one job when the job is created (a conditional create in the output
  store, file or S3): a second job naming it is refused with FAILED_PRECONDITION before it does
  any work, even when both are created at once; deleting the first job frees the location.
"""

from __future__ import annotations

import os
import threading

import grpc
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.rpc import code_pb2, error_details_pb2

from rulewright.service.jobs.dataset import PREFIX
from rulewright.v1 import jobs_service_pb2_grpc as jobs_grpc

from .conftest import detail, error_info
from .test_job_output import _serve, embedded, out_dir, s3_out  # noqa: F401 -- fixtures
from .test_jobs import BOUND_S, GatedExecutor, create, metadata, wait_done


def _files(path) -> list[str]:
    """Every file under ``path`` (relative), to show nothing was written there."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def _job_ids(domain) -> list[str]:
    return domain.registry.store.list_children(PREFIX)


@pytest.fixture
def linked(tmp_path):
    """``allowed/`` (the operator's prefix) with ``allowed/link -> ../outside`` and ``allowed/a/b -> ../../outside``."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "a").mkdir(parents=True)
    outside.mkdir()
    os.symlink("../outside", allowed / "link")
    os.symlink("../../outside", allowed / "a" / "b")
    return allowed, outside


@pytest.mark.parametrize("target", ["link/e6", "link", "a/b/e6", "a/b"])
def test_a_symlink_below_an_allowed_prefix_is_refused_before_any_work(embedded, linked, target):
    allowed, outside = linked
    server, channel = _serve(embedded, (allowed.as_uri(),))
    try:
        with pytest.raises(grpc.RpcError) as err:
            create(jobs_grpc.JobServiceStub(channel), count=4, shard_size=2, output_uri=f"{allowed.as_uri()}/{target}")
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value.details()
        info = error_info(err.value)
        assert info.reason == "OUTPUT_NOT_ALLOWED" and info.metadata["field"] == "output_uri"
        assert "link" in err.value.details()
    finally:
        channel.close()
        server.stop(0).wait()
    assert _files(outside) == [] and not _job_ids(embedded)


def test_an_allowed_prefix_that_is_itself_a_link_still_works(embedded, tmp_path):
    """The operator's own prefix may pass through links (a mount point); only links below it are refused."""
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "prefix")
    server, channel = _serve(embedded, ((tmp_path / "prefix").as_uri(),))
    try:
        op = wait_done(operations_pb2_grpc.OperationsStub(channel),
                       create(jobs_grpc.JobServiceStub(channel), count=4, shard_size=2,
                              output_uri=(tmp_path / "prefix").as_uri() + "/run").name)
        assert op.WhichOneof("result") == "response", op
    finally:
        channel.close()
        server.stop(0).wait()
    assert "docs/manifest.json" in _files(real / "run")


@pytest.mark.parametrize("swapped", ["run", "run/docs"])
def test_a_link_that_appears_mid_job_stops_the_next_write(embedded, tmp_path, swapped):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    executor = GatedExecutor(embedded, hold_from=2)
    server, channel = _serve(embedded, (allowed.as_uri(),), executor)
    try:
        ops = operations_pb2_grpc.OperationsStub(channel)
        op = create(jobs_grpc.JobServiceStub(channel), count=8, shard_size=2, output_uri=f"{allowed.as_uri()}/run")
        assert executor.held.wait(BOUND_S)                   # shards 0 and 1 are written, 2 waits
        (allowed / swapped).rename(tmp_path / "moved")
        os.symlink(outside, allowed / swapped)               # someone with access to the folder plants a link
        executor.gate.set()
        op = wait_done(ops, op.name)
        assert op.done and op.error.code == code_pb2.PERMISSION_DENIED, op
        assert metadata(op).shards_done == 2
    finally:
        channel.close()
        server.stop(0).wait()
    assert _files(outside) == []


@pytest.mark.parametrize("where", ["file", "s3"])
def test_a_second_job_on_a_claimed_location_is_refused_before_work(embedded, where, request):
    allowed = request.getfixturevalue("out_dir").as_uri() if where == "file" else request.getfixturevalue("s3_out")
    target = f"{allowed}/shared"
    executor = GatedExecutor(embedded, hold_from=0)          # the first job holds before writing anything
    server, channel = _serve(embedded, (allowed,), executor)
    try:
        jobs, ops = jobs_grpc.JobServiceStub(channel), operations_pb2_grpc.OperationsStub(channel)
        first = create(jobs, count=4, shard_size=2, output_uri=target, request_id="claim-1")
        assert executor.held.wait(BOUND_S)
        with pytest.raises(grpc.RpcError) as err:
            create(jobs, count=4, shard_size=2, output_uri=target, request_id="claim-2")
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
        info = error_info(err.value)
        assert info.reason == "OUTPUT_IN_USE" and info.metadata["field"] == "output_uri"
        assert info.metadata["job"] == first.name.split("/")[1]
        assert detail(err.value, error_details_pb2.PreconditionFailure).violations[0].type == "OUTPUT_IN_USE"
        assert _job_ids(embedded) == [first.name.split("/")[1]]          # the second left nothing behind
        again = create(jobs, count=4, shard_size=2, output_uri=target, request_id="claim-1")
        assert again.name == first.name                                   # a retry of the first is still its job
        executor.gate.set()
        done = wait_done(ops, first.name)
        assert done.WhichOneof("result") == "response", done
        ops.DeleteOperation(operations_pb2.DeleteOperationRequest(name=first.name))
        executor.hold_from = 99
        reused = wait_done(ops, create(jobs, count=4, shard_size=2, output_uri=target, request_id="claim-3").name)
        assert reused.WhichOneof("result") == "response", reused             # deleting the job freed the location
    finally:
        channel.close()
        server.stop(0).wait()


@pytest.mark.parametrize("where", ["file", "s3"])
def test_of_two_jobs_created_at_once_on_one_location_exactly_one_is_accepted(embedded, where, request):
    allowed = request.getfixturevalue("out_dir").as_uri() if where == "file" else request.getfixturevalue("s3_out")
    executor = GatedExecutor(embedded, hold_from=0)
    server, channel = _serve(embedded, (allowed,), executor)
    try:
        jobs = jobs_grpc.JobServiceStub(channel)
        for round_ in range(3):
            target, results = f"{allowed}/r{round_}", {}
            barrier = threading.Barrier(2, timeout=BOUND_S)

            def one(n: int) -> None:
                barrier.wait()
                try:
                    results[n] = create(jobs, count=4, shard_size=2, output_uri=target, request_id=f"{round_}-{n}")
                except grpc.RpcError as err:
                    results[n] = err
            threads = [threading.Thread(target=one, args=(n,)) for n in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(BOUND_S)
            codes = sorted("OK" if not isinstance(r, grpc.RpcError) else r.code().name for r in results.values())
            assert codes == ["FAILED_PRECONDITION", "OK"], f"round {round_}: {codes}"
        assert len(_job_ids(embedded)) == 3
    finally:
        executor.gate.set()
        channel.close()
        server.stop(0).wait()
