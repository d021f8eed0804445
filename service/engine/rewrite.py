"""Rewrite a rule, erase a rule, zero a direction — and the baselines they are measured against.

- ``rewrite(model, spec, moment=None, progress=None) -> Edit``: run an edit spec
  (op ``rewrite``: copy → paste → context; op ``erase``; op ``zero``). Never modifies ``model``.
  After the fit, ops rewrite and erase measure the edit's strength curve on seeds of its own
  (``strength.measure_curve``), record it in the metrics (``strength_curve``), and — unless the
  spec gives a strength — set the multilayer method's final-quality strength to the curve's choice.
- ``full_rank_update(model, spec, ...)`` and ``finetune_all(model, spec, ...)``: the baselines.

The pieces live beside this module: ``goals`` (context directions, goal targets, context search),
``objective`` (the loss and rendering with replaced weights) and ``solvers``; their public names
are importable from here too.

The update is ``W' = W + Λ ×_in Dᵀ``: Λ has the weight's shape with the input-channel axis
replaced by the rank, so the change acts only on the part of each key inside span(D). Keys with
``Dᵀk = 0`` — keys orthogonal to the context in the C⁻¹ metric — see no change at all.
"""

from __future__ import annotations

import copy
import dataclasses
import time

import torch

from rulewright.service.engine.delta import LowRankDelta, with_strength
from rulewright.service.engine.edit import Edit, EditDraft, EditSpec
from rulewright.service.engine.errors import InvalidArgument
from rulewright.service.engine.generators.base import Generator
from rulewright.service.engine.goals import (Goal, _box_mask, _capture, _center, _context_keys, _feather,  # noqa: F401
                                             _render, _shift, build_goal, context_direction, find_targets,
                                             value_mean_square, whitening)
from rulewright.service.engine.objective import (LowRankPaths, Objective, Weights, _dense, _param_name,  # noqa: F401
                                                 edited_images, edited_values, render_with)
from rulewright.service.engine.progress import Progress
from rulewright.service.engine.solvers import (PROGRESS_EVERY, _cosine_adam, _zero_lam, best_adam,  # noqa: F401
                                               delta_weights, layer_directions, orthonormalize, rewritable_layers,
                                               solve_closed_form, solve_multilayer, solve_optimize)
from rulewright.service.engine.stats import SecondMoment, key_moment
from rulewright.service.engine.strength import measure_curve


def _statistics(model: Generator, spec: EditSpec, layer: str, progress: Progress | None) -> SecondMoment:
    s = spec.stats
    return key_moment(model, layer, range(s["seed_start"], s["seed_start"] + s["samples"]),
                      truncation=spec.truncation, progress=progress)


def _moment_of(model: Generator, spec: EditSpec, moment, progress: Progress) -> torch.Tensor:
    """C for spec.layer (computed from spec.stats when not given), checked against the layer's keys."""
    layer = model.layer(spec.layer)
    if moment is None:
        moment = _statistics(model, spec, spec.layer, progress)
    C = moment.moment() if isinstance(moment, SecondMoment) else moment
    if C.shape != (layer.weight.shape[layer.in_axis],) * 2:
        raise InvalidArgument("statistics", f"C is {tuple(C.shape)}, layer {spec.layer} keys have "
                              f"{layer.weight.shape[layer.in_axis]} channels")
    return C.to(layer.weight.device)


def _zero(model: Generator, spec: EditSpec, C: torch.Tensor) -> tuple[list[LowRankDelta], dict]:
    """Op zero: remove W's component along the context directions."""
    layer = model.layer(spec.layer)
    device = layer.weight.device
    ctx = _context_keys(model, spec.layer, spec.context, spec.truncation, device)
    direction = context_direction(C, ctx, spec.rank, spec.ridge)
    lam = _zero_lam(layer.weight, direction, layer.in_axis)
    metrics = {"op": "zero", "removed_norm": _dense(lam, direction.to(device), layer.in_axis).norm().item()}
    return [LowRankDelta(layer.weight_key, layer.in_axis, direction.detach().cpu(), lam.detach().cpu(),
                         spec.strength)], metrics


def _with_found(model: Generator, spec: EditSpec, C: torch.Tensor, progress: Progress) -> EditSpec:
    """The spec with its found targets listed (searched for unless the spec lists them already)."""
    if spec.found is not None:
        return spec
    found = []
    if spec.op in ("rewrite", "erase") and spec.search["targets"] > 0:
        found = find_targets(model, spec, C, build_goal(model, dataclasses.replace(spec, found=[])))
        progress.report("search", len(found), len(found), found=[r.seed for r in found])
    return dataclasses.replace(spec, found=found)


