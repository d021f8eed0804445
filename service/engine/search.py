"""Context search: which samples (and where) an edit's direction will touch.

- ``direction_for(model, layer, C, regions, rank)``: D for context regions, without an edit.
- ``response_maps(model, layer, direction, z)``: per-location response (N, Hk, Wk): ``kᵀd`` for
  rank 1 (D is signed so the context responds positively), ``‖Dᵀk‖`` for higher ranks.
- ``response_threshold(model, layer, direction, seeds, q=0.999)``: the q-quantile of the response
  over every location of many samples — locations above it are highlighted as matches.
- ``search(model, layer, direction, seeds, top=...)``: samples ranked by their strongest response,
  with their maps and the share of locations above the threshold.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from rulewright.service.engine import nethook
from rulewright.service.engine.errors import InvalidArgument
from rulewright.service.engine.generators.base import Generator
from rulewright.service.engine.regions import Region
from rulewright.service.engine.rewrite import _context_keys, context_direction
from rulewright.service.engine.sampling import check_seeds, latents
from rulewright.service.engine.stats import Quantile


def direction_for(model: Generator, layer: str, C: torch.Tensor, regions: Sequence[Region], rank: int = 1,
                  ridge: float = 1e-4, truncation: float = 1.0) -> torch.Tensor:
    """D (C_in, rank) for context regions (the same direction a rewrite with them would use)."""
    for i, region in enumerate(regions):
        region.validate(model.resolution, f"context[{i}]")
    device = next(model.parameters()).device
    keys = _context_keys(model, layer, regions, truncation, device)
    return context_direction(C.to(device), keys, rank, ridge)


def response_maps(model: Generator, layer: str, direction: torch.Tensor, z: torch.Tensor,
                  truncation: float = 1.0) -> torch.Tensor:
    """(N, Hk, Wk) response of every key location to ``direction``."""
    with torch.no_grad():
        key = nethook.latents_to_keys(model, layer, z, truncation).key
    if key.shape[1] != direction.shape[0]:
        raise InvalidArgument("direction", f"has {direction.shape[0]} rows, layer {layer} keys have {key.shape[1]} channels")
    proj = torch.einsum("nchw,cr->nrhw", key, direction.to(key.device, key.dtype))
    return proj[:, 0] if direction.shape[1] == 1 else proj.norm(dim=1)


def response_threshold(model: Generator, layer: str, direction: torch.Tensor, seeds: Sequence[int],
                       q: float = 0.999, truncation: float = 1.0, batch_size: int = 32) -> float:
    """The q-quantile of the response over every location of ``seeds``' samples."""
    seeds = check_seeds(list(seeds))
    stat = Quantile(1)
    device = next(model.parameters()).device
    for start in range(0, len(seeds), batch_size):
        z = latents(seeds[start:start + batch_size], model.z_dim).to(device)
        stat.add(response_maps(model, layer, direction, z, truncation).reshape(-1, 1))
    return float(stat.quantile(q)[0])


@dataclasses.dataclass
class Match:
    """One sample's response to a direction."""

    seed: int
    score: float                 # strongest response anywhere in the sample
    above: float                 # share of locations above the threshold
    response: torch.Tensor       # (Hk, Wk)


def search(model: Generator, layer: str, direction: torch.Tensor, seeds: Sequence[int], top: int = 16,
           threshold: float | None = None, truncation: float = 1.0, batch_size: int = 32) -> list[Match]:
    """The ``top`` seeds with the strongest responses, best first (threshold: see response_threshold)."""
    seeds = check_seeds(list(seeds))
    if top < 1:
        raise InvalidArgument("top", f"must be positive, got {top}")
    device = next(model.parameters()).device
    matches = []
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start:start + batch_size]
        maps = response_maps(model, layer, direction, latents(chunk, model.z_dim).to(device), truncation).cpu()
        for seed, m in zip(chunk, maps):
            above = float((m > threshold).float().mean()) if threshold is not None else 0.0
            matches.append(Match(seed, float(m.max()), above, m))
    matches.sort(key=lambda m: (-m.score, m.seed))
    return matches[:top]
