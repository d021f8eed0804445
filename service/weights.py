"""Materialize a version's weights (base + the deltas along its lineage) and export them.

- ``materialize(registry, model, number)``: the version's state dict (CPU tensors).
- ``Materializer(registry, budget_bytes)``: the same with an LRU of resident versions bounded by
  a memory budget; a version builds on its nearest resident ancestor, and versions share every
  tensor their edits leave alone (so the budget counts each storage once).
- ``export_bytes`` / ``export_to_file`` / ``iter_export``: one safetensors file with the
  version's identity in its metadata; ``load_generator`` reads it back.

It lives beside the domain, not in the registry, so that the registry (and the clients that use
it) never import torch.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
from typing import Iterator, Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from rulewright.registry import errors
from rulewright.registry.errors import Reason
from rulewright.registry.manifests import Version
from rulewright.registry.registry import Registry

from .engine.delta import apply_to_state_dict, from_bytes

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


def _base_weights(registry: Registry, root: Version) -> StateDict:
    data = registry.store.get_blob(root.blobs["weights"].sha256)
    try:
        return dict(st_load(data))
    except Exception as exc:  # safetensors raises its own error type for a malformed header
        raise errors.DataLoss(
            Reason.BLOB_CORRUPT,
            f"weights of {root.name} are not safetensors: {exc}",
            sha256=root.blobs["weights"].sha256,
        ) from None


def _apply(registry: Registry, state: Mapping[str, torch.Tensor], version: Version) -> StateDict:
    sha = version.blobs["delta"].sha256
    try:
        deltas = from_bytes(registry.store.get_blob(sha))
    except ValueError as exc:
        raise errors.DataLoss(
            Reason.BLOB_CORRUPT, f"delta of {version.name} is unreadable: {exc}", sha256=sha
        ) from None
    try:
        return apply_to_state_dict(state, deltas)
    except (KeyError, ValueError) as exc:
        # The manifest says this delta applies to the parent's weights: if it does not fit, the
        # stored data contradicts itself.
        raise errors.DataLoss(
            Reason.MANIFEST_CORRUPT, f"delta of {version.name} does not fit its parent: {exc}"
        ) from None


def materialize(registry: Registry, model: str, number: int) -> StateDict:
    """The weights of version ``number``: its import's base weights plus each edit's delta, in order."""
    lineage = registry.get_lineage(model, number)
    state = _base_weights(registry, lineage[0])
    for version in lineage[1:]:
        state = _apply(registry, state, version)
    return state


def _storage_bytes(states: list[Mapping[str, torch.Tensor]]) -> int:
    seen: dict[int, int] = {}
    for state in states:
        for t in state.values():
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class Materializer:
    """Materialized versions kept in an LRU bounded by ``budget_bytes`` of distinct tensor storage."""

    def __init__(
        self,
        registry: Registry,           # where manifests and blobs come from
        budget_bytes: int = 2 << 30,  # resident weights, shared tensors counted once
    ):
        self.registry = registry
        self.budget_bytes = budget_bytes
        self._cache: "collections.OrderedDict[tuple[str, int], StateDict]" = collections.OrderedDict()
        self._lock = threading.Lock()

    def state_dict(self, model: str, number: int) -> StateDict:
        """Version ``number``'s weights; reuses the nearest resident ancestor.

        The returned dict and its tensors are shared with the cache: treat them as read-only.
        """
        with self._lock:
            hit = self._cache.get((model, number))
            if hit is not None:
                self._cache.move_to_end((model, number))
                return hit
        lineage = self.registry.get_lineage(model, number)
        start, state = 0, None
        with self._lock:
            for i in range(len(lineage) - 1, -1, -1):
                state = self._cache.get((model, lineage[i].number))
                if state is not None:
                    start = i + 1
                    break
        if state is None:
            state, start = _base_weights(self.registry, lineage[0]), 1
            self._put((model, lineage[0].number), state)
        for version in lineage[start:]:
            state = _apply(self.registry, state, version)
        self._put((model, number), state)
        return state

    def _put(self, key: tuple[str, int], state: StateDict) -> None:
        with self._lock:
            self._cache[key] = state
            self._cache.move_to_end(key)
            # Evict least recently used versions until the distinct storage fits (keeping the
            # newest even if it alone exceeds the budget: it is about to be used).
            while len(self._cache) > 1 and _storage_bytes(list(self._cache.values())) > self.budget_bytes:
                evicted, _ = self._cache.popitem(last=False)
                log.debug("materialized version evicted", extra={"model": evicted[0], "version": evicted[1]})

    def resident(self) -> list[tuple[str, int]]:
        """(model, version) pairs currently held, least recently used first."""
        with self._lock:
            return list(self._cache)

    def resident_bytes(self) -> int:
        """Distinct tensor storage held (what the budget bounds)."""
        with self._lock:
            return _storage_bytes(list(self._cache.values()))


def export_bytes(registry: Registry, model: str, number: int, state: Mapping[str, torch.Tensor] | None = None) -> bytes:
    """The version's weights as one safetensors file (keys sorted; metadata names the version)."""
    version = registry.get_version(model, number)
    if state is None:
        state = materialize(registry, model, number)
    info = registry.get_model(model)
    meta = {
        "rulewright": json.dumps(
            {"model": model, "version": number, "arch": info.arch, "config": info.config, "kind": version.kind},
            sort_keys=True,
        )
    }
    tensors = {k: state[k].detach().to("cpu").contiguous() for k in sorted(state)}
    return st_save(tensors, metadata=meta)


def export_to_file(registry: Registry, model: str, number: int, path: str | os.PathLike) -> int:
    """Write the export to ``path`` atomically (temporary file, then rename); returns its size."""
    data = export_bytes(registry, model, number)
    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return len(data)


def iter_export(registry: Registry, model: str, number: int, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """The export in chunks (what a server-streaming ``ExportVersion`` sends)."""
    data = export_bytes(registry, model, number)
    for start in range(0, len(data), chunk_size):
        yield data[start : start + chunk_size]
