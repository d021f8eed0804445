"""Helpers shared by the test packages: free loopback ports, and missing tools under CI."""

from __future__ import annotations

import os
import socket

import pytest


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing(what: str) -> None:
    """Fail under CI, skip elsewhere: a server or tool the tests need is not installed."""
    message = f"{what} is not installed (make test installs it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
