"""StyleGAN2 in the layout of the common PyTorch port (``g_ema``: ``style.N.*``, ``conv1.*``,
``convs.N.*``, ``to_rgbs.N.*``, ``noises.noise_N``), in plain PyTorch ops, sizes inferred from the weights.

- ``StyleGAN2Generator``: the generator; ``from_state_dict`` reads the flat ``g_ema`` dict (with an
  optional ``latent_avg``), ``forward(z, truncation)`` draws images with the stored noise maps.
- ``normalize_checkpoint(obj)``: a checkpoint (``{"g_ema": {...}, "latent_avg": ...}`` or flat keys
  prefixed ``g_ema.``) to the flat dict ``from_state_dict`` reads.
- Building blocks, bottom-up: ``upfirdn2d``, ``make_kernel``, ``PixelNorm``, ``EqualLinear``,
  ``Blur``, ``Upsample``, ``FusedLeakyReLU`` (from ``stylegan2_ops``), then ``ModulatedConv2d``,
  ``NoiseInjection``, ``StyledConv``, ``ToRGB``, ``ConstantInput``.

The split that makes a layer rewritable: the port's modulated convolution scales the weight per
sample, ``W_b = scale · W · s_b`` (modulation along the input axis), then divides each output
channel by ``d_b = |W_b|``. Scaling the weight's input axis by ``s_b`` is the same as scaling the
input by ``s_b``, and demodulation is a per-output-channel factor that commutes with the
convolution and the blur. So a ``StyledConv`` is called as ``layer(key, s, noise)`` where the
key is the *style-modulated input* ``x · s`` (computed by ``StyledConv.modulate``), and its value
is ``activate(noise(demod(s) · conv(key, scale · W)))``: one convolution whose weight is shared by
the whole batch — exactly the rule ``v ≈ W k`` the rewriting method edits. The value is not
affine in ``W`` (demodulation reads it), so no closed-form update applies (``linear=False``).

Noise: the generator always adds the fixed ``noises.noise_N`` buffers (the port's
``randomize_noise=False``), so an image is a function of (weights, seed, truncation) alone.

``latent_avg`` (the centre of truncation) is a buffer. A checkpoint converted from the official
weights carries it; one saved by the port's training script does not, and then it is computed the
way the port's sampling script does (``mean_latent``): the mean of the mapping network's output over
``MEAN_LATENT_SAMPLES`` latents drawn from a CPU generator seeded ``MEAN_LATENT_SEED`` — not zeros,
since ``w`` space is not centred at the origin and truncating towards zero would distort images.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rulewright.service.engine import factored
from rulewright.service.engine.generators.base import Generator, LayerSpec, StateDictMismatch, check_state_dict, require
from rulewright.service.engine.generators.stylegan2_ops import (Blur, EqualLinear, FusedLeakyReLU, PixelNorm, Upsample,
                                                                fused_leaky_relu, make_kernel, upfirdn2d)

__all__ = ["ARCH", "BLUR_KERNEL", "Blur", "ConstantInput", "EqualLinear", "FusedLeakyReLU", "ModulatedConv2d",
           "NoiseInjection", "PixelNorm", "StyleGAN2Generator", "StyledConv", "ToRGB", "Upsample", "fused_leaky_relu",
           "make_kernel", "normalize_checkpoint", "upfirdn2d"]

ARCH = "stylegan2"
BLUR_KERNEL = (1, 3, 3, 1)          # the port's only blur kernel; its buffers are (4, 4)
MEAN_LATENT_SAMPLES = 4096          # the port's sampling script's truncation_mean
MEAN_LATENT_SEED = 0
_RGB = 3


# ---------------------------------------------------------------------------------------------
# Modulated convolution, split into style → style-scaled input (the key) → shared convolution


class ModulatedConv2d(nn.Module):
    """The port's modulated convolution, taking the style-scaled input and the style.

    Keys: ``weight`` (1, out, in, k, k), ``modulation.weight`` (in, style_dim),
    ``modulation.bias`` (in,), and ``blur.kernel`` (4, 4) when upsampling.
    ``forward(key, s)`` with ``key = x · s`` equals the port's ``forward(x, w)`` for ``s = modulation(w)``.
    """

    def __init__(
        self,
        in_channels: int,               # input channels (the key's dimension)
        out_channels: int,              # output channels
        kernel_size: int,               # odd spatial size of the kernel
        style_dim: int,                 # size of w
        demodulate: bool = True,        # normalize each output channel (False for to-RGB)
        upsample: bool = False,         # transposed convolution with stride 2, then blur
        blur_taps: Sequence[float] = BLUR_KERNEL,  # low-pass filter after upsampling
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.demodulate = demodulate
        self.upsample = upsample
        self.scale = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.weight = nn.Parameter(torch.randn(1, out_channels, in_channels, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channels, bias_init=1.0)
        if upsample:
            factor = 2
            p = (len(blur_taps) - factor) - (kernel_size - 1)
            self.blur = Blur(blur_taps, pad=((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor)
        else:
            self.blur = None

    def scaled_weight(self) -> torch.Tensor:
        """The shared convolution weight ``scale · W``, (out, in, k, k)."""
        return self.weight[0] * self.scale

    def demodulation(self, s: torch.Tensor) -> torch.Tensor:
        """Per-sample, per-output-channel factor ``1 / |scale · W · s|``, (N, out)."""
        energy = self.scaled_weight().pow(2).sum(dim=(2, 3))          # (out, in)
        return torch.rsqrt(s.pow(2) @ energy.t() + 1e-8)

    def forward(self, key: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        weight = self.scaled_weight()
        if self.upsample:
            # ConvTranspose2d wants (in, out, k, k); the port stores (out, in, k, k).
            out = F.conv_transpose2d(key, weight.transpose(0, 1), stride=2)
        else:
            out = F.conv2d(key, weight, padding=self.kernel_size // 2)
        # In a factored pass each image's version adds its own low-rank term here, before the
        # blur and the demodulation, which must both see the edited weight.
        terms = factored.current(self)
        if terms is not None:
            out = terms.add(out, key, self.low_rank_side())
        if self.upsample:
            out = self.blur(out)
        if self.demodulate:
            d = self.demodulation(s)
            if terms is not None:
                d = self._edited_demodulation(d, s, terms)
            out = out * d[:, :, None, None]
        return out

    def low_rank_side(self) -> factored.Side:
        """How a low-rank change of this weight runs beside it: ``scale·Λ`` convolved like ``scale·W``."""
        if self.upsample:
            return factored.Side(True, 2, 0, part=lambda lam: lam[0].transpose(0, 1), gain=self.scale)
        return factored.Side(False, 1, self.kernel_size // 2, part=lambda lam: lam[0], gain=self.scale)

    def _edited_demodulation(self, d: torch.Tensor, s: torch.Tensor, terms: factored.Terms) -> torch.Tensor:
        """``d`` with each edited row's factor computed from its version's weight.

        The version's weight is formed delta by delta as materializing it does (a transient
        tensor the size of this layer); each version's rows run padded to a group size, so
        their bits do not depend on how many share the batch.
        """
        d = d.clone()
        for rows, parts in terms.versions():
            rows = rows.to(s.device)
            weight = self.weight
            for delta in parts:
                weight = weight + delta.dense().to(weight.device, weight.dtype)
            energy = (weight[0] * self.scale).pow(2).sum(dim=(2, 3))
            n = rows.shape[0]
            rs = s.index_select(0, rows)
            if factored.group_size(n) > n:
                rs = torch.cat([rs, rs.new_zeros(factored.group_size(n) - n, rs.shape[1])])
            d.index_copy_(0, rows, torch.rsqrt(rs.pow(2) @ energy.t() + 1e-8)[:n])
        return d

    def extra_repr(self) -> str:
        return (f"weight={tuple(self.weight.shape)}, upsample={self.upsample}, "
                f"demodulate={self.demodulate}")


class NoiseInjection(nn.Module):
    """Add a noise map with a learned strength (keys: ``weight`` (1,))."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return x + self.weight * noise


