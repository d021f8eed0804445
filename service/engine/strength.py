"""An edit's strength curve, measured on seeds of its own, and the rule that picks its default strength.

A fitted edit's low-rank deltas can be scaled exactly, so its strength is a dial; this module says
where to set it. After the fit, the engine renders 16 faces that took no part in the edit
(``CURVE_START``: disjoint from every other seed set of the project) at a few strengths and
measures, at each:

- **detected**: the share of faces whose edited picture, inside the edit's box, closed at least
  half (``CLOSED``) of its distance to that face's ideal result (``evaluate.ideal_images``: the copy
  pasted into the face's own features and rendered). Renders only — a stand-in for the per-edit
  detector of the benchmarks, which takes far too long to train inside a rewrite; its agreement
  with the detector is measured by ``benchmarks.strength_agreement``.
- **side effect**: the mean absolute pixel change outside the box.
- **box edge**: how much of the change sits on the box's border (``evaluate.EdgeSums``; near 1: a
  pasted rectangle).

``choose_strength(points, rule)`` then picks the default: the smallest strength whose detected
share reaches ``rule.share``, but never past the last strength before the side effect or the box
edge crosses its bound (``RULE``). The rewrite uses it for the multilayer method's final quality
when the spec names no strength; a given strength is kept, and a draft keeps its quick 0.6 (its
fit is a preview of the final one, whose curve differs), both with their curve recorded.

- ``measure_curve(model, spec, deltas)`` → ``StrengthCurve``; ``StrengthCurve.to_json()`` is what a
  version's metrics record under ``strength_curve``.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch.func import functional_call

from rulewright.service.engine.delta import LowRankDelta, with_strength
from rulewright.service.engine.edit import EditSpec
from rulewright.service.engine.evaluate import EdgeSums, ideal_images, paste_geometry
from rulewright.service.engine.goals import _box_mask
from rulewright.service.engine.sampling import latents
from rulewright.service.engine.solvers import delta_weights

# Far from every other seed range (statistics from 0 up to 10^7, held-out faces from 50,000, the keep
# pool from 10^6, search candidates from 2·10^6, the detector's from 10^12): 10^11.
CURVE_START = 10**11
CURVE_SEEDS = 16
CURVE_STRENGTHS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
# The share of a face's distance to its ideal an edit must close to count as detected: of the shares
# tried (0 to 0.7), half agreed best with the trained detectors face by face (strength_agreement).
CLOSED = 0.5


@dataclasses.dataclass(frozen=True)
class Rule:
    """How the default strength is picked from a curve (``choose_strength``)."""

    name: str
    share: float            # the detected share to reach
    side_effect: float      # the side effect no chosen strength may exceed
    box_edge: float         # the box edge no chosen strength may exceed


# Measured on the shipped edits (benchmarks.strength_agreement): 0.03 is about the smallest side effect
# of fine-tuning every weight at its default on any of them, and past a box edge of 0.55 the glasses
# edit starts to draw the box's rectangle on many faces.
# Where the share is never reached the peak is taken, not the cap: past it the edit overshoots the
# ideal (the glasses at strength 2 paint harder and are reached on fewer faces than at 1.5).
RULE = Rule("smallest strength with detected >= 0.6, else where detected peaks; capped before side effect > "
            "0.03 or box edge > 0.55", share=0.6, side_effect=0.03, box_edge=0.55)


@dataclasses.dataclass(frozen=True)
class CurvePoint:
    """The edit measured at one strength."""

    strength: float
    detected: float
    side_effect: float
    box_edge: float


@dataclasses.dataclass(frozen=True)
class StrengthCurve:
    """An edit's curve, the strength its rule picks (``chosen``) and the rule's name."""

    points: tuple[CurvePoint, ...]
    chosen: float
    rule: str

    def to_json(self) -> dict:
        """``{"points": [{strength, detected, side_effect, box_edge}...], "chosen": s, "rule": name}``."""
        return {"points": [dataclasses.asdict(p) for p in self.points], "chosen": self.chosen, "rule": self.rule}

    @classmethod
    def from_json(cls, d: dict) -> "StrengthCurve":
        """The curve ``to_json`` wrote."""
        return cls(tuple(CurvePoint(**p) for p in d["points"]), float(d["chosen"]), str(d["rule"]))


def choose_strength(points: Sequence[CurvePoint], rule: Rule = RULE) -> float:
    """The smallest strength whose detected share reaches ``rule.share``, capped at the last strength
    before the side effect or box edge first exceeds its bound; if the share is never reached below
    the cap, the (smallest) strength where the detected share peaks; the smallest strength if even
    that one is over a bound."""
    ordered = sorted(points, key=lambda p: p.strength)
    if not ordered:
        raise ValueError("a strength curve needs at least one point")
    allowed = []
    for p in ordered:
        if p.side_effect > rule.side_effect or p.box_edge > rule.box_edge:
            break
        allowed.append(p)
    if not allowed:
        return ordered[0].strength
    reached = [p for p in allowed if p.detected >= rule.share]
    return (reached[0] if reached else max(allowed, key=lambda p: (p.detected, -p.strength))).strength


def closed_share(base: torch.Tensor, edited: torch.Tensor, ideal: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Per face, the share of its distance to its ideal (mean |·| in the box) that the edit closed."""
    inside = box.sum().clamp_min(1)
    before = ((base - ideal).abs().mean(1) * box).sum(dim=(1, 2)) / inside
    after = ((edited - ideal).abs().mean(1) * box).sum(dim=(1, 2)) / inside
    return 1 - after / before.clamp_min(1e-12)


def _point(strength: float, base: torch.Tensor, edited: torch.Tensor, ideal: torch.Tensor, box: torch.Tensor,
           closed: float) -> CurvePoint:
    share = closed_share(base, edited, ideal, box)
    outside = (1 - box).sum().clamp_min(1)
    side = ((edited - base).abs().mean(1) * (1 - box)).sum(dim=(1, 2)) / outside
    edge = EdgeSums(box)
    edge.add(edited, base)
    return CurvePoint(float(strength), round(float((share >= closed).float().mean()), 6),
                      round(float(side.mean()), 6), round(edge.value(), 6))


def measure_curve(model, spec: EditSpec, deltas: Sequence[LowRankDelta], rule: Rule = RULE,
                  seeds: Sequence[int] = range(CURVE_START, CURVE_START + CURVE_SEEDS),
                  strengths: Sequence[float] = CURVE_STRENGTHS, closed: float = CLOSED) -> StrengthCurve:
    """The edit's curve on ``seeds`` at ``strengths`` (renders only) and the strength ``rule`` picks."""
    device = next(model.parameters()).device
    geometry = paste_geometry(model, spec)
    box = _box_mask(geometry["image_box"]).to(device)
    z = latents(list(seeds), model.z_dim).to(device)
    with torch.no_grad():
        base = model(z, spec.truncation)
        ideal = ideal_images(model, spec, z, geometry)
        points = []
        for s in strengths:
            edited = functional_call(model, delta_weights(model, with_strength(deltas, s)), (z, spec.truncation))
            points.append(_point(s, base, edited, ideal, box, closed))
    return StrengthCurve(tuple(points), choose_strength(points, rule), rule.name)
