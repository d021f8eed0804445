"""Statistics jobs over a real gRPC channel, on the embedded default and on S3 + Redis (the ``domain`` fixture).

A job of 100,000 samples on the tiny model is merged from shards and compared with ``key_moment``
over the same seeds in one process; a Rewrite that asks for those samples then finds the moment
in the cache (or, after the cache lost it, in the store) and computes nothing. Where a job stops
is decided by a gate, not by timing.
"""

from __future__ import annotations

import json
import threading
import time

import grpc
import pytest
import torch
from google.longrunning import operations_pb2

from rulewright.registry.stats_cache import LocalStatsCache
from rulewright.service.domain import statistics as statistics_module
from rulewright.service.domain.core import Domain
from rulewright.service.engine.errors import InvalidArgument
from rulewright.service.engine.stats import key_moment, load_stat
from rulewright.service.domain.limits import Limits
from rulewright.service.domain.requests import RewriteRequest
from rulewright.service.jobs.statistics import PREFIX, StatisticsJobRequest, StatisticsJobs, alignment
from rulewright.service.domain.statistics import durable_key
from rulewright.v1 import edit_pb2, jobs_service_pb2 as jobs_pb, jobs_service_pb2_grpc as jobs_grpc
from tests.builders import TINY_SPEC

from .conftest import detail
from .test_jobs import job_service, operations  # noqa: F401  (fixtures)
from .test_jobs import metadata as job_metadata, result as job_result, wait_done as wait_job

BOUND_S = 120.0                # every wait below gives up after this long
SAMPLES = 100_000              # the bar: at least 10^5 samples, merged from shards
LAYER = "main.6"               # keys of 8x8 locations: 1,024 samples fill one float32 block


def create(job_service, samples=SAMPLES, shard_size=25_000, layer=LAYER, **kw) -> operations_pb2.Operation:
    return job_service.CreateStatisticsJob(jobs_pb.CreateStatisticsJobRequest(
        model=kw.pop("model", "tiny"), layer=layer,
        stats=edit_pb2.StatisticsSpec(samples=samples, seed_start=kw.pop("start", 0)), shard_size=shard_size, **kw),
        timeout=BOUND_S)


def metadata(op) -> jobs_pb.StatisticsJobMetadata:
    return job_metadata(op, jobs_pb.StatisticsJobMetadata)


def result(op) -> jobs_pb.StatisticsJob:
    return job_result(op, jobs_pb.StatisticsJob)


def wait_done(operations, name: str) -> operations_pb2.Operation:
    return wait_job(operations, name, BOUND_S)


