"""Streaming statistics of layer activations, mergeable across workers and serializable.

Every statistic follows one protocol: ``add(batch)`` with rows of vectors (N, C); readouts;
``merge(other)`` of a partial computed elsewhere; ``state_dict()`` / ``load_state_dict()`` that
record the constructor; ``to_bytes()`` / ``from_bytes()`` as safetensors.

- ``SecondMoment``: count, mean and the uncentered second moment E[k kᵀ] of keys, in float64.
- ``Quantile``: per-unit quantiles of values (the dissection threshold) by a mergeable sketch.
- ``key_moment(model, layer, seeds, ...)``: C for a layer over seeds, batched, with progress.
- ``value_quantiles(model, layer, seeds, ...)``: per-unit quantiles of a layer's values.
- ``load_stat(data)``: rebuild any statistic from its bytes.
"""

from __future__ import annotations

import abc
import json
from typing import Callable, Sequence, TypeVar

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from rulewright.service.engine.generators.base import Generator
from rulewright.service.engine.nethook import latents_to_keys, latents_to_values
from rulewright.service.engine.progress import Progress
from rulewright.service.engine.sampling import check_seeds, latents

# Most rows summed in the batch dtype (float32) before the float64 add: bounds the float32
# rounding of each partial sum while keeping the per-batch work one fused multiply-add.
_CHUNK_ROWS = 65536



class Stat(abc.ABC):
    """Shared serialization for statistics: tensors plus constructor arguments as metadata."""

    kind = ""

    @abc.abstractmethod
    def constructor(self) -> dict:
        """Keyword arguments that rebuild an empty statistic of the same shape."""

    @abc.abstractmethod
    def state_dict(self) -> dict:
        """Tensors and scalars that ``load_state_dict`` restores."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""

    def to_bytes(self) -> bytes:
        """The statistic as a safetensors blob (kind and constructor in its metadata)."""
        state = self.state_dict()
        tensors = {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
        scalars = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
        meta = {"kind": self.kind, "constructor": json.dumps(self.constructor()), "scalars": json.dumps(scalars)}
        return _canonical_header(st_save(tensors, metadata=meta))


def _canonical_header(data: bytes) -> bytes:
    """safetensors bytes with the header's keys sorted: the library writes its metadata in hash order,
    so equal statistics made different bytes (and a retried statistics shard failed its sha256)."""
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    if len(header) > n:                  # never: the same keys and values, reordered
        return data
    return data[:8] + header + b" " * (n - len(header)) + data[8 + n :]


def load_stat(data: bytes) -> Stat:
    """Rebuild a ``SecondMoment`` or ``Quantile`` from ``to_bytes`` output."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = header.get("__metadata__", {})
    kinds = {cls.kind: cls for cls in (SecondMoment, Quantile)}
    if meta.get("kind") not in kinds:
        raise ValueError(f"not a statistic blob (kind {meta.get('kind')!r})")
    stat = kinds[meta["kind"]](**json.loads(meta["constructor"]))
    state = dict(st_load(data))
    state.update(json.loads(meta.get("scalars", "{}")))
    stat.load_state_dict(state)
    return stat


