"""DCGAN in the PyTorch DCGAN tutorial's layout (``main.N.*``), sizes inferred from the weights.

The tutorial's generator is one ``nn.Sequential``: blocks of ConvTranspose2d → BatchNorm2d →
ReLU, then ConvTranspose2d → Tanh. The first convolution maps the latent (a 1×1 map) to 4×4
(stride 1, no padding); each later one doubles the resolution (stride 2, padding 1).

A rewritable layer's key is a ConvTranspose2d's input; its value is that convolution's output
after the eval-mode BatchNorm (affine, so it belongs to the value and keeps it linear in the
weight). ConvTranspose2d stores its weight as (in, out, kh, kw): the input axis is 0.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from rulewright.service.engine.generators.base import Generator, LayerSpec, StateDictMismatch, check_state_dict, require

ARCH = "dcgan"


def _conv_indices(state: Mapping[str, torch.Tensor]) -> list[int]:
    """Indices N of ``main.N.weight`` tensors with 4 dimensions (the transposed convolutions)."""
    found = []
    for key, tensor in state.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "main" and parts[2] == "weight" and parts[1].isdigit():
            if tensor.ndim == 4:
                found.append(int(parts[1]))
    return sorted(found)


class DCGANGenerator(Generator):
    """The tutorial's generator, built from inferred sizes."""

    arch = ARCH
    supports_truncation = False

    def __init__(
        self,
        z_dim: int,                 # latent size (the tutorial's nz)
        widths: list[int],          # output channels of each ConvTranspose2d; the last is the image's
        kernel_size: int = 4,       # every transposed convolution's kernel (the tutorial: 4)
    ):
        resolution = 4 * 2 ** (len(widths) - 1)
        super().__init__(z_dim=z_dim, resolution=resolution)
        self.widths = list(widths)
        self.kernel_size = kernel_size
        modules: list[nn.Module] = []
        in_ch = z_dim
        for i, out_ch in enumerate(widths):
            first, last = i == 0, i == len(widths) - 1
            stride, padding = (1, 0) if first else (2, 1)
            modules.append(nn.ConvTranspose2d(in_ch, out_ch, kernel_size, stride, padding, bias=False))
            if last:
                modules.append(nn.Tanh())
            else:
                modules.append(nn.BatchNorm2d(out_ch))
                modules.append(nn.ReLU(inplace=False))  # in-place would overwrite captured values
            in_ch = out_ch
        self.main = nn.Sequential(*modules)
        self.eval()

    @classmethod
    def expected_shapes(cls, z_dim: int, widths: list[int], kernel_size: int) -> dict[str, tuple]:
        """Every key of the public layout with its shape."""
        shapes: dict[str, tuple] = {}
        in_ch, index = z_dim, 0
        for i, out_ch in enumerate(widths):
            shapes[f"main.{index}.weight"] = (in_ch, out_ch, kernel_size, kernel_size)
            if i < len(widths) - 1:
                bn = index + 1
                for name in ("weight", "bias", "running_mean", "running_var"):
                    shapes[f"main.{bn}.{name}"] = (out_ch,)
                shapes[f"main.{bn}.num_batches_tracked"] = ()
            index += 3
            in_ch = out_ch
        return shapes

    @classmethod
    def infer_sizes(cls, state: Mapping[str, torch.Tensor]) -> tuple[int, list[int], int]:
        """(z_dim, widths, kernel_size) read from the weights of the transposed convolutions."""
        first = require(ARCH, state, "main.0.weight", 4)
        z_dim, kernel_size = int(first.shape[0]), int(first.shape[2])
        indices = _conv_indices(state)
        expected = list(range(0, 3 * len(indices), 3))
        if indices != expected:
            raise StateDictMismatch(
                ARCH, reason=f"transposed convolutions must sit at main.0, main.3, main.6, ...; found at "
                + ", ".join(f"main.{i}" for i in indices),
            )
        widths = [int(state[f"main.{i}.weight"].shape[1]) for i in indices]
        if len(widths) < 2:
            raise StateDictMismatch(ARCH, reason="need at least two transposed convolutions")
        return z_dim, widths, kernel_size

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], share: bool = False) -> "DCGANGenerator":
        z_dim, widths, kernel_size = cls.infer_sizes(state)
        check_state_dict(ARCH, cls.expected_shapes(z_dim, widths, kernel_size), state)
        model = cls(z_dim, widths, kernel_size)
        model.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()},
                              assign=share)
        return model.requires_grad_(False)  # an inference object: edits optimize their own tensors

    def config(self) -> dict:
        return {"z_dim": self.z_dim, "widths": self.widths, "kernel_size": self.kernel_size,
                "resolution": self.resolution}

    def forward(self, z: torch.Tensor, truncation: float = 1.0) -> torch.Tensor:
        """Images in [-1, 1], (N, 3, R, R), for latents (N, z_dim)."""
        self.check_latents(z, truncation)
        return self.main(z[:, :, None, None])

    def layer_specs(self) -> list[LayerSpec]:
        specs = []
        # main.0's key is the latent itself (a 1×1 map): no spatial context to select, so skip it.
        conv_indices = [i for i, m in enumerate(self.main) if isinstance(m, nn.ConvTranspose2d)]
        for index in conv_indices[1:]:
            conv = self.main[index]
            follower = self.main[index + 1]
            modules = (conv, follower) if isinstance(follower, nn.BatchNorm2d) else (conv,)
            specs.append(LayerSpec(f"main.{index}", modules, conv.weight, in_axis=0, linear=True,
                                   weight_key=f"main.{index}.weight"))
        return specs

    def default_layer(self) -> str:
        # The third transposed convolution (8×8 keys on the tutorial's 64×64 model): mid-level.
        names = [s.name for s in self.layer_specs()]
        return names[min(1, len(names) - 1)]
