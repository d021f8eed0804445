"""Dataset and statistics jobs on the Ray executor, on a real local Ray instance (2 CPUs), file and S3 stores.

- The Ray executor's shards are byte-identical (sha256) to a clean single-worker run of the local
  executor, which ``test_jobs`` checks against Sample.
- A worker process SIGKILLed mid-shard (once during a tar's write, once between a tar and its
  record: ``ray_faults``) is retried by Ray; the job completes with the clean run's sha256s and
  nothing partial is ever visible in the store.
- A statistics job's shards run as Ray tasks too, and merge to the moment the local executor's
  shards merge to.

Ray starts once for the module (it is slow to start); the workers inherit this process's
environment, which points them at the repository (to import ``tests.server.ray_faults``), the
moto S3 server and the fault markers.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid

import pytest
import torch

from rulewright.registry.stats_cache import open_stats_cache
from rulewright.service.domain.core import Domain
from rulewright.service.jobs.dataset import PREFIX, DatasetJobRequest, DatasetJobs
from tests.backends import REPO

from .test_job_faults import BOUND_S, SEEDS, SHARD, SHARDS, assert_nothing_partial, backend, clean_run  # noqa: F401

ray = pytest.importorskip("ray") if not os.environ.get("CI") else __import__("ray")


@pytest.fixture(scope="module")
def ray_instance(moto_server, tmp_path_factory):
    """A local Ray instance whose workers can import the tests and reach moto."""
    from rulewright.service.jobs.ray_executor import RayExecutor  # noqa: F401  (fails early if the module is broken)

    faults = tmp_path_factory.mktemp("ray-faults")
    cfg = moto_server.config()
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "RULEWRIGHT_FAULT_DIR": str(faults), "RULEWRIGHT_S3_ENDPOINT": cfg.endpoint,
           "RULEWRIGHT_S3_ACCESS_KEY": cfg.access_key, "RULEWRIGHT_S3_SECRET_KEY": cfg.secret_key,
           "RULEWRIGHT_S3_SECURE": "false"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)                      # the raylet, and so every worker, inherits these
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    try:
        yield faults
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ray_run(backend, request_id: str, **executor) -> tuple[str, list[str]]:
    """A job of SEEDS seeds on the Ray executor; its id and its shards' sha256s."""
    from rulewright.service.jobs.ray_executor import RayExecutor

    domain = Domain(backend.registry, open_stats_cache("memory://"), device="cpu")
    jobs = DatasetJobs(domain, RayExecutor(backend.uri, device="cpu", max_in_flight=2, **executor))
    try:
        status = jobs.create(DatasetJobRequest("tiny", 0, SEEDS, shard_size=SHARD, request_id=request_id))
        deadline = time.monotonic() + BOUND_S
        while not status.done and time.monotonic() < deadline:
            status = jobs.wait(status.spec.id, 1.0)
            assert_nothing_partial(backend, status.spec.id, clean_shas[backend.uri])
        assert status.state == "succeeded", (status.state, status.error)
        return status.spec.id, [s["sha256"] for s in status.manifest["shards"]]
    finally:
        jobs.close()
        domain.close()


clean_shas: dict[str, list[str]] = {}


def test_ray_shards_are_byte_identical_to_the_local_executor(ray_instance, backend):
    clean_shas[backend.uri] = clean = clean_run(backend)
    job_id, shas = ray_run(backend, "ray")
    assert shas == clean
    assert assert_nothing_partial(backend, job_id, clean) == set(range(SHARDS))


def test_ray_worker_killed_mid_shard_is_retried_and_the_job_completes(ray_instance, backend):
    from tests.server import ray_faults

    for name in (f"killed-{ray_faults.KILL_DURING_TAR}", f"killed-{ray_faults.KILL_BEFORE_RECORD}"):
        (ray_instance / name).unlink(missing_ok=True)
    clean_shas[backend.uri] = clean = clean_run(backend)
    job_id, shas = ray_run(backend, "ray-kill", shard_fn=ray_faults.killing_shard_task, max_retries=2)
    assert (ray_instance / f"killed-{ray_faults.KILL_DURING_TAR}").exists()      # the kills did happen
    assert (ray_instance / f"killed-{ray_faults.KILL_BEFORE_RECORD}").exists()
    assert shas == clean
    assert assert_nothing_partial(backend, job_id, clean) == set(range(SHARDS))


