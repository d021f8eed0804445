"""Dataset jobs that write to a caller-named output location, over a real gRPC channel.

An embedded server (filesystem registry) with an operator allow-list writes a job's shards and
manifest to an allowed ``file://`` folder and to an allowed ``s3://bucket/prefix`` on the moto S3
server; they are read back with ``webdataset`` and must hash like the same job written into the
registry's store. Locations outside the allow-list are refused before any work, and a restart
mid-job resumes into the same output location.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from urllib.parse import unquote, urlparse

import grpc
import pytest
import webdataset as wds
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.rpc import error_details_pb2

from rulewright.registry.stores import open_store
from rulewright.service.domain.core import Domain
from rulewright.service.jobs.dataset import PREFIX, LocalExecutor
from rulewright.service.server.app import create_server
from rulewright.v1 import jobs_service_pb2_grpc as jobs_grpc
from tests.builders import tiny_domain

from .conftest import detail, error_info
from .test_jobs import BOUND_S, GatedExecutor, create, metadata, result, wait_done


@pytest.fixture
def out_dir(tmp_path):
    """An allowed local output folder (not created: the job creates it)."""
    return tmp_path / "datasets"


@pytest.fixture
def s3_out(moto_server, monkeypatch):
    """An allowed S3 prefix on moto, in a fresh bucket; the server reaches it with RULEWRIGHT_S3_*."""
    cfg = moto_server.config()
    for name, value in {"ENDPOINT": cfg.endpoint, "ACCESS_KEY": cfg.access_key, "SECRET_KEY": cfg.secret_key,
                        "SECURE": "false"}.items():
        monkeypatch.setenv(f"RULEWRIGHT_S3_{name}", value)
    bucket = f"out-{uuid.uuid4().hex[:12]}"
    with open_store(f"s3://{bucket}", s3=cfg) as store:
        store.ensure_bucket()
    return f"s3://{bucket}/team-a"


@pytest.fixture
def embedded(tmp_path):
    d = tiny_domain(tmp_path)
    yield d
    d.close()


def _serve(domain, prefixes, executor=None):
    server, port = create_server(domain, job_executor=executor, job_output_prefixes=prefixes)
    return server, grpc.insecure_channel(f"127.0.0.1:{port}")


def _read(uri: str) -> bytes:
    """The bytes at a ``file://`` or ``s3://`` document URI, read without the server."""
    if uri.startswith("file://"):
        with open(unquote(urlparse(uri).path), "rb") as f:
            return f.read()
    root, _, key = uri.partition("/docs/")               # the output store's documents folder
    with open_store(root) as store:                      # RULEWRIGHT_S3_* from the fixture
        return store.read(key)


def _run(domain, prefixes, tmp_path, **request):
    """One 40-image job of 4 shards through a server with ``prefixes`` allowed; its DatasetJob."""
    server, channel = _serve(domain, prefixes)
    try:
        op = wait_done(operations_pb2_grpc.OperationsStub(channel),
                       create(jobs_grpc.JobServiceStub(channel), **request).name)
        assert op.WhichOneof("result") == "response", op
        return result(op)
    finally:
        channel.close()
        server.stop(0).wait()


