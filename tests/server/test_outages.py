"""A hung or dead store and a dead Redis, with real processes.

The S3 server is this module's own ``moto_server`` (the session's serves other tests), paused with
SIGSTOP and resumed with SIGCONT; the server under test is configured with short store timeouts.
"""

from __future__ import annotations

import signal
import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rulewright.inference import grpc_predict_v2_pb2 as oip, grpc_predict_v2_pb2_grpc as oip_grpc
from rulewright.service.server.app import create_server
from rulewright.v1 import edit_pb2, generator_service_pb2 as gen, generator_service_pb2_grpc as gen_grpc
from rulewright.v1 import registry_service_pb2 as reg, registry_service_pb2_grpc as reg_grpc
from tests.backends import start_moto

from .conftest import s3_redis_domain

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
DEADLINE_S = 3.0
MARGIN_S = 1.5


@pytest.fixture
def own_moto():
    server = start_moto()             # its own: this test pauses it
    yield server
    server.proc.send_signal(signal.SIGCONT)
    server.stop()


@pytest.fixture
def outage(tmp_path, own_moto, redis_url):
    """(server, channel, moto) over S3 with 1 s store calls and 4 work threads; tiny/1 resident."""
    domain = s3_redis_domain(tmp_path, own_moto, redis_url, store_timeout_s="1", s3_connect_timeout_s="0.5",
                             s3_read_timeout_s="0.5", s3_max_attempts="1")
    domain.generator(domain.resolve("tiny/1"))
    server, port = create_server(domain, max_workers=4)
    if hasattr(server, "store_watch"):      # probe often, so the test sees readiness change soon
        server.store_watch.period_s = 0.3
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield server, channel, own_moto
    channel.close()
    server.stop(0).wait()
    domain.close()


def health(channel, service: str = "") -> int | None:
    try:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=1).status
    except grpc.RpcError as err:
        return err.code()


def until(check, timeout_s: float = 10.0):
    """``check()`` once it is truthy, polling for at most ``timeout_s``; the last value otherwise."""
    deadline = time.monotonic() + timeout_s
    while not (value := check()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return value


def timed_sample(stub, model: str) -> tuple[object, float]:
    started = time.monotonic()
    try:
        stub.Sample(gen.SampleRequest(model=model, seeds=[1]), timeout=DEADLINE_S)
        code = grpc.StatusCode.OK
    except grpc.RpcError as err:
        code = err.code()
    return code, time.monotonic() - started


def test_hung_s3_answers_unavailable_before_the_deadline_and_health_stays_prompt(outage):
    server, channel, moto = outage
    stub = gen_grpc.GeneratorServiceStub(channel)
    assert stub.Sample(gen.SampleRequest(model="tiny@production", seeds=[1]), timeout=30).images
    moto.proc.send_signal(signal.SIGSTOP)
    with futures.ThreadPoolExecutor(12) as pool:
        calls = [pool.submit(timed_sample, stub, "tiny@production") for _ in range(12)]    # 3x the work threads
        time.sleep(0.3)
        assert health(channel) == SERVING                  # not queued behind the stuck calls
        results = [c.result() for c in calls]
    # the store's failure, or (for calls past max_workers) a busy server: both prompt, both retriable
    assert {code for code, _ in results} <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}, results
    assert grpc.StatusCode.UNAVAILABLE in {code for code, _ in results}
    assert max(seconds for _, seconds in results) < DEADLINE_S + MARGIN_S, results
    listing = reg_grpc.RegistryServiceStub(channel).ListModels
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        listing(reg.ListModelsRequest(), timeout=DEADLINE_S)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - started < DEADLINE_S


def test_resident_version_serves_through_an_s3_outage_and_readiness_says_so(outage):
    server, channel, moto = outage
    stub = gen_grpc.GeneratorServiceStub(channel)
    infer = oip_grpc.GRPCInferenceServiceStub(channel)
    before = stub.Sample(gen.SampleRequest(model="tiny/1", seeds=[5]), timeout=30).images[0].data
    assert infer.ServerReady(oip.ServerReadyRequest(), timeout=5).ready
    moto.proc.send_signal(signal.SIGSTOP)
    code, _ = timed_sample(stub, "tiny@production")         # an alias needs the store
    assert code == grpc.StatusCode.UNAVAILABLE
    during = stub.Sample(gen.SampleRequest(model="tiny/1", seeds=[5]), timeout=DEADLINE_S)
    assert during.images[0].data == before and during.version == "models/tiny/versions/1"
    tensor = oip.ModelInferRequest.InferInputTensor(name="seed", datatype="INT64", shape=[1],
                                                    contents=oip.InferTensorContents(int64_contents=[5]))
    assert infer.ModelInfer(oip.ModelInferRequest(model_name="tiny", model_version="1", inputs=[tensor]),
                            timeout=DEADLINE_S).outputs[0].shape == [1, 32, 32, 3]
    assert until(lambda: not infer.ServerReady(oip.ServerReadyRequest(), timeout=1).ready)
    assert until(lambda: health(channel, "rulewright.v1.RegistryService") == NOT_SERVING)
    assert health(channel) == SERVING                        # alive: a liveness probe must not restart it
    moto.proc.send_signal(signal.SIGCONT)
    assert until(lambda: timed_sample(stub, "tiny@production")[0] == grpc.StatusCode.OK)
    assert until(lambda: infer.ServerReady(oip.ServerReadyRequest(), timeout=1).ready)
    assert health(channel, "rulewright.v1.RegistryService") == SERVING


def test_dead_redis_leaves_sampling_and_statistics_working(tmp_path, moto_server, redis_server):
    redis_server.start() if redis_server.proc is None or redis_server.proc.poll() is not None else None
    domain = s3_redis_domain(tmp_path, moto_server, redis_server.url)
    server, port = create_server(domain)
    try:
        redis_server.proc.kill()
        redis_server.proc.wait()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = gen_grpc.GeneratorServiceStub(channel)
            assert stub.Sample(gen.SampleRequest(model="tiny@production", seeds=[1]), timeout=30).images
            events = list(stub.ComputeStatistics(gen.ComputeStatisticsRequest(
                model="tiny", stats=edit_pb2.StatisticsSpec(samples=16)), timeout=30))
            assert events[-1].result.layer          # computed here while the shared cache is gone
            assert health(channel) == SERVING
    finally:
        server.stop(0).wait()
        domain.close()
        redis_server.start()
