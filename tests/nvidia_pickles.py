"""Network pickles in NVIDIA's StyleGAN2-ADA format, written without NVIDIA's code.

The format (``torch_utils/persistence.py`` of stylegan2-ada-pytorch): every network module
pickles as ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with ``meta = dict(
type='class', version=6, module_src=<its module's source>, class_name=..., state=<the module's
__dict__>)``; tensors pickle the way torch pickles them (``torch._utils._rebuild_parameter``,
``torch.storage._load_from_bytes``). ``nvidia_names()`` puts stand-in modules under those names
in ``sys.modules`` while pickling, so that ``pickle`` writes NVIDIA's global names; the reader
under test never sees them (``dumps`` removes them again).

- ``random_tensors(...)``: a generator's tensors under NVIDIA's names (``mapping.fc0.weight``, …).
- ``from_port(model)``: the same from one of our ``StyleGAN2Generator`` by the inverse mapping.
- ``generator(tensors, cfg)``: the persistent-object tree of ``networks.Generator`` holding them,
  with the attributes NVIDIA's constructors set (``weight_gain``, ``act_gain``, ``up``, …).
- ``dumps(obj)``: pickle bytes; ``network_pickle(G)``: the dict a training snapshot holds.
- ``reference_forward(tensors, cfg, z, psi)``: images by NVIDIA's formulas (``networks.py``:
  fused modulated convolution, ``conv2d_resample``, ``upfirdn2d``, ``bias_act`` with clamping).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import pickle
import sys
import types
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

SOURCE = "# the source of training/networks.py travels here; the reader keeps it as text\n"
FILTER = [1, 3, 3, 1]


@dataclasses.dataclass
class Config:
    """The constructor arguments of a small StyleGAN2-ADA generator."""

    resolution: int = 16
    w_dim: int = 32
    n_mlp: int = 2
    channels: tuple[int, ...] = (32, 16, 8)         # at 4, 8, 16, …
    lr_multiplier: float = 0.01                      # mapping_kwargs.lr_multiplier
    conv_clamp: float | None = 256
    use_noise: bool = True
    architecture: str = "skip"
    num_fp16_res: int = 2

    @property
    def resolutions(self) -> list[int]:
        return [2**i for i in range(2, int(math.log2(self.resolution)) + 1)]


@contextlib.contextmanager
def nvidia_names():
    """Stand-in modules named like NVIDIA's, present only while pickling."""
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("only its name is pickled")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    util = types.ModuleType("dnnlib.util")
    util.EasyDict = EasyDict
    modules = {"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": persistence,
               "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": util}
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield modules
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


class EasyDict(dict):
    """Pickles as ``dnnlib.util.EasyDict`` (NEWOBJ of the class, then its items), being that name
    while ``nvidia_names()`` is active."""


EasyDict.__module__ = "dnnlib.util"


class Persistent:
    """Pickles as NVIDIA's persistence format does: the reconstruct function and one meta dict."""

    def __init__(self, class_name: str, state: dict, module_src: str = SOURCE, version: int = 6,
                 kind: str = "class"):
        self.class_name, self.state, self.module_src, self.version, self.kind = (
            class_name, state, module_src, version, kind)

    def __reduce__(self):
        meta = dict(type=self.kind, version=self.version, module_src=self.module_src,
                    class_name=self.class_name, state=self.state)
        return (sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,))


def module(class_name: str, params: dict | None = None, buffers: dict | None = None,
           children: dict | None = None, init_args: tuple = (), init_kwargs: dict | None = None,
           **attrs: Any) -> Persistent:
    """A persistent ``torch.nn.Module``: its ``__dict__`` as torch 1.x pickles it, plus NVIDIA's extras."""
    state = {
        "training": False,
        "_parameters": collections.OrderedDict(
            (k, None if v is None else torch.nn.Parameter(v.detach().clone(), requires_grad=False))
            for k, v in (params or {}).items()),
        "_buffers": collections.OrderedDict((k, v.detach().clone()) for k, v in (buffers or {}).items()),
        "_non_persistent_buffers_set": set(),
        "_backward_hooks": collections.OrderedDict(),
        "_forward_hooks": collections.OrderedDict(),
        "_forward_pre_hooks": collections.OrderedDict(),
        "_state_dict_hooks": collections.OrderedDict(),
        "_load_state_dict_pre_hooks": collections.OrderedDict(),
        "_modules": collections.OrderedDict(children or {}),
        **attrs,
        "_init_args": tuple(init_args),
        "_init_kwargs": dict(init_kwargs or {}),
    }
    return Persistent(class_name, state)