@pytest.mark.parametrize("where", ["file", "s3"])
def test_job_writes_shards_and_manifest_to_an_allowed_output_location(embedded, where, tmp_path, request):
    allowed = request.getfixturevalue("out_dir").as_uri() if where == "file" else request.getfixturevalue("s3_out")
    target = f"{allowed}/faces-v3"
    in_registry = _run(embedded, (), tmp_path)
    job = _run(embedded, (allowed,), tmp_path, output_uri=target + "/")    # a trailing slash is the same place
    assert job.output_uri == target
    assert [s.sha256 for s in job.shards] == [s.sha256 for s in in_registry.shards]
    assert [s.uri for s in job.shards] == [f"{target}/docs/shard-{i:06d}.tar" for i in range(4)]
    assert job.manifest_uri == f"{target}/docs/manifest.json"

    paths = []
    for shard in job.shards:
        data = _read(shard.uri)
        assert hashlib.sha256(data).hexdigest() == shard.sha256
        paths.append(tmp_path / shard.name)
        paths[-1].write_bytes(data)
    samples = list(wds.WebDataset([str(p) for p in paths], shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [f"{seed:09d}" for seed in range(40)]
    manifest = json.loads(_read(job.manifest_uri))
    assert manifest["output_uri"] == target and manifest["version"] == "models/tiny/versions/1"
    assert [(s["uri"], s["sha256"]) for s in manifest["shards"]] == [(s.uri, s.sha256) for s in job.shards]
    # The job's own records stay in the registry's store; its shards do not.
    keys = embedded.registry.store.list_keys(f"{PREFIX}{job.name.split('/')[1]}/")
    assert not [k for k in keys if k.endswith(".tar")] and any(k.endswith("manifest.json") for k in keys)


@pytest.mark.parametrize("uri, code, reason", [
    ("s3://other-bucket/x", grpc.StatusCode.PERMISSION_DENIED, "OUTPUT_NOT_ALLOWED"),
    ("{allowed}-b/x", grpc.StatusCode.PERMISSION_DENIED, "OUTPUT_NOT_ALLOWED"),   # a prefix of the name, not a folder
    ("{allowed}/../escape", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ("/srv/datasets", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ("http://example.com/x", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
])
def test_output_outside_the_allow_list_is_refused_and_writes_nothing(embedded, out_dir, uri, code, reason):
    allowed = out_dir.as_uri()
    server, channel = _serve(embedded, (allowed,))
    try:
        with pytest.raises(grpc.RpcError) as err:
            create(jobs_grpc.JobServiceStub(channel), output_uri=uri.format(allowed=allowed))
        assert err.value.code() == code
        info = error_info(err.value)
        assert info.reason == reason and info.metadata["field"] == "output_uri"
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert [v.field for v in detail(err.value, error_details_pb2.BadRequest).field_violations] == \
                ["output_uri"]
    finally:
        channel.close()
        server.stop(0).wait()
    assert not embedded.registry.store.list_keys(PREFIX)               # refused before any work
    assert not out_dir.exists() and not (out_dir.parent / "datasets-b").exists()


def test_without_the_setting_no_output_location_is_allowed(embedded, out_dir):
    server, channel = _serve(embedded, ())
    try:
        with pytest.raises(grpc.RpcError) as err:
            create(jobs_grpc.JobServiceStub(channel), output_uri=out_dir.as_uri())
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        channel.close()
        server.stop(0).wait()
    assert not embedded.registry.store.list_keys(PREFIX) and not out_dir.exists()


def test_a_used_output_location_is_refused_but_a_retry_returns_its_job_and_delete_cleans_it(embedded, out_dir,
                                                                                            tmp_path):
    allowed = out_dir.as_uri()
    server, channel = _serve(embedded, (allowed,))
    try:
        jobs, ops = jobs_grpc.JobServiceStub(channel), operations_pb2_grpc.OperationsStub(channel)
        first = wait_done(ops, create(jobs, count=4, shard_size=2, output_uri=allowed, request_id="out-1").name)
        again = create(jobs, count=4, shard_size=2, output_uri=allowed, request_id="out-1")
        assert again.name == first.name and again.done                   # an idempotent retry
        with pytest.raises(grpc.RpcError) as err:
            create(jobs, count=4, shard_size=2, output_uri=allowed, request_id="out-2")
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(err.value).reason == "OUTPUT_IN_USE"                # the first job's claim
        assert len(ops.ListOperations(operations_pb2.ListOperationsRequest(name="operations")).operations) == 1
        ops.DeleteOperation(operations_pb2.DeleteOperationRequest(name=first.name))
        assert not list((out_dir / "docs").rglob("*.*"))                 # its shards, manifest and claim are gone
        (out_dir / "docs" / "notes.txt").write_text("someone else's")
        with pytest.raises(grpc.RpcError) as err:
            create(jobs, count=4, shard_size=2, output_uri=allowed, request_id="out-3")
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(err.value).reason == "OUTPUT_NOT_EMPTY"
    finally:
        channel.close()
        server.stop(0).wait()


@pytest.mark.parametrize("where", ["file", "s3"])
def test_restart_resumes_into_the_same_output_location(embedded, where, request):
    allowed = request.getfixturevalue("out_dir").as_uri() if where == "file" else request.getfixturevalue("s3_out")
    target = f"{allowed}/run"
    server, channel = _serve(embedded, (allowed,), LocalExecutor(embedded, max_workers=1))
    try:
        clean = result(wait_done(operations_pb2_grpc.OperationsStub(channel),
                                 create(jobs_grpc.JobServiceStub(channel)).name))
    finally:
        channel.close()
        server.stop(0).wait()

    executor = GatedExecutor(embedded, hold_from=2)
    server, channel = _serve(embedded, (allowed,), executor)
    try:
        op = create(jobs_grpc.JobServiceStub(channel), output_uri=target)
        assert executor.held.wait(BOUND_S)
    finally:
        channel.close()
        server.stop(0).wait()                                 # the server goes away mid-job
    out = open_store(target)
    assert out.list_keys("") == ["job.json", "shard-000000.tar", "shard-000001.tar"]       # its claim, 2 shards

    again = Domain(embedded.registry, embedded.stats_cache, device="cpu")
    server, channel = _serve(again, (allowed,), LocalExecutor(again, max_workers=2))
    try:
        op = wait_done(operations_pb2_grpc.OperationsStub(channel), op.name)
        assert metadata(op).shards_done == 4
        job = result(op)
        assert [s.sha256 for s in job.shards] == [s.sha256 for s in clean.shards]
        assert out.list_keys("") == ["job.json", "manifest.json"] + [f"shard-{i:06d}.tar" for i in range(4)]
        for i, shard in enumerate(job.shards):
            assert hashlib.sha256(out.read(f"shard-{i:06d}.tar")).hexdigest() == shard.sha256
    finally:
        channel.close()
        server.stop(0).wait()
        again.close()
        out.close()
