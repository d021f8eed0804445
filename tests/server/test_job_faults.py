"""Dataset jobs survive SIGKILL of a real server process, on a filesystem store and on S3 (moto).

One job of 60 seeds in shards of 10 is created over gRPC on a real ``rulewright-engine serve``
process (``tests/server/fault_serve.py``, which can hang one chosen store write), and:

1. the server is SIGKILLed while it writes shard 2's tar (shards 0 and 1 committed; on the
   filesystem half of the tar is already spilled to the store's ``tmp/``);
2. a restarted server resumes the job and is SIGKILLed between publishing shard 4's tar and
   writing its commit record (the tar is visible, its record is not);
3. a plain ``rulewright-engine serve`` over the same store resumes it again and finishes it.

Every shard's sha256 must equal the one a clean single-worker run writes for the same seeds, and
at every observation point (each poll of the operation, after each kill, at the end) the store
must show only whole documents: no temporary names, no tar whose bytes are not the clean run's,
no commit record without its tar, no manifest before every shard is recorded, no S3 multipart
upload in flight. Where each kill lands is decided by the fault point, not by timing; every wait
is bounded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import save_file

from rulewright.registry import Registry
from rulewright.registry.stats_cache import open_stats_cache
from rulewright.service.domain.core import Domain
from rulewright.service.jobs.dataset import PREFIX, DatasetJobRequest, DatasetJobs, LocalExecutor
from rulewright.v1 import generator_service_pb2 as gen, jobs_service_pb2 as jobs_pb
from rulewright.v1 import jobs_service_pb2_grpc as jobs_grpc
from tests.backends import REPO
from tests.builders import dcgan_state
from tests.support import free_port

BOUND_S = 120.0               # every wait below gives up after this long (a loaded CI machine starts torch slowly)
SEEDS, SHARD = 60, 10
SHARDS = SEEDS // SHARD
_ALLOWED = re.compile(r"^(job\.json|manifest\.json|shard-\d{6}\.tar|done/\d{6}\.json)$")


# ---- the store, seen from outside the server -----------------------------------------------------

class Backend:
    """A store URI, the environment a server needs to reach it, and raw views of what it holds."""

    def __init__(self, kind: str, tmp_path: Path, moto=None):
        self.kind = kind
        self.env: dict[str, str] = {}
        if kind == "file":
            self.root = tmp_path / "store"
            self.uri = self.root.as_uri()
        else:
            cfg = moto.config()
            self.bucket = f"faults-{uuid.uuid4().hex[:12]}"
            self.uri = f"s3://{self.bucket}/registry"
            self.env = {"RULEWRIGHT_S3_ENDPOINT": cfg.endpoint, "RULEWRIGHT_S3_ACCESS_KEY": cfg.access_key,
                        "RULEWRIGHT_S3_SECRET_KEY": cfg.secret_key, "RULEWRIGHT_S3_SECURE": "false"}
            self.s3 = cfg
        self.registry = Registry.open(self.uri, **({"s3": self.s3} if kind == "s3" else {}))
        if kind == "s3":
            self.registry.store.ensure_bucket()

    def job_names(self, job_id: str) -> list[str]:
        """What the store's listing shows of the job, as names relative to its folder."""
        base = f"{PREFIX}{job_id}/"
        return [k[len(base):] for k in self.registry.store.list_keys(base)]

    def raw_stray(self, job_id: str) -> list[str]:
        """Anything under the job's folder that is not a document name, seen below the store's API:
        files on disk, or S3 objects and multipart uploads in flight."""
        if self.kind == "file":
            folder = self.root / "docs" / PREFIX / job_id
            names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()] if folder.exists() else []
            return [n for n in names if not _ALLOWED.match(n)]
        client = self.registry.store._client
        prefix = f"registry/docs/{PREFIX}{job_id}/"
        objects = client.list_objects_v2(Bucket=self.bucket, Prefix=prefix).get("Contents", [])
        uploads = client.list_multipart_uploads(Bucket=self.bucket, Prefix=prefix).get("Uploads", [])
        return ([o["Key"] for o in objects if not _ALLOWED.match(o["Key"][len(prefix):])]
                + [f"multipart upload {u['Key']}" for u in uploads])

    def abandoned_uploads(self) -> list[str]:
        """Temporary files a killed writer left (filesystem only: S3 has none)."""
        return self.registry.store.abandoned_uploads(0.0) if self.kind == "file" else []