class SecondMoment(Stat):
    """Count, mean and uncentered second moment of C-dimensional vectors, accumulated in float64.

    Batches are multiplied in their own dtype into a pending buffer on their own device (one
    ``addmm`` per batch, no host round trip), which is added into float64 totals every
    ``_CHUNK_ROWS`` rows and before any readout. Readouts are float64 on that device.
    """

    kind = "second_moment"

    def __init__(self, dim: int):
        self.dim = dim
        self.count = 0
        self._sum = torch.zeros(dim, dtype=torch.float64)
        self._outer = torch.zeros(dim, dim, dtype=torch.float64)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None   # (outer, sum) in batch dtype
        self._pending_rows = 0

    def constructor(self) -> dict:
        return {"dim": self.dim}

    def add(self, rows: torch.Tensor) -> None:
        """Accumulate vectors (N, dim)."""
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"rows must have shape (N, {self.dim}), got {tuple(rows.shape)}")
        for start in range(0, rows.shape[0], _CHUNK_ROWS):
            chunk = rows[start : start + _CHUNK_ROWS]
            if self._pending is not None and (
                self._pending[0].device != chunk.device or self._pending[0].dtype != chunk.dtype
                or self._pending_rows + chunk.shape[0] > _CHUNK_ROWS
            ):
                self._flush()
            if self._pending is None:
                self._to(chunk.device)
                self._pending = (chunk.new_zeros(self.dim, self.dim), chunk.new_zeros(self.dim))
            outer, total = self._pending
            outer.addmm_(chunk.T, chunk)
            total.add_(chunk.sum(0))
            self._pending_rows += chunk.shape[0]
        self.count += rows.shape[0]

    def _to(self, device: torch.device) -> None:
        self._sum, self._outer = self._sum.to(device), self._outer.to(device)

    def _flush(self) -> None:
        if self._pending is not None:
            outer, total = self._pending
            self._to(outer.device)
            self._outer += outer.to(torch.float64)
            self._sum += total.to(torch.float64)
            self._pending, self._pending_rows = None, 0

    def merge(self, other: "SecondMoment") -> "SecondMoment":
        """Add a partial over disjoint data (another worker's seed range); returns self."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge dims {other.dim} and {self.dim}")
        self._flush()
        other._flush()
        self._outer += other._outer.to(self._outer.device)
        self._sum += other._sum.to(self._sum.device)
        self.count += other.count
        return self

    def mean(self) -> torch.Tensor:
        """E[k] (float64)."""
        self._flush()
        return self._sum / max(self.count, 1)

    def moment(self) -> torch.Tensor:
        """E[k kᵀ], the uncentered second moment C (float64)."""
        self._flush()
        return self._outer / max(self.count, 1)

    def covariance(self) -> torch.Tensor:
        """E[k kᵀ] - E[k]E[k]ᵀ (float64)."""
        m = self.mean()
        return self.moment() - torch.outer(m, m)

    def state_dict(self) -> dict:
        self._flush()
        return {"count": self.count, "sum": self._sum.cpu().clone(), "outer": self._outer.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])
        self._sum = state["sum"].to(torch.float64).clone()
        self._outer = state["outer"].to(torch.float64).clone()
        self._pending, self._pending_rows = None, 0


class Quantile(Stat):
    """Per-unit quantiles of a stream of (N, units) rows, with bounded memory.

    A mergeable compactor sketch: level ``l`` holds samples of weight 2**l; a level that grows past
    ``capacity`` is sorted per unit and every other element (alternating offset) moves up a level.
    The rank error stays near ``levels / capacity``; with capacity 4096 the 0.99 quantile over a
    million values lands within about ±0.002 in rank. Until ``capacity`` rows arrive it is exact.
    """

    kind = "quantile"

    def __init__(self, units: int, capacity: int = 4096):
        if capacity < 2 or capacity % 2:
            raise ValueError("capacity must be an even number >= 2")
        self.units = units
        self.capacity = capacity
        self.count = 0
        self.levels: list[torch.Tensor] = [torch.empty(units, 0)]
        self._flip = 0  # alternates the compaction offset, so rounding errors cancel deterministically
        self.min = torch.full((units,), float("inf"))
        self.max = torch.full((units,), float("-inf"))

    def constructor(self) -> dict:
        return {"units": self.units, "capacity": self.capacity}

    def add(self, rows: torch.Tensor) -> None:
        """Accumulate rows (N, units)."""
        if rows.ndim != 2 or rows.shape[1] != self.units:
            raise ValueError(f"rows must have shape (N, {self.units}), got {tuple(rows.shape)}")
        rows = rows.detach().to(device="cpu", dtype=torch.float32)
        if rows.shape[0] == 0:
            return
        self.count += rows.shape[0]
        self.min = torch.minimum(self.min, rows.min(0).values)
        self.max = torch.maximum(self.max, rows.max(0).values)
        for start in range(0, rows.shape[0], self.capacity):
            self._push(0, rows[start : start + self.capacity].T)

    def _push(self, level: int, samples: torch.Tensor) -> None:
        while len(self.levels) <= level:
            self.levels.append(torch.empty(self.units, 0))
        self.levels[level] = torch.cat([self.levels[level], samples], dim=1)
        if self.levels[level].shape[1] >= self.capacity:
            full = self.levels[level]
            take = full.shape[1] // 2 * 2
            ordered = full[:, :take].sort(dim=1).values
            self.levels[level] = full[:, take:]
            promoted = ordered[:, self._flip :: 2]
            self._flip ^= 1
            self._push(level + 1, promoted)

    def merge(self, other: "Quantile") -> "Quantile":
        """Add a partial computed on other data; returns self."""
        if other.units != self.units:
            raise ValueError(f"cannot merge {other.units} units into {self.units}")
        self.count += other.count
        self.min = torch.minimum(self.min, other.min)
        self.max = torch.maximum(self.max, other.max)
        for level, samples in enumerate(other.levels):
            if samples.shape[1]:
                self._push(level, samples)
        return self

    def quantile(self, q: float | Sequence[float]) -> torch.Tensor:
        """(units,) for a scalar q, or (units, len(q)); linear interpolation between samples."""
        qs = torch.tensor([q] if isinstance(q, (int, float)) else list(q), dtype=torch.float64)
        if ((qs < 0) | (qs > 1)).any():
            raise ValueError("quantiles must lie in [0, 1]")
        if self.count == 0:
            raise ValueError("no data added")
        values = torch.cat(self.levels, dim=1)
        weights = torch.cat([torch.full((lv.shape[1],), 2.0**i) for i, lv in enumerate(self.levels)])
        order = values.sort(dim=1)
        w = weights[order.indices].double()
        cum = w.cumsum(dim=1)
        # Rank of each sample's midpoint, normalized to [0, 1] over the first and last midpoints.
        mid = cum - w / 2
        lo, hi = mid[:, :1], mid[:, -1:]
        pos = (mid - lo) / (hi - lo).clamp_min(1e-12)
        out = torch.empty(self.units, len(qs), dtype=torch.float64)
        for j, qv in enumerate(qs):
            idx = torch.searchsorted(pos.contiguous(), torch.full((self.units, 1), float(qv), dtype=torch.float64))
            idx = idx.clamp(1, values.shape[1] - 1)
            p0, p1 = pos.gather(1, idx - 1), pos.gather(1, idx)
            v0, v1 = order.values.gather(1, idx - 1).double(), order.values.gather(1, idx).double()
            t = ((qv - p0) / (p1 - p0).clamp_min(1e-12)).clamp(0, 1)
            out[:, j] = (v0 + t * (v1 - v0)).squeeze(1)
        out = out.float()
        return out[:, 0] if isinstance(q, (int, float)) else out

    def state_dict(self) -> dict:
        state = {f"level_{i}": lv.clone() for i, lv in enumerate(self.levels)}
        state.update({"min": self.min.clone(), "max": self.max.clone(), "count": self.count,
                      "levels": len(self.levels), "flip": self._flip})
        return state

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])
        self._flip = int(state["flip"])
        self.levels = [state[f"level_{i}"].float().clone() for i in range(int(state["levels"]))]
        self.min, self.max = state["min"].float().clone(), state["max"].float().clone()


def _flatten(maps: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) → (N·H·W, C): every spatial location is one vector."""
    return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])


