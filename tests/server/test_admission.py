"""Admission and queued work over a real channel: a queued Sample whose client leaves (deadline,
cancel) leaves the batch queue with its own status and nothing logged INTERNAL; Samples waiting for
a batch take no work slot, long calls (Rewrite, Dissect, SearchContext, ComputeStatistics) have
their own bounded lane, and each lane refuses with RESOURCE_EXHAUSTED only past its own bound."""

from __future__ import annotations

import logging
import threading
import time

import grpc
import pytest

from rulewright.service.domain import batching
from rulewright.service.server.app import create_server
from rulewright.v1 import edit_pb2, generator_service_pb2 as gen, generator_service_pb2_grpc as gen_grpc
from tests.builders import tiny_domain

from .test_generator import spec_pb


@pytest.fixture
def tiny(tmp_path):
    d = tiny_domain(tmp_path)
    yield d
    d.close()


@pytest.fixture
def held(monkeypatch):
    """The batcher's forward passes wait for ``release``; ``sizes`` records each pass's image count."""
    entered, release, sizes = threading.Event(), threading.Event(), []
    real = batching.sample

    def sample(model, z, **kw):
        sizes.append(z.shape[0])
        entered.set()
        release.wait(30)
        return real(model, z=z, **kw)

    monkeypatch.setattr(batching, "sample", sample)
    yield entered, release, sizes
    release.set()


def until(predicate, seconds: float = 10.0) -> bool:
    """Whether ``predicate()`` came true within ``seconds`` (polled)."""
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


def test_queued_samples_whose_clients_leave_leave_the_queue_without_internal(tiny, held, caplog):
    entered, release, sizes = held
    server, port = create_server(tiny)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch, caplog.at_level(logging.INFO, logger="rulewright"):
            stub = gen_grpc.GeneratorServiceStub(ch)
            running = stub.Sample.future(gen.SampleRequest(model="tiny/1", seeds=[1]), timeout=60)
            assert entered.wait(20)
            queued = stub.Sample.future(gen.SampleRequest(model="tiny/1", seeds=[2, 3]), timeout=60)
            assert until(lambda: len(tiny.batcher._pending) == 1)
            cancelled = stub.Sample.future(gen.SampleRequest(model="tiny/1", seeds=range(10, 15)), timeout=60)
            assert until(lambda: len(tiny.batcher._pending) == 2)
            with pytest.raises(grpc.RpcError) as late:            # queued behind another request
                stub.Sample(gen.SampleRequest(model="tiny/1", seeds=range(20, 27)), timeout=0.5)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            cancelled.cancel()
            assert until(lambda: [j.z.shape[0] for j in tiny.batcher._pending] == [2]), \
                "abandoned requests are still queued"
            release.set()
            assert len(running.result().images) == 1 and len(queued.result().images) == 2
            assert len(stub.Sample(gen.SampleRequest(model="tiny/1", seeds=[4]), timeout=30).images) == 1
        assert until(lambda: len([r for r in caplog.records if getattr(r, "method", "") == "Sample"]) == 5)
        codes = [getattr(r, "code", "") for r in caplog.records if getattr(r, "method", "") == "Sample"]
        assert "INTERNAL" not in codes and codes.count("OK") == 3, codes
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
        assert 5 not in sizes and 7 not in sizes and sum(sizes) == 4, sizes     # no pass drew the leavers' seeds
    finally:
        release.set()
        server.stop(0).wait()


