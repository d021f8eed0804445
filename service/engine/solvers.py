"""The solvers of an edit: Adam on the low-rank factors (one layer or many), the closed form, op zero.

- ``best_adam(params, loss, steps, lr)``: Adam that hands back its best iterate.
- ``solve_optimize`` / ``solve_closed_form``: Λ of the paper's one-layer edit, D fixed.
- ``solve_multilayer(objective, spec, directions)``: low-rank deltas on every edited layer, fitted together.
- ``delta_weights(model, deltas)``: the edited weights of a model's deltas.
- ``rewritable_layers`` / ``layer_directions`` / ``orthonormalize``: the multilayer method's plumbing.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from rulewright.service.engine.delta import LowRankDelta
from rulewright.service.engine.edit import EditSpec
from rulewright.service.engine.generators.base import Generator
from rulewright.service.engine.goals import Goal, _context_keys, context_direction
from rulewright.service.engine.objective import LowRankPaths, Objective, Weights, _dense, _param_name, edited_values
from rulewright.service.engine.progress import Progress
from rulewright.service.engine.regions import Region

PROGRESS_EVERY = 10     # optimization steps between progress events


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
