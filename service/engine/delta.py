"""Low-rank weight deltas: what an edit version stores (kilobytes, not a new weight file).

- ``LowRankDelta(weight_key, in_axis, direction, lam)``: ``ΔW = Λ ×_{in_axis} Dᵀ``, i.e. for a
  Conv2d weight (out, in, kh, kw): ``ΔW[o,i,y,x] = Σ_r Λ[o,r,y,x] D[i,r]``; for ConvTranspose2d
  (in, out, kh, kw) the same with the input axis first. ``direction`` D is (in, r); ``lam`` Λ has
  the weight's shape with the input axis replaced by r.
- ``to_bytes(deltas)`` / ``from_bytes(data)``: one safetensors blob for an edit's deltas.
- ``apply_to_state_dict(state, deltas)``: weights after the edit; unedited tensors are shared.

Pure torch on tensors: no model code, so the registry can materialize versions with it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Mapping, Sequence

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT = 1


@dataclasses.dataclass
class LowRankDelta:
    """A change of one weight restricted to the span of ``direction`` along its input axis."""

    weight_key: str               # key of the edited weight in the public state dict
    in_axis: int                  # the weight's input-channel axis
    direction: torch.Tensor       # D, (in_channels, rank)
    lam: torch.Tensor             # Λ, weight shape with in_axis replaced by rank

    def __post_init__(self):
        if self.direction.ndim != 2:
            raise ValueError(f"direction must be (in, rank), got {tuple(self.direction.shape)}")
        if not 0 <= self.in_axis < self.lam.ndim:
            raise ValueError(f"in_axis {self.in_axis} out of range for lambda of {self.lam.ndim} dims")
        if self.lam.shape[self.in_axis] != self.direction.shape[1]:
            raise ValueError(
                f"lambda has {self.lam.shape[self.in_axis]} along axis {self.in_axis}, direction rank is "
                f"{self.direction.shape[1]}"
            )

    @property
    def rank(self) -> int:
        """Number of directions."""
        return int(self.direction.shape[1])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the weight this delta changes."""
        shape = list(self.lam.shape)
        shape[self.in_axis] = int(self.direction.shape[0])
        return tuple(shape)

    def dense(self) -> torch.Tensor:
        """ΔW as a full tensor of the weight's shape."""
        lam_last = self.lam.movedim(self.in_axis, -1)                 # (..., r)
        full = lam_last @ self.direction.to(lam_last.dtype).T         # (..., in)
        return full.movedim(-1, self.in_axis).contiguous()

    def nbytes(self) -> int:
        """Bytes of the factors (what is stored)."""
        return self.direction.numel() * self.direction.element_size() + self.lam.numel() * self.lam.element_size()


def to_bytes(deltas: Sequence[LowRankDelta]) -> bytes:
    """One safetensors blob holding every delta of an edit (deterministic bytes)."""
    tensors, parts = {}, []
    for i, d in enumerate(deltas):
        tensors[f"{i}.direction"] = d.direction.detach().to("cpu", torch.float32).clone(memory_format=torch.contiguous_format)
        tensors[f"{i}.lambda"] = d.lam.detach().to("cpu", torch.float32).clone(memory_format=torch.contiguous_format)
        parts.append({"weight_key": d.weight_key, "in_axis": d.in_axis, "weight_shape": list(d.weight_shape)})
    meta = {"kind": "low_rank_delta", "format": FORMAT, "parts": parts}
    return st_save(tensors, metadata={"rulewright": json.dumps(meta, sort_keys=True)})


def from_bytes(data: bytes) -> list[LowRankDelta]:
    """The deltas stored by ``to_bytes``; ValueError for anything else."""
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    try:
        header = json.loads(data[8 : 8 + n])
        meta = json.loads(header["__metadata__"]["rulewright"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError("not a low-rank delta blob") from exc
    if meta.get("kind") != "low_rank_delta" or meta.get("format") != FORMAT:
        raise ValueError(f"not a low-rank delta blob of format {FORMAT}")
    tensors = st_load(data)
    return [
        LowRankDelta(p["weight_key"], int(p["in_axis"]), tensors[f"{i}.direction"], tensors[f"{i}.lambda"])
        for i, p in enumerate(meta["parts"])
    ]


def apply_to_state_dict(state: Mapping[str, torch.Tensor], deltas: Sequence[LowRankDelta]) -> dict[str, torch.Tensor]:
    """A new dict with each delta added to its weight; every other tensor is shared, not copied."""
    out = dict(state)
    for d in deltas:
        if d.weight_key not in out:
            raise KeyError(f"delta edits {d.weight_key!r}, which the weights lack")
        w = out[d.weight_key]
        if tuple(w.shape) != d.weight_shape:
            raise ValueError(f"delta for {d.weight_key} expects shape {d.weight_shape}, weight is {tuple(w.shape)}")
        out[d.weight_key] = w + d.dense().to(device=w.device, dtype=w.dtype)
    return out
