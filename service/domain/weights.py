"""Read a version's weights from the registry (base + the deltas along its lineage) and export them.

- ``base_weights(registry, root)``: an import's state dict (CPU tensors).
- ``read_deltas(registry, version)``: an edit version's low-rank deltas (a rescaled one's at its strength).
- ``materialize(registry, model, number)``: the version's dense state dict (CPU tensors).
- ``export_bytes`` / ``export_to_file`` / ``iter_export``: one safetensors file with the
  version's identity in its metadata; ``load_generator`` reads it back.

Serving keeps versions resident as the base plus factors (``residency``), not as dense weights.

It lives beside the domain, not in the registry, so that the registry (and the clients that use
it) never import torch.
"""

from __future__ import annotations

import json
import os
from typing import Iterator, Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from rulewright.registry import errors
from rulewright.registry.errors import Reason
from rulewright.registry.manifests import Version
from rulewright.registry.registry import Registry

from rulewright.service.engine.delta import LowRankDelta, apply_to_state_dict, from_bytes, with_strength


StateDict = dict[str, torch.Tensor]


def base_weights(registry: Registry, root: Version) -> StateDict:
    """The weights an import stored (DATA_LOSS if the blob is not safetensors)."""
    data = registry.store.get_blob(root.blobs["weights"].sha256)
    try:
        return dict(st_load(data))
    except Exception as exc:  # safetensors raises its own error type for a malformed header
        raise errors.DataLoss(
            Reason.BLOB_CORRUPT,
            f"weights of {root.name} are not safetensors: {exc}",
            sha256=root.blobs["weights"].sha256,
        ) from None


def read_deltas(registry: Registry, version: Version) -> list[LowRankDelta]:
    """The low-rank deltas an edit version applies: as stored, at its own strength if it was
    rescaled (DATA_LOSS if the blob is unreadable)."""
    sha = version.blobs["delta"].sha256
    try:
        deltas = from_bytes(registry.store.get_blob(sha))
    except ValueError as exc:
        raise errors.DataLoss(
            Reason.BLOB_CORRUPT, f"delta of {version.name} is unreadable: {exc}", sha256=sha
        ) from None
    return deltas if version.strength is None else with_strength(deltas, version.strength)


def delta_misfit(version: Version, exc: Exception) -> errors.DataLoss:
    """The error for a delta that does not fit its parent's weights: the stored data contradicts itself."""
    return errors.DataLoss(Reason.MANIFEST_CORRUPT, f"delta of {version.name} does not fit its parent: {exc}")


def _apply(registry: Registry, state: Mapping[str, torch.Tensor], version: Version) -> StateDict:
    deltas = read_deltas(registry, version)
    try:
        return apply_to_state_dict(state, deltas)
    except (KeyError, ValueError) as exc:
        raise delta_misfit(version, exc) from None


def materialize(registry: Registry, model: str, number: int) -> StateDict:
    """The weights of version ``number``: its import's base weights plus each edit's delta, in order."""
    lineage = registry.get_lineage(model, number)
    state = base_weights(registry, lineage[0])
    for version in lineage[1:]:
        state = _apply(registry, state, version)
    return state


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
