"""Computed images: PNG bytes of results (the bytes gRPC returns), heatmaps of response and unit
maps, and the small LRU (``Renders``) the JSON answers point into by URL."""

from __future__ import annotations

import collections
import io
import math
import secrets
import threading

import torch
import torch.nn.functional as F
from PIL import Image as PILImage

from rulewright.service.server import convert
from rulewright.service.server.web.errors import RenderNotFound
from rulewright.v1 import images_pb2


def png(images: torch.Tensor) -> list[bytes]:
    """(N, H, W, 3) uint8 → PNG bytes each, exactly as gRPC Sample encodes them."""
    return [m.data for m in convert.images_pb(images, images_pb2.IMAGE_FORMAT_PNG)]


def heatmap_png(values: torch.Tensor, threshold: float, size: int) -> bytes:
    """An RGBA PNG of ``values`` (H, W) at ``size``×``size``: transparent where a cell is not above
    ``threshold``, yellow to red (and more opaque) from the threshold up to the map's maximum.

    Cells are enlarged as blocks (nearest), so the shaded share is exactly the share of cells
    above the threshold that search reports as ``above``."""
    v = values.detach().float().cpu()
    if tuple(v.shape) != (size, size):
        v = F.interpolate(v[None, None], size=(size, size), mode="nearest")[0, 0]
    threshold = float(threshold) if math.isfinite(float(threshold)) else float(v.max())
    span = max(float(v.max()) - threshold, 1e-12)
    t = ((v - threshold) / span).clamp(0, 1)
    above = v > threshold
    rgba = torch.zeros(size, size, 4, dtype=torch.uint8)
    rgba[..., 0] = 255
    rgba[..., 1] = (230 - 190 * t).round().to(torch.uint8)
    rgba[..., 2] = (40 * (1 - t)).round().to(torch.uint8)
    rgba[..., 3] = torch.where(above, (110 + 145 * t).round(), torch.zeros_like(t)).to(torch.uint8)
    buf = io.BytesIO()
    PILImage.fromarray(rgba.numpy(), "RGBA").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class Renders:
    """Computed PNGs (heatmaps, previews) by random id, the ``capacity`` newest kept."""

    def __init__(self, capacity: int = 2048):
        self.capacity = capacity
        self._items: "collections.OrderedDict[str, bytes]" = collections.OrderedDict()
        self._lock = threading.Lock()

    def put(self, data: bytes) -> str:
        """The URL of ``data``."""
        key = secrets.token_urlsafe(12)
        with self._lock:
            self._items[key] = data
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return f"/api/renders/{key}.png"

    def heatmap(self, values: torch.Tensor, threshold: float, size: int) -> str:
        """The URL of ``values``' heatmap (``heatmap_png``)."""
        return self.put(heatmap_png(values, threshold, size))

    def get(self, key: str) -> bytes:
        """The PNG ``put`` stored under ``key``; ``RenderNotFound`` once it is gone."""
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
        if data is None:
            raise RenderNotFound(f"image {key!r} is gone (the server keeps the {self.capacity} newest computed "
                                 "images): run the search, dissection or rewrite again")
        return data
