"""Small random generators written directly in each architecture's public layout (test data)."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from rulewright.service.engine.generators.base import Generator, LayerSpec


def tutorial_dcgan(z_dim: int = 16, widths: tuple[int, ...] = (32, 16, 8, 3), seed: int = 0) -> nn.Module:
    """The PyTorch DCGAN tutorial's generator structure (in-place ReLUs and all), randomly filled."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    c_in = z_dim
    for i, c_out in enumerate(widths):
        stride, pad = (1, 0) if i == 0 else (2, 1)
        layers.append(nn.ConvTranspose2d(c_in, c_out, 4, stride, pad, bias=False))
        if i < len(widths) - 1:
            bn = nn.BatchNorm2d(c_out)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.normal_(0, 0.1)
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 2.0)
            layers += [bn, nn.ReLU(True)]
        else:
            layers.append(nn.Tanh())
        c_in = c_out

    class Tutorial(nn.Module):
        def __init__(self):
            super().__init__()
            self.main = nn.Sequential(*layers)

        def forward(self, z):
            return self.main(z[:, :, None, None])

    model = Tutorial().eval()
    for m in model.modules():
        if isinstance(m, nn.ConvTranspose2d):
            m.weight.data.normal_(0, 0.05)
    return model


def dcgan_state(**kw) -> dict[str, torch.Tensor]:
    """State dict of ``tutorial_dcgan`` (keys ``main.N.*``)."""
    return {k: v.clone() for k, v in tutorial_dcgan(**kw).state_dict().items()}


def progan_state(widths: tuple[int, ...] = (32, 32, 16), seed: int = 0) -> dict[str, torch.Tensor]:
    """Keys and shapes of GAN Dissection's ProGAN (``layerN.conv.weight``, ``layerN.wscale.b``)."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = OrderedDict()

    def block(name: str, c_in: int, c_out: int, k: int) -> None:
        state[f"{name}.conv.weight"] = torch.randn(c_out, c_in, k, k, generator=g)
        state[f"{name}.wscale.b"] = torch.randn(c_out, generator=g) * 0.1

    block("layer1", widths[0], widths[0], 4)
    block("layer2", widths[0], widths[0], 3)
    n = 2
    for c_in, c_out in zip(widths[:-1], widths[1:]):
        block(f"layer{n + 1}", c_in, c_out, 3)
        block(f"layer{n + 2}", c_out, c_out, 3)
        n += 2
    res = 4 * 2 ** (len(widths) - 1)
    block(f"output_{res}x{res}", widths[-1], 3, 1)
    return state


def progan_reference(state: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """ProGAN's forward written out functionally from the published description (an oracle)."""
    names = sorted({k.split(".")[0] for k in state if k.startswith("layer")}, key=lambda s: int(s[5:]))
    out_name = next(k.split(".")[0] for k in state if k.startswith("output_"))
    x = z[:, :, None, None]
    for i, name in enumerate(names + [out_name]):
        w, b = state[f"{name}.conv.weight"], state[f"{name}.wscale.b"]
        x = x / torch.sqrt((x**2).mean(1, keepdim=True) + 1e-8)
        upsample = i >= 2 and i % 2 == 0 and name != out_name
        if upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        k = w.shape[-1]
        x = F.conv2d(x, w, padding={4: 3, 3: 1, 1: 0}[k])
        gain = 1.0 if name == out_name else math.sqrt(2)
        x = x * (gain / math.sqrt(w.shape[1] * k * k)) + b.view(1, -1, 1, 1)
        x = x.clamp(-1, 1) if name == out_name else F.leaky_relu(x, 0.2)
    return x


