"""Issue 12, defect 7 on the gRPC side: a broken ImportModel stream is no INTERNAL error, a public
metrics address needs tokens, and after SIGTERM health answers NOT_SERVING while work drains."""

from __future__ import annotations

import logging
import signal
import subprocess
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rulewright.service.server.app import create_server
from rulewright.v1 import edit_pb2, generator_service_pb2 as gen, generator_service_pb2_grpc as gen_grpc
from rulewright.v1 import registry_service_pb2 as reg, registry_service_pb2_grpc as reg_grpc
from tests.builders import tiny_domain
from tests.support import free_port

from .test_config import clean_env, cli, health_of, one_error_line, rulewright_exe, wait_serving  # noqa: F401

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_import_stream_broken_by_an_oversized_message_is_not_logged_as_internal(tmp_path, caplog):
    domain = tiny_domain(tmp_path)
    server, port = create_server(domain, max_message_bytes=1 << 20)
    try:
        options = [("grpc.max_send_message_length", 8 << 20)]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            def requests():
                yield reg.ImportModelRequest(metadata=reg.ImportModelMetadata(model_id="big", arch="dcgan"))
                yield reg.ImportModelRequest(chunk=b"\0" * (2 << 20))
            with caplog.at_level(logging.INFO, logger="rulewright"), pytest.raises(grpc.RpcError) as err:
                reg_grpc.RegistryServiceStub(channel).ImportModel(requests(), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        deadline = time.monotonic() + 5          # the server's side of the call ends a moment later
        while not [r for r in caplog.records if getattr(r, "method", "") == "ImportModel"] \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        calls = [r for r in caplog.records if getattr(r, "method", "") == "ImportModel"]
        assert calls and all(getattr(r, "code", "") != "INTERNAL" for r in calls), [r.__dict__ for r in calls]
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    finally:
        server.stop(0).wait()
        domain.close()


def test_public_metrics_address_without_tokens_exits_2(cli):  # noqa: F811 -- the fixture
    rc, err = cli("--metrics-address", "0.0.0.0:0")
    assert rc == 2
    line = one_error_line(err)
    assert "without auth" in line and "0.0.0.0:0" in line


def test_after_sigterm_health_answers_not_serving_while_work_drains(tmp_path):
    from safetensors.torch import save_file

    from rulewright.service.domain import Domain
    from tests.builders import dcgan_state

    data = tmp_path / "data"
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in dcgan_state(z_dim=16, widths=(32, 16, 8, 3)).items()}, str(path))
    seeded = Domain.open(data, device="cpu")
    seeded.bootstrap("tiny", path)
    seeded.close()
    port = free_port()
    proc = subprocess.Popen(
        [str(rulewright_exe()), "serve", "--bootstrap", "none", "--data-dir", str(data), "--web-address", "off",
         "--address", f"127.0.0.1:{port}", "--device", "cpu", "--grace-s", "4"],
        env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wait_serving(channel, proc, timeout_s=60)
            request = gen.ComputeStatisticsRequest(model="tiny", layer="main.6",
                                                   stats=edit_pb2.StatisticsSpec(samples=100_000))
            stream = gen_grpc.GeneratorServiceStub(channel).ComputeStatistics(request, timeout=30)
            assert next(stream).HasField("progress")              # work in flight
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            status = health_of(channel)
            assert status == NOT_SERVING, status
            with pytest.raises(grpc.RpcError) as err:              # new work goes elsewhere
                gen_grpc.GeneratorServiceStub(channel).Sample(gen.SampleRequest(model="tiny", seeds=[0]), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            stream.cancel()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
