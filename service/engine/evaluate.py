"""How well an edit generalizes: efficacy and side effect on held-out samples.

- ``ideal_images(model, spec, z)``: each sample's *ideal* result — the spec's copy pasted into its
  own value map (at the first paste target's offset) and rendered by the unedited model; for op
  erase, its own value map with the erased units switched off in the first context region.
- ``heldout_metrics(model, spec, seeds, render, detect=None)``: efficacy (share of the gap to the
  ideal closed inside the paste box, and the L1 before/after), side effect (mean absolute pixel
  change outside the box) and box edge (below), for any way of rendering the edited model
  (``render(z) -> images``); with ``detect(images) -> P(edited)`` (``detector.Detector``) also the
  share of faces detected as edited and the mean probability.
- ``box_edge``: the change just inside the box's border minus the change just outside it, over
  the change inside the box — near 0 for an edit that fades out or stays off the border, near 1
  for a pasted rectangle (a block whose edges are the box's).

Why pixels and an ideal paste: a value-space cosine says nothing (values
share a large common component), while the image-space gap to an ideal paste does.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from rulewright.service.engine import nethook
from rulewright.service.engine.edit import EditSpec
from rulewright.service.engine.goals import _box_mask, _shift, build_goal
from rulewright.service.engine.sampling import latents

Render = Callable[[torch.Tensor], torch.Tensor]
EDGE_BAND = 2              # pixels each side of the box's border that box_edge compares


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


def edge_bands(box: torch.Tensor, width: int = EDGE_BAND) -> tuple[torch.Tensor, torch.Tensor]:
    """(inner, outer): the ``width``-pixel bands just inside and just outside a box mask's border."""
    grown = F.max_pool2d(box[None, None], 2 * width + 1, stride=1, padding=width)[0, 0]
    shrunk = -F.max_pool2d(-box[None, None], 2 * width + 1, stride=1, padding=width)[0, 0]
    return box - shrunk, grown - box


class EdgeSums:
    """Running sums of the change in the box, its inner and its outer border band (box_edge)."""

    def __init__(self, box: torch.Tensor):
        self.box = box
        self.inner, self.outer = edge_bands(box)
        self.sums = [0.0, 0.0, 0.0]

    def add(self, edited: torch.Tensor, base: torch.Tensor) -> None:
        """Count a batch of edited images against their originals."""
        change = (edited - base).abs().mean(1)
        for i, m in enumerate((self.box, self.inner, self.outer)):
            self.sums[i] += ((change * m).sum(dim=(1, 2)) / m.sum().clamp_min(1)).sum().item()

    def value(self) -> float:
        """(inner band − outer band) / inside the box, over every image added."""
        inside, inner, outer = self.sums
        return (inner - outer) / inside if inside > 0 else 0.0


def heldout_metrics(model, spec: dict | EditSpec, seeds: Sequence[int], render: Render,
                    batch_size: int = 50, detect: Render | None = None) -> dict:
    """Efficacy, side effect and box edge of an edited renderer on held-out seeds (spec op rewrite
    or erase); with ``detect`` (images -> P(edited)) also the detected share and mean probability."""
    spec = spec if isinstance(spec, EditSpec) else EditSpec.from_json(spec, model)
    geometry = paste_geometry(model, spec)
    box = _box_mask(geometry["image_box"])
    inside, outside = box.sum(), (1 - box).sum()
    device = next(model.parameters()).device
    gap_before = gap_after = side = 0.0
    edge = EdgeSums(box)
    hits = probability = 0.0
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
        edge.add(edited, base)
        if detect is not None:
            p = detect(edited)
            hits += (p >= 0.5).sum().item()
            probability += p.sum().item()
    n = len(seeds)
    out = {
        "l1_to_ideal_before": gap_before / n,
        "l1_to_ideal_after": gap_after / n,
        "efficacy": 1 - gap_after / gap_before,      # share of the gap closed
        "side_effect": side / n,
        "box_edge": edge.value(),
        "seeds": n,
    }
    if detect is not None:
        out.update(detected=hits / n, probability=probability / n)
    return out
