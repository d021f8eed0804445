"""The loss an edit's solvers minimize, and rendering with replaced weights.

- ``edited_values(layer, weight, key, extras)`` / ``edited_images(model, layer, weight, z)`` /
  ``render_with(model, weights, z)``: the layer's values or the images with weights replaced
  (the model is untouched; gradients flow).
- ``Objective(model, spec, goal)``: the goal term (value or image space, or whole target images
  for the multilayer method, with its batch and edges options) plus the pooled keep term, and a
  report of the goal losses before and after.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from rulewright.service.engine.edit import EditSpec
from rulewright.service.engine.generators.base import Generator, LayerSpec
from rulewright.service.engine.goals import Goal, _render
from rulewright.service.engine.sampling import latents


# ---------------------------------------------------------------------------------------------
# Weight plumbing


def _param_name(module: torch.nn.Module, param: torch.Tensor) -> str:
    for name, p in module.named_parameters():
        if p is param:
            return name
    raise LookupError("weight is not a parameter of this module")


def _dense(lam: torch.Tensor, direction: torch.Tensor, in_axis: int) -> torch.Tensor:
    """Λ ×_in Dᵀ as a weight-shaped tensor (differentiable in both)."""
    return (lam.movedim(in_axis, -1) @ direction.to(lam.dtype).T).movedim(-1, in_axis)


def edited_values(spec: LayerSpec, weight: torch.Tensor, key: torch.Tensor, extras: tuple) -> torch.Tensor:
    """The layer's values for ``key`` with its weight replaced by ``weight``."""
    out = functional_call(spec.modules[0], {_param_name(spec.modules[0], spec.weight): weight}, (key, *extras))
    for module in spec.modules[1:]:
        out = module(out)
    return out


def edited_images(model: Generator, layer: str, weight: torch.Tensor, z: torch.Tensor,
                  truncation: float = 1.0) -> torch.Tensor:
    """Images for ``z`` with ``layer``'s weight replaced by ``weight`` (the model is untouched)."""
    name = _param_name(model, model.layer(layer).weight)
    return functional_call(model, {name: weight}, (z, truncation))



# ---------------------------------------------------------------------------------------------
# Losses


def _masked_l1(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean |a − b| over mask (T, H, W) cells and all channels, averaged over targets."""
    per = ((a - b).abs() * mask[:, None]).sum(dim=(1, 2, 3)) / (mask.sum(dim=(1, 2)) * a.shape[1]).clamp_min(1)
    return per.mean()


def _edge_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean |∇a − ∇b| over horizontal and vertical neighbour differences: where the edges are."""
    dx = (a[..., :, 1:] - a[..., :, :-1]) - (b[..., :, 1:] - b[..., :, :-1])
    dy = (a[..., 1:, :] - a[..., :-1, :]) - (b[..., 1:, :] - b[..., :-1, :])
    return 0.5 * (dx.abs().mean() + dy.abs().mean())


Weights = dict[str, torch.Tensor]      # {parameter name: replacement tensor}


def render_with(model: Generator, weights: Weights, z: torch.Tensor, truncation: float = 1.0) -> torch.Tensor:
    """Images for ``z`` with some parameters replaced (the model is untouched; gradients flow)."""
    return functional_call(model, weights, (z, truncation))


class LowRankPaths:
    """Low-rank deltas run as side paths: ``conv(x, W + Λ×Dᵀ) = conv(x, W) + conv(Dᵀx, Λ)``.

    Same images as replacing the weights, but the frozen base convolution never computes a
    weight gradient, and the first edited layer (whose input is constant) none at all: about a
    third less work per step. Only for plain ``Conv2d``/``ConvTranspose2d`` modules (``supports``);
    a context manager whose hooks are always removed.
    """

    def __init__(self, parts: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]]):
        self.parts = parts             # (conv module, D (in, r), Λ in the weight's layout)
        self._handles: list = []

    @staticmethod
    def supports(layer: LayerSpec) -> bool:
        """Whether ``layer``'s weight belongs to a plain, ungrouped convolution."""
        m = layer.modules[0]
        return type(m) in (torch.nn.Conv2d, torch.nn.ConvTranspose2d) and m.groups == 1 and m.weight is layer.weight

    def _hook(self, d: torch.Tensor, lam: torch.Tensor):
        def add(module, args, output):
            x = torch.einsum("nchw,cr->nrhw", args[0], d)
            if isinstance(module, torch.nn.ConvTranspose2d):
                side = F.conv_transpose2d(x, lam, None, module.stride, module.padding, module.output_padding, 1,
                                          module.dilation)
            else:
                side = F.conv2d(x, lam, None, module.stride, module.padding, module.dilation, 1)
            return output + side
        return add

    def __enter__(self) -> "LowRankPaths":
        for module, d, lam in self.parts:
            self._handles.append(module.register_forward_hook(self._hook(d, lam)))
        return self

    def __exit__(self, *exc) -> None:
        while self._handles:
            self._handles.pop().remove()



