"""A real server from ``create_server`` on a free loopback port over a tiny random DCGAN, and
helpers to read google.rpc details from a failed call.

Every test that uses the ``domain`` fixture runs twice: against the embedded default (a
filesystem registry in a tmp folder, the in-process statistics cache) and against a server
configured for S3 and Redis the way ``rulewright serve`` is (``Domain.from_config`` with
``RULEWRIGHT_S3_*`` in the environment), talking to a real ``moto_server`` and ``redis-server``.
"""

from __future__ import annotations

import time
import uuid

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from rulewright.service.server.app import create_server
from rulewright.v1 import generator_service_pb2_grpc as gen_grpc, registry_service_pb2_grpc as reg_grpc
from tests.builders import TINY_SPEC, tiny_domain

SPEC = TINY_SPEC


BACKENDS = ["embedded", "s3+redis"]


@pytest.fixture(params=BACKENDS)
def domain(request, tmp_path):
    """The tiny model served from the embedded default, then from S3 and Redis."""
    if request.param == "embedded":
        d = tiny_domain(tmp_path)
    else:
        d = s3_redis_domain(tmp_path, request.getfixturevalue("moto_server"), request.getfixturevalue("redis_url"))
    yield d
    d.close()


def s3_redis_domain(tmp_path, moto_server, redis_url, **settings: str):
    """A Domain from a ServeConfig naming a fresh S3 bucket and Redis, with ``tiny`` bootstrapped;
    ``settings`` are more ``RULEWRIGHT_*`` values by setting name (``store_timeout_s="1"``)."""
    from safetensors.torch import save_file

    from rulewright.service.domain.core import Domain
    from rulewright.service.server.config import resolve
    from tests.builders import dcgan_state

    cfg = moto_server.config()
    config = resolve(environ={"RULEWRIGHT_REGISTRY_URI": f"s3://test-{uuid.uuid4().hex[:12]}/registry",
                              "RULEWRIGHT_CREATE_BUCKET": "true", "RULEWRIGHT_STATS_CACHE": redis_url,
                              "RULEWRIGHT_DEVICE": "cpu", "RULEWRIGHT_MAX_RESIDENT": "4",
                              **{f"RULEWRIGHT_{k.upper()}": v for k, v in settings.items()}})
    with pytest.MonkeyPatch.context() as env:        # the store reads RULEWRIGHT_S3_* once, when opened
        for name, value in {"ENDPOINT": cfg.endpoint, "ACCESS_KEY": cfg.access_key, "SECRET_KEY": cfg.secret_key,
                            "SECURE": "false"}.items():
            env.setenv(f"RULEWRIGHT_S3_{name}", value)
        domain = Domain.from_config(config)
    assert domain.registry.store.uri.startswith("s3://") and type(domain.stats_cache).__name__ == "RedisStatsCache"
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in dcgan_state(z_dim=16, widths=(32, 16, 8, 3)).items()}, str(path))
    domain.bootstrap("tiny", path)
    return domain


@pytest.fixture
def server(domain):
    server, port = create_server(domain)
    yield server, port
    server.stop(0).wait()


@pytest.fixture
def channel(server):
    with grpc.insecure_channel(f"127.0.0.1:{server[1]}") as ch:
        yield ch


@pytest.fixture
def generator(channel):
    return gen_grpc.GeneratorServiceStub(channel)


@pytest.fixture
def registry(channel):
    return reg_grpc.RegistryServiceStub(channel)


def rpc_status(err: grpc.RpcError) -> status_pb2.Status:
    """The google.rpc.Status a failed call carried in grpc-status-details-bin."""
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError(f"no details trailer on {err.code()}: {err.details()}")


def detail(err: grpc.RpcError, cls):
    """The first detail of type ``cls`` in a failed call's status."""
    for a in rpc_status(err).details:
        if a.Is(cls.DESCRIPTOR):
            m = cls()
            a.Unpack(m)
            return m
    raise AssertionError(f"no {cls.DESCRIPTOR.name} in the status of {err.code()}")


def error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    return detail(err, error_details_pb2.ErrorInfo)


def wait_idle(server, timeout: float = 30.0) -> None:
    """Wait until the server's streaming jobs (Rewrite, ComputeStatistics) have stopped."""
    deadline = time.monotonic() + timeout
    while server[0].generator_servicer.workers and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not server[0].generator_servicer.workers, "the worker did not stop"