def test_samples_waiting_for_a_batch_do_not_shut_out_a_rewrite(tiny, held):
    """With 2 work slots, 8 Samples wait for a held forward pass; a Rewrite still runs to its result."""
    entered, release, sizes = held
    server, port = create_server(tiny, max_workers=2)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = gen_grpc.GeneratorServiceStub(ch)
            samples = [stub.Sample.future(gen.SampleRequest(model="tiny/1", seeds=[i]), timeout=60) for i in range(8)]
            assert entered.wait(20)
            assert until(lambda: sum(sizes) + sum(len(j.z) for j in tiny.batcher._pending) == 8
                         or any(s.done() for s in samples))
            assert not [s for s in samples if s.done()], [s.exception() for s in samples if s.done()]
            spec = spec_pb(steps=30)                        # a budget that leaves no edit (fewer is refused)
            replies = list(stub.Rewrite(gen.RewriteRequest(model="tiny/1", spec=spec, dry_run=True), timeout=60))
            assert replies[-1].HasField("result")
            assert not [s for s in samples if s.done()]          # the Samples were waiting all along
            release.set()
            assert all(len(s.result().images) == 1 for s in samples)
    finally:
        release.set()
        server.stop(0).wait()


def _stats_stream(stub, samples: int = 100_000):
    request = gen.ComputeStatisticsRequest(model="tiny", layer="main.6", stats=edit_pb2.StatisticsSpec(samples=samples))
    return stub.ComputeStatistics(request, timeout=60)


def test_each_lane_refuses_only_past_its_own_bound(tiny, held):
    """One long call running and one waiting fill the long lane: a third is RESOURCE_EXHAUSTED naming
    its setting, while Samples are still admitted up to their own bound and refused past it."""
    entered, release, _ = held
    server, port = create_server(tiny, max_workers=1, max_sample_calls=3, max_long_calls=1, long_call_queue=1)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = gen_grpc.GeneratorServiceStub(ch)
            first = _stats_stream(stub)
            assert next(first).HasField("progress")                # running
            second = _stats_stream(stub)                           # waiting for the long lane
            assert until(lambda: server.limiter.lanes["long"].waiting == 1)
            with pytest.raises(grpc.RpcError) as busy:
                next(_stats_stream(stub))
            assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "long_call_queue" in busy.value.details()
            samples = [stub.Sample.future(gen.SampleRequest(model="tiny/1", seeds=[i]), timeout=60) for i in range(3)]
            assert entered.wait(20)
            with pytest.raises(grpc.RpcError) as full:
                stub.Sample(gen.SampleRequest(model="tiny/1", seeds=[9]), timeout=10)
            assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_sample_calls" in full.value.details()
            assert stub.ListLayers(gen.ListLayersRequest(model="tiny/1"), timeout=10).z_dim == 16   # the work lane
            release.set()
            assert all(len(s.result().images) == 1 for s in samples)
            first.cancel()
            assert next(second).HasField("progress")               # admitted once the first left
            second.cancel()
    finally:
        release.set()
        server.stop(0).wait()


def test_lanes_by_method():
    """Samples and ModelInfers wait in the sample lane (those with unit interventions work alone, in the
    work lane); Rewrite, Dissect, SearchContext and ComputeStatistics in the long lane; the rest work."""
    from rulewright.service.server.app import WorkLimiter

    limiter = WorkLimiter(4, sample_calls=8, long_calls=2, long_queue=3)
    svc = "/rulewright.v1.GeneratorService/"
    assert limiter.lane(svc + "Sample", gen.SampleRequest(seeds=[1])).name == "sample"
    assert limiter.lane("/inference.GRPCInferenceService/ModelInfer").name == "sample"
    intervened = gen.SampleRequest(seeds=[1], interventions=[gen.UnitIntervention(units=[3])])
    assert limiter.lane(svc + "Sample", intervened).name == "work"
    assert {limiter.lane(svc + m).name for m in ("Rewrite", "Dissect", "SearchContext", "ComputeStatistics")} == {"long"}
    assert limiter.lane(svc + "ListLayers").name == "work"
    assert limiter.lane("/rulewright.v1.RegistryService/ImportModel").name == "work"
    assert limiter.threads == 4 + 4 + 8 + 2 + 3
    unbatched = WorkLimiter(4, long_calls=2, long_queue=3)            # no batcher: Samples are work
    assert unbatched.lane(svc + "Sample", gen.SampleRequest(seeds=[1])).name == "work"
