"""Fixtures: a real ``redis-server`` and a real ``moto_server`` on free loopback ports, and stores.

A missing server binary skips the tests that need it with a reason, except under CI (``CI`` set),
where it fails them: CI must install what the tests need (``make test`` does).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from rulewright.registry import Registry
from rulewright.registry.filestore import FileStore
from rulewright.registry.s3store import S3Config, S3Store
from tests.support import free_port, missing  # noqa: F401  (test modules import free_port from here)

REPO = Path(__file__).resolve().parents[2]


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


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A running ``redis-server`` for the whole session (tests that stop it must start it again)."""
    binary = shutil.which("redis-server")
    if binary is None:
        missing("redis-server")
    server = RedisServer(binary, tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    """The URL of an empty, running Redis."""
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()
    redis_server.flush()
    return redis_server.url


def _moto_command() -> list[str] | None:
    """moto's server entry point, serving one request at a time (see ``serial_moto_server``)."""
    try:
        import moto.server  # noqa: F401  (moto[server] brings flask and werkzeug)
        import flask        # noqa: F401
    except ImportError:
        return None
    return [sys.executable, "-m", "tests.registry.serial_moto_server"]


@pytest.fixture(scope="session")
def moto_server():
    """A running ``moto_server`` for the whole session; each test uses its own bucket."""
    command = _moto_command()
    if command is None:
        missing("moto_server (pip install 'moto[server]')")
    server = MotoServer(command)
    yield server
    server.stop()


@pytest.fixture
def s3_store(moto_server):
    """An ``S3Store`` on a fresh bucket of the moto server."""
    store = S3Store(f"test-{uuid.uuid4().hex[:12]}", "registry", moto_server.config())
    store.ensure_bucket()
    yield store
    store.close()


@pytest.fixture
def file_store(tmp_path):
    """A ``FileStore`` in a fresh folder."""
    return FileStore(tmp_path / "store")


@pytest.fixture(params=["file", "s3"])
def store(request):
    """Every backend in turn: the contract suite runs against each."""
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture
def registry(store):
    """A registry on each backend in turn."""
    return Registry(store)


def store_spec(store) -> tuple[str, S3Config | None]:
    """What a worker process needs to open the same store (picklable)."""
    return store.uri, getattr(store, "config", None)
