"""Helpers: a gRPC server on a free loopback port (port 0) with in-test servicers, and the
fail-under-CI rule for tools the tests need.

Never import ``tritonclient`` in this process: it registers the same ``inference.*`` protobuf
symbols as ``rulewright.inference``; the tests run it in a subprocess.
"""

from __future__ import annotations

import contextlib
from concurrent import futures
from pathlib import Path
from typing import Callable, Iterator

import grpc
import pytest

from tests.support import missing  # noqa: F401  (test modules import it from here)

REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def serve(*register: Callable[[grpc.Server], None]) -> Iterator[str]:
    """A started server with the given ``add_*_to_server`` registrations; yields its address."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    for add in register:
        add(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None).wait()


@pytest.fixture
def channel_to() -> Iterator[Callable[[str], grpc.Channel]]:
    """Opens channels to addresses; all are closed after the test."""
    opened: list[grpc.Channel] = []

    def open_channel(address: str) -> grpc.Channel:
        ch = grpc.insecure_channel(address)
        opened.append(ch)
        return ch

    yield open_channel
    for ch in opened:
        ch.close()
