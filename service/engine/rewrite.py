"""Rewrite a rule, erase a rule, zero a direction — and the baselines they are measured against.

- ``rewrite(model, spec, moment=None, progress=None) -> Edit``: run an edit spec
  (op ``rewrite``: copy → paste → context; op ``erase``; op ``zero``). Never modifies ``model``.
- ``context_direction(C, keys, rank, ridge)``: D, the whitened top-``rank`` directions of keys.
- ``build_goal(model, spec)``: the targets (keys, goal values, goal images, boxes) of a spec.
- ``full_rank_update(model, spec, ...)`` and ``finetune_all(model, spec, ...)``: the baselines.
- ``edited_images(model, layer, weight, z)``: render with one weight replaced (gradients flow).

The update is ``W' = W + Λ ×_in Dᵀ``: Λ has the weight's shape with the input-channel axis
replaced by the rank, so the change acts only on the part of each key inside span(D). Keys with
``Dᵀk = 0`` — keys orthogonal to the context in the C⁻¹ metric — see no change at all.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call

from rulewright.service.engine import nethook
from rulewright.service.engine.delta import LowRankDelta
from rulewright.service.engine.edit import Edit, EditSpec
from rulewright.service.engine.errors import InvalidArgument
from rulewright.service.engine.generators.base import Generator, LayerSpec
from rulewright.service.engine.progress import Progress
from rulewright.service.engine.regions import Region, bbox
from rulewright.service.engine.sampling import latents
from rulewright.service.engine.stats import SecondMoment, key_moment


PROGRESS_EVERY = 10     # optimization steps between progress events


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
# Direction


def whitening(C: torch.Tensor, ridge: float) -> torch.Tensor:
    """(C + ridge·tr(C)/d·I)^(-1/2), float64."""
    C = C.double()
    d = C.shape[0]
    reg = C + ridge * torch.trace(C) / d * torch.eye(d, dtype=C.dtype, device=C.device)
    evals, evecs = torch.linalg.eigh(reg)
    evals = evals.clamp_min(evals.max() * 1e-12)
    return (evecs * evals.rsqrt()) @ evecs.T


def context_direction(C: torch.Tensor, keys: torch.Tensor, rank: int, ridge: float = 1e-4) -> torch.Tensor:
    """D (d, rank), orthonormal: span of C^(-1/2)·q for the top right singular vectors q of the
    whitened context keys (rows of ``keys``, already weighted). For one key this is ∝ C⁻¹k."""
    if keys.shape[0] < rank:
        raise InvalidArgument("rank", f"rank {rank} exceeds the {keys.shape[0]} context keys selected")
    w = whitening(C, ridge)
    _, _, vh = torch.linalg.svd(keys.double() @ w, full_matrices=False)
    q = vh[:rank].T
    direction, _ = torch.linalg.qr(w @ q)
    # Sign convention: the context keys project positively (so responses read as "matches").
    signs = torch.sign((keys.double() @ direction).sum(0))
    signs[signs == 0] = 1
    return (direction * signs).float()


# ---------------------------------------------------------------------------------------------
# Goals


@dataclasses.dataclass
class Goal:
    """What the edited layer must draw, for a batch of T target samples."""

    seeds: list[int]
    z: torch.Tensor                  # (T, z_dim)
    key: torch.Tensor                # (T, C_in, Hk, Wk)
    extras: tuple                    # extra layer inputs captured with the keys
    value: torch.Tensor              # (T, C_out, Hv, Wv) the unedited values
    goal_value: torch.Tensor         # (T, C_out, Hv, Wv) v*
    value_box: torch.Tensor          # (T, Hv, Wv) 1 inside each target's goal box
    image: torch.Tensor              # (T, 3, R, R) the unedited images
    goal_image: torch.Tensor         # (T, 3, R, R) the pasted (or erased) pictures
    image_box: torch.Tensor          # (T, R, R) 1 inside each target's goal box
    key_box: torch.Tensor            # (T, Hk, Wk) keys under the goal box
    context_keys: torch.Tensor       # (n, C_in) context keys, rows scaled by sqrt(mask weight)
    info: dict = dataclasses.field(default_factory=dict)


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate the last two axes by (dy, dx), filling with zeros."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    if h - abs(dy) > 0 and w - abs(dx) > 0:
        out[..., yd, xd] = x[..., ys, xs]
    return out


def _feather(alpha: torch.Tensor, sigma: float) -> torch.Tensor:
    """``alpha`` (R, R) blurred by a Gaussian of ``sigma`` pixels inside its own support: the
    paste fades out towards the box's border instead of ending in a hard rectangle."""
    if sigma <= 0:
        return alpha
    radius = max(1, math.ceil(2.5 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=alpha.dtype, device=alpha.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    # Eroding by 1.25 sigma first leaves about a tenth of the paste on the box's border and keeps
    # the blurred alpha (almost) inside the box, where the user put it.
    e = math.ceil(1.25 * sigma)
    inner = -F.max_pool2d(-alpha[None, None], 2 * e + 1, stride=1, padding=e)
    blurred = F.conv2d(F.conv2d(inner, k.view(1, 1, 1, -1), padding=(0, radius)), k.view(1, 1, -1, 1),
                       padding=(radius, 0))
    return blurred[0, 0]


def _box_mask(alpha: torch.Tensor) -> torch.Tensor:
    """1 inside the tight box around alpha's nonzero cells."""
    out = torch.zeros_like(alpha)
    b = bbox(alpha)
    if b is not None:
        out[b[0]:b[2], b[1]:b[3]] = 1
    return out


def _center(alpha: torch.Tensor) -> tuple[float, float]:
    y0, x0, y1, x1 = bbox(alpha)
    return (y0 + y1) / 2, (x0 + x1) / 2


def _render(model: Generator, z: torch.Tensor, truncation: float) -> torch.Tensor:
    with torch.no_grad():
        return model(z, truncation)


def _capture(model: Generator, layer: str, z: torch.Tensor, truncation: float):
    with torch.no_grad(), nethook.Trace(model, layer, stop=True) as tr:
        model(z, truncation)
    return tr.key, tr.extras, tr.value


def _context_keys(model: Generator, layer: str, regions: Sequence[Region], truncation: float,
                  device: torch.device) -> torch.Tensor:
    rows = []
    res = model.resolution
    for region in regions:
        key, _, _ = _capture(model, layer, latents([region.seed], model.z_dim).to(device), truncation)
        w = region.at(key.shape[-1], res).to(device).reshape(-1)
        flat = key[0].reshape(key.shape[1], -1).T
        keep = w > 0
        rows.append(flat[keep] * w[keep, None].sqrt())
    return torch.cat(rows)


def _rewrite_goal(model: Generator, spec: EditSpec, device: torch.device) -> Goal:
    res, t = model.resolution, spec.truncation
    z_src = latents([spec.copy.seed], model.z_dim).to(device)
    _, _, v_src = _capture(model, spec.layer, z_src, t)
    img_src = _render(model, z_src, t)
    hv = v_src.shape[-1]
    if res % hv:
        raise InvalidArgument("layer", f"value grid {hv} does not divide the image size {res}")
    cell = res // hv
    a_src_v = spec.copy.at(hv, res).to(device)
    if a_src_v.max() == 0:
        raise InvalidArgument("copy", "the copy region covers no cell of the layer's value grid")
    a_src_img = spec.copy.alpha(res).to(device)
    cy, cx = _center(a_src_v)

    targets = spec.targets                   # the user's pastes, then any found by context search
    z = latents([r.seed for r in targets], model.z_dim).to(device)
    key, extras, value = _capture(model, spec.layer, z, t)
    image = _render(model, z, t)
    goal_value, goal_image = value.clone(), image.clone()
    value_box = torch.zeros(len(targets), hv, hv, device=device)
    image_box = torch.zeros(len(targets), res, res, device=device)
    offsets, pasted_alpha = [], []
    for i, region in enumerate(targets):
        py, px = _center(region.alpha(res))
        dy, dx = round(py / cell - cy), round(px / cell - cx)
        a_v = _shift(a_src_v, dy, dx)
        if a_v.max() == 0:
            field = f"paste[{i}]" if i < len(spec.paste) else f"found[{i - len(spec.paste)}]"
            raise InvalidArgument(field, "the pasted copy falls outside the image")
        a_img = _shift(a_src_img, dy * cell, dx * cell)
        a_goal = _feather(a_img, spec.fit["feather"]) if spec.method == "multilayer" else a_img
        goal_value[i] = value[i] * (1 - a_v) + _shift(v_src[0], dy, dx) * a_v
        goal_image[i] = image[i] * (1 - a_goal) + _shift(img_src[0], dy * cell, dx * cell) * a_goal
        value_box[i] = _box_mask(a_v)
        image_box[i] = _box_mask(a_img)
        offsets.append([dy * cell, dx * cell])
        pasted_alpha.append(a_img.cpu())
    hk = key.shape[-1]
    key_box = F.adaptive_max_pool2d(image_box[:, None], hk)[:, 0] if hk < res else image_box.clone()
    # The context is the user's: found targets add examples of the goal, not of the rule's context.
    context = spec.context or [Region(seed=r.seed, mask=a) for r, a in zip(spec.paste, pasted_alpha)]
    ctx = _context_keys(model, spec.layer, context, t, device)
    return Goal([r.seed for r in targets], z, key, extras, value, goal_value, value_box, image, goal_image,
                image_box, key_box, ctx, {"context": context, "offsets_px": offsets, "copy_alpha_value": a_src_v.cpu(),
                                          "source_value": v_src.cpu(), "source_image": img_src.cpu()})


def value_mean_square(model: Generator, layer: str, seeds: Sequence[int], truncation: float = 1.0,
                      batch_size: int = 32) -> torch.Tensor:
    """Per-unit E[a²] of a layer's values over every location of ``seeds`` (erase's normalizer)."""
    device = next(model.parameters()).device
    total, count = None, 0
    seeds = list(seeds)
    for start in range(0, len(seeds), batch_size):
        v = nethook.latents_to_values(model, layer, latents(seeds[start:start + batch_size], model.z_dim).to(device),
                                      truncation)
        sq = v.detach().double().pow(2).sum(dim=(0, 2, 3))
        total = sq if total is None else total + sq
        count += v.shape[0] * v.shape[2] * v.shape[3]
    return (total / count).float()


def _erase_goal(model: Generator, spec: EditSpec, device: torch.device) -> Goal:
    res, t = model.resolution, spec.truncation
    regions = list(spec.context) + list(spec.found or [])    # found: more samples where the rule holds
    n_user = len(spec.context)
    z = latents([r.seed for r in regions], model.z_dim).to(device)
    key, extras, value = _capture(model, spec.layer, z, t)
    image = _render(model, z, t)
    hv, hk = value.shape[-1], key.shape[-1]
    alpha_v = torch.stack([r.at(hv, res) for r in regions]).to(device)
    seeds = range(spec.stats["seed_start"], spec.stats["seed_start"] + min(spec.stats["samples"], 256))
    energy = value_mean_square(model, spec.layer, seeds, t)
    # The units to switch off are the user's context's: found samples only get the same units erased.
    inside = (value[:n_user].pow(2) * alpha_v[:n_user, None]).sum(dim=(0, 2, 3)) / alpha_v[:n_user].sum().clamp_min(1e-12)
    units = torch.argsort(inside / energy.clamp_min(1e-12), descending=True)[: spec.erase["units"]]
    goal_value = value.clone()
    goal_value[:, units] = value[:, units] * (1 - alpha_v[:, None])
    with torch.no_grad():
        goal_image = nethook.values_to_image(model, spec.layer, z, goal_value, t)
    value_box = torch.stack([_box_mask(a) for a in alpha_v])
    image_box = torch.stack([_box_mask(r.alpha(res)) for r in regions]).to(device)
    key_box = F.adaptive_max_pool2d(image_box[:, None], hk)[:, 0] if hk < res else image_box.clone()
    ctx = _context_keys(model, spec.layer, spec.context, t, device)
    return Goal([r.seed for r in regions], z, key, extras, value, goal_value, value_box, image, goal_image,
                image_box, key_box, ctx, {"units": units.tolist(), "context": list(spec.context)})


def build_goal(model: Generator, spec: EditSpec) -> Goal:
    """The targets of a spec: what the layer must draw where (op rewrite or erase)."""
    device = next(model.parameters()).device
    return _rewrite_goal(model, spec, device) if spec.op == "rewrite" else _erase_goal(model, spec, device)


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


# ---------------------------------------------------------------------------------------------
# Solvers


def _cosine_adam(params: list[torch.Tensor], loss_fn: Callable[[], torch.Tensor], steps: int, lr: float,
                 progress: Progress | None, stage: str = "optimize") -> float:
    progress = progress or Progress()
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    loss_value = float("nan")
    for step in range(steps):
        progress.check(f"{stage} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        sched.step()
        loss_value = loss.item()
        if step % PROGRESS_EVERY == 0 or step == steps - 1:
            progress.report(stage, step + 1, steps, loss_value)
    return loss_value


def best_adam(params: list[torch.Tensor], loss_fn: Callable[[], torch.Tensor], steps: int, lr: float,
              schedule: str = "cosine", progress: Progress | None = None,
              stage: str = "optimize", final: Callable[[], torch.Tensor] | None = None) -> tuple[float, float, int]:
    """Adam that hands back its best iterate: ``params`` end at the lowest loss seen.

    The loss of step t is measured at the parameters step t starts from, so the starting point
    (no edit, when the factors start at zero) is a candidate, and a short or diverging run can
    never return anything worse than it. Returns (best loss, starting loss, best step).
    With ``final`` (a loss over every target, where ``loss_fn`` draws a batch of them) the
    candidates are the start and the last iterate, compared by ``final``: a batch's loss says
    too little about the whole to pick among iterates.
    """
    progress = progress or Progress()
    opt = torch.optim.Adam(params, lr=lr)
    factor = (lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))) if schedule == "cosine" else (lambda s: 1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    best, best_step, start = float("inf"), 0, float("nan")
    saved = [p.detach().clone() for p in params]

    def consider(value: float, step: int) -> None:
        nonlocal best, best_step
        if value < best:                       # NaN never wins
            best, best_step = value, step
            for keep, p in zip(saved, params):
                keep.copy_(p.detach())

    if final is not None:
        with torch.no_grad():
            consider(final().item(), 0)
        start = best
    for step in range(steps):
        progress.check(f"{stage} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        value = loss.item()
        if step == 0 and final is None:
            start = value
        if final is None:
            consider(value, step)
        loss.backward()
        opt.step()
        sched.step()
        if step % PROGRESS_EVERY == 0 or step == steps - 1:
            progress.report(stage, step + 1, steps, value, best_loss=best)
    with torch.no_grad():
        consider((final or loss_fn)().item(), steps)      # the last update, which no step measured yet
        for keep, p in zip(saved, params):
            p.copy_(keep)
    return best, start, best_step


def _lam_shape(weight: torch.Tensor, in_axis: int, rank: int) -> list[int]:
    shape = list(weight.shape)
    shape[in_axis] = rank
    return shape


def _reparam(goal: Goal, direction: torch.Tensor) -> torch.Tensor:
    """T (r, r) making the goal keys' projections onto D·T decorrelated with unit RMS.

    Goal keys project onto a C⁻¹-aligned direction at several σ, so Adam at the paper's step size
    oscillates; in this basis one unit of Λ moves a goal value by about one unit.
    """
    # Keys one cell around the box feed the box's values through the kernel: count them too.
    near = F.max_pool2d(goal.key_box[:, None], 3, stride=1, padding=1)[:, 0]
    keys = goal.key.permute(0, 2, 3, 1)[near > 0]                    # (M, C_in)
    p = keys.double() @ direction.double()                          # (M, r)
    gram = p.T @ p / max(p.shape[0], 1)
    evals, evecs = torch.linalg.eigh(gram)
    # Directions the goal keys barely touch are not amplified more than 10×: blowing them up
    # would let Adam's fixed step move keys elsewhere by a lot.
    evals = evals.clamp_min(evals.max().clamp_min(1e-30) * 1e-2)
    return ((evecs * evals.rsqrt()) @ evecs.T).float()


def solve_optimize(objective: Objective, direction: torch.Tensor, spec: EditSpec,
                   progress: Progress | None = None) -> torch.Tensor:
    """Λ (orthonormal-D basis) by Adam on the constrained update, cosine-decayed; the best iterate."""
    layer = objective.layer
    w0 = layer.weight.detach()
    t = _reparam(objective.goal, direction).to(w0.device)
    d_work = direction.to(w0.device) @ t
    lam = torch.zeros(_lam_shape(w0, layer.in_axis, direction.shape[1]), device=w0.device, requires_grad=True)
    best_adam([lam], lambda: objective.loss(w0 + _dense(lam, d_work, layer.in_axis)), spec.steps, spec.lr,
              "cosine", progress)
    # Back to the orthonormal basis: Λ_orth[..., r] = Σ_r' T[r, r'] Λ[..., r'].
    return (lam.detach().movedim(layer.in_axis, -1) @ t.T).movedim(-1, layer.in_axis).contiguous()


def solve_closed_form(objective: Objective, direction: torch.Tensor) -> torch.Tensor:
    """Λ minimizing the squared value error in the goal boxes (layers whose value is affine in W).

    Output channel o of the change depends only on Λ's slice for o, so each channel is a small
    least-squares problem over the (rank × kernel) entries of its slice; the columns are the
    responses to unit Λ entries, measured by running the layer (exact, since it is linear).
    """
    layer, goal = objective.layer, objective.goal
    w0 = layer.weight.detach()
    out_axis = 1 if layer.in_axis == 0 else 0
    shape = _lam_shape(w0, layer.in_axis, direction.shape[1])
    slice_shape = [s for a, s in enumerate(shape) if a != out_axis]
    n_basis = math.prod(slice_shape)
    d = direction.to(w0.device)
    with torch.no_grad():
        base = edited_values(layer, w0, goal.key, goal.extras)
        cells = goal.value_box > 0                                            # (T, Hv, Wv)
        columns = []
        for j in range(n_basis):
            unit = torch.zeros(n_basis, device=w0.device)
            unit[j] = 1
            lam = unit.view(slice_shape).unsqueeze(out_axis).expand(shape)
            resp = edited_values(layer, w0 + _dense(lam, d, layer.in_axis), goal.key, goal.extras) - base
            columns.append(resp.permute(1, 0, 2, 3)[:, cells])              # (C_out, rows)
        design = torch.stack(columns, dim=-1).double().cpu()                  # (C_out, rows, J)
        target = (goal.goal_value - base).permute(1, 0, 2, 3)[:, cells].double().cpu()[..., None]
        solution = torch.linalg.lstsq(design, target, driver="gelsd").solution[..., 0]   # (C_out, J)
    lam = solution.float().view(shape[out_axis], *slice_shape).movedim(0, out_axis)
    return lam.to(w0.device).contiguous()


def _zero_lam(weight: torch.Tensor, direction: torch.Tensor, in_axis: int) -> torch.Tensor:
    """Λ that removes W's component along D (D orthonormal): Λ = −W ×_in D."""
    return -(weight.detach().movedim(in_axis, -1) @ direction.to(weight.device)).movedim(-1, in_axis).contiguous()


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


def rewritable_layers(model: Generator, spec: EditSpec) -> list[str]:
    """The layers a spec changes: the one layer, or (multilayer) the named or every rewritable layer."""
    if spec.method != "multilayer":
        return [spec.layer]
    return list(spec.layers) or [info.name for info in model.layer_infos()]


def layer_directions(model: Generator, spec: EditSpec, moments: dict, regions: Sequence[Region],
                     device: torch.device) -> dict[str, torch.Tensor]:
    """{layer: D_L}, each layer's own context directions (the paper's constraint, layer by layer)."""
    out = {}
    for name in rewritable_layers(model, spec):
        keys = _context_keys(model, name, regions, spec.truncation, device)
        out[name] = context_direction(moments[name].to(device), keys, min(spec.rank, keys.shape[0]), spec.ridge)
    return out


def orthonormalize(direction: torch.Tensor, lam: torch.Tensor, in_axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, Λ·Rᵀ) for D = QR: the same ΔW = Λ ×_in Dᵀ with an orthonormal direction."""
    q, r = torch.linalg.qr(direction)
    return q, (lam.movedim(in_axis, -1) @ r.T).movedim(-1, in_axis).contiguous()


def solve_multilayer(objective: Objective, spec: EditSpec, directions: dict[str, torch.Tensor] | None = None,
                     progress: Progress | None = None, side_paths: bool = True) -> list[LowRankDelta]:
    """Low-rank deltas ΔW_L = Λ_L ×_in D_Lᵀ on every edited layer, fitted together by Adam.

    Λ starts at zero (the unedited model) and D at a seeded random orthonormal basis, as LoRA
    does; with ``directions`` the D_L are fixed to each layer's context directions and only Λ
    is trained. The stored D is orthonormalized (Λ absorbs the triangular factor), so ΔW is
    unchanged.
    """
    model = objective.model
    gen = torch.Generator().manual_seed(spec.keep["seed"])
    parts = []
    for name in rewritable_layers(model, spec):
        layer = model.layer(name)
        w0 = layer.weight.detach()
        in_dim = w0.shape[layer.in_axis]
        if directions is not None:
            d = directions[name].to(w0.device).clone()
        else:
            d = torch.linalg.qr(torch.randn(in_dim, spec.rank, generator=gen))[0].to(w0.device)
            d.requires_grad_(True)
        lam = torch.zeros(_lam_shape(w0, layer.in_axis, d.shape[1]), device=w0.device, requires_grad=True)
        parts.append((layer, _param_name(model, layer.weight), w0, d, lam))

    def candidate() -> Weights:
        return {pname: w0 + _dense(lam, d, layer.in_axis) for layer, pname, w0, d, lam in parts}

    if side_paths and all(LowRankPaths.supports(layer) for layer, *_ in parts):
        paths = LowRankPaths([(layer.modules[0], d, lam) for layer, _, _, d, lam in parts])
        candidate = lambda: paths                      # noqa: E731  (same images, less work)

    params = [lam for *_, lam in parts] + ([d for *_, d, _ in parts] if directions is None else [])
    batched = 0 < spec.fit["batch"] < len(objective.goal.z)
    best_adam(params, lambda: objective.loss(candidate()), spec.steps, spec.lr, "cosine" if batched else "constant",
              progress, final=(lambda: objective.loss(candidate(), batch=False)) if batched else None)
    deltas = []
    for layer, _, _, d, lam in parts:
        q, lam_q = orthonormalize(d.detach(), lam.detach(), layer.in_axis)
        deltas.append(LowRankDelta(layer.weight_key, layer.in_axis, q.cpu(), lam_q.cpu(), spec.strength))
    return deltas


def delta_weights(model: Generator, deltas: Sequence[LowRankDelta]) -> Weights:
    """{parameter name: edited weight} for deltas of this model (their scale applied)."""
    params = dict(model.public_parameters())
    out = {}
    for d in deltas:
        p = params[d.weight_key]
        out[_param_name(model, p)] = p.detach() + (0 if d.is_zero else d.dense().to(p.device, p.dtype))
    return out


# ---------------------------------------------------------------------------------------------
# Context search for extra paste targets


def find_targets(model: Generator, spec: EditSpec, C: torch.Tensor, goal: Goal) -> list[Region]:
    """Extra targets: the candidate samples whose keys under a paste box respond most to the
    context direction, each with the copy pasted at that box (one of the user's paste regions).
    For op erase the same with the context regions: more samples to erase the rule from.

    ``goal`` is the goal of the user's own targets (its key boxes say where each paste lands).
    Candidates are seeds ``search.seed_start ..`` (+ ``search.candidates``), minus the edit's own.
    """
    n, count, start = spec.search["targets"], spec.search["candidates"], spec.search["seed_start"]
    if n == 0 or spec.op not in ("rewrite", "erase"):
        return []
    user = spec.paste if spec.op == "rewrite" else spec.context
    device = goal.z.device
    direction = context_direction(C, goal.context_keys, min(spec.rank, goal.context_keys.shape[0]), spec.ridge)
    direction = direction.to(device)
    own = {r.seed for r in user} | ({spec.copy.seed} if spec.copy is not None else set())
    seeds = [s for s in range(start, start + count) if s not in own]
    boxes = goal.key_box[: len(user)]                                        # (P, Hk, Wk)
    area = boxes.sum(dim=(1, 2)).clamp_min(1e-12)
    scores, which = [], []
    for i in range(0, len(seeds), 64):
        key, _, _ = _capture(model, spec.layer, latents(seeds[i:i + 64], model.z_dim).to(device), spec.truncation)
        resp = torch.einsum("nchw,cr->nrhw", key, direction).norm(dim=1)      # (N, Hk, Wk)
        per_box = torch.einsum("nhw,phw->np", resp, boxes) / area             # mean response under each box
        best, idx = per_box.max(dim=1)
        scores.append(best.cpu())
        which.append(idx.cpu())
    scores, which = torch.cat(scores), torch.cat(which)
    order = sorted(range(len(seeds)), key=lambda j: (-float(scores[j]), seeds[j]))[:n]
    return [dataclasses.replace(user[int(which[j])], seed=seeds[j]) for j in order]


# ---------------------------------------------------------------------------------------------
# Entry points


def _statistics(model: Generator, spec: EditSpec, progress: Progress | None) -> SecondMoment:
    s = spec.stats
    return key_moment(model, spec.layer, range(s["seed_start"], s["seed_start"] + s["samples"]),
                      truncation=spec.truncation, progress=progress)


def rewrite(
    model: Generator,
    spec: dict | EditSpec,                  # an edit spec (JSON form) or a validated EditSpec
    moment: SecondMoment | torch.Tensor | None = None,   # C for spec.layer; None computes it from spec.stats
    progress: Progress | None = None,       # events (statistics, search, optimize, done); stops between steps
    moments: dict | None = None,            # {layer: C} for factors "context" (missing ones are computed)
) -> Edit:
    """Run an edit spec and return the edit; the model's weights are never modified.

    The returned edit's spec lists the targets context search found (``found``), so replaying
    it reproduces the edit exactly.
    """
    started = time.perf_counter()
    progress = progress or Progress()
    spec = spec if isinstance(spec, EditSpec) else EditSpec.from_json(spec, model)
    layer = model.layer(spec.layer)
    if moment is None:
        moment = _statistics(model, spec, progress)
    C = moment.moment() if isinstance(moment, SecondMoment) else moment
    if C.shape != (layer.weight.shape[layer.in_axis],) * 2:
        raise InvalidArgument("statistics", f"C is {tuple(C.shape)}, layer {spec.layer} keys have "
                              f"{layer.weight.shape[layer.in_axis]} channels")
    device = layer.weight.device
    C = C.to(device)
    if spec.op == "zero":
        ctx = _context_keys(model, spec.layer, spec.context, spec.truncation, device)
        direction = context_direction(C, ctx, spec.rank, spec.ridge)
        lam = _zero_lam(layer.weight, direction, layer.in_axis)
        metrics = {"op": "zero", "removed_norm": _dense(lam, direction.to(device), layer.in_axis).norm().item()}
        deltas = [LowRankDelta(layer.weight_key, layer.in_axis, direction.detach().cpu(), lam.detach().cpu(),
                               spec.strength)]
    else:
        if spec.found is None:
            found = []
            if spec.op in ("rewrite", "erase") and spec.search["targets"] > 0:
                found = find_targets(model, spec, C, build_goal(model, dataclasses.replace(spec, found=[])))
                progress.report("search", len(found), len(found), found=[r.seed for r in found])
            spec = dataclasses.replace(spec, found=found)
        goal = build_goal(model, spec)
        objective = Objective(model, spec, goal)
        w0 = layer.weight.detach()
        before = objective.report({} if spec.method == "multilayer" else w0)   # same keys as after
        if spec.method == "multilayer":
            directions = None
            if spec.factors == "context":
                moments = dict(moments or {})
                moments[spec.layer] = C
                for name in rewritable_layers(model, spec):
                    if name not in moments:
                        s = spec.stats
                        moments[name] = key_moment(model, name, range(s["seed_start"], s["seed_start"] + s["samples"]),
                                                   truncation=spec.truncation, progress=Progress(None, progress.should_stop))
                    if isinstance(moments[name], SecondMoment):
                        moments[name] = moments[name].moment()
                directions = layer_directions(model, spec, moments, goal.info["context"], device)
            deltas = solve_multilayer(objective, spec, directions, progress)
        else:
            direction = context_direction(C, goal.context_keys, spec.rank, spec.ridge).to(device)
            if spec.solver == "closed_form":
                lam = solve_closed_form(objective, direction)
            else:
                lam = solve_optimize(objective, direction, spec, progress)
            deltas = [LowRankDelta(layer.weight_key, layer.in_axis, direction.detach().cpu(), lam.detach().cpu(),
                                   spec.strength)]
        candidate = delta_weights(model, deltas)
        if spec.method != "multilayer":
            candidate = candidate[objective.weight_name]
        after = objective.report(candidate)
        metrics = {"goal": spec.goal, "method": spec.method, "before": before, "after": after,
                   "goal_loss_before": before[f"{spec.goal}_loss"], "goal_loss_after": after[f"{spec.goal}_loss"],
                   "targets": len(spec.paste if spec.op == "rewrite" else spec.context),
                   "found_targets": len(spec.found or [])}
        if spec.op == "erase":
            metrics["erased_units"] = goal.info["units"]
    metrics["seconds"] = time.perf_counter() - started
    progress.report("done", 1, 1, metrics=metrics)
    return Edit(layer=spec.layer, deltas=deltas, spec=spec.to_json(), metrics=metrics)


def full_rank_update(model: Generator, spec: dict | EditSpec, lr: float = 1e-3,
                     progress: Progress | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Baseline: the same goal solved by an unconstrained update of the whole layer weight.

    Returns ({weight_key: new weight}, metrics). Same steps and schedule as ours; ``lr`` is in
    weight units (ours is in the reparameterized Λ's).
    """
    spec = spec if isinstance(spec, EditSpec) else EditSpec.from_json(spec, model)
    goal = build_goal(model, spec)
    objective = Objective(model, spec, goal)
    w0 = objective.layer.weight.detach()
    delta = torch.zeros_like(w0, requires_grad=True)
    started = time.perf_counter()
    before = objective.report(w0)
    _cosine_adam([delta], lambda: objective.loss(w0 + delta), spec.steps, lr, progress, "full_rank")
    after = objective.report(w0 + delta.detach())
    return ({objective.layer.weight_key: (w0 + delta.detach())},
            {"before": before, "after": after, "seconds": time.perf_counter() - started})


def finetune_all(model: Generator, spec: dict | EditSpec, steps: int = 500, lr: float = 1e-4,
                 progress: Progress | None = None) -> tuple[Generator, dict]:
    """Baseline: fine-tune every weight so the targets render as their pasted pictures (whole image L1).

    Returns (a fine-tuned copy of the model, metrics); ``model`` itself is untouched.
    """
    import copy

    spec = spec if isinstance(spec, EditSpec) else EditSpec.from_json(spec, model)
    goal = build_goal(model, spec)
    tuned = copy.deepcopy(model).requires_grad_(True)
    params = list(tuned.parameters())
    started = time.perf_counter()
    _cosine_adam(params, lambda: (tuned(goal.z, spec.truncation) - goal.goal_image).abs().mean(),
                 steps, lr, progress, "finetune")
    for p in tuned.parameters():
        p.requires_grad_(False)
    return tuned, {"seconds": time.perf_counter() - started}