def setup_filter() -> torch.Tensor:
    f = torch.tensor(FILTER, dtype=torch.float32)
    f = f.ger(f)
    return f / f.sum()


# ---------------------------------------------------------------------------------------------
# Tensors under NVIDIA's names


def random_tensors(cfg: Config, seed: int = 0) -> dict[str, torch.Tensor]:
    """A generator's parameters and buffers, named as ``G_ema.named_parameters()`` names them."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, offset=0.0):
        return torch.randn(shape, generator=g) * scale + offset

    t: dict[str, torch.Tensor] = {}
    w = cfg.w_dim
    for i in range(cfg.n_mlp):
        t[f"mapping.fc{i}.weight"] = rnd(w, w) / cfg.lr_multiplier
        t[f"mapping.fc{i}.bias"] = rnd(w, scale=0.1 / cfg.lr_multiplier)
    t["mapping.w_avg"] = rnd(w, scale=0.5)
    ch = dict(zip(cfg.resolutions, cfg.channels))
    for r in cfg.resolutions:
        b = f"synthesis.b{r}"
        t[f"{b}.resample_filter"] = setup_filter()
        layers = ["conv1"] if r == 4 else ["conv0", "conv1"]
        if r == 4:
            t[f"{b}.const"] = rnd(ch[4], 4, 4)
        for name in layers:
            cin = ch[r // 2] if name == "conv0" else ch[r]
            p = f"{b}.{name}"
            t[f"{p}.weight"] = rnd(ch[r], cin, 3, 3)
            t[f"{p}.bias"] = rnd(ch[r], scale=0.1)
            t[f"{p}.affine.weight"] = rnd(cin, w)
            t[f"{p}.affine.bias"] = rnd(cin, scale=0.1, offset=1.0)
            t[f"{p}.resample_filter"] = setup_filter()
            if cfg.use_noise:
                t[f"{p}.noise_const"] = rnd(r, r)
                t[f"{p}.noise_strength"] = rnd(scale=0.2)
        if cfg.architecture == "skip" or r == cfg.resolution:
            t[f"{b}.torgb.weight"] = rnd(3, ch[r], 1, 1, scale=0.2)   # images of about unit size
            t[f"{b}.torgb.bias"] = rnd(3, scale=0.1)
            t[f"{b}.torgb.affine.weight"] = rnd(ch[r], w)
            t[f"{b}.torgb.affine.bias"] = rnd(ch[r], scale=0.1, offset=1.0)
        if cfg.architecture == "resnet" and r > 4:
            t[f"{b}.skip.weight"] = rnd(ch[r], ch[r // 2], 1, 1)
            t[f"{b}.skip.resample_filter"] = setup_filter()
    return t


def from_port(model) -> tuple[dict[str, torch.Tensor], Config]:
    """NVIDIA-named tensors that compute what one of our ``StyleGAN2Generator`` computes (the inverse
    of the conversion, mapping lr_multiplier 0.01 as the port's)."""
    res = model.size
    cfg = Config(resolution=res, w_dim=model.style_dim, n_mlp=model.n_mlp, channels=tuple(model.channels),
                 lr_multiplier=model.lr_mlp)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    t: dict[str, torch.Tensor] = {}
    for i in range(cfg.n_mlp):
        layer = model.style[i + 1]
        gain = cfg.lr_multiplier / math.sqrt(cfg.w_dim)
        t[f"mapping.fc{i}.weight"] = sd[f"style.{i + 1}.weight"] * (layer.scale / gain)
        t[f"mapping.fc{i}.bias"] = sd[f"style.{i + 1}.bias"] * (layer.lr_mul / cfg.lr_multiplier)
    t["mapping.w_avg"] = sd["latent_avg"]

    def styled(ours: str, theirs: str, noise: int, r: int, scale: float):
        t[f"{theirs}.weight"] = sd[f"{ours}.conv.weight"][0] * scale
        t[f"{theirs}.bias"] = sd[f"{ours}.activate.bias"]
        t[f"{theirs}.affine.weight"] = sd[f"{ours}.conv.modulation.weight"]
        t[f"{theirs}.affine.bias"] = sd[f"{ours}.conv.modulation.bias"]
        t[f"{theirs}.resample_filter"] = setup_filter()
        t[f"{theirs}.noise_const"] = sd[f"noises.noise_{noise}"][0, 0]
        t[f"{theirs}.noise_strength"] = sd[f"{ours}.noise.weight"][0]

    def to_rgb(ours: str, theirs: str):
        t[f"{theirs}.weight"] = sd[f"{ours}.conv.weight"][0]     # the port's scale is NVIDIA's weight_gain
        t[f"{theirs}.bias"] = sd[f"{ours}.bias"].reshape(3)
        t[f"{theirs}.affine.weight"] = sd[f"{ours}.conv.modulation.weight"]
        t[f"{theirs}.affine.bias"] = sd[f"{ours}.conv.modulation.bias"]

    t["synthesis.b4.const"] = sd["input.input"][0]
    t["synthesis.b4.resample_filter"] = setup_filter()
    styled("conv1", "synthesis.b4.conv1", 0, 4, model.conv1.conv.scale)
    to_rgb("to_rgb1", "synthesis.b4.torgb")
    for j, r in enumerate(cfg.resolutions[1:]):
        b = f"synthesis.b{r}"
        t[f"{b}.resample_filter"] = setup_filter()
        styled(f"convs.{2 * j}", f"{b}.conv0", 2 * j + 1, r, model.convs[2 * j].conv.scale)
        styled(f"convs.{2 * j + 1}", f"{b}.conv1", 2 * j + 2, r, model.convs[2 * j + 1].conv.scale)
        to_rgb(f"to_rgbs.{j}", f"{b}.torgb")
    return t, cfg


# ---------------------------------------------------------------------------------------------
# The persistent-object tree


def _fc(t: dict, prefix: str, activation: str, lr: float, bias_init: float = 0) -> Persistent:
    w = t[f"{prefix}.weight"]
    return module("FullyConnectedLayer", params={"weight": w, "bias": t[f"{prefix}.bias"]},
                  init_args=(w.shape[1], w.shape[0]),
                  init_kwargs={"activation": activation, "lr_multiplier": lr, "bias_init": bias_init},
                  activation=activation, weight_gain=np.float64(lr / np.sqrt(w.shape[1])), bias_gain=lr)


def _layer(t: dict, prefix: str, cfg: Config, r: int, up: int) -> Persistent:
    params = {"weight": t[f"{prefix}.weight"], "bias": t[f"{prefix}.bias"]}
    buffers = {"resample_filter": t[f"{prefix}.resample_filter"]}
    if cfg.use_noise:
        params["noise_strength"] = t[f"{prefix}.noise_strength"]
        buffers["noise_const"] = t[f"{prefix}.noise_const"]
    out_ch, in_ch = params["weight"].shape[:2]
    return module("SynthesisLayer", params=params, buffers=buffers,
                  children={"affine": _fc(t, f"{prefix}.affine", "linear", 1, bias_init=1)},
                  init_args=(in_ch, out_ch), init_kwargs={"w_dim": cfg.w_dim, "resolution": r, "up": up},
                  resolution=r, up=up, use_noise=cfg.use_noise, activation="lrelu", conv_clamp=cfg.conv_clamp,
                  padding=1, act_gain=np.float64(np.sqrt(2)))


def _torgb(t: dict, prefix: str, cfg: Config) -> Persistent:
    in_ch = t[f"{prefix}.weight"].shape[1]
    return module("ToRGBLayer", params={"weight": t[f"{prefix}.weight"], "bias": t[f"{prefix}.bias"]},
                  children={"affine": _fc(t, f"{prefix}.affine", "linear", 1, bias_init=1)},
                  init_args=(in_ch, 3, cfg.w_dim), conv_clamp=cfg.conv_clamp,
                  weight_gain=np.float64(1 / np.sqrt(in_ch)))


def generator(t: dict[str, torch.Tensor], cfg: Config, extra_children: dict | None = None) -> Persistent:
    """``networks.Generator`` (z_dim = w_dim, c_dim 0, RGB) holding tensors ``t``."""
    fp16_from = max(2 ** (int(math.log2(cfg.resolution)) + 1 - cfg.num_fp16_res), 8)
    blocks = {}
    for r in cfg.resolutions:
        b = f"synthesis.b{r}"
        children = {}
        if r > 4:
            children["conv0"] = _layer(t, f"{b}.conv0", cfg, r, 2)
        children["conv1"] = _layer(t, f"{b}.conv1", cfg, r, 1)
        if cfg.architecture == "skip" or r == cfg.resolution:
            children["torgb"] = _torgb(t, f"{b}.torgb", cfg)
        if f"{b}.skip.weight" in t:
            children["skip"] = module("Conv2dLayer", params={"weight": t[f"{b}.skip.weight"]},
                                      buffers={"resample_filter": t[f"{b}.skip.resample_filter"]}, up=2)
        blocks[f"b{r}"] = module(
            "SynthesisBlock", params={"const": t[f"{b}.const"]} if r == 4 else {},
            buffers={"resample_filter": t[f"{b}.resample_filter"]}, children=children,
            in_channels=0 if r == 4 else cfg.channels[cfg.resolutions.index(r) - 1], w_dim=cfg.w_dim, resolution=r,
            img_channels=3, is_last=r == cfg.resolution, architecture=cfg.architecture, use_fp16=r >= fp16_from,
            channels_last=False, num_conv=len(children) - ("torgb" in children), num_torgb=int("torgb" in children))
    synthesis = module("SynthesisNetwork", children=blocks, w_dim=cfg.w_dim, img_resolution=cfg.resolution,
                       img_resolution_log2=int(math.log2(cfg.resolution)), img_channels=3,
                       block_resolutions=cfg.resolutions, num_ws=2 * len(cfg.resolutions))
    mapping = module("MappingNetwork",
                     buffers={"w_avg": t["mapping.w_avg"]} if "mapping.w_avg" in t else {},
                     children={f"fc{i}": _fc(t, f"mapping.fc{i}", "lrelu", cfg.lr_multiplier)
                               for i in range(cfg.n_mlp)},
                     z_dim=cfg.w_dim, c_dim=0, w_dim=cfg.w_dim, num_ws=2 * len(cfg.resolutions),
                     num_layers=cfg.n_mlp, w_avg_beta=0.995)
    kwargs = {"z_dim": cfg.w_dim, "c_dim": 0, "w_dim": cfg.w_dim, "img_resolution": cfg.resolution, "img_channels": 3,
              "mapping_kwargs": EasyDict(num_layers=cfg.n_mlp, lr_multiplier=cfg.lr_multiplier),
              "synthesis_kwargs": EasyDict(channel_base=cfg.channels[0] * 4, channel_max=cfg.channels[0],
                                           num_fp16_res=cfg.num_fp16_res, conv_clamp=cfg.conv_clamp,
                                           architecture=cfg.architecture)}
    return module("Generator", children={"synthesis": synthesis, "mapping": mapping, **(extra_children or {})},
                  init_kwargs=kwargs, z_dim=cfg.w_dim, c_dim=0, w_dim=cfg.w_dim, img_resolution=cfg.resolution,
                  img_channels=3, num_ws=2 * len(cfg.resolutions))


def network_pickle(G: Any, **extra: Any) -> dict:
    """What a StyleGAN2-ADA snapshot holds: G, D, G_ema, augment_pipe, training_set_kwargs."""
    D = module("Discriminator", params={"b4.fc.weight_": torch.randn(4, 4)}, c_dim=0, img_resolution=16)
    return {"G": G, "D": D, "G_ema": G, "augment_pipe": None,
            "training_set_kwargs": EasyDict(class_name="training.dataset.ImageFolderDataset", path="faces.zip",
                                            use_labels=False, max_size=70000, xflip=True, resolution=16),
            **extra}


def dumps(obj: Any, protocol: int = 3) -> bytes:
    """Pickle bytes of ``obj`` with NVIDIA's names (protocol 3: Python 3.7's, which NVIDIA used)."""
    with nvidia_names():
        return pickle.dumps(obj, protocol=protocol)


# ---------------------------------------------------------------------------------------------
# NVIDIA's forward pass, from the formulas of training/networks.py and torch_utils/ops


def _upfirdn2d(x: torch.Tensor, f: torch.Tensor, up: int, pad: tuple[int, int], gain: float) -> torch.Tensor:
    """``upfirdn2d._upfirdn2d_ref``: zero-insert, pad, convolve (flipped filter) with gain."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h, 1, w, 1)
    x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1]).reshape(n, c, h * up, w * up)
    x = F.pad(x, [pad[0], pad[1], pad[0], pad[1]])
    f = (f * gain).flip([0, 1])[None, None].repeat(c, 1, 1, 1)
    return F.conv2d(x, f, groups=c)


def _bias_act(x: torch.Tensor, b: torch.Tensor, act: str, clamp: float | None) -> torch.Tensor:
    x = x + b.reshape([1, -1] + [1] * (x.ndim - 2))
    if act == "lrelu":
        x = F.leaky_relu(x, 0.2) * np.sqrt(2)
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return x


def _fc_forward(t, prefix, x, act, lr):
    w = t[f"{prefix}.weight"]
    return _bias_act(x.matmul((w * (lr / np.sqrt(w.shape[1]))).t()), t[f"{prefix}.bias"] * lr, act, None)


def _modconv(x, weight, styles, demodulate: bool, up: int) -> torch.Tensor:
    """The fused modulated_conv2d: per-sample weights, demodulation folded in, one grouped convolution."""
    n = x.shape[0]
    o, i, kh, kw = weight.shape
    w = weight[None] * styles.reshape(n, 1, -1, 1, 1)
    if demodulate:
        w = w * (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt().reshape(n, -1, 1, 1, 1)
    x = x.reshape(1, -1, *x.shape[2:])
    if up == 1:
        x = F.conv2d(x, w.reshape(-1, i, kh, kw), padding=kh // 2, groups=n)
    else:   # conv2d_resample's transposed path: stride-2 transposed conv, then the filter, gain up**2
        w = w.transpose(1, 2).reshape(n * i, o, kh, kw)
        x = F.conv_transpose2d(x, w, stride=2, groups=n)
        x = _upfirdn2d(x, setup_filter(), 1, (1, 1), gain=4)
    return x.reshape(n, -1, *x.shape[2:])


def reference_forward(t: dict[str, torch.Tensor], cfg: Config, z: torch.Tensor, psi: float = 1.0) -> torch.Tensor:
    """``G(z, c=None, truncation_psi=psi, noise_mode='const', force_fp32=True)`` by NVIDIA's formulas."""
    x = z * (z.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()
    for i in range(cfg.n_mlp):
        x = _fc_forward(t, f"mapping.fc{i}", x, "lrelu", cfg.lr_multiplier)
    w = t["mapping.w_avg"].lerp(x, psi) if psi != 1 else x
    img = None
    for r in cfg.resolutions:
        b = f"synthesis.b{r}"
        if r == 4:
            x = t[f"{b}.const"][None].repeat(z.shape[0], 1, 1, 1)
        for name, up in ([("conv1", 1)] if r == 4 else [("conv0", 2), ("conv1", 1)]):
            p = f"{b}.{name}"
            styles = _fc_forward(t, f"{p}.affine", w, "linear", 1)
            x = _modconv(x, t[f"{p}.weight"], styles, True, up)
            if cfg.use_noise:
                x = x + t[f"{p}.noise_const"] * t[f"{p}.noise_strength"]
            x = _bias_act(x, t[f"{p}.bias"], "lrelu", cfg.conv_clamp)
        if img is not None:   # upfirdn2d.upsample2d: up 2, padding [2, 1], gain 4
            img = _upfirdn2d(img, t[f"{b}.resample_filter"], 2, (2, 1), gain=4)
        p = f"{b}.torgb"
        styles = _fc_forward(t, f"{p}.affine", w, "linear", 1) * (1 / np.sqrt(t[f"{p}.weight"].shape[1]))
        y = _bias_act(_modconv(x, t[f"{p}.weight"], styles, False, 1), t[f"{p}.bias"], "linear", cfg.conv_clamp)
        img = img + y if img is not None else y
    return img