class Objective:
    """The loss of candidate weights: the goal (value or image space) plus the pooled keep term.

    A candidate is one tensor (the edited layer's weight; method single) or a dict of replaced
    parameters by name (method multilayer). Method single measures the goal inside the goal
    boxes; multilayer measures the whole target image, whose outside-the-box part holds the
    targets themselves in place.
    """

    def __init__(self, model: Generator, spec: EditSpec, goal: Goal):
        self.model, self.spec, self.goal = model, spec, goal
        self.layer = model.layer(spec.layer)
        self.weight_name = _param_name(model, self.layer.weight)
        device = goal.z.device
        self.outside = 1 - goal.image_box.amax(0)           # outside every target's goal box
        self.whole = torch.ones_like(goal.image_box)
        keep = spec.keep
        self.pool = torch.arange(keep["pool_start"], keep["pool_start"] + keep["pool_size"])
        self.gen = torch.Generator().manual_seed(keep["seed"])
        self.fit_gen = torch.Generator().manual_seed(keep["seed"] + 1)
        self.device = device
        # Unedited pool images are rendered once when they fit in 256 MB, else per step.
        numel = keep["pool_size"] * 3 * model.resolution ** 2
        self.pool_images = None
        if keep["weight"] > 0 and numel * 4 <= 256 << 20:
            self.pool_images = torch.cat([
                _render(model, latents(self.pool[i:i + 64].tolist(), model.z_dim).to(device), spec.truncation)
                for i in range(0, len(self.pool), 64)])
        probe_seeds = self.pool[:16].tolist()
        self.probe_z = latents(probe_seeds, model.z_dim).to(device)
        self.probe_base = _render(model, self.probe_z, spec.truncation)

    def _weights(self, candidate: torch.Tensor | Weights) -> Weights:
        return candidate if isinstance(candidate, dict) else {self.weight_name: candidate}

    def _images(self, candidate, z: torch.Tensor) -> torch.Tensor:
        if isinstance(candidate, LowRankPaths):
            with candidate:
                return self.model(z, self.spec.truncation)
        return render_with(self.model, self._weights(candidate), z, self.spec.truncation)

    def goal_loss(self, candidate: torch.Tensor | Weights, space: str | None = None) -> torch.Tensor:
        """L1 to the goal: inside the goal boxes (value or image space), or over whole target images."""
        g = self.goal
        space = space or ("whole" if self.spec.method == "multilayer" else self.spec.goal)
        if space == "value":
            return _masked_l1(edited_values(self.layer, candidate, g.key, g.extras), g.goal_value, g.value_box)
        images = self._images(candidate, g.z)
        return _masked_l1(images, g.goal_image, self.whole if space == "whole" else g.image_box)

    def keep_loss(self, candidate: torch.Tensor | Weights) -> torch.Tensor:
        """Mean change outside the goal boxes on a few seeds drawn afresh from the pool."""
        idx = torch.randint(len(self.pool), (self.spec.keep["per_step"],), generator=self.gen)
        z = latents(self.pool[idx].tolist(), self.model.z_dim).to(self.device)
        base = self.pool_images[idx.to(self.device)] if self.pool_images is not None else \
            _render(self.model, z, self.spec.truncation)
        edited = self._images(candidate, z)
        mask = self.outside.expand(z.shape[0], -1, -1)
        return _masked_l1(edited, base, mask)

    def _fit_loss(self, candidate: Weights | LowRankPaths, batch: bool = True) -> torch.Tensor:
        """Multilayer: whole-image L1 (plus the edges term) on ``fit.batch`` targets drawn afresh."""
        g, fit = self.goal, self.spec.fit
        idx = None
        if batch and 0 < fit["batch"] < len(g.z):
            idx = torch.randperm(len(g.z), generator=self.fit_gen)[: fit["batch"]].to(g.z.device)
        if idx is None and fit["edges"] == 0:
            return self.goal_loss(candidate)          # the whole batch, as fitted before these options
        z, goal = (g.z, g.goal_image) if idx is None else (g.z[idx], g.goal_image[idx])
        images = self._images(candidate, z)
        loss = (images - goal).abs().mean()
        if fit["edges"] > 0:
            loss = loss + fit["edges"] * _edge_l1(images, goal)
        return loss

    def loss(self, candidate: torch.Tensor | Weights, batch: bool = True) -> torch.Tensor:
        """What the solver minimizes (``batch=False``: over every target, whatever ``fit.batch``)."""
        if self.spec.method == "multilayer":
            loss = self._fit_loss(candidate, batch)
        else:
            loss = self.goal_loss(candidate)
        if self.spec.keep["weight"] > 0:
            loss = loss + self.spec.keep["weight"] * self.keep_loss(candidate)
        return loss

    def report(self, candidate: torch.Tensor | Weights) -> dict:
        """Goal losses (value space only for one layer's weight) and the mean change over 16 probe seeds."""
        with torch.no_grad():
            probe = self._images(candidate, self.probe_z)
            g = self.goal
            images = self._images(candidate, g.z)          # once for both image losses (64+ targets)
            out = {"image_loss": _masked_l1(images, g.goal_image, g.image_box).item(),
                   "whole_image_loss": _masked_l1(images, g.goal_image, self.whole).item(),
                   "probe_change": (probe - self.probe_base).abs().mean().item()}
            if not isinstance(candidate, dict):
                out["value_loss"] = self.goal_loss(candidate, "value").item()
            return out
