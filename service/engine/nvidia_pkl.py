"""Read NVIDIA's StyleGAN2-ADA network pickles as data and convert their ``G_ema`` to ``stylegan2``.

- ``is_network_pickle(data)``, ``read_network_pickle(data)``: from ``nvidia_unpickle``, the
  restricted unpickler that reads the pickle as data and never runs its code (why that is safe
  is told there).
- ``convert_network_pickle(data)``: a ``Conversion``: ``G_ema`` in the ``stylegan2`` layout
  (what ``StyleGAN2Generator.from_state_dict`` reads) and a JSON summary of what was found.
- ``to_safetensors(conversion)``: the converted weights as a safetensors file (same input, same bytes).

Every refusal is an ``InvalidArgument`` on field ``weights`` that names what the reader found.

**Conversion.** NVIDIA's layers (``training/networks.py``) and the ``stylegan2`` port compute the
same functions with different stored scales; each tensor is rescaled so that the product the
forward pass uses is NVIDIA's: mapping and affine layers by ``weight_gain / scale`` and
``bias_gain / lr_mul`` (NVIDIA's ``lr_multiplier`` becomes the port's fixed one), modulated
3×3 weights by ``sqrt(fan_in)`` (NVIDIA demodulates the unscaled weight), ToRGB weights by
NVIDIA's ``weight_gain`` over the port's scale. ``noise_const`` becomes the fixed noise maps (the
port always draws NVIDIA's ``noise_mode='const'``), ``w_avg`` becomes ``latent_avg``. Supported:
unconditional StyleGAN2(-ADA) generators of the ``'skip'`` architecture (config F) with 3×3
convolutions, the ``[1, 3, 3, 1]`` filter, leaky ReLU, RGB output and ``z_dim == w_dim``.
Refused with the reason: StyleGAN3, TensorFlow-era pickles, ``c_dim > 0``, ``'orig'`` and
``'resnet'`` architectures, anything else. Not carried over: ``conv_clamp`` (a float16 guard that
clips activations at ±conv_clamp; nothing changes unless an activation reaches it) and the
float16 blocks (the port renders in float32, as NVIDIA's ``force_fp32=True`` does).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from rulewright.service.engine.errors import InvalidArgument
from rulewright.service.engine.generators.base import check_state_dict
from rulewright.service.engine.generators.stylegan2 import ARCH, BLUR_KERNEL, Blur, StyledConv, StyleGAN2Generator, ToRGB, Upsample, make_kernel
from rulewright.service.engine.nvidia_unpickle import FIELD, PersistentObject, is_network_pickle, read_network_pickle
from rulewright.service.engine.nvidia_unpickle import refuse as _refuse
from rulewright.service.engine.nvidia_unpickle import short_repr as _short

__all__ = ["FIELD", "FORMAT", "Conversion", "PersistentObject", "convert_network_pickle", "is_network_pickle",
           "read_network_pickle", "to_safetensors"]

FORMAT = "stylegan2-ada-pytorch network pickle"
_TENSOR_KINDS = ("_parameters", "_buffers")


# ---------------------------------------------------------------------------------------------
# The generator's tree


class _Node:
    """A ``PersistentObject`` that should be an ``nn.Module``, with its path for messages."""

    def __init__(self, obj: Any, path: str):
        if not isinstance(obj, PersistentObject):
            raise _refuse(f"{path} is a {type(obj).__name__}, not a persistent network module")
        self.obj = obj
        self.path = path

    @property
    def cls(self) -> str:
        return self.obj.class_name

    def expect(self, class_name: str) -> "_Node":
        if self.cls != class_name:
            raise _refuse(f"{self.path} is a {self.cls}, expected a StyleGAN2-ADA {class_name}")
        return self

    def has(self, name: str) -> bool:
        return name in self.obj.state

    def attr(self, name: str, *kinds: type) -> Any:
        if name not in self.obj.state:
            raise _refuse(f"{self.path} ({self.cls}) has no attribute {name!r}")
        value = self.obj.state[name]
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            raise _refuse(f"{self.path}.{name} is {_short(value)}, expected {' or '.join(k.__name__ for k in kinds)}")
        return value

    def number(self, name: str) -> float:
        try:
            value = float(self.attr(name, int, float))
        except OverflowError:
            value = math.inf
        if not math.isfinite(value) or value <= 0:
            raise _refuse(f"{self.path}.{name} is {value}, expected a positive number")
        return value

    def _dict(self, key: str) -> dict:
        value = self.obj.state.get(key, {})
        if not isinstance(value, dict):
            raise _refuse(f"{self.path}.{key} is a {type(value).__name__}, not a dict")
        return value

    def children(self) -> dict[str, "_Node"]:
        return {str(k): _Node(v, f"{self.path}.{k}") for k, v in self._dict("_modules").items() if v is not None}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for kind in _TENSOR_KINDS:
            for k, v in self._dict(kind).items():
                if v is None:
                    continue
                if type(v) is not torch.Tensor:
                    raise _refuse(f"{self.path}.{k} is a {type(v).__name__}, not a tensor")
                out[str(k)] = v
        return out

    def child(self, name: str, class_name: str) -> "_Node":
        found = self.children()
        if name not in found:
            raise _refuse(f"{self.path} ({self.cls}) has no submodule {name!r}")
        return found[name].expect(class_name)

    def only(self, children: set[str], tensors: set[str]) -> None:
        """Refuse submodules and tensors outside the given names (what StyleGAN2-ADA's class has)."""
        extra = sorted(set(self.children()) - children) + sorted(set(self.tensors()) - tensors)
        if extra:
            found = ", ".join(f"{self.path}.{n}" for n in extra)
            raise _refuse(f"{found}: not part of a StyleGAN2-ADA {self.cls} of the supported kind")

    def shape(self, name: str, ndim: int) -> tuple[int, ...]:
        """The shape of tensor ``name``, which must have ``ndim`` dimensions (sizes are read from it)."""
        t = self.tensors().get(name)
        if t is None or t.ndim != ndim:
            found = "missing" if t is None else f"of shape {tuple(t.shape)}"
            raise _refuse(f"{self.path}.{name} is {found}, expected {ndim} dimensions")
        return tuple(int(s) for s in t.shape)

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        tensors = self.tensors()
        if name not in tensors:
            raise _refuse(f"{self.path} ({self.cls}) has no tensor {name!r}")
        t = tensors[name]
        if tuple(t.shape) != tuple(shape):
            raise _refuse(f"{self.path}.{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if not t.is_floating_point():
            raise _refuse(f"{self.path}.{name} holds {t.dtype}, not floating-point numbers")
        t = t.to(torch.float32)
        if not torch.isfinite(t).all():
            raise _refuse(f"{self.path}.{name} holds NaN or infinite values")
        return t


def _walk(root: _Node) -> list[_Node]:
    """Every module under ``root``, depth first; a cycle (a module inside itself) is refused."""
    seen: set[int] = set()
    out: list[_Node] = []
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node.obj) in seen:
            raise _refuse(f"{node.path} appears twice in the module tree")
        seen.add(id(node.obj))
        out.append(node)
        stack.extend(reversed(list(node.children().values())))
    return out


def _refuse_other_generators(g: _Node) -> None:
    """Name the first sign of a generator this converter does not render (StyleGAN3 above all)."""
    for node in _walk(g):
        tensors = node.tensors()
        if node.cls == "SynthesisInput" or "magnitude_ema" in tensors or (
                node.cls == "SynthesisLayer" and node.has("use_fp16")):
            sign = ("is a SynthesisInput" if node.cls == "SynthesisInput" else
                    "has a magnitude_ema buffer" if "magnitude_ema" in tensors else "has use_fp16 per layer")
            raise _refuse(f"a StyleGAN3 (alias-free) generator: {node.path} {sign}; rulewright's stylegan2 "
                          "renders StyleGAN2 generators only")


# ---------------------------------------------------------------------------------------------
# Conversion


@dataclasses.dataclass(frozen=True)
class Conversion:
    """A network pickle's ``G_ema`` in the ``stylegan2`` layout, and what was found in the pickle."""

    state: dict[str, torch.Tensor]      # float32, contiguous; ``latent_avg`` from ``w_avg`` when present
    source: dict                        # JSON: format, sha256, NVIDIA's constructor arguments, sizes


def _scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
    # Skip the multiplication when the conventions agree, so those tensors stay bit for bit.
    return t.clone().contiguous() if factor == 1.0 else (t * factor).contiguous()


def _json(value: Any, budget: list[int] | None = None, depth: int = 0) -> Any:
    """Constructor arguments as JSON (other objects by their type's name), at most a few hundred
    values: they are recorded beside an import, and a pickle's memo can repeat one list endlessly."""
    budget = [500] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0 or depth > 6:
        return "…"
    if isinstance(value, dict):
        return {_short(k) if not isinstance(k, str) else k[:200]: _json(v, budget, depth + 1)
                for k, v in list(value.items())[:100]}
    if isinstance(value, (list, tuple)):
        return [_json(v, budget, depth + 1) for v in value[:100]]
    if value is None or isinstance(value, bool) or isinstance(value, int) and abs(value) < 2**63:
        return value
    if isinstance(value, str):
        return value[:1000]
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return f"<{type(value).__name__}>"


def _linear(fc: _Node, target, prefix: str, activation: str, shape: tuple[int, int], out: dict) -> None:
    """NVIDIA's FullyConnectedLayer onto the port's EqualLinear (``target``, for its scales)."""
    fc.expect("FullyConnectedLayer")
    fc.only(set(), {"weight", "bias"})
    found = fc.attr("activation", str)
    if found != activation:
        raise _refuse(f"{fc.path} has activation {found!r}; the port's layer here uses {activation!r}")
    weight_gain, bias_gain = fc.number("weight_gain"), fc.number("bias_gain")
    # NVIDIA: x @ (W · weight_gain)ᵀ + b · bias_gain; the port: x @ (W' · scale)ᵀ + b' · lr_mul.
    out[f"{prefix}.weight"] = _scaled(fc.tensor("weight", shape), weight_gain / target.scale)
    out[f"{prefix}.bias"] = _scaled(fc.tensor("bias", shape[:1]), bias_gain / target.lr_mul)


def _check_filter(node: _Node, name: str) -> None:
    found = node.tensor(name, (len(BLUR_KERNEL), len(BLUR_KERNEL)))
    if not torch.allclose(found, make_kernel(BLUR_KERNEL), rtol=0, atol=1e-6):
        raise _refuse(f"{node.path}.{name} is not the [1, 3, 3, 1] filter, the only one the port has")


def _styled(layer: _Node, target: StyledConv, prefix: str, noise_key: str, res: int, up: int,
            w_dim: int, out: dict, clamps: set) -> None:
    """A SynthesisLayer onto the port's StyledConv."""
    layer.expect("SynthesisLayer")
    layer.only({"affine"}, {"weight", "bias", "resample_filter", "noise_const", "noise_strength"})
    conv = target.conv
    if layer.attr("up", int) != up:
        raise _refuse(f"{layer.path} upsamples by {layer.attr('up', int)}, expected {up}")
    if layer.attr("activation", str) != "lrelu":
        raise _refuse(f"{layer.path} has activation {layer.attr('activation', str)!r}; the port uses 'lrelu'")
    if abs(layer.number("act_gain") - math.sqrt(2)) > 1e-6:
        raise _refuse(f"{layer.path}.act_gain is {layer.number('act_gain')}; the port's leaky ReLU has gain sqrt(2)")
    weight = layer.tensor("weight", (conv.out_channels, conv.in_channels, conv.kernel_size, conv.kernel_size))
    _check_filter(layer, "resample_filter")
    clamps.add(layer.attr("conv_clamp", int, float, type(None)) if layer.has("conv_clamp") else None)
    # NVIDIA demodulates the unscaled weight, the port the weight times `scale`: dividing by
    # `scale` makes the two identical, the 1e-8 inside the square root included.
    out[f"{prefix}.conv.weight"] = _scaled(weight, 1.0 / conv.scale)[None]
    _linear(layer.child("affine", "FullyConnectedLayer"), conv.modulation, f"{prefix}.conv.modulation",
            "linear", (conv.in_channels, w_dim), out)
    if layer.attr("use_noise", bool):
        out[f"{prefix}.noise.weight"] = layer.tensor("noise_strength", ()).reshape(1).clone()
        out[noise_key] = layer.tensor("noise_const", (res, res)).reshape(1, 1, res, res).clone()
    else:
        layer.only({"affine"}, {"weight", "bias", "resample_filter"})
        out[f"{prefix}.noise.weight"] = torch.zeros(1)
        out[noise_key] = torch.zeros(1, 1, res, res)
    out[f"{prefix}.activate.bias"] = layer.tensor("bias", (conv.out_channels,)).clone()
    if conv.upsample:
        out[f"{prefix}.conv.blur.kernel"] = Blur(BLUR_KERNEL, (0, 0), upsample_factor=2).kernel


def _to_rgb(torgb: _Node, target: ToRGB, prefix: str, w_dim: int, out: dict, clamps: set) -> None:
    """A ToRGBLayer onto the port's ToRGB."""
    torgb.expect("ToRGBLayer")
    torgb.only({"affine"}, {"weight", "bias"})
    conv = target.conv
    weight = torgb.tensor("weight", (3, conv.in_channels, 1, 1))
    clamps.add(torgb.attr("conv_clamp", int, float, type(None)) if torgb.has("conv_clamp") else None)
    # NVIDIA scales the styles by weight_gain, the port the weight by `scale`: the same product.
    out[f"{prefix}.conv.weight"] = _scaled(weight, torgb.number("weight_gain") / conv.scale)[None]
    _linear(torgb.child("affine", "FullyConnectedLayer"), conv.modulation, f"{prefix}.conv.modulation",
            "linear", (conv.in_channels, w_dim), out)
    out[f"{prefix}.bias"] = torgb.tensor("bias", (3,)).reshape(1, 3, 1, 1).clone()
    if target.upsample is not None:
        out[f"{prefix}.upsample.kernel"] = Upsample(BLUR_KERNEL).kernel


def _generator(top: Any) -> _Node:
    if isinstance(top, PersistentObject):
        return _Node(top, "G")
    if isinstance(top, dict):
        if "G_ema" in top:
            return _Node(top["G_ema"], "G_ema")
        found = ", ".join(sorted(k if isinstance(k, str) else _short(k) for k in top)[:10]) or "nothing"
        raise _refuse(f"the pickle holds {found} but no G_ema (the generator with averaged weights)")
    raise _refuse(f"the pickle holds a {type(top).__name__}, not a network dict with G_ema")


def convert_network_pickle(data: bytes) -> Conversion:
    """Read a StyleGAN2-ADA network pickle as data and convert its ``G_ema`` (see the module docstring)."""
    try:
        return _convert(data)
    except InvalidArgument:
        raise
    except Exception as exc:  # noqa: BLE001 -- whatever else a crafted pickle provokes is still bad input
        raise _refuse(f"cannot convert the network ({type(exc).__name__}: {_short(str(exc))})") from None


@dataclasses.dataclass
class _Network:
    """The parts of a checked ``Generator`` the conversion reads, and its sizes."""

    g: _Node
    mapping: _Node
    blocks: dict[int, _Node]          # resolution → SynthesisBlock
    res: int
    w_dim: int
    n_mlp: int
    channels: list[int]
    kernel: int
    clamps: set = dataclasses.field(default_factory=set)   # the layers' conv_clamp values, noted while converting


def _convert(data: bytes) -> Conversion:
    net = _network(_generator(read_network_pickle(data)))
    state = _convert_tensors(net)
    return Conversion(state, _source(data, net))


def _check_sizes(g: _Node) -> int:
    """The generator's resolution, once its sizes are ones the port draws."""
    z_dim, c_dim, w_dim = g.attr("z_dim", int), g.attr("c_dim", int), g.attr("w_dim", int)
    res, img_channels = g.attr("img_resolution", int), g.attr("img_channels", int)
    if c_dim != 0:
        raise _refuse(f"a conditional generator (c_dim={c_dim}): rulewright's stylegan2 draws from latents "
                      "alone and has no class labels")
    if img_channels != 3:
        raise _refuse(f"{g.path} draws {img_channels}-channel images; the port draws RGB (3)")
    if z_dim != w_dim or w_dim < 1:
        raise _refuse(f"z_dim {z_dim} and w_dim {w_dim} differ; the port's latents and styles share one size")
    log_res = int(math.log2(res)) if res >= 4 else 0
    if 2**log_res != res:
        raise _refuse(f"img_resolution {res} is not a power of two >= 4")
    return res


def _skip_blocks(synthesis: _Node, resolutions: list[int]) -> dict[int, _Node]:
    """The synthesis blocks by resolution, each checked to be a 'skip' block with the port's filter."""
    synthesis.only({f"b{r}" for r in resolutions}, set())
    blocks = {r: synthesis.child(f"b{r}", "SynthesisBlock") for r in resolutions}
    for r, block in blocks.items():
        arch = block.attr("architecture", str)
        if arch != "skip":
            why = {"resnet": "residual blocks with 1x1 skip convolutions",
                   "orig": "only the last block draws RGB"}.get(arch, "an unknown architecture")
            raise _refuse(f"{block.path} has architecture {arch!r} ({why}); rulewright's stylegan2 is the 'skip' "
                          "generator (config F)")
        block.only({"conv1", "torgb"} if r == 4 else {"conv0", "conv1", "torgb"},
                   {"const", "resample_filter"} if r == 4 else {"resample_filter"})
        _check_filter(block, "resample_filter")
    return blocks


def _network(g: _Node) -> _Network:
    """``g`` checked to be a generator the port can draw, with its parts and sizes."""
    g.expect("Generator")
    _refuse_other_generators(g)
    res = _check_sizes(g)
    g.only({"mapping", "synthesis"}, set())
    mapping = g.child("mapping", "MappingNetwork")
    synthesis = g.child("synthesis", "SynthesisNetwork")
    n_mlp = mapping.attr("num_layers", int)
    if n_mlp < 0:
        raise _refuse(f"{mapping.path}.num_layers is {n_mlp}")
    mapping.only({f"fc{i}" for i in range(n_mlp)}, {"w_avg"})
    resolutions = [2**i for i in range(2, int(math.log2(res)) + 1)]
    blocks = _skip_blocks(synthesis, resolutions)
    channels = [blocks[4].shape("const", 3)[0]]
    channels += [blocks[r].child("conv0", "SynthesisLayer").shape("weight", 4)[0] for r in resolutions[1:]]
    kernel = blocks[4].child("conv1", "SynthesisLayer").shape("weight", 4)[-1]
    if kernel != 3:
        raise _refuse(f"{blocks[4].path}.conv1 has {kernel}x{kernel} kernels; only StyleGAN2's 3x3 are converted")
    if min(channels) < 1:
        raise _refuse(f"{synthesis.path} has a block without channels: {channels}")
    return _Network(g, mapping, blocks, res, g.attr("w_dim", int), n_mlp, channels, kernel)


def _convert_tensors(net: _Network) -> dict[str, torch.Tensor]:
    """Every tensor in the port's layout, rescaled to the port's conventions (``net.clamps`` noted)."""
    w_dim, blocks, mapping = net.w_dim, net.blocks, net.mapping
    # The port's own layers, for the scales its forward pass applies (read, never duplicated here).
    port = StyleGAN2Generator(net.res, w_dim, net.n_mlp, net.channels, net.kernel)
    out: dict[str, torch.Tensor] = {}
    clamps = net.clamps
    for i in range(net.n_mlp):
        _linear(mapping.child(f"fc{i}", "FullyConnectedLayer"), port.style[i + 1], f"style.{i + 1}", "lrelu",
                (w_dim, w_dim), out)
    if "w_avg" in mapping.tensors():
        out["latent_avg"] = mapping.tensor("w_avg", (w_dim,)).clone()
    out["input.input"] = blocks[4].tensor("const", (net.channels[0], 4, 4))[None].clone()
    _styled(blocks[4].child("conv1", "SynthesisLayer"), port.conv1, "conv1", "noises.noise_0", 4, 1, w_dim, out,
            clamps)
    _to_rgb(blocks[4].child("torgb", "ToRGBLayer"), port.to_rgb1, "to_rgb1", w_dim, out, clamps)
    for j, r in enumerate(sorted(blocks)[1:]):
        b = blocks[r]
        _styled(b.child("conv0", "SynthesisLayer"), port.convs[2 * j], f"convs.{2 * j}",
                f"noises.noise_{2 * j + 1}", r, 2, w_dim, out, clamps)
        _styled(b.child("conv1", "SynthesisLayer"), port.convs[2 * j + 1], f"convs.{2 * j + 1}",
                f"noises.noise_{2 * j + 2}", r, 1, w_dim, out, clamps)
        _to_rgb(b.child("torgb", "ToRGBLayer"), port.to_rgbs[j], f"to_rgbs.{j}", w_dim, out, clamps)
    expected = StyleGAN2Generator.expected_shapes(net.res, w_dim, net.n_mlp, net.channels, net.kernel)
    if "latent_avg" in out:
        expected["latent_avg"] = (w_dim,)
    check_state_dict(ARCH, expected, out)      # a converter bug, not bad input, if this ever fails
    return out


def _source(data: bytes, net: _Network) -> dict:
    """The JSON summary of what the pickle held, recorded beside the import."""
    g = net.g
    fc0 = net.mapping.children().get("fc0")
    clamp_values = sorted({float(c) for c in net.clamps if c is not None})
    return {
        "format": FORMAT,
        "sha256": hashlib.sha256(data).hexdigest(),
        "network": g.path,
        "z_dim": g.attr("z_dim", int), "w_dim": net.w_dim, "c_dim": g.attr("c_dim", int),
        "img_resolution": net.res, "img_channels": g.attr("img_channels", int),
        "mapping_layers": net.n_mlp,
        "mapping_lr_multiplier": fc0.number("bias_gain") if fc0 is not None else None,
        "channels": {str(r): c for r, c in zip(sorted(net.blocks), net.channels)},
        "architecture": "skip",
        "fp16_blocks": [r for r, b in net.blocks.items() if b.has("use_fp16") and b.attr("use_fp16", bool)],
        "conv_clamp": clamp_values[0] if len(clamp_values) == 1 else (clamp_values or None),
        "init_args": _json(g.obj.state.get("_init_args", [])),
        "init_kwargs": _json(g.obj.state.get("_init_kwargs", {})),
    }


def to_safetensors(conversion: Conversion) -> bytes:
    """The converted weights as safetensors: keys sorted, one sorted-JSON metadata entry (same input, same bytes)."""
    meta = {"arch": ARCH, "source": conversion.source}
    tensors = {k: conversion.state[k].contiguous() for k in sorted(conversion.state)}
    return save_safetensors(tensors, metadata={"rulewright": json.dumps(meta, sort_keys=True)})
