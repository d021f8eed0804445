"""How well an edit generalizes: efficacy and side effect on held-out samples.

- ``ideal_images(model, spec, z)``: each sample's *ideal* result — the spec's copy pasted into its
  own value map (at the first paste target's offset) and rendered by the unedited model; for op
  erase, its own value map with the erased units switched off in the first context region.
- ``heldout_metrics(model, spec, seeds, render)``: efficacy (share of the gap to the ideal closed
  inside the paste box, and the L1 before/after) and side effect (mean absolute pixel change
  outside the box), for any way of rendering the edited model (``render(z) -> images``).

Why pixels and an ideal paste: a value-space cosine says nothing (values
share a large common component), while the image-space gap to an ideal paste does.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

from . import nethook
from .edit import EditSpec
from .rewrite import _box_mask, _center, _shift, build_goal
from .sampling import latents

Render = Callable[[torch.Tensor], torch.Tensor]


def paste_geometry(model, spec: EditSpec) -> dict:
    """Shifted copy alpha (value grid), the source values, and the image box of paste target 0
    (op erase: the first context region's alpha and box, and the erased units)."""
    if spec.op == "erase":
        goal = build_goal(model, dataclasses.replace(spec, found=[]))     # the user's units
        hv = goal.value.shape[-1]
        return {"alpha_value": spec.context[0].at(hv, model.resolution), "units": goal.info["units"],
                "image_box": goal.image_box[0].cpu()}
    if spec.op != "rewrite":
        raise ValueError(f"held-out metrics need op rewrite or erase, got {spec.op}")
    goal = build_goal(model, dataclasses.replace(spec, found=[]))     # target 0 is the user's
    dy_px, dx_px = goal.info["offsets_px"][0]
    hv = goal.value.shape[-1]
    cell = model.resolution // hv
    alpha_v = _shift(goal.info["copy_alpha_value"], dy_px // cell, dx_px // cell)
    source_v = _shift(goal.info["source_value"][0], dy_px // cell, dx_px // cell)
    return {"alpha_value": alpha_v, "source_value": source_v, "image_box": goal.image_box[0].cpu()}


def ideal_images(model, spec: EditSpec, z: torch.Tensor, geometry: dict | None = None) -> torch.Tensor:
    """Each latent's own value map with the copy pasted in, rendered by the unedited model."""
    geometry = geometry or paste_geometry(model, spec)
    device = next(model.parameters()).device
    a = geometry["alpha_value"].to(device)
    with torch.no_grad():
        v = nethook.latents_to_values(model, spec.layer, z, spec.truncation)
        if "units" in geometry:
            pasted = v.clone()
            pasted[:, geometry["units"]] = v[:, geometry["units"]] * (1 - a)
            return nethook.values_to_image(model, spec.layer, z, pasted, spec.truncation)
        pasted = v * (1 - a) + geometry["source_value"].to(device)[None] * a
        return nethook.values_to_image(model, spec.layer, z, pasted, spec.truncation)


def heldout_metrics(model, spec: dict | EditSpec, seeds: Sequence[int], render: Render,
                    batch_size: int = 50) -> dict:
    """Efficacy and side effect of an edited renderer on held-out seeds (spec op rewrite or erase)."""
    spec = spec if isinstance(spec, EditSpec) else EditSpec.from_json(spec, model)
    geometry = paste_geometry(model, spec)
    box = _box_mask(geometry["image_box"])
    inside, outside = box.sum(), (1 - box).sum()
    device = next(model.parameters()).device
    gap_before = gap_after = side = 0.0
    seeds = list(seeds)
    for start in range(0, len(seeds), batch_size):
        z = latents(seeds[start:start + batch_size], model.z_dim).to(device)
        with torch.no_grad():
            base = model(z, spec.truncation).cpu()
            edited = render(z).cpu()
        ideal = ideal_images(model, spec, z, geometry).cpu()
        gap_before += ((base - ideal).abs().mean(1) * box).sum().item() / inside.item()
        gap_after += ((edited - ideal).abs().mean(1) * box).sum().item() / inside.item()
        side += ((edited - base).abs().mean(1) * (1 - box)).sum().item() / outside.item()
    n = len(seeds)
    return {
        "l1_to_ideal_before": gap_before / n,
        "l1_to_ideal_after": gap_after / n,
        "efficacy": 1 - gap_after / gap_before,      # share of the gap closed
        "side_effect": side / n,
        "seeds": n,
    }
