"""Fixtures: an empty Redis, stores on each backend (the servers themselves: tests/backends.py)."""

from __future__ import annotations

import uuid

import pytest

from rulewright.registry import Registry
from rulewright.registry.filestore import FileStore
from rulewright.registry.s3store import S3Config, S3Store
from tests.backends import REPO  # noqa: F401  (test modules import REPO and free_port from here)
from tests.support import free_port  # noqa: F401


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
