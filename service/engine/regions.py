"""Regions: a seed plus a soft mask at image resolution (8-bit alpha) or a box.

- ``Region(seed, mask=..., box=...)``: exactly one of ``mask`` ((R, R) uint8 or float in [0, 1])
  and ``box`` ((x0, y0, x1, y1) in image pixels, end exclusive).
- ``Region.alpha(resolution)``: the soft mask (R, R) float in [0, 1] at image resolution.
- ``Region.at(size, resolution)``: resampled to a layer's grid, keeping the soft weights (each
  cell gets the mean alpha of the pixels it covers).
- ``Region.to_spec()`` / ``Region.from_spec(d, field)``: JSON form; masks are zlib-compressed
  base64 bytes, so the spec is exact and needs no image library.
- ``bbox(alpha)``: the tight box (y0, x0, y1, x1) of a mask's nonzero cells, or None.
"""

from __future__ import annotations

import base64
import dataclasses
import zlib
from typing import Any

import torch
import torch.nn.functional as F

from rulewright.service.engine.errors import InvalidArgument
from rulewright.service.engine.sampling import MAX_SEED


@dataclasses.dataclass
class Region:
    """Where on which sample: a seed and a soft mask or box at image resolution."""

    seed: int
    mask: torch.Tensor | None = None                      # (R, R) uint8 0..255 or float 0..1
    box: tuple[int, int, int, int] | None = None          # (x0, y0, x1, y1), pixels, end exclusive

    def validate(self, resolution: int, field: str) -> None:
        """Raise ``InvalidArgument`` naming ``field`` unless this region fits an R×R image."""
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise InvalidArgument(f"{field}.seed", f"must be an integer in [0, 2**63), got {self.seed!r}")
        if (self.mask is None) == (self.box is None):
            raise InvalidArgument(field, "give exactly one of mask or box")
        if self.box is not None:
            if len(self.box) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) for v in self.box):
                raise InvalidArgument(f"{field}.box", f"must be four integers x0,y0,x1,y1, got {self.box!r}")
            x0, y0, x1, y1 = self.box
            if not (0 <= x0 < x1 <= resolution and 0 <= y0 < y1 <= resolution):
                raise InvalidArgument(
                    f"{field}.box", f"must satisfy 0 <= x0 < x1 <= {resolution} and 0 <= y0 < y1 <= {resolution}, "
                    f"got {list(self.box)}")
        else:
            if self.mask.ndim != 2 or tuple(self.mask.shape) != (resolution, resolution):
                raise InvalidArgument(
                    f"{field}.mask", f"must be {resolution}x{resolution} (the image resolution), "
                    f"got {'x'.join(str(s) for s in self.mask.shape)}")
            alpha = self._mask_float()
            if not torch.isfinite(alpha).all() or alpha.min() < 0 or alpha.max() > 1:
                raise InvalidArgument(f"{field}.mask", "values must lie in [0, 1] (or 0..255 as uint8)")
            if alpha.max() == 0:
                raise InvalidArgument(f"{field}.mask", "is empty (no pixel selected)")

    def _mask_float(self) -> torch.Tensor:
        m = self.mask
        return m.float() / 255.0 if m.dtype == torch.uint8 else m.float()

    def alpha(self, resolution: int) -> torch.Tensor:
        """Soft mask (R, R) in [0, 1] at image resolution."""
        if self.mask is not None:
            return self._mask_float()
        out = torch.zeros(resolution, resolution)
        x0, y0, x1, y1 = self.box
        out[y0:y1, x0:x1] = 1.0
        return out

    def at(self, size: int, resolution: int) -> torch.Tensor:
        """Soft mask (size, size) on a layer's grid: each cell's mean alpha over its pixels."""
        return resample(self.alpha(resolution), size)

    def to_spec(self) -> dict:
        """JSON-ready form (exact)."""
        if self.box is not None:
            return {"seed": self.seed, "box": list(self.box)}
        raw = self.mask if self.mask.dtype == torch.uint8 else (self.mask.clamp(0, 1) * 255).round().to(torch.uint8)
        data = base64.b64encode(zlib.compress(raw.contiguous().numpy().tobytes(), 9)).decode()
        return {"seed": self.seed, "mask": {"encoding": "zlib-base64-u8", "size": list(raw.shape), "data": data}}

    @classmethod
    def from_spec(cls, spec: Any, field: str) -> "Region":
        """Parse the JSON form; ``InvalidArgument`` naming ``field`` on anything malformed."""
        if not isinstance(spec, dict):
            raise InvalidArgument(field, f"must be an object with seed and mask or box, got {type(spec).__name__}")
        unknown = set(spec) - {"seed", "mask", "box"}
        if unknown:
            raise InvalidArgument(field, f"unknown fields {sorted(unknown)}")
        if "seed" not in spec:
            raise InvalidArgument(f"{field}.seed", "is required")
        box = tuple(spec["box"]) if spec.get("box") is not None else None
        mask = decode_mask(spec["mask"], f"{field}.mask") if spec.get("mask") is not None else None
        return cls(seed=spec["seed"], mask=mask, box=box)


def decode_mask(obj: Any, field: str) -> torch.Tensor:
    """(H, W) uint8 from ``{"encoding": "zlib-base64-u8", "size": [H, W], "data": ...}``."""
    try:
        if obj["encoding"] != "zlib-base64-u8":
            raise InvalidArgument(field, f"unknown encoding {obj['encoding']!r}; use zlib-base64-u8")
        h, w = (int(v) for v in obj["size"])
        raw = zlib.decompress(base64.b64decode(obj["data"], validate=True))
    except InvalidArgument:
        raise
    except (KeyError, TypeError, ValueError, zlib.error) as exc:
        raise InvalidArgument(field, f"malformed mask ({exc})") from exc
    if len(raw) != h * w:
        raise InvalidArgument(field, f"holds {len(raw)} bytes, size says {h}x{w}")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(h, w).clone()


def resample(alpha: torch.Tensor, size: int) -> torch.Tensor:
    """(R, R) soft mask to (size, size): area mean when shrinking, bilinear when growing."""
    r = alpha.shape[-1]
    x = alpha[None, None].float()
    if size == r:
        return alpha.float().clone()
    if size < r:
        return F.adaptive_avg_pool2d(x, size)[0, 0]
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)


def bbox(alpha: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(y0, x0, y1, x1), end exclusive, of the nonzero cells of a (H, W) mask; None if empty."""
    ys, xs = torch.nonzero(alpha > 0, as_tuple=True)
    if ys.numel() == 0:
        return None
    return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1
