"""Deterministic sampling: an image is named by (model version, seed, truncation).

- ``latents(seeds, z_dim)``: one latent per seed, each drawn by its own CPU ``torch.Generator``, so
  it does not depend on the device, the batch, or the other seeds.
- ``sample(model, seeds=..., z=..., truncation=..., batch_size=..., changes=...)``: images in [-1, 1]
  on the CPU; ``changes`` draws edited versions of the model (each image its own) in shared passes.
- ``bucket(n)``: the padded size of an n-image forward pass (a power of two, at least 4).
- ``check_latents(z, z_dim)``: raw latents must be finite (N, z_dim) floats (InvalidArgument).
- ``to_uint8(images)``: (N, H, W, 3) uint8 pixels for PNG or raw RGB8.
- ``png_bytes(pixels)``: one (H, W, 3) uint8 image as PNG: the one encoder Sample and dataset
  jobs share, so a job's image is byte-identical to Sample's for the same (version, seed, truncation).
- ``grid(images, columns)``: one (H, W, 3) uint8 album of many images.
"""

from __future__ import annotations

import io
import math
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image as PILImage

from rulewright.service.engine import factored
from rulewright.service.engine.factored import Change
from rulewright.service.engine.generators.base import Generator

MAX_SEED = 2**63 - 1


def check_seeds(seeds: Sequence[int]) -> list[int]:
    """Seeds as ints in [0, 2**63); ValueError naming the first bad one."""
    out = []
    for i, seed in enumerate(seeds):
        if isinstance(seed, bool) or not isinstance(seed, int) and not hasattr(seed, "__index__"):
            raise ValueError(f"seeds[{i}] must be an integer, got {seed!r}")
        seed = int(seed)
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seeds[{i}] must lie in [0, 2**63), got {seed}")
        out.append(seed)
    return out


def latents(seeds: Iterable[int], z_dim: int) -> torch.Tensor:
    """(N, z_dim) float32 CPU latents, row i drawn from a generator seeded with seeds[i]."""
    rows = []
    for seed in check_seeds(list(seeds)):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        rows.append(torch.randn(z_dim, generator=gen, dtype=torch.float32))
    if not rows:
        return torch.empty(0, z_dim)
    return torch.stack(rows)


def check_latents(z: torch.Tensor, z_dim: int, field: str = "z") -> None:
    """Raise ``InvalidArgument`` unless ``z`` is a finite (N, z_dim) float tensor."""
    from rulewright.service.engine.errors import InvalidArgument

    if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[1] != z_dim:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise InvalidArgument(field, f"must have shape (N, {z_dim}), got {shape}")
    if not z.is_floating_point():
        raise InvalidArgument(field, f"must be floating point, got {z.dtype}")
    bad = (~torch.isfinite(z)).any(dim=1).nonzero().flatten()
    if bad.numel():
        raise InvalidArgument(field, f"row {int(bad[0])} holds NaN or infinite values")


def _model_device(model: Generator) -> torch.device:
    return next(model.parameters()).device


MIN_BUCKET = 4


def bucket(n: int) -> int:
    """The batch size an n-image forward pass runs at: the next power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << max(0, n - 1).bit_length())


def sample(
    model: Generator,
    seeds: Sequence[int] | None = None,   # one image per seed
    z: torch.Tensor | None = None,        # or raw latents (N, z_dim); exactly one of seeds / z
    truncation: float | Sequence[float] = 1.0,   # 1 = none; or one per image (architectures with a mapping network)
    batch_size: int = 16,                 # images per forward pass (memory, not results)
    changes: Sequence[Change | None] | Change | None = None,   # low-rank changes of the model, one per image
) -> torch.Tensor:
    """Images (N, 3, R, R) in [-1, 1] on the CPU; the same seed always gives the same image.

    Forward passes run only at batch sizes 4, 8, 16, ... (a short chunk is padded with zero
    latents): oneDNN and MKL pick kernels by batch size, and on this CPU batches of 1, 2, 3, 5,
    6, 7, 9, 10 or 11 give results that differ from the others in the last bit (which sizes
    depends on the architecture), so an image would depend on what else was in its batch.
    ``tests/test_sampling.py`` checks that every bucket agrees bitwise for each architecture.

    ``changes`` draws images of edited versions of ``model`` (one change for all, or one per
    image, None for the model's own weights) through ``factored``: the model's weights run once
    for every image and each adds its own version's low-rank term, so versions share passes and
    an image's bits still depend only on its version, latent and truncation.
    """
    if (seeds is None) == (z is None):
        raise ValueError("give exactly one of seeds or z")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if z is None:
        z = latents(seeds, model.z_dim)
    check_latents(z, model.z_dim)
    count = z.shape[0]
    truncations = _per_image(truncation, count, "truncation")
    for t in set(truncations):
        model.check_truncation(t)
    per_image = _per_image(changes, count, "changes")
    device = _model_device(model)
    outs = []
    step = max(MIN_BUCKET, 1 << (batch_size.bit_length() - 1))   # the largest bucket within batch_size
    with torch.no_grad():
        for start in range(0, count, step):
            chunk = z[start : start + step].to(device=device, dtype=torch.float32)
            n = chunk.shape[0]
            if bucket(n) != n:
                chunk = torch.cat([chunk, chunk.new_zeros(bucket(n) - n, chunk.shape[1])])
            rows = truncations[start : start + n]
            # One number when the rows agree (the path every single-truncation request takes);
            # one per row, padding rows at 1, when a batch mixes them: the same bits per element.
            t = rows[0] if len(set(rows)) == 1 else torch.tensor(rows + [1.0] * (chunk.shape[0] - n), device=device)
            chunk_changes = [c if c else None for c in per_image[start : start + n]]
            if any(c is not None for c in chunk_changes):
                with factored.rendering(model, chunk_changes + [None] * (chunk.shape[0] - n)):
                    outs.append(model(chunk, t)[:n].float().cpu())
            else:
                outs.append(model(chunk, t)[:n].float().cpu())
    if not outs:
        return torch.empty(0, 3, model.resolution, model.resolution)
    return torch.cat(outs)


def _per_image(value, count: int, name: str) -> list:
    """One value per image: a sequence of ``count`` as given, anything else repeated."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name} must give one value per image ({count}), got {len(value)}")
        return list(value)
    return [value] * count


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] → (N, H, W, 3) uint8."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def png_bytes(pixels: np.ndarray) -> bytes:
    """One (H, W, 3) uint8 image as PNG bytes (deterministic: same pixels, same bytes)."""
    buf = io.BytesIO()
    # compress_level 1: PNG's lossless either way; fast beats a few percent smaller for sampling.
    PILImage.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def grid(images: torch.Tensor, columns: int | None = None, pad: int = 2) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] → one (H', W', 3) uint8 image, ``columns`` per row, white gaps."""
    n, _, h, w = images.shape
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / columns))
    pixels = to_uint8(images)
    canvas = torch.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[y : y + h, x : x + w] = pixels[i]
    return canvas