def _batches(seeds: Sequence[int], batch_size: int):
    for start in range(0, len(seeds), batch_size):
        yield seeds[start : start + batch_size]


S = TypeVar("S", SecondMoment, Quantile)


def _tally(
    model: Generator,
    seeds: Sequence[int],
    truncation: float,
    batch_size: int,
    progress: Progress | None,
    what: str,                                             # names the work in a cancellation
    rows_of: Callable[[torch.Tensor], torch.Tensor],       # latents → the layer's maps
    new_stat: Callable[[int], S],                          # the empty statistic for that many columns
) -> S:
    """One statistic over every location of every seed's sample, batch by batch."""
    progress = progress or Progress()
    seeds = check_seeds(seeds)
    model.check_truncation(truncation)
    stat: S | None = None
    device = next(model.parameters()).device
    done = 0
    with torch.no_grad():
        for chunk in _batches(seeds, batch_size):
            progress.check(what)
            rows = _flatten(rows_of(latents(chunk, model.z_dim).to(device)))
            if stat is None:
                stat = new_stat(rows.shape[1])
            stat.add(rows)
            done += len(chunk)
            progress.report("statistics", done, len(seeds))
    if stat is None:
        raise ValueError("seeds must not be empty")
    return stat


def key_moment(
    model: Generator,
    layer: str,
    seeds: Sequence[int],                 # the samples; disjoint ranges merge into the whole
    truncation: float = 1.0,
    batch_size: int = 32,                 # samples per forward pass
    progress: Progress | None = None,     # "statistics" events per batch; checked between batches
) -> SecondMoment:
    """The second moment of ``layer``'s keys over every location of every seed's sample."""
    return _tally(model, seeds, truncation, batch_size, progress, "key statistics",
                  lambda z: latents_to_keys(model, layer, z, truncation).key, SecondMoment)


def value_quantiles(
    model: Generator,
    layer: str,
    seeds: Sequence[int],
    truncation: float = 1.0,
    batch_size: int = 32,
    capacity: int = 4096,                 # sketch size per level (accuracy vs memory)
    progress: Progress | None = None,     # "statistics" events per batch; checked between batches
) -> Quantile:
    """Per-unit quantiles of ``layer``'s values over every location of every seed's sample."""
    return _tally(model, seeds, truncation, batch_size, progress, "value statistics",
                  lambda z: latents_to_values(model, layer, z, truncation), lambda dim: Quantile(dim, capacity))