def test_ray_tasks_write_shards_to_the_jobs_output_location(ray_instance, backend, moto_server):
    from rulewright.registry.stores import open_store
    from rulewright.service.jobs.ray_executor import RayExecutor

    clean = clean_shas.get(backend.uri) or clean_run(backend)
    bucket = f"ray-out-{uuid.uuid4().hex[:12]}"
    with open_store(f"s3://{bucket}", s3=moto_server.config()) as store:
        store.ensure_bucket()
    target = f"s3://{bucket}/team-a/{backend.kind}"
    domain = Domain(backend.registry, open_stats_cache("memory://"), device="cpu")
    jobs = DatasetJobs(domain, RayExecutor(backend.uri, device="cpu", max_in_flight=2),
                       output_prefixes=[f"s3://{bucket}/team-a"])
    try:
        status = jobs.create(DatasetJobRequest("tiny", 0, SEEDS, shard_size=SHARD, request_id="ray-out",
                                               output_uri=target))
        status = jobs.wait(status.spec.id, BOUND_S)
        assert status.state == "succeeded", (status.state, status.error)
        assert [s["sha256"] for s in status.manifest["shards"]] == clean
        out = jobs.output_store(status.spec)        # the workers wrote there, with their own RULEWRIGHT_S3_*
        assert out.list_keys("") == ["job.json", "manifest.json"] + [f"shard-{i:06d}.tar" for i in range(SHARDS)]
        assert [hashlib.sha256(out.read(f"shard-{i:06d}.tar")).hexdigest() for i in range(SHARDS)] == clean
        assert not [k for k in backend.registry.store.list_keys(f"{PREFIX}{status.spec.id}/") if k.endswith(".tar")]
    finally:
        jobs.close()
        domain.close()


def test_serve_settings_build_the_ray_executor(ray_instance, backend):
    from rulewright.service.jobs.ray_executor import RayExecutor
    from rulewright.service.server.app import job_executor
    from rulewright.service.server.config import resolve

    domain = Domain(backend.registry, open_stats_cache("memory://"), device="cpu")
    try:
        assert job_executor(resolve(environ={}), domain) is None                  # local: the server's thread pool
        executor = job_executor(resolve(environ={"RULEWRIGHT_JOB_EXECUTOR": "ray", "RULEWRIGHT_DEVICE": "cpu",
                                                 "RULEWRIGHT_JOB_WORKERS": "1"}), domain)
        assert isinstance(executor, RayExecutor) and executor.max_in_flight == 1
        jobs = DatasetJobs(domain, executor)
        status = jobs.create(DatasetJobRequest("tiny", 0, 4, shard_size=2, request_id="settings"))
        assert jobs.wait(status.spec.id, BOUND_S).state == "succeeded"
        jobs.close()
        assert ray.is_initialized()            # it joined the Ray instance it found, so it leaves it running
    finally:
        domain.close()


def test_statistics_shards_run_as_ray_tasks_and_merge_like_the_local_executor(ray_instance, backend):
    from rulewright.service.jobs.ray_executor import RayExecutor
    from rulewright.service.jobs.statistics import StatisticsJobRequest, StatisticsJobs, merge_shards
    from tests.server import ray_faults

    def merged(status):
        store = backend.registry.store
        return merge_shards(store.read(s["key"]) for s in status.manifest["shards"])

    for marker in ray_instance.glob("ran-statistics-*"):
        marker.unlink()
    domain = Domain(backend.registry, open_stats_cache("memory://"), device="cpu")
    request = StatisticsJobRequest("tiny", samples=4096, layer="main.6", shard_size=1024)
    local = StatisticsJobs(domain)
    try:
        clean = local.wait(local.create(request).spec.id, BOUND_S)
        assert clean.state == "succeeded", (clean.state, clean.error)
    finally:
        local.close()
    jobs = StatisticsJobs(domain, RayExecutor(backend.uri, device="cpu", max_in_flight=2,
                                              shard_fn=ray_faults.recording_shard_task))
    try:
        status = jobs.wait(jobs.create(StatisticsJobRequest("tiny", samples=4096, layer="main.6", shard_size=1024,
                                                            request_id="ray-stats")).spec.id, BOUND_S)
        assert status.state == "succeeded", (status.state, status.error)
        ran = {p.name: int(p.read_text()) for p in ray_instance.glob("ran-statistics-*")}
        assert sorted(ran) == [f"ran-statistics-{i}" for i in range(4)] and os.getpid() not in ran.values()
        ours, theirs = merged(status), merged(clean)
        assert ours.count == theirs.count == 4096 * 8 * 8            # every key location of every sample
        # Other processes sum float32 blocks with their own thread counts: equal up to float32 rounding.
        for a, b in ((ours.moment(), theirs.moment()), (ours.mean(), theirs.mean())):
            assert torch.linalg.norm(a - b) <= 1e-5 * torch.linalg.norm(b)
    finally:
        jobs.close()
        domain.close()
