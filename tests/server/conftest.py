"""A real server from ``create_server`` on a free loopback port over a tiny random DCGAN in a
tmp registry, and helpers to read google.rpc details from a failed call."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from rulewright.service.server.app import create_server
from rulewright.v1 import generator_service_pb2_grpc as gen_grpc, registry_service_pb2_grpc as reg_grpc
from tests.builders import TINY_SPEC, tiny_domain

SPEC = TINY_SPEC


@pytest.fixture
def domain(tmp_path):
    return tiny_domain(tmp_path)


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
