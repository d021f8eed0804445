"""Per-request caps over a real channel: an oversized request is refused with
INVALID_ARGUMENT naming the field and the server setting before any work, on both backends, and the
server keeps serving; a Sample whose client leaves (deadline) leaves the batch it waited for."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from google.rpc import error_details_pb2

from rulewright.inference import grpc_predict_v2_pb2 as oip, grpc_predict_v2_pb2_grpc as oip_grpc
from rulewright.service.domain import batching
from rulewright.service.server.app import create_server
from rulewright.v1 import edit_pb2, generator_service_pb2 as gen, generator_service_pb2_grpc as gen_grpc, images_pb2

from .conftest import detail, error_info
from .test_generator import spec_pb

BOX = [8, 8, 16, 16]


def refused(call, request, **kw) -> tuple[str, str]:
    """(field, description) of the INVALID_ARGUMENT a call gets, answered within a few seconds."""
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        result = call(request, timeout=10, **kw)
        if hasattr(result, "__iter__") and not hasattr(result, "SerializeToString"):
            list(result)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert time.monotonic() - started < 5          # refused up front, not after computing
    violation = detail(err.value, error_details_pb2.BadRequest).field_violations[0]
    return violation.field, violation.description


def test_oversized_requests_are_refused_naming_field_and_setting(generator, channel):
    field, why = refused(generator.Sample, gen.SampleRequest(model="tiny", seeds=range(20000)))
    assert field == "seeds" and "max_images" in why and "20,000" in why
    field, why = refused(generator.Sample, gen.SampleRequest(model="tiny", latents=gen.Latents(count=100000, dim=16)))
    assert field == "latents.count" and "max_images" in why
    big = images_pb2.Mask(width=5000, height=5000, encoding=images_pb2.Mask.ENCODING_RAW)
    field, why = refused(generator.Dissect, gen.DissectRequest(model="tiny", regions=[
        images_pb2.Region(seed=0, box=BOX), images_pb2.Region(seed=1, mask=big)]))
    assert field == "regions[1].mask" and "max_mask_pixels" in why
    field, why = refused(generator.Dissect, gen.DissectRequest(
        model="tiny", regions=[images_pb2.Region(seed=i, box=BOX) for i in range(65)]))
    assert field == "regions" and "max_regions" in why
    field, why = refused(generator.SearchContext, gen.SearchContextRequest(
        model="tiny", context=[images_pb2.Region(seed=0, box=BOX)], seed_range=gen.SeedRange(start=0, count=10**9)))
    assert field == "seed_range.count" and "max_search_seeds" in why
    field, why = refused(generator.ComputeStatistics, gen.ComputeStatisticsRequest(
        model="tiny", stats=edit_pb2.StatisticsSpec(samples=10**8)))
    assert field == "stats.samples" and "max_stats_samples" in why
    field, why = refused(generator.Rewrite, gen.RewriteRequest(model="tiny", spec=spec_pb(), dry_run=True,
                                                               preview_seeds=range(1000)))
    assert field == "preview_seeds" and "max_images" in why
    infer = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer
    field, why = refused(infer, oip.ModelInferRequest(model_name="tiny", inputs=[
        oip.ModelInferRequest.InferInputTensor(name="seed", datatype="INT64", shape=[20000],
                                               contents=oip.InferTensorContents(int64_contents=range(20000)))]))
    assert field == "inputs[0].shape" and "max_images" in why
    ok = generator.Sample(gen.SampleRequest(model="tiny", seeds=range(64)), timeout=30)     # the cap itself is fine
    assert len(ok.images) == 64


def test_a_reply_over_the_message_limit_is_refused_before_sampling(domain):
    from rulewright.service.domain.limits import Limits

    domain.limits = Limits(max_message_bytes=64 * 32 * 32 * 3)      # room for about 60 raw 32x32 images
    server, port = create_server(domain, max_message_bytes=domain.limits.max_message_bytes)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            field, why = refused(gen_grpc.GeneratorServiceStub(ch).Sample, gen.SampleRequest(model="tiny/1",
                                                                                               seeds=range(64)))
            assert field == "seeds" and "max_message_mb" in why
            # the refusal names the most that fit, so a client can split its request (rulewright sample does)
            with pytest.raises(grpc.RpcError) as err:
                gen_grpc.GeneratorServiceStub(ch).Sample(gen.SampleRequest(model="tiny/1", seeds=range(64)), timeout=10)
            fit = dict(error_info(err.value).metadata)
            assert (fit["setting"], fit["limit"]) == ("max_message_mb", "60")
            reply = gen_grpc.GeneratorServiceStub(ch).Sample(gen.SampleRequest(model="tiny/1", seeds=range(60)),
                                                             timeout=60)
            assert len(reply.images) == 60
    finally:
        server.stop(0).wait()


def test_a_sample_whose_deadline_passes_leaves_its_batch(server, channel, domain, monkeypatch):
    """The batcher's worker is held inside one forward pass; a second Sample times out meanwhile and
    must leave the queue: once the worker is released, no forward pass carries its images."""
    entered, release, sizes = threading.Event(), threading.Event(), []
    real = batching.sample

    def held(model, z, **kw):
        sizes.append(z.shape[0])
        entered.set()
        release.wait(20)
        return real(model, z=z, **kw)

    monkeypatch.setattr(batching, "sample", held)
    stub = gen_grpc.GeneratorServiceStub(channel)
    first = stub.Sample.future(gen.SampleRequest(model="tiny/1", seeds=[1]), timeout=30)
    assert entered.wait(20)
    with pytest.raises(grpc.RpcError) as err:
        stub.Sample(gen.SampleRequest(model="tiny/1", seeds=range(10, 17)), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 5
    while domain.batcher._pending and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not domain.batcher._pending, "the abandoned request is still queued"
    release.set()
    assert len(first.result().images) == 1
    after = stub.Sample(gen.SampleRequest(model="tiny/1", seeds=[2, 3]), timeout=30)
    assert len(after.images) == 2
    assert 7 not in sizes and 8 not in sizes and 9 not in sizes, sizes      # no pass ever drew the 7 seeds


def test_health_answers_while_every_worker_is_busy(domain, monkeypatch):
    """Four Samples admitted and held inside sampling, more refused at once: health and OIP readiness
    still answer, from threads work cannot take."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    release = threading.Event()
    real = batching.sample
    monkeypatch.setattr(batching, "sample", lambda model, z, **kw: (release.wait(20), real(model, z=z, **kw))[1])
    server, port = create_server(domain, max_workers=2, max_sample_calls=4)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = gen_grpc.GeneratorServiceStub(ch)
            calls = [stub.Sample.future(gen.SampleRequest(model="tiny/1", seeds=[i]), timeout=30) for i in range(6)]
            deadline = time.monotonic() + 10
            refused = []
            while len(refused) < 2 and time.monotonic() < deadline:
                refused = [c for c in calls if c.done()]
                time.sleep(0.05)
            assert len(refused) == 2 and all(c.exception().code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                                             for c in refused)
            check = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            ready = oip_grpc.GRPCInferenceServiceStub(ch).ServerReady(oip.ServerReadyRequest(), timeout=2)
            assert ready.ready
            release.set()
            assert all(len(c.result().images) == 1 for c in calls if c not in refused)      # the waiting ones too
    finally:
        release.set()
        server.stop(0).wait()


