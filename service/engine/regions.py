"""Regions: a seed plus a soft mask at image resolution (8-bit alpha) or a box.

- ``Region(seed, mask=..., box=...)``: exactly one of ``mask`` ((R, R) uint8 or float in [0, 1])
  and ``box`` ((x0, y0, x1, y1) in image pixels, end exclusive).
- ``Region.alpha(resolution)``: the soft mask (R, R) float in [0, 1] at image resolution.
- ``Region.at(size, resolution)``: resampled to a layer's grid, keeping the soft weights (each
  cell gets the mean alpha of the pixels it covers).
- ``Region.to_spec()`` / ``Region.from_spec(d, field)``: the JSON form of the API's Region
  (``{"seed", "box": [x0, y0, x1, y1]}`` or ``{"seed", "mask": {"encoding", "width", "height",
  "data"}}``); masks are written zlib-compressed (ENCODING_ZLIB), so the spec is exact.
- ``decode_pixels(encoding, width, height, data, field)``: the one mask decoder (PNG, raw, zlib),
  which never inflates or decodes past the declared size; ``decode_mask`` reads a JSON mask with
  it (first-release ``zlib-base64-u8`` masks too, ``upgrade_region``); ``mask_size`` the size a
  JSON mask declares.
- ``bbox(alpha)``: the tight box (y0, x0, y1, x1) of a mask's nonzero cells, or None.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import zlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image as PILImage

from rulewright.service.engine.errors import InvalidArgument
from rulewright.service.engine.sampling import MAX_SEED

MASK_ENCODINGS = ("ENCODING_ZLIB", "ENCODING_RAW", "ENCODING_PNG")   # as the API's Mask.Encoding names them
LEGACY_MASK = "zlib-base64-u8"        # first-release specs: {"encoding", "size": [H, W], "data"}, zlib bytes


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
        """The JSON form (exact): ``{"seed", "box": [x0, y0, x1, y1]}`` or a zlib mask."""
        if self.box is not None:
            return {"seed": self.seed, "box": list(self.box)}
        raw = self.mask if self.mask.dtype == torch.uint8 else (self.mask.clamp(0, 1) * 255).round().to(torch.uint8)
        data = base64.b64encode(zlib.compress(raw.contiguous().numpy().tobytes(), 9)).decode()
        return {"seed": self.seed, "mask": {"encoding": "ENCODING_ZLIB", "width": int(raw.shape[1]),
                                            "height": int(raw.shape[0]), "data": data}}

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


def upgrade_region(spec: Any) -> Any:
    """A JSON region with a first-release mask (``zlib-base64-u8``) in today's form; the bytes stay as they are."""
    mask = spec.get("mask") if isinstance(spec, dict) else None
    if not (isinstance(mask, dict) and mask.get("encoding") == LEGACY_MASK):
        return spec
    size = mask.get("size")
    h, w = size if isinstance(size, list) and len(size) == 2 else (0, 0)
    return {**spec, "mask": {"encoding": "ENCODING_ZLIB", "width": w, "height": h, "data": mask.get("data", "")}}


def mask_size(obj: Any) -> tuple[int, int] | None:
    """(height, width) a JSON mask declares (either form), or None when it declares none that reads."""
    obj = upgrade_region({"mask": obj})["mask"]
    h, w = (obj.get("height", 0), obj.get("width", 0)) if isinstance(obj, dict) else (None, None)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (h, w)):
        return None
    return h, w


def decode_mask(obj: Any, field: str) -> torch.Tensor:
    """(H, W) uint8 from a JSON mask: ``{"encoding": "ENCODING_ZLIB", "width", "height", "data": base64}``
    (or ENCODING_RAW, ENCODING_PNG), or a first-release ``{"encoding": "zlib-base64-u8", "size": [H, W], ...}``."""
    obj = upgrade_region({"mask": obj})["mask"]
    try:
        encoding = obj.get("encoding")
        if encoding not in MASK_ENCODINGS:
            raise InvalidArgument(field, f"unknown encoding {encoding!r}; use {', '.join(MASK_ENCODINGS)}")
        width, height = int(obj.get("width", 0)), int(obj.get("height", 0))
        data = base64.b64decode(obj.get("data") or "", validate=True)
    except InvalidArgument:
        raise
    except (AttributeError, TypeError, ValueError) as exc:
        raise InvalidArgument(field, f"malformed mask ({exc})") from exc
    try:
        return decode_pixels(encoding, width, height, data, field)
    except InvalidArgument as exc:             # the JSON form names the mask, not its parts
        raise InvalidArgument(field, exc.description) from None


def decode_pixels(encoding: str, width: int, height: int, data: bytes, field: str) -> torch.Tensor:
    """(height, width) uint8 from a mask's bytes; never inflates or decodes past the declared size.

    ``encoding`` is ENCODING_RAW, ENCODING_ZLIB or ENCODING_PNG; the caller has capped width x
    height (a server's ``max_mask_pixels``) before the bytes are read.
    """
    if width < 1 or height < 1:
        raise InvalidArgument(f"{field}.data", f"holds {len(data)} bytes, width x height is {width * height}")
    if encoding == "ENCODING_PNG":
        pixels = _png_pixels(data, width, height, field)
    else:
        raw = data
        if encoding == "ENCODING_ZLIB":
            raw = _inflate(data, width * height, field)
        elif encoding != "ENCODING_RAW":
            raise InvalidArgument(f"{field}.encoding", f"must be one of {', '.join(MASK_ENCODINGS)}")
        if len(raw) != width * height:
            raise InvalidArgument(f"{field}.data", f"holds {len(raw)} bytes, width x height is {width * height}")
        pixels = np.frombuffer(raw, dtype=np.uint8).reshape(height, width)
    return torch.from_numpy(pixels.copy())


def _inflate(data: bytes, size: int, field: str) -> bytes:
    """zlib ``data`` inflated to at most one byte past ``size``: a small body can inflate to gigabytes."""
    try:
        raw = zlib.decompressobj().decompress(data, size + 1)
    except zlib.error as exc:
        raise InvalidArgument(f"{field}.data", f"malformed mask ({exc})") from None
    if len(raw) > size:
        raise InvalidArgument(f"{field}.data", "inflates to more than the width x height it declares")
    return raw


def _png_pixels(data: bytes, width: int, height: int, field: str) -> np.ndarray:
    """An 8-bit grayscale PNG's pixels, its header checked against the declared size before decoding."""
    try:
        image = PILImage.open(io.BytesIO(data))
        if image.size != (width, height):      # before decoding: a small PNG can declare a huge image
            raise InvalidArgument(f"{field}.data", f"PNG is {image.size[0]}x{image.size[1]}, width x height "
                                  f"says {width}x{height}")
        pixels = np.asarray(image.convert("L"))
    except InvalidArgument:
        raise
    except Exception as exc:  # noqa: BLE001 -- any decoder failure is bad input
        raise InvalidArgument(f"{field}.data", f"not a readable PNG ({exc})") from None
    if pixels.shape != (height, width):
        raise InvalidArgument(f"{field}.data", f"PNG is {pixels.shape[1]}x{pixels.shape[0]}, "
                              f"width x height says {width}x{height}")
    return pixels


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
