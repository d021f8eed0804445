"""Low-rank weight deltas: what an edit version stores (kilobytes, not a new weight file).

- ``LowRankDelta(weight_key, in_axis, direction, lam, scale=1.0)``: ``ΔW = scale · Λ ×_{in_axis} Dᵀ``, i.e. for a
  Conv2d weight (out, in, kh, kw): ``ΔW[o,i,y,x] = Σ_r Λ[o,r,y,x] D[i,r]``; for ConvTranspose2d
  (in, out, kh, kw) the same with the input axis first. ``direction`` D is (in, r); ``lam`` Λ has
  the weight's shape with the input axis replaced by r. ``scale`` is the edit's *strength*: the
  low-rank form makes dialling an edit up or down exact without re-optimizing, and a delta at
  strength 0 is skipped entirely, so the weights are the parent's bit for bit.
- ``with_strength(deltas, s)``: the same factors at another strength.
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

FORMAT = 2            # 2 added the per-part scale; blobs at strength 1 are still written as format 1
READS = (1, 2)


@dataclasses.dataclass
class LowRankDelta:
    """A change of one weight restricted to the span of ``direction`` along its input axis."""

    weight_key: str               # key of the edited weight in the public state dict
    in_axis: int                  # the weight's input-channel axis
    direction: torch.Tensor       # D, (in_channels, rank)
    lam: torch.Tensor             # Λ, weight shape with in_axis replaced by rank
    scale: float = 1.0            # strength: ΔW is multiplied by it (0 = no change at all)

    def __post_init__(self):
        if not isinstance(self.scale, (int, float)) or isinstance(self.scale, bool) or self.scale != self.scale:
            raise ValueError(f"scale must be a number, got {self.scale!r}")
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

    @property
    def is_zero(self) -> bool:
        """True at strength 0: callers skip the delta so the weight stays bit-identical."""
        return self.scale == 0

    def dense(self) -> torch.Tensor:
        """ΔW as a full tensor of the weight's shape (the scale applied)."""
        lam_last = self.lam.movedim(self.in_axis, -1)                 # (..., r)
        full = lam_last @ self.direction.to(lam_last.dtype).T         # (..., in)
        if self.scale != 1:
            full = full * self.scale
        return full.movedim(-1, self.in_axis).contiguous()

    def nbytes(self) -> int:
        """Bytes of the factors (what is stored)."""
        return self.direction.numel() * self.direction.element_size() + self.lam.numel() * self.lam.element_size()


def with_strength(deltas: Sequence[LowRankDelta], strength: float) -> list[LowRankDelta]:
    """The same factors at ``strength`` (replacing any earlier scale)."""
    return [dataclasses.replace(d, scale=float(strength)) for d in deltas]


def to_bytes(deltas: Sequence[LowRankDelta]) -> bytes:
    """One safetensors blob holding every delta of an edit (deterministic bytes)."""
    tensors, parts = {}, []
    scaled = any(d.scale != 1 for d in deltas)
    for i, d in enumerate(deltas):
        tensors[f"{i}.direction"] = d.direction.detach().to("cpu", torch.float32).clone(memory_format=torch.contiguous_format)
        tensors[f"{i}.lambda"] = d.lam.detach().to("cpu", torch.float32).clone(memory_format=torch.contiguous_format)
        part = {"weight_key": d.weight_key, "in_axis": d.in_axis, "weight_shape": list(d.weight_shape)}
        if scaled:
            part["scale"] = float(d.scale)
        parts.append(part)
    # Format 1 when every scale is 1, so earlier readers still read what they understand; a reader
    # that ignored a scale would apply the wrong edit, hence format 2 for scaled parts.
    meta = {"kind": "low_rank_delta", "format": FORMAT if scaled else 1, "parts": parts}
    return st_save(tensors, metadata={"rulewright": json.dumps(meta, sort_keys=True)})


def from_bytes(data: bytes) -> list[LowRankDelta]:
    """The deltas stored by ``to_bytes``; ValueError for anything else."""
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    try:
        header = json.loads(data[8 : 8 + n])
        meta = json.loads(header["__metadata__"]["rulewright"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError("not a low-rank delta blob") from exc
    if meta.get("kind") != "low_rank_delta" or meta.get("format") not in READS:
        raise ValueError(f"not a low-rank delta blob of format {' or '.join(map(str, READS))}")
    tensors = st_load(data)
    return [
        LowRankDelta(p["weight_key"], int(p["in_axis"]), tensors[f"{i}.direction"], tensors[f"{i}.lambda"],
                     float(p.get("scale", 1.0)))
        for i, p in enumerate(meta["parts"])
    ]


def apply_to_state_dict(state: Mapping[str, torch.Tensor], deltas: Sequence[LowRankDelta]) -> dict[str, torch.Tensor]:
    """A new dict with each delta added to its weight; every other tensor is shared, not copied."""
    out = dict(state)
    for d in deltas:
        if d.is_zero:
            continue
        if d.weight_key not in out:
            raise KeyError(f"delta edits {d.weight_key!r}, which the weights lack")
        w = out[d.weight_key]
        if tuple(w.shape) != d.weight_shape:
            raise ValueError(f"delta for {d.weight_key} expects shape {d.weight_shape}, weight is {tuple(w.shape)}")
        out[d.weight_key] = w + d.dense().to(device=w.device, dtype=w.dtype)
    return out