def test_job_of_100k_samples_equals_one_process_and_serves_rewrite(domain, job_service, operations, server,
                                                                  monkeypatch):
    op = create(job_service)
    assert op.name.startswith("operations/")
    # 25,000 rounds up to 25 blocks of 1,024 samples: shards of 25,600, the last of 23,200
    assert (metadata(op).shards_total, metadata(op).samples_total, metadata(op).layer) == (4, SAMPLES, LAYER)
    op = wait_done(operations, op.name)
    assert op.done and op.WhichOneof("result") == "response", op
    meta, job = metadata(op), result(op)
    assert (meta.state, meta.shards_done, meta.samples_done) == (jobs_pb.DatasetJobMetadata.STATE_SUCCEEDED, 4,
                                                                 SAMPLES)
    assert job.shard_size == 25_600 and job.shards == 4 and job.stats.samples == SAMPLES
    spec = server[0].stat_jobs.get(op.name.split("/")[1]).spec
    assert spec.batch_size == 256 and alignment(8 * 8) == 1024

    version = domain.resolve("tiny/1")
    model = domain.generator(version).hookable()
    key = domain.stats.key(model, LAYER, statistics_module.KEY_MOMENT, range(SAMPLES), 1.0,
                           memo=(version.model, version.number))
    assert job.cache_key == key.canonical()
    merged = load_stat(domain.stats_cache.get(key))
    assert domain.registry.store.read(durable_key(key)) == domain.stats_cache.get(key)

    # The same seeds and batch size in one process: only the order of float64 additions differs.
    single = key_moment(model, LAYER, range(SAMPLES), batch_size=spec.batch_size)
    assert merged.count == single.count == SAMPLES * 64
    for got, want in ((merged.moment(), single.moment()), (merged.mean(), single.mean())):
        assert got.dtype == torch.float64
        err = (got - want).abs().max().item() / want.abs().max().item()
        assert err < 1e-13, f"relative difference {err:.3g} is more than float64 rounding"

    # A Rewrite asking for those samples finds the moment and computes none, even though one request
    # may compute at most a thousand here.
    def no_compute(*a, **kw):
        raise AssertionError("the statistic was computed again")
    monkeypatch.setattr(statistics_module, "key_moment", no_compute)
    hits = []
    monkeypatch.setattr(domain.stats, "observe", lambda kind, hit: hits.append((kind, hit)))
    monkeypatch.setattr(domain, "limits", Limits(max_stats_samples=1000))
    spec_json = {**TINY_SPEC, "stats": {"samples": SAMPLES, "seed_start": 0}}
    out = domain.rewrite(RewriteRequest(model="tiny", spec=spec_json, dry_run=True))
    assert out.edit is not None and hits == [(statistics_module.KEY_MOMENT, True)]

    # Other seeds over max_stats_samples were never computed by a job: refused, naming the field.
    with pytest.raises(InvalidArgument) as err:
        domain.rewrite(RewriteRequest(model="tiny", spec={**spec_json, "stats": {"samples": SAMPLES, "seed_start": 1}},
                                      dry_run=True))
    assert err.value.field == "spec.stats.samples" and "rulewright stats create" in err.value.description

    # A multilayer edit fixed to context directions needs every layer's moment: the other layers'
    # were never computed by a job, so the request is refused rather than computing 10^5 samples.
    with pytest.raises(InvalidArgument) as err:
        domain.rewrite(RewriteRequest(model="tiny", spec={**spec_json, "method": "multilayer", "factors": "context",
                                                          "goal": "image", "layers": ["main.3", LAYER]},
                                      dry_run=True))
    assert err.value.field == "spec.stats.samples" and "--layer main.3" in err.value.description

    # A server whose cache never saw it (a fresh in-process cache) reads the job's copy in the store.
    again = Domain(domain.registry, LocalStatsCache(), device="cpu", limits=Limits(max_stats_samples=1000))
    try:
        out = again.rewrite(RewriteRequest(model="tiny", spec=spec_json, dry_run=True))
        assert out.edit is not None and len(again.stats_cache) == 1
    finally:
        again.close()


@pytest.mark.parametrize("change, field", [
    (dict(samples=0), "stats.samples"),
    (dict(samples=10**7 + 1), "stats.samples"),
    (dict(shard_size=-1), "shard_size"),
    (dict(truncation=1.5), "truncation"),
    (dict(start=-1), "stats.seed_start"),
    (dict(layer="nope"), "layer"),
])
def test_bad_requests_name_their_field(job_service, domain, change, field):
    from google.rpc import error_details_pb2

    with pytest.raises(grpc.RpcError) as err:
        create(job_service, **{"samples": 64, "shard_size": 32, **change})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in detail(err.value, error_details_pb2.BadRequest).field_violations] == [field]
    assert not domain.registry.store.list_keys(PREFIX)           # refused before any work


def test_operations_list_both_kinds_and_request_ids(job_service, operations, channel):
    from rulewright.v1 import generator_service_pb2 as gen

    stats = create(job_service, samples=64, shard_size=32, request_id="same")
    assert create(job_service, samples=64, shard_size=32, request_id="same").name == stats.name
    data = jobs_grpc.JobServiceStub(channel).CreateDatasetJob(jobs_pb.CreateDatasetJobRequest(
        model="tiny", seeds=gen.SeedRange(start=0, count=2), shard_size=2, request_id="same"), timeout=BOUND_S)
    assert data.name != stats.name                               # one id space, kinds apart
    for name in (stats.name, data.name):
        assert wait_done(operations, name).done
    listed = operations.ListOperations(operations_pb2.ListOperationsRequest(name="operations"))
    assert sorted(o.name for o in listed.operations) == sorted([stats.name, data.name])
    got = operations.GetOperation(operations_pb2.GetOperationRequest(name=stats.name))
    assert got.metadata.Is(jobs_pb.StatisticsJobMetadata.DESCRIPTOR) and result(got).stats.samples == 64
    operations.DeleteOperation(operations_pb2.DeleteOperationRequest(name=stats.name))
    with pytest.raises(grpc.RpcError) as err:
        operations.GetOperation(operations_pb2.GetOperationRequest(name=stats.name))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


