"""Prometheus metrics over a real server and channel: RPC counts by code (unary, server and client
streaming, cancelled, refused by auth), latency, statistics-cache hits, the domain gauges, batch
sizes and the HTTP endpoint."""

from __future__ import annotations

import time
import types
import urllib.error
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from rulewright.service.domain.statistics import KEY_MOMENT
from rulewright.service.server import auth
from rulewright.service.server.app import create_server
from rulewright.service.server.metrics import Metrics, rpc_label
from rulewright.v1 import edit_pb2, generator_service_pb2 as gen, generator_service_pb2_grpc as gen_grpc
from rulewright.v1 import registry_service_pb2 as reg, registry_service_pb2_grpc as reg_grpc

from .test_auth import READER, TOKENS_TEXT, bearer
from .test_generator import spec_pb

SAMPLE = "GeneratorService/Sample"


def value(metrics: Metrics, sample: str, **labels) -> float | None:
    """The value of one sample in the exposition, or None when it is absent."""
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def requests(metrics: Metrics, rpc: str, code: str) -> float:
    return value(metrics, "rulewright_requests_total", rpc=rpc, code=code) or 0.0


def eventually(check, timeout: float = 15.0) -> None:
    """Poll ``check()`` until true: a cancelled stream is recorded when grpc drops it, a bit later."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.02)


@pytest.fixture
def metrics():
    return Metrics()


@pytest.fixture
def served(domain, metrics):
    server, port = create_server(domain, metrics=metrics)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield gen_grpc.GeneratorServiceStub(ch), reg_grpc.RegistryServiceStub(ch), ch
    server.stop(0).wait()


def test_rpc_label():
    assert rpc_label("/rulewright.v1.GeneratorService/Sample") == SAMPLE
    assert rpc_label("/grpc.health.v1.Health/Check") == "Health/Check"


def test_successful_sample_counts_once_with_latency(served, metrics):
    generator, _, _ = served
    assert requests(metrics, SAMPLE, "OK") == 0 and value(metrics, "rulewright_resident_versions") == 0
    generator.Sample(gen.SampleRequest(model="tiny", seeds=[1, 2]), timeout=30)
    assert requests(metrics, SAMPLE, "OK") == 1
    assert value(metrics, "rulewright_request_duration_seconds_count", rpc=SAMPLE) == 1
    assert value(metrics, "rulewright_request_duration_seconds_sum", rpc=SAMPLE) > 0
    assert value(metrics, "rulewright_resident_versions") >= 1
    # on CPU the GPU gauges are left out rather than reported as 0
    assert value(metrics, "rulewright_gpu_memory_allocated_bytes") is None


def test_errors_are_counted_under_their_code(served, metrics):
    generator, _, _ = served
    with pytest.raises(grpc.RpcError) as err:
        generator.Sample(gen.SampleRequest(model="tiny"), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        generator.Sample(gen.SampleRequest(model="nope", seeds=[1]), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert requests(metrics, SAMPLE, "INVALID_ARGUMENT") == 1 and requests(metrics, SAMPLE, "NOT_FOUND") == 1
    assert requests(metrics, SAMPLE, "OK") == 0
    assert value(metrics, "rulewright_request_duration_seconds_count", rpc=SAMPLE) == 2


def test_server_stream_counted_at_its_end_and_cache_hits_seen(served, metrics):
    generator, _, _ = served
    rpc = "GeneratorService/ComputeStatistics"
    request = gen.ComputeStatisticsRequest(model="tiny", layer="main.6", stats=edit_pb2.StatisticsSpec(samples=16))
    cache = lambda result: value(metrics, "rulewright_stats_cache_lookups_total",  # noqa: E731
                                 kind=KEY_MOMENT, result=result) or 0
    first = list(generator.ComputeStatistics(request, timeout=60))
    assert not first[-1].result.cached
    assert requests(metrics, rpc, "OK") == 1 and (cache("miss"), cache("hit")) == (1, 0)
    again = list(generator.ComputeStatistics(request, timeout=60))
    assert again[-1].result.cached
    assert requests(metrics, rpc, "OK") == 2 and (cache("miss"), cache("hit")) == (1, 1)
    assert value(metrics, "rulewright_request_duration_seconds_count", rpc=rpc) == 2


def test_client_stream_counted(served, metrics):
    _, registry, _ = served
    bad = iter([reg.ImportModelRequest(chunk=b"no metadata first")])
    with pytest.raises(grpc.RpcError) as err:
        registry.ImportModel(bad, timeout=30)
    assert requests(metrics, "RegistryService/ImportModel", err.value.code().name) == 1
    assert err.value.code() != grpc.StatusCode.OK


def test_cancelled_stream_counted_cancelled(served, metrics):
    generator, _, _ = served
    rpc = "GeneratorService/Rewrite"
    call = generator.Rewrite(gen.RewriteRequest(model="tiny", spec=spec_pb(steps=100_000)), timeout=60)
    for event in call:
        if event.HasField("progress") and event.progress.stage == gen.Progress.STAGE_OPTIMIZE:
            call.cancel()
            break
    eventually(lambda: requests(metrics, rpc, "CANCELLED") == 1)
    assert requests(metrics, rpc, "OK") == 0 and requests(metrics, rpc, "UNKNOWN") == 0


def test_refused_calls_and_health_are_counted(domain, metrics):
    server, port = create_server(domain, tokens=auth.parse_tokens(TOKENS_TEXT), metrics=metrics)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            generator = gen_grpc.GeneratorServiceStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                generator.Sample(gen.SampleRequest(model="tiny", seeds=[0]), timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as err:        # a streaming handler, refused
                list(generator.Rewrite(gen.RewriteRequest(model="tiny", spec=spec_pb()), timeout=30))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            generator.Sample(gen.SampleRequest(model="tiny", seeds=[0]), timeout=30, metadata=bearer(READER))
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
    finally:
        server.stop(0).wait()
    assert requests(metrics, SAMPLE, "UNAUTHENTICATED") == 1 and requests(metrics, SAMPLE, "OK") == 1
    assert requests(metrics, "GeneratorService/Rewrite", "UNAUTHENTICATED") == 1
    assert requests(metrics, "Health/Check", "OK") == 1


class FakeContext:
    """Just what the interceptor reads: no code set, still active, no deadline."""

    def code(self):
        return None

    def is_active(self):
        return True

    def time_remaining(self):
        return None


def intercepted(metrics: Metrics, handler) -> grpc.RpcMethodHandler:
    details = types.SimpleNamespace(method="/rulewright.v1.GeneratorService/Fake", invocation_metadata=())
    return metrics.interceptor().intercept_service(lambda _: handler, details)


def test_closed_stream_is_cancelled_and_bare_exception_unknown():
    metrics = Metrics()

    def stream(request, context):
        yield 1
        yield 2
    responses = intercepted(metrics, grpc.unary_stream_rpc_method_handler(stream)).unary_stream(None, FakeContext())
    assert next(responses) == 1 and requests(metrics, "GeneratorService/Fake", "CANCELLED") == 0
    responses.close()                     # what dropping the stream does when the client goes away
    assert requests(metrics, "GeneratorService/Fake", "CANCELLED") == 1

    def broken(request, context):
        raise RuntimeError("no code set")
    with pytest.raises(RuntimeError):
        intercepted(metrics, grpc.unary_unary_rpc_method_handler(broken)).unary_unary(None, FakeContext())
    assert requests(metrics, "GeneratorService/Fake", "UNKNOWN") == 1


def test_batch_sizes():
    metrics = Metrics()
    metrics.observe_batch(3)
    assert value(metrics, "rulewright_sample_batch_size_bucket", le="2.0") == 0
    assert value(metrics, "rulewright_sample_batch_size_bucket", le="4.0") == 1
    assert value(metrics, "rulewright_sample_batch_size_count") == 1
    assert value(metrics, "rulewright_sample_batch_size_sum") == 3


def test_gauges_unbound_and_on_cuda(monkeypatch):
    metrics = Metrics()
    assert value(metrics, "rulewright_resident_versions") == 0
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 1234)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 4096)
    fake = types.SimpleNamespace(device=torch.device("cuda"), resident_versions=lambda: [("a", 1), ("b", 2)])
    metrics.bind(fake)
    assert fake.metrics is metrics
    assert value(metrics, "rulewright_resident_versions") == 2
    assert value(metrics, "rulewright_gpu_memory_allocated_bytes") == 1234
    assert value(metrics, "rulewright_gpu_memory_reserved_bytes") == 4096


def test_serve_http(served, metrics):
    generator, _, _ = served
    generator.ListLayers(gen.ListLayersRequest(model="tiny"), timeout=30)
    http, port = metrics.serve_http("127.0.0.1:0")
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        assert port > 0
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.status == 200
            text = r.read().decode()
        assert 'rulewright_requests_total{code="OK",rpc="GeneratorService/ListLayers"} 1.0' in text
    finally:
        http.shutdown()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)
