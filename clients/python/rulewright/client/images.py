"""Pictures from results: image grids, boxes drawn on samples, and unit heatmaps."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["grid", "draw_boxes", "heatmap_overlay"]


def grid(images: Sequence[Any], columns: int = 8, scale: int = 2) -> Image.Image:
    """``images`` (PIL images, or results with an ``.image`` such as ``SampledImage``) side by
    side, ``columns`` per row, enlarged ``scale``x (nearest neighbour)."""
    if not images:
        raise ValueError("no images to put in a grid")
    images = [getattr(im, "image", im) for im in images]
    w, h = images[0].size
    columns = max(1, min(columns, len(images)))
    rows = (len(images) + columns - 1) // columns
    out = Image.new("RGB", (columns * w, rows * h), "white")
    for i, im in enumerate(images):
        out.paste(im, ((i % columns) * w, (i // columns) * h))
    return out.resize((out.width * scale, out.height * scale), Image.NEAREST) if scale != 1 else out


def draw_boxes(image: Image.Image, boxes: Iterable[Sequence[int]], color: str = "red", scale: int = 4) -> Image.Image:
    """``image`` enlarged ``scale``x with each box (x0, y0, x1, y1, image pixels, ends
    exclusive) outlined in ``color``."""
    out = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(out)
    for x0, y0, x1, y1 in boxes:
        draw.rectangle([x0 * scale, y0 * scale, x1 * scale - 1, y1 * scale - 1], outline=color, width=max(1, scale // 2))
    return out


def _hot(v: np.ndarray) -> np.ndarray:
    """Values in [0, 1] → RGB uint8 on a black-red-yellow-white scale."""
    r = np.clip(3 * v, 0, 1)
    g = np.clip(3 * v - 1, 0, 1)
    b = np.clip(3 * v - 2, 0, 1)
    return (np.stack([r, g, b], -1) * 255).round().astype(np.uint8)


def heatmap_overlay(image: Image.Image, values: np.ndarray, threshold: float | None = None,
                    alpha: float = 0.6) -> Image.Image:
    """An activation map (height, width), upsampled (bilinear) to ``image``'s size, scaled to
    [0, its maximum] (or to [0, 2 x ``threshold``], so the unit's threshold sits mid-scale) and
    blended over ``image`` on a hot colour scale."""
    v = np.asarray(values, dtype=np.float32)
    top = 2 * threshold if threshold and threshold > 0 else float(v.max())
    v = np.clip(v / top, 0, 1) if top > 0 else np.zeros_like(v)
    up = Image.fromarray((v * 255).round().astype(np.uint8), "L").resize(image.size, Image.BILINEAR)
    heat = Image.fromarray(_hot(np.asarray(up, dtype=np.float32) / 255), "RGB")
    return Image.blend(image.convert("RGB"), heat, alpha)