def test_a_rewrites_target_search_and_found_list_are_bounded(generator):
    spec = spec_pb()
    spec.search.candidates = 10**6
    field, why = refused(generator.Rewrite, gen.RewriteRequest(model="tiny", spec=spec, dry_run=True))
    assert field == "spec.search.candidates" and "max_search_seeds" in why
    spec = spec_pb()
    spec.search.targets = 200
    field, why = refused(generator.Rewrite, gen.RewriteRequest(model="tiny", spec=spec, dry_run=True))
    assert field == "spec.search.targets" and "max_regions" in why
    spec = spec_pb()
    spec.found.extend(images_pb2.Region(seed=1000 + i, box=BOX) for i in range(10_000))
    field, why = refused(generator.Rewrite, gen.RewriteRequest(model="tiny", spec=spec, dry_run=True))
    assert field == "spec.found" and "max_regions" in why and "found" in why and "10,002" in why


def test_the_region_cap_names_the_list_that_crosses_it():
    from rulewright.service.engine.errors import InvalidArgument
    from rulewright.service.domain.limits import Limits, check_spec

    region = {"seed": 1, "box": [0, 0, 4, 4]}
    for lists, field in [({"paste": [region] * 70}, "spec.paste"), ({"context": [region] * 70}, "spec.context"),
                         ({"paste": [region] * 40, "found": [region] * 40}, "spec.found"),
                         ({"paste": [region] * 30, "context": [region] * 40, "found": [region]}, "spec.context")]:
        with pytest.raises(InvalidArgument) as err:
            check_spec(Limits(max_regions=64), {"copy": region, **lists})
        assert err.value.field == field, (lists.keys(), err.value)


def test_one_set_of_bounds_for_both_transports(generator):
    """gRPC refuses the same fields with the same descriptions as the HTTP side
    (tests/web/test_web_limits.py): the bounds are the domain's."""
    from tests.web.test_web_limits import QUANTILE_OUT, TOP_OVER

    def search(**kw):
        return gen.SearchContextRequest(model="tiny", context=[images_pb2.Region(seed=0, box=BOX)], seeds=[1, 2], **kw)

    assert refused(generator.SearchContext, search(top=10_001)) == ("top", TOP_OVER)
    assert refused(generator.SearchContext, search(quantile=1.5)) == ("quantile", QUANTILE_OUT)