class GatedJobs(StatisticsJobs):
    """Shards from ``hold_from`` on wait for ``gate``; a stop (the server going away) leaves them unrun."""

    def __init__(self, domain, hold_from: int):
        super().__init__(domain)
        self.hold_from = hold_from
        self.gate = threading.Event()
        self.held = threading.Event()

    def _run_shards(self, spec, indices, progress):
        for index in indices:
            if index >= self.hold_from:
                self.held.set()
                deadline = time.monotonic() + BOUND_S
                while not self.gate.wait(0.02):
                    if progress.stopped() or time.monotonic() > deadline:
                        return
            yield from super()._run_shards(spec, [index], progress)


def test_a_stopped_job_resumes_from_its_records_and_merges_the_same(domain):
    request = StatisticsJobRequest(model="tiny", layer=LAYER, samples=4096, shard_size=1024)
    clean = StatisticsJobs(domain)
    try:
        first = clean.create(request)
        done = clean.wait(first.spec.id, BOUND_S)
        assert done.state == "succeeded"
    finally:
        clean.close()

    gated = GatedJobs(domain, hold_from=2)
    job = gated.create(StatisticsJobRequest(model="tiny", layer=LAYER, samples=4096, shard_size=1024,
                                            request_id="resume-me"))
    assert gated.held.wait(BOUND_S)
    gated.close()                                    # the server goes away with two shards committed
    store = domain.registry.store
    keys = store.list_keys(f"{PREFIX}{job.spec.id}/")
    assert len([k for k in keys if k.endswith(".safetensors")]) == 2 and not any("manifest" in k for k in keys)

    again = StatisticsJobs(domain)
    try:
        assert again.resume() == [job.spec.id]
        status = again.wait(job.spec.id, BOUND_S)
        assert status.state == "succeeded" and status.shards_done == 4
        assert status.manifest["sha256"] == done.manifest["sha256"]          # bit for bit the clean run's moment
        assert [s["sha256"] for s in status.manifest["shards"]] == [s["sha256"] for s in done.manifest["shards"]]
        keys = store.list_keys(f"{PREFIX}{job.spec.id}/")
        assert len([k for k in keys if k.endswith(".safetensors")]) == 4 == len([k for k in keys if "/done/" in k])
        assert json.loads(store.read(f"{PREFIX}{job.spec.id}/manifest.json"))["samples"] == 4096
    finally:
        again.close()


def test_a_job_on_an_edited_version_is_named_by_its_own_weights(domain, job_service, operations):
    """An edited version's resident module is its base's: the job's moment must be filed under the
    edited weights' fingerprint, where the domain looks it up, and not under the base's."""
    from rulewright.service.domain.requests import StatisticsRequest

    edited = domain.rewrite(RewriteRequest("tiny/1", TINY_SPEC)).version          # edits main.6
    op = wait_done(operations, create(job_service, samples=2048, shard_size=1024, layer="main.9",
                                      model=f"tiny/{edited.number}").name)
    assert op.done and not op.HasField("error"), op
    found = domain.compute_statistic(StatisticsRequest(f"tiny/{edited.number}", layer="main.9", samples=2048))
    assert found.cached                                                           # the job's entry: nothing computed
    dense = domain.generator(edited).hookable()
    assert torch.allclose(found.stat.moment(), key_moment(dense, "main.9", range(2048)).moment(),
                          rtol=1e-6, atol=1e-9)
    base = domain.compute_statistic(StatisticsRequest("tiny/1", layer="main.9", samples=2048))
    assert not base.cached and base.key != found.key