class StyledConv(nn.Module):
    """One rewritable layer: modulated convolution → noise → fused leaky ReLU.

    Keys: ``conv.*`` (see ``ModulatedConv2d``), ``noise.weight``, ``activate.bias``.
    Call ``key, s = layer.modulate(x, w)`` and then ``layer(key, s, noise)``: hooks on the layer
    see the key (the style-modulated input) as the first argument and ``(s, noise)`` as extras.
    """

    def __init__(
        self,
        in_channels: int,               # input channels (the key's dimension)
        out_channels: int,              # output channels (the value's dimension)
        kernel_size: int,               # odd spatial size of the kernel
        style_dim: int,                 # size of w
        upsample: bool = False,         # double the resolution
        blur_taps: Sequence[float] = BLUR_KERNEL,  # low-pass filter after upsampling
    ):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, kernel_size, style_dim,
                                    demodulate=True, upsample=upsample, blur_taps=blur_taps)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channels)

    def modulate(self, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The key ``x · s`` (N, in, H, W) and the style ``s`` (N, in) for features ``x`` and latents ``w``."""
        if x.ndim != 4 or x.shape[1] != self.conv.in_channels:
            raise ValueError(f"features must have shape (N, {self.conv.in_channels}, H, W), got {tuple(x.shape)}")
        s = self.conv.modulation(w)
        return x * s[:, :, None, None], s

    def forward(self, key: torch.Tensor, s: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.activate(self.noise(self.conv(key, s), noise))


class ToRGB(nn.Module):
    """Project features to RGB (no demodulation) and add the upsampled image so far.

    Keys: ``conv.*`` (1×1 ``ModulatedConv2d``), ``bias`` (1, 3, 1, 1), ``upsample.kernel`` when upsampling.
    """

    def __init__(
        self,
        in_channels: int,               # feature channels
        style_dim: int,                 # size of w
        upsample: bool = True,          # upsample the skip image (False only for the 4×4 block)
        blur_taps: Sequence[float] = BLUR_KERNEL,  # filter of the skip upsampling
    ):
        super().__init__()
        self.upsample = Upsample(blur_taps) if upsample else None
        self.conv = ModulatedConv2d(in_channels, _RGB, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, _RGB, 1, 1))

    def forward(self, x: torch.Tensor, w: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        s = self.conv.modulation(w)
        out = self.conv(x * s[:, :, None, None], s) + self.bias
        if skip is not None:
            out = out + (self.upsample(skip) if self.upsample is not None else skip)
        return out


class ConstantInput(nn.Module):
    """The learned 4×4 input, shared by every sample (keys: ``input`` (1, C, 4, 4))."""

    def __init__(
        self,
        channels: int,                  # channels of the 4×4 map
    ):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, 4, 4))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.input.expand(w.shape[0], -1, -1, -1)

    def extra_repr(self) -> str:
        return f"input={tuple(self.input.shape)}"


# ---------------------------------------------------------------------------------------------
# Checkpoints and the generator


def normalize_checkpoint(obj: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The flat ``g_ema`` dict (plus ``latent_avg`` when present) from a checkpoint.

    Accepts ``{"g_ema": {...}, "latent_avg": tensor, ...}`` (other entries such as ``g``, ``d``,
    ``g_optim``, ``args`` are dropped), a flat dict whose generator keys are prefixed ``g_ema.``
    (as a safetensors file of such a checkpoint is), or a dict that is already flat (returned as
    is). Raises ``StateDictMismatch`` if a kept value is not a tensor.
    """
    g_ema = obj.get("g_ema")
    if isinstance(g_ema, Mapping):
        flat = dict(g_ema)
    elif any(isinstance(k, str) and k.startswith("g_ema.") for k in obj):
        flat = {k[len("g_ema."):]: v for k, v in obj.items() if k.startswith("g_ema.")}
    else:
        return _tensors_only(dict(obj))
    if "latent_avg" in obj:
        flat["latent_avg"] = obj["latent_avg"]
    return _tensors_only(flat)


def _tensors_only(flat: dict) -> dict[str, torch.Tensor]:
    bad = sorted(str(k) for k, v in flat.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise StateDictMismatch(ARCH, reason="not tensors: " + ", ".join(bad))
    return flat


def _max_index(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Largest N among keys ``{prefix}.N.*``, or -1 (so one missing key is reported as missing)."""
    found = [-1]
    for key in state:
        parts = key.split(".")
        if len(parts) >= 3 and parts[0] == prefix and parts[1].isdigit():
            found.append(int(parts[1]))
    return max(found)


def _styled_conv_shapes(prefix: str, in_ch: int, out_ch: int, k: int, style_dim: int,
                        upsample: bool) -> dict[str, tuple]:
    shapes = {
        f"{prefix}.conv.weight": (1, out_ch, in_ch, k, k),
        f"{prefix}.conv.modulation.weight": (in_ch, style_dim),
        f"{prefix}.conv.modulation.bias": (in_ch,),
        f"{prefix}.noise.weight": (1,),
        f"{prefix}.activate.bias": (out_ch,),
    }
    if upsample:
        shapes[f"{prefix}.conv.blur.kernel"] = (len(BLUR_KERNEL), len(BLUR_KERNEL))
    return shapes


def _to_rgb_shapes(prefix: str, in_ch: int, style_dim: int, upsample: bool) -> dict[str, tuple]:
    shapes = {
        f"{prefix}.conv.weight": (1, _RGB, in_ch, 1, 1),
        f"{prefix}.conv.modulation.weight": (in_ch, style_dim),
        f"{prefix}.conv.modulation.bias": (in_ch,),
        f"{prefix}.bias": (1, _RGB, 1, 1),
    }
    if upsample:
        shapes[f"{prefix}.upsample.kernel"] = (len(BLUR_KERNEL), len(BLUR_KERNEL))
    return shapes


class StyleGAN2Generator(Generator):
    """The port's generator (``g_ema``), built from inferred sizes; see the module docstring."""

    arch = ARCH
    supports_truncation = True

    def __init__(
        self,
        size: int,                      # output resolution, a power of two >= 4
        style_dim: int,                 # size of z and w
        n_mlp: int,                     # equalized linear layers in the mapping network
        channels: Sequence[int],        # feature channels at 4, 8, ..., size (log2(size) - 1 entries)
        kernel_size: int = 3,           # odd kernel size of every styled convolution
        lr_mlp: float = 0.01,           # mapping learning-rate multiplier (not stored in weights; the port's default)
    ):
        log_size = int(math.log2(size)) if size >= 1 else 0
        if size < 4 or 2**log_size != size:
            raise ValueError(f"size must be a power of two >= 4, got {size}")
        if len(channels) != log_size - 1:
            raise ValueError(f"need {log_size - 1} channel counts for size {size}, got {len(channels)}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if n_mlp < 0 or style_dim < 1 or min(channels) < 1:
            raise ValueError("n_mlp must be >= 0, style_dim and channels >= 1")
        super().__init__(z_dim=style_dim, resolution=size)
        self.size = size
        self.style_dim = style_dim
        self.n_mlp = n_mlp
        self.channels = [int(c) for c in channels]
        self.kernel_size = kernel_size
        self.lr_mlp = lr_mlp
        self.num_layers = (log_size - 2) * 2 + 1

        self.style = nn.Sequential(
            PixelNorm(),
            *[EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activation=True) for _ in range(n_mlp)],
        )
        self.input = ConstantInput(self.channels[0])
        self.conv1 = StyledConv(self.channels[0], self.channels[0], kernel_size, style_dim)
        self.to_rgb1 = ToRGB(self.channels[0], style_dim, upsample=False)
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        for prev, ch in zip(self.channels[:-1], self.channels[1:]):
            self.convs.append(StyledConv(prev, ch, kernel_size, style_dim, upsample=True))
            self.convs.append(StyledConv(ch, ch, kernel_size, style_dim))
            self.to_rgbs.append(ToRGB(ch, style_dim))
        self.noises = nn.Module()
        for i in range(self.num_layers):
            r = 2 ** ((i + 5) // 2)
            self.noises.register_buffer(f"noise_{i}", torch.randn(1, 1, r, r))
        self.register_buffer("latent_avg", torch.zeros(style_dim))
        self.eval()

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def expected_shapes(cls, size: int, style_dim: int, n_mlp: int, channels: Sequence[int],
                        kernel_size: int = 3) -> dict[str, tuple]:
        """Every key of the port's ``g_ema`` layout with its shape (``latent_avg`` excluded)."""
        shapes: dict[str, tuple] = {}
        for i in range(1, n_mlp + 1):
            shapes[f"style.{i}.weight"] = (style_dim, style_dim)
            shapes[f"style.{i}.bias"] = (style_dim,)
        c4 = channels[0]
        shapes["input.input"] = (1, c4, 4, 4)
        shapes.update(_styled_conv_shapes("conv1", c4, c4, kernel_size, style_dim, upsample=False))
        shapes.update(_to_rgb_shapes("to_rgb1", c4, style_dim, upsample=False))
        for j, (prev, ch) in enumerate(zip(channels[:-1], channels[1:])):
            shapes.update(_styled_conv_shapes(f"convs.{2 * j}", prev, ch, kernel_size, style_dim, upsample=True))
            shapes.update(_styled_conv_shapes(f"convs.{2 * j + 1}", ch, ch, kernel_size, style_dim, upsample=False))
            shapes.update(_to_rgb_shapes(f"to_rgbs.{j}", ch, style_dim, upsample=True))
        for i in range(2 * (len(channels) - 1) + 1):
            r = 2 ** ((i + 5) // 2)
            shapes[f"noises.noise_{i}"] = (1, 1, r, r)
        return shapes

    @classmethod
    def infer_sizes(cls, state: Mapping[str, torch.Tensor]) -> tuple[int, int, int, list[int], int]:
        """(size, style_dim, n_mlp, channels, kernel_size) read from the weights' shapes."""
        c4 = int(require(ARCH, state, "input.input", 4).shape[1])
        conv1 = require(ARCH, state, "conv1.conv.weight", 5)
        kernel_size = int(conv1.shape[3])
        style_dim = int(require(ARCH, state, "conv1.conv.modulation.weight", 2).shape[1])
        n_mlp = max(_max_index(state, "style"), 0)     # style.0 is the parameterless PixelNorm
        n_blocks = max(_max_index(state, "convs") // 2, _max_index(state, "to_rgbs")) + 1
        channels = [c4]
        for j in range(n_blocks):
            channels.append(int(require(ARCH, state, f"convs.{2 * j}.conv.weight", 5).shape[1]))
        if kernel_size % 2 == 0:
            raise StateDictMismatch(ARCH, reason=f"conv1.conv.weight has an even kernel size {kernel_size}")
        return 4 * 2**n_blocks, style_dim, n_mlp, channels, kernel_size

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], share: bool = False) -> "StyleGAN2Generator":
        """Build from the flat ``g_ema`` dict, optionally with ``latent_avg`` (see ``normalize_checkpoint``)."""
        size, style_dim, n_mlp, channels, kernel_size = cls.infer_sizes(state)
        expected = cls.expected_shapes(size, style_dim, n_mlp, channels, kernel_size)
        has_avg = "latent_avg" in state
        if has_avg:
            expected["latent_avg"] = (style_dim,)
        check_state_dict(ARCH, expected, state)
        model = cls(size, style_dim, n_mlp, channels, kernel_size)
        weights = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}
        if not has_avg:
            weights["latent_avg"] = model.latent_avg
        model.load_state_dict(weights, assign=share)
        if not has_avg:
            model.latent_avg = model.mean_latent()
        return model.requires_grad_(False)  # an inference object: edits optimize their own tensors

    def mean_latent(self, n: int = MEAN_LATENT_SAMPLES, seed: int = MEAN_LATENT_SEED) -> torch.Tensor:
        """Mean of ``w`` over ``n`` latents from a CPU generator seeded ``seed`` (the port's ``mean_latent``)."""
        param = self.input.input
        z = torch.randn(n, self.style_dim, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            return self.style(z.to(device=param.device, dtype=param.dtype)).mean(dim=0)

    def config(self) -> dict:
        return {"size": self.size, "style_dim": self.style_dim, "n_mlp": self.n_mlp,
                "channels": list(self.channels), "kernel_size": self.kernel_size, "lr_mlp": self.lr_mlp,
                "z_dim": self.z_dim, "resolution": self.resolution}

    # -- sampling --------------------------------------------------------------------------

    def forward(self, z: torch.Tensor, truncation: float | torch.Tensor = 1.0) -> torch.Tensor:
        """Images (N, 3, size, size) for latents (N, style_dim); ``truncation`` in [0, 1], or (N,) of them."""
        self.check_latents(z, truncation)
        return self.synthesize(self.mapping(z, truncation))

    def mapping(self, z: torch.Tensor, truncation: float | torch.Tensor = 1.0) -> torch.Tensor:
        """``w`` (N, style_dim), pulled towards ``latent_avg`` when ``truncation < 1`` (a number, or one per row)."""
        w = self.style(z)
        if isinstance(truncation, torch.Tensor):
            # One truncation per image (a batch of requests that differ in it): the same
            # arithmetic per element as a single number, and rows at 1 are left untouched.
            t = truncation.to(w.device, w.dtype)[:, None]
            return torch.where(t < 1, self.latent_avg + t * (w - self.latent_avg), w)
        if truncation < 1:  # the port leaves w untouched at 1 (bit for bit)
            w = self.latent_avg + truncation * (w - self.latent_avg)
        return w

    def synthesize(self, w: torch.Tensor) -> torch.Tensor:
        """Images from ``w``, the same ``w`` at every layer (no style mixing), with the fixed noise."""
        x = self._styled(self.conv1, self.input(w), w, self.noises.noise_0)
        skip = self.to_rgb1(x, w)
        for j, to_rgb in enumerate(self.to_rgbs):
            x = self._styled(self.convs[2 * j], x, w, getattr(self.noises, f"noise_{2 * j + 1}"))
            x = self._styled(self.convs[2 * j + 1], x, w, getattr(self.noises, f"noise_{2 * j + 2}"))
            skip = to_rgb(x, w, skip)
        return skip

    @staticmethod
    def _styled(layer: StyledConv, x: torch.Tensor, w: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        key, s = layer.modulate(x, w)
        return layer(key, s, noise)   # through __call__, so hooks see (key, s, noise)

    # -- rewritable layers -----------------------------------------------------------------

    def _named_layers(self) -> list[tuple[str, StyledConv, int]]:
        """(name, layer, key resolution) from input to output."""
        layers = [("conv1", self.conv1, 4)]
        for j in range(len(self.to_rgbs)):
            layers.append((f"convs.{2 * j}", self.convs[2 * j], 4 * 2**j))       # key before upsampling
            layers.append((f"convs.{2 * j + 1}", self.convs[2 * j + 1], 8 * 2**j))
        return layers

    def layer_specs(self) -> list[LayerSpec]:
        return [LayerSpec(name, (layer,), layer.conv.weight, in_axis=2, linear=False,
                          weight_key=f"{name}.conv.weight")
                for name, layer, _ in self._named_layers()]

    def default_layer(self) -> str:
        # The first layer whose keys are at least size/8 across: mid-level, like the DCGAN's 8×8
        # keys at 64 (convs.1 at 64, convs.5 at 256, convs.9 at 1024; conv1 at 32 or less).
        for name, _, key_res in self._named_layers():
            if key_res * 8 >= self.size:
                return name
        return self._named_layers()[-1][0]