def _layer_moments(model: Generator, spec: EditSpec, C: torch.Tensor, moments: dict | None,
                   progress: Progress) -> dict[str, torch.Tensor]:
    """{layer: C} for every layer the multilayer method edits (missing ones are computed)."""
    out = dict(moments or {})
    out[spec.layer] = C
    for name in rewritable_layers(model, spec):
        if name not in out:
            out[name] = _statistics(model, spec, name, Progress(None, progress.should_stop))
        if isinstance(out[name], SecondMoment):
            out[name] = out[name].moment()
    return out


def _solve(model: Generator, spec: EditSpec, C: torch.Tensor, objective: Objective, moments: dict | None,
           progress: Progress) -> list[LowRankDelta]:
    """The deltas of a rewrite or erase, at the spec's strength."""
    layer = model.layer(spec.layer)
    device = layer.weight.device
    if spec.method == "multilayer":
        directions = None
        if spec.factors == "context":
            directions = layer_directions(model, spec, _layer_moments(model, spec, C, moments, progress),
                                          objective.goal.info["context"], device)
        return solve_multilayer(objective, spec, directions, progress)
    direction = context_direction(C, objective.goal.context_keys, spec.rank, spec.ridge).to(device)
    if spec.solver == "closed_form":
        lam = solve_closed_form(objective, direction)
    else:
        lam = solve_optimize(objective, direction, spec, progress)
    return [LowRankDelta(layer.weight_key, layer.in_axis, direction.detach().cpu(), lam.detach().cpu(), spec.strength)]


def chooses_strength(spec: dict | EditDraft | EditSpec, choose: bool | None = None) -> bool:
    """Whether a rewrite may set the strength from its curve: ``choose`` when given; else whether
    ``spec`` is as given (JSON or a parsed draft) and names no strength (an ``EditSpec`` keeps its
    own). Only the multilayer method's final quality uses the choice."""
    if choose is not None:
        return choose
    if isinstance(spec, EditDraft):
        return spec.settings.get("strength") is None
    return isinstance(spec, dict) and "strength" not in spec


def _fit(model: Generator, spec: EditSpec, C: torch.Tensor, moments: dict | None, progress: Progress,
         choose: bool) -> tuple[EditSpec, list[LowRankDelta], dict]:
    """Ops rewrite and erase: search, fit, measure the strength curve; (spec as run, deltas, metrics)."""
    spec = _with_found(model, spec, C, progress)
    goal = build_goal(model, spec)
    objective = Objective(model, spec, goal)
    before = objective.report({} if spec.method == "multilayer" else model.layer(spec.layer).weight.detach())
    deltas = _solve(model, spec, C, objective, moments, progress)
    # The goal losses judge the fit, at the spec's strength; the curve shows every other strength.
    candidate = delta_weights(model, deltas)
    after = objective.report(candidate if spec.method == "multilayer" else candidate[objective.weight_name])
    progress.check("strength curve")
    curve = measure_curve(model, spec, deltas)
    progress.report("curve", 1, 1)
    if choose and spec.method == "multilayer" and spec.quality == "final":
        spec = dataclasses.replace(spec, strength=curve.chosen)
        deltas = with_strength(deltas, curve.chosen)
    metrics = {"goal": spec.goal, "method": spec.method, "before": before, "after": after,
               "goal_loss_before": before[f"{spec.goal}_loss"], "goal_loss_after": after[f"{spec.goal}_loss"],
               "targets": len(spec.paste if spec.op == "rewrite" else spec.context),
               "found_targets": len(spec.found or []), "strength_curve": curve.to_json()}
    if spec.op == "erase":
        metrics["erased_units"] = goal.info["units"]
    return spec, deltas, metrics


def rewrite(
    model: Generator,
    spec: dict | EditSpec,                  # an edit spec (JSON form) or a validated EditSpec
    moment: SecondMoment | torch.Tensor | None = None,   # C for spec.layer; None computes it from spec.stats
    progress: Progress | None = None,       # events (statistics, search, optimize, curve, done); stops between steps
    moments: dict | None = None,            # {layer: C} for factors "context" (missing ones are computed)
    choose_strength: bool | None = None,    # set the strength from the curve (None: ``chooses_strength``)
) -> Edit:
    """Run an edit spec and return the edit; the model's weights are never modified.

    The returned edit's spec lists the targets context search found (``found``) and the strength
    the edit was stored at, so replaying it reproduces the edit, and its curve, exactly.
    """
    started = time.perf_counter()
    progress = progress or Progress()
    choose = chooses_strength(spec, choose_strength)
    spec = spec if isinstance(spec, EditSpec) else EditSpec.from_json(spec, model)
    C = _moment_of(model, spec, moment, progress)
    if spec.op == "zero":
        deltas, metrics = _zero(model, spec, C)
    else:
        spec, deltas, metrics = _fit(model, spec, C, moments, progress, choose)
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