class TinyGenerator(Generator):
    """8×8 keys → one rewritable convolution ("edit") → RGB: the smallest generator with a rule."""

    arch = "tiny"

    def __init__(
        self,
        z_dim: int = 8,             # latent size
        channels: int = 6,          # key channels
        out: int = 5,               # value channels
        kernel: int = 1,            # kernel of the rewritable convolution (odd)
        transpose: bool = False,    # ConvTranspose2d (input axis 0) instead of Conv2d (axis 1)
        seed: int = 0,
    ):
        super().__init__(z_dim=z_dim, resolution=8)
        torch.manual_seed(seed)
        self.channels = channels
        self.fc = nn.Linear(z_dim, channels * 64)
        conv = nn.ConvTranspose2d if transpose else nn.Conv2d
        self.edit = conv(channels, out, kernel, 1, kernel // 2, bias=False)
        self.rgb = nn.Conv2d(out, 3, 1)
        self.transpose = transpose
        self.eval()
        self.requires_grad_(False)

    @classmethod
    def from_state_dict(cls, state, share=False):
        # Tests build it directly; it has no public checkpoint layout to load.
        raise TypeError("TinyGenerator is built by tests, not loaded from a state dict")

    def config(self) -> dict:
        return {}

    def forward(self, z, truncation=1.0):
        self.check_truncation(truncation)
        x = torch.tanh(self.fc(z)).view(-1, self.channels, 8, 8)
        return torch.tanh(self.rgb(F.leaky_relu(self.edit(x), 0.2)))

    def layer_specs(self):
        return [LayerSpec("edit", (self.edit,), self.edit.weight, in_axis=0 if self.transpose else 1,
                          linear=True, weight_key="edit.weight")]

    def default_layer(self) -> str:
        return "edit"



def random_deltas(model: Generator, seed: int, rank: int = 3, strength: float = 0.7,
                  layers: tuple[str, ...] | None = None) -> list:
    """A random low-rank delta on each rewritable layer (or on ``layers``), visible but small."""
    from rulewright.service.engine.delta import LowRankDelta

    g = torch.Generator().manual_seed(seed)
    out = []
    for spec in model.layer_specs():
        if layers is not None and spec.name not in layers:
            continue
        shape = list(spec.weight.shape)
        d_in, shape[spec.in_axis] = shape[spec.in_axis], rank
        direction = torch.linalg.qr(torch.randn(d_in, rank, generator=g))[0]
        lam = 0.2 * float(spec.weight.abs().mean()) * torch.randn(shape, generator=g)
        out.append(LowRankDelta(spec.weight_key, spec.in_axis, direction, lam, strength))
    return out


# A cheap edit on the tiny DCGAN below (32×32, main.6 keys 8×8): value goal, no keep term.
TINY_SPEC = {"layer": "main.6", "rank": 2, "goal": "value", "steps": 60, "stats": {"samples": 64},
             "keep": {"weight": 0}, "copy": {"seed": 1, "box": [8, 8, 16, 16]},
             "paste": [{"seed": 2, "box": [8, 8, 16, 16]}]}


def tiny_domain(tmp_path, max_resident: int = 4):
    """A Domain over a filesystem registry in ``tmp_path`` with a random DCGAN imported as ``tiny``."""
    from safetensors.torch import save_file

    from rulewright.service.domain.core import Domain

    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in dcgan_state(z_dim=16, widths=(32, 16, 8, 3)).items()}, str(path))
    domain = Domain.open(tmp_path / "data", device="cpu", max_resident=max_resident)
    domain.bootstrap("tiny", path)
    return domain


def store_edited_versions(domain, count: int, model: str = "tiny") -> list[str]:
    """References of ``count`` edited versions stored directly (random deltas on every layer, no
    rewrite run): siblings on version 1, except that the second is at strength 0 and the last is
    a chain on the first."""
    from rulewright.service.engine.delta import to_bytes, with_strength

    base = domain.generator(domain.resolve(f"{model}/1")).model
    refs: list[str] = []
    for i in range(count):
        deltas = random_deltas(base, seed=i, strength=0.5 + i / 10)
        if i == 1:
            deltas = with_strength(deltas, 0.0)
        parent = int(refs[0].split("/")[1]) if i == count - 1 and i > 0 else 1
        v = domain.registry.create_version(model, parent=parent, delta=to_bytes(deltas), spec={"seed": i})
        refs.append(f"{model}/{v.number}")
    return refs
