"""ProGAN in the layout published with GAN Dissection (``layerN.conv.*``, ``output_RxR.*``).

The generator is a sequence of blocks named ``layer1``, ``layer2``, …: each pixel-normalizes its
input, doubles the resolution (even-numbered blocks after the first pair), convolves without bias,
then applies the equalized-learning-rate scale and bias (``wscale``) and a leaky ReLU. The last
block, ``output_RxR``, is a 1×1 convolution to RGB followed by a clamp to [-1, 1].

``layer1`` turns the latent (a 1×1 map) into 4×4 with a 4×4 kernel and padding 3. A rewritable
layer's key is its convolution's input (after pixel-norm and upsampling); its value is the
convolution's output before wscale, bias and activation — linear in the weight (Conv2d: input
axis 1).
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from rulewright.service.engine.generators.base import Generator, LayerSpec, StateDictMismatch, check_state_dict, require

ARCH = "progan"


class PixelNorm(nn.Module):
    """Scale each location's feature vector to unit root-mean-square."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class Upsample2x(nn.Module):
    """Nearest-neighbour doubling of the resolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="nearest")


class WScale(nn.Module):
    """Equalized learning rate: a fixed scale (gain / sqrt(fan_in)) and a learned bias ``b``."""

    def __init__(
        self,
        channels: int,      # output channels (size of the bias)
        fan_in: int,        # inputs feeding one output (in_channels * k * k)
        gain: float,        # sqrt(2) for the leaky-ReLU blocks, 1 for the RGB output
    ):
        super().__init__()
        self.scale = gain / math.sqrt(fan_in)
        self.b = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.b.view(1, -1, 1, 1)


class ConvBlock(nn.Module):
    """pixel-norm → (upsample) → conv → wscale → leaky ReLU (or clamp for the RGB output)."""

    def __init__(
        self,
        in_channels: int,       # channels of the input map
        out_channels: int,      # channels written
        kernel_size: int,       # 4 for layer1, 3 for the rest, 1 for the RGB output
        padding: int,           # 3 for layer1, 1 for 3×3 blocks, 0 for the output
        upsample: bool,         # double the resolution before the convolution
        output: bool = False,   # the RGB output block: no activation, clamp to [-1, 1]
    ):
        super().__init__()
        self.norm = PixelNorm()
        self.up = Upsample2x() if upsample else nn.Identity()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, 1, padding, bias=False)
        gain = 1.0 if output else math.sqrt(2)
        self.wscale = WScale(out_channels, in_channels * kernel_size * kernel_size, gain)
        self.act = nn.Hardtanh() if output else nn.LeakyReLU(0.2, inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.wscale(self.conv(self.up(self.norm(x)))))


class ProGANGenerator(Generator):
    """GAN Dissection's progressive generator, built from inferred channel widths."""

    arch = ARCH
    supports_truncation = False

    def __init__(
        self,
        widths: list[int],      # channels per resolution: widths[0] at 4×4 (= z_dim), then 8×8, ...
    ):
        if len(widths) < 2:
            raise ValueError("ProGAN needs at least two resolutions")
        resolution = 4 * 2 ** (len(widths) - 1)
        super().__init__(z_dim=widths[0], resolution=resolution)
        self.widths = list(widths)
        blocks: list[tuple[str, nn.Module]] = [
            ("layer1", ConvBlock(widths[0], widths[0], 4, 3, upsample=False)),
            ("layer2", ConvBlock(widths[0], widths[0], 3, 1, upsample=False)),
        ]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            n = len(blocks)
            blocks.append((f"layer{n + 1}", ConvBlock(c_in, c_out, 3, 1, upsample=True)))
            blocks.append((f"layer{n + 2}", ConvBlock(c_out, c_out, 3, 1, upsample=False)))
        blocks.append((self.output_name(resolution), ConvBlock(widths[-1], 3, 1, 0, False, output=True)))
        self.blocks = nn.Sequential(OrderedDict(blocks))
        self.eval()

    @staticmethod
    def output_name(resolution: int) -> str:
        """Name of the RGB block in the public layout."""
        return f"output_{resolution}x{resolution}"

    @classmethod
    def expected_shapes(cls, widths: list[int]) -> dict[str, tuple]:
        """Every key of the public layout with its shape."""
        shapes: dict[str, tuple] = {}

        def block(name: str, c_in: int, c_out: int, k: int) -> None:
            shapes[f"{name}.conv.weight"] = (c_out, c_in, k, k)
            shapes[f"{name}.wscale.b"] = (c_out,)

        block("layer1", widths[0], widths[0], 4)
        block("layer2", widths[0], widths[0], 3)
        n = 2
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            block(f"layer{n + 1}", c_in, c_out, 3)
            block(f"layer{n + 2}", c_out, c_out, 3)
            n += 2
        block(cls.output_name(4 * 2 ** (len(widths) - 1)), widths[-1], 3, 1)
        return shapes

    @classmethod
    def infer_widths(cls, state: Mapping[str, torch.Tensor]) -> list[int]:
        """Channels per resolution, read from the odd-numbered (upsampling) blocks."""
        first = require(ARCH, state, "layer1.conv.weight", 4)
        numbers = sorted(
            int(m.group(1)) for k in state if (m := re.fullmatch(r"layer(\d+)\.conv\.weight", k))
        )
        if numbers != list(range(1, len(numbers) + 1)) or len(numbers) % 2:
            raise StateDictMismatch(
                ARCH, reason="blocks must be layer1..layerN with N even; found "
                + ", ".join(f"layer{n}" for n in numbers),
            )
        widths = [int(first.shape[0])]
        for n in range(3, len(numbers) + 1, 2):
            widths.append(int(require(ARCH, state, f"layer{n}.conv.weight", 4).shape[0]))
        return widths

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], share: bool = False) -> "ProGANGenerator":
        widths = cls.infer_widths(state)
        check_state_dict(ARCH, cls.expected_shapes(widths), state)
        model = cls(widths)
        model.blocks.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, assign=share)
        return model.requires_grad_(False)  # an inference object: edits optimize their own tensors

    def public_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.blocks.state_dict().items()}

    def config(self) -> dict:
        return {"z_dim": self.z_dim, "widths": self.widths, "resolution": self.resolution}

    def forward(self, z: torch.Tensor, truncation: float = 1.0) -> torch.Tensor:
        """Images in [-1, 1], (N, 3, R, R), for latents (N, z_dim)."""
        self.check_latents(z, truncation)
        return self.blocks(z[:, :, None, None])

    def layer_specs(self) -> list[LayerSpec]:
        specs = []
        for name, block in self.blocks.named_children():
            # layer1's key is the latent (1×1) and the output block draws RGB: neither is a rule.
            if name == "layer1" or name.startswith("output_"):
                continue
            specs.append(LayerSpec(name, (block.conv,), block.conv.weight, in_axis=1, linear=True,
                                   weight_key=f"{name}.conv.weight"))
        return specs

    def default_layer(self) -> str:
        # The first block whose keys reach an eighth of the output resolution (32×32 at 256).
        target = max(4, self.resolution // 8)
        size = 4
        for name, block in self.blocks.named_children():
            if isinstance(block.up, Upsample2x):
                size *= 2
            if name != "layer1" and size >= target and not name.startswith("output_"):
                return name
        return self.layer_specs()[-1].name
