"""The StyleGAN2 port's building blocks below the modulated convolution, in plain PyTorch ops.

- Resampling: ``make_kernel`` (a separable FIR kernel), ``upfirdn2d`` (upsample, pad, filter),
  ``Blur`` and ``Upsample`` (modules holding their kernel as a buffer).
- ``PixelNorm``, ``fused_leaky_relu`` / ``FusedLeakyReLU`` (bias, leaky ReLU, gain sqrt 2) and
  ``EqualLinear`` (a linear layer with the equalized learning rate's runtime scale).

Buffers and parameters keep the port's names, so ``stylegan2`` checkpoints load as they are.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------------------------
# Resampling


def make_kernel(taps: Sequence[float]) -> torch.Tensor:
    """A separable 2-d FIR kernel from 1-d taps (outer product), normalized to sum 1."""
    k = torch.tensor(taps, dtype=torch.float32)
    k = k[None, :] * k[:, None]
    return k / k.sum()


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Upsample by zero insertion, zero-pad, filter — each channel separately.

    ``x`` (N, C, H, W); every pixel is followed by ``up - 1`` zeros along each spatial axis, each
    side is padded by ``pad[0]`` before and ``pad[1]`` after (negative crops), and the result is
    correlated with the flipped ``kernel`` (i.e. convolved with it), no padding.
    """
    n, c, h, w = x.shape
    if up > 1:
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(n, c, h * up, w * up)
    x = F.pad(x, [pad[0], pad[1], pad[0], pad[1]])
    kh, kw = kernel.shape
    weight = torch.flip(kernel, [0, 1]).to(x.dtype)[None, None].expand(c, 1, kh, kw)
    return F.conv2d(x, weight, groups=c)


class Blur(nn.Module):
    """Low-pass filter after a transposed convolution (keys: ``kernel``)."""

    def __init__(
        self,
        taps: Sequence[float],          # 1-d filter taps
        pad: tuple[int, int],           # zero padding before / after, per spatial side
        upsample_factor: int = 1,       # the preceding upsampling, whose zeros cost gain factor**2
    ):
        super().__init__()
        self.register_buffer("kernel", make_kernel(taps) * upsample_factor**2)
        self.pad = tuple(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, up=1, pad=self.pad)

    def extra_repr(self) -> str:
        return f"kernel={tuple(self.kernel.shape)}, pad={self.pad}"


class Upsample(nn.Module):
    """Filtered ×``factor`` upsampling of the RGB skip path (keys: ``kernel``)."""

    def __init__(
        self,
        taps: Sequence[float],          # 1-d filter taps
        factor: int = 2,                # upsampling factor
    ):
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_kernel(taps) * factor**2)
        p = len(taps) - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)   # output exactly factor × input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)

    def extra_repr(self) -> str:
        return f"factor={self.factor}, kernel={tuple(self.kernel.shape)}, pad={self.pad}"


# ---------------------------------------------------------------------------------------------
# Equalized layers and activations


class PixelNorm(nn.Module):
    """Normalize each latent to unit root-mean-square (no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x * x, dim=1, keepdim=True) + 1e-8)


def fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor, negative_slope: float = 0.2,
                     scale: float = math.sqrt(2)) -> torch.Tensor:
    """``leaky_relu(x + bias) · scale``, with ``bias`` broadcast along axis 1."""
    shape = (1, bias.shape[0]) + (1,) * (x.ndim - 2)
    return F.leaky_relu(x + bias.reshape(shape), negative_slope) * scale


class FusedLeakyReLU(nn.Module):
    """Bias, leaky ReLU and gain ``sqrt(2)`` in one (keys: ``bias``)."""

    def __init__(
        self,
        channels: int,                  # length of the bias (axis 1 of the input)
    ):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias)

    def extra_repr(self) -> str:
        return f"channels={self.bias.shape[0]}"


class EqualLinear(nn.Module):
    """Linear layer with equalized learning rate: weights stored unscaled, scaled at run time
    (keys: ``weight`` (out, in), ``bias`` (out,))."""

    def __init__(
        self,
        in_dim: int,                    # input features
        out_dim: int,                   # output features
        bias_init: float = 0.0,         # initial bias (1 for modulations: styles start at identity)
        lr_mul: float = 1.0,            # learning-rate multiplier baked into both weight and bias
        activation: bool = False,       # follow with the fused leaky ReLU
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation:
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), self.bias * self.lr_mul)
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)

    def extra_repr(self) -> str:
        out_dim, in_dim = self.weight.shape
        return f"in={in_dim}, out={out_dim}, lr_mul={self.lr_mul}, activation={self.activation}"