def assert_nothing_partial(backend: Backend, job_id: str, clean: list[str]) -> set[int]:
    """Every document of the job is whole and the clean run's; the indices of the committed shards."""
    store = backend.registry.store
    names = backend.job_names(job_id)
    assert not [n for n in names if not _ALLOWED.match(n)], names
    assert not backend.raw_stray(job_id)
    tars = {int(n[6:12]) for n in names if n.endswith(".tar")}
    records = {int(n[5:11]) for n in names if n.startswith("done/")}
    for i in tars:
        data = store.read(f"{PREFIX}{job_id}/shard-{i:06d}.tar")
        assert hashlib.sha256(data).hexdigest() == clean[i], f"shard {i} is not the clean run's"
    for i in records:
        assert json.loads(store.read(f"{PREFIX}{job_id}/done/{i:06d}.json"))["sha256"] == clean[i]
    assert records <= tars, f"records without their shard: {sorted(records - tars)}"
    if "manifest.json" in names:
        assert records == set(range(SHARDS))
    return records


# ---- processes -------------------------------------------------------------------------------------

class Server:
    """One ``serve`` process over the backend's store; ``hold`` makes it hang at a store write."""

    def __init__(self, backend: Backend, tmp_path: Path, hold: str | None = None):
        self.port = free_port()
        self.held = tmp_path / f"held-{self.port}"
        env = {**os.environ, **backend.env, "PYTHONPATH": str(REPO), "RULEWRIGHT_ADDRESS": "127.0.0.1:1"}
        if hold:
            env.update(RULEWRIGHT_FAULT_HOLD=hold, RULEWRIGHT_FAULT_HELD=str(self.held))
            command = [sys.executable, "-m", "tests.server.fault_serve"]
        else:
            command = [str(Path(sys.executable).with_name("rulewright-engine"))]
        self.log = open(tmp_path / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen(
            command + ["serve", "--registry-uri", backend.uri, "--bootstrap", "none", "--device", "cpu",
                       "--address", f"127.0.0.1:{self.port}", "--web-address", "off", "--job-workers", "1",
                       "--data-dir", str(tmp_path / "data"), "--grace-s", "1"],
            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=self.log)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.jobs = jobs_grpc.JobServiceStub(self.channel)
        self.operations = operations_pb2_grpc.OperationsStub(self.channel)
        self._wait_serving()

    def _wait_serving(self) -> None:
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + BOUND_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited with {self.proc.returncode}: {self.stderr()}"
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not serving within {BOUND_S}s: {self.stderr()}")

    def stderr(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-4000:]

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed or cleaned up."""
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=BOUND_S)
        self.log.close()

    def operation(self, name: str) -> operations_pb2.Operation:
        return self.operations.GetOperation(operations_pb2.GetOperationRequest(name=name), timeout=30)


def metadata(op) -> jobs_pb.DatasetJobMetadata:
    meta = jobs_pb.DatasetJobMetadata()
    assert op.metadata.Unpack(meta)
    return meta


def hold_until_held(server: Server, backend: Backend, name: str, clean: list[str]) -> operations_pb2.Operation:
    """Poll the operation (checking the store each time) until the server hangs at its fault point."""
    job_id = name.split("/")[1]
    deadline = time.monotonic() + BOUND_S
    while not server.held.exists():
        assert time.monotonic() < deadline, f"the fault point was not reached: {server.stderr()}"
        assert server.proc.poll() is None, f"server exited with {server.proc.returncode}: {server.stderr()}"
        op = server.operation(name)
        assert not op.done, "the job ended before the fault point"
        assert metadata(op).shards_done == len(assert_nothing_partial(backend, job_id, clean))
        time.sleep(0.1)
    op = server.operation(name)
    assert not op.done and metadata(op).shards_done >= 1
    return op


# ---- the test ----------------------------------------------------------------------------------------

@pytest.fixture(params=["file", "s3"])
def backend(request, tmp_path):
    moto = request.getfixturevalue("moto_server") if request.param == "s3" else None
    b = Backend(request.param, tmp_path, moto)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in dcgan_state(z_dim=16, widths=(32, 16, 8, 3)).items()}, str(path))
    domain = Domain(b.registry, open_stats_cache("memory://"), device="cpu")
    try:
        domain.bootstrap("tiny", path)
    finally:
        domain.close()
    yield b
    b.registry.close()


def clean_run(backend: Backend) -> list[str]:
    """Every shard's sha256 from one worker in this process, undisturbed (a job of its own)."""
    domain = Domain(backend.registry, open_stats_cache("memory://"), device="cpu")
    jobs = DatasetJobs(domain, LocalExecutor(domain, max_workers=1))
    try:
        status = jobs.create(DatasetJobRequest("tiny", 0, SEEDS, shard_size=SHARD, request_id="clean"))
        status = jobs.wait(status.spec.id, BOUND_S)
        assert status.state == "succeeded", status
        return [s["sha256"] for s in status.manifest["shards"]]
    finally:
        jobs.close()
        domain.close()


def test_server_killed_mid_shard_twice_then_restarted_completes_with_clean_shards(backend, tmp_path):
    clean = clean_run(backend)

    # 1: killed while shard 2's tar is being written.
    server = Server(backend, tmp_path, hold=r"/shard-000002\.tar$")
    try:
        op = server.jobs.CreateDatasetJob(jobs_pb.CreateDatasetJobRequest(
            model="tiny", seeds=gen.SeedRange(start=0, count=SEEDS), shard_size=SHARD, request_id="faults"),
            timeout=30)
        name, job_id = op.name, op.name.split("/")[1]
        op = hold_until_held(server, backend, name, clean)
        assert metadata(op).shards_done == 2
    finally:
        server.kill()
    assert assert_nothing_partial(backend, job_id, clean) == {0, 1}
    assert "shard-000002.tar" not in backend.job_names(job_id)
    if backend.kind == "file":
        assert backend.abandoned_uploads(), "the kill was meant to land during the tar's write"

    # 2: the job resumes in a new server, which is killed between shard 4's tar and its record.
    server = Server(backend, tmp_path, hold=r"/done/000004\.json$")
    try:
        hold_until_held(server, backend, name, clean)
    finally:
        server.kill()
    assert assert_nothing_partial(backend, job_id, clean) == {0, 1, 2, 3}
    assert "shard-000004.tar" in backend.job_names(job_id)          # published, not yet recorded

    # 3: a plain server resumes it once more and finishes it.
    server = Server(backend, tmp_path)
    try:
        deadline = time.monotonic() + BOUND_S
        op = server.operation(name)
        while not op.done and time.monotonic() < deadline:
            assert_nothing_partial(backend, job_id, clean)
            op = server.operations.WaitOperation(operations_pb2.WaitOperationRequest(
                name=name, timeout=duration_pb2.Duration(seconds=2)), timeout=30)
        assert op.done and op.WhichOneof("result") == "response", (op, server.stderr())
        job = jobs_pb.DatasetJob()
        assert op.response.Unpack(job)
        assert [s.sha256 for s in job.shards] == clean
        assert metadata(op).shards_done == SHARDS and metadata(op).images_done == SEEDS
    finally:
        server.kill()
    assert assert_nothing_partial(backend, job_id, clean) == set(range(SHARDS))
    assert "manifest.json" in backend.job_names(job_id)
