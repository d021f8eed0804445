"""Server construction: health, reflection, message sizes, JSON logs, and the real
``rulewright-engine serve`` process (faces from the cache, SIGTERM → exit 0)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from tests.support import free_port
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from rulewright.service.server.app import SERVICES, JsonFormatter, create_server
from rulewright.v1 import generator_service_pb2 as gen, generator_service_pb2_grpc as gen_grpc, images_pb2

REPO = Path(__file__).resolve().parents[2]


def health_of(channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_health_serves_once_a_model_is_registered(channel, tmp_path):
    for name in ("",) + SERVICES:
        assert health_of(channel, name) == health_pb2.HealthCheckResponse.SERVING
    from rulewright.service.domain.core import Domain

    server, port = create_server(Domain.open(tmp_path / "empty", device="cpu"))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            assert health_of(ch) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        server.stop(0).wait()


def test_reflection_lists_the_services(channel):
    names = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert set(SERVICES) | {"grpc.health.v1.Health"} <= names


def test_message_size_limit_is_explicit(domain):
    server, port = create_server(domain, max_message_bytes=4096)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = gen_grpc.GeneratorServiceStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                stub.Sample(gen.SampleRequest(model="tiny", seeds=list(range(8)),
                                              image_format=images_pb2.IMAGE_FORMAT_RAW_RGB8), timeout=30)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert len(stub.Sample(gen.SampleRequest(model="tiny", seeds=[0]), timeout=30).images) == 1
    finally:
        server.stop(0).wait()


def test_json_log_lines_carry_the_extra_fields():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "rpc", (), None)
    record.method, record.code = "Sample", "OK"
    line = json.loads(JsonFormatter().format(record))
    assert (line["message"], line["method"], line["code"], line["level"]) == ("rpc", "Sample", "OK", "info")


def test_rulewright_engine_serve_end_to_end(tmp_path, cache_dir, faces_path):
    port = free_port()
    env = {**os.environ, "RULEWRIGHT_CACHE_DIR": str(cache_dir), "RULEWRIGHT_ADDRESS": "127.0.0.1:1"}
    exe = Path(sys.executable).with_name("rulewright-engine")
    proc = subprocess.Popen([str(exe), "serve", "--data-dir", str(tmp_path / "data"), "--address",
                             f"127.0.0.1:{port}", "--device", "cpu", "--grace-s", "5"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            deadline = time.monotonic() + 60
            status = None
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    status = health_of(ch)
                except grpc.RpcError:
                    status = None
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
                time.sleep(0.2)
            assert status == health_pb2.HealthCheckResponse.SERVING, proc.poll()
            r = gen_grpc.GeneratorServiceStub(ch).Sample(gen.SampleRequest(model="faces@production", seeds=[0]),
                                                         timeout=30)
            assert r.version == "models/faces/versions/1"
            assert (r.images[0].width, r.images[0].height) == (64, 64)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        _, err = proc.communicate(timeout=5)
        events = [json.loads(line).get("event") for line in err.splitlines() if line.startswith("{")]
        assert "serving" in events and "stopped" in events
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
