"""Real servers on free loopback ports for the test packages: ``redis-server`` and ``moto_server``.

A missing server binary skips the tests that need it with a reason, except under CI (``CI`` set),
where it fails them: CI must install what the tests need (``make test`` does). The session
fixtures ``redis_server`` and ``moto_server`` are in tests/conftest.py.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from rulewright.registry.s3store import S3Config
from tests.support import free_port

REPO = Path(__file__).resolve().parents[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """Return once ``port`` accepts connections; fail if ``proc`` exits first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"server did not listen on {port} within {timeout_s}s")


class RedisServer:
    """A ``redis-server`` with persistence off, on a fixed free port; can be stopped and restarted."""

    def __init__(self, binary: str, workdir: Path):
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def flush(self) -> None:
        import redis

        redis.Redis(port=self.port).flushall()


class MotoServer:
    """moto's S3 server on a free port."""

    def __init__(self, command: list[str]):
        self.port = free_port()
        self.proc = subprocess.Popen(
            command + ["-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=REPO,
        )
        wait_for_port(self.port, self.proc)

    def config(self) -> S3Config:
        return S3Config(endpoint=f"127.0.0.1:{self.port}", access_key="testing", secret_key="testing", secure=False)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def moto_command() -> list[str] | None:
    """moto's server entry point, serving one request at a time (see ``serial_moto_server``)."""
    try:
        import moto.server  # noqa: F401  (moto[server] brings flask and werkzeug)
        import flask        # noqa: F401
    except ImportError:
        return None
    return [sys.executable, "-m", "tests.registry.serial_moto_server"]


def start_moto() -> MotoServer:
    """A running moto S3 server; when moto is absent, ``missing`` fails the test under CI (skips elsewhere)."""
    from tests.support import missing

    command = moto_command()
    if command is None:
        missing("moto_server (pip install 'moto[server]')")
    return MotoServer(command)
