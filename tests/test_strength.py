"""The strength curve: the rule that picks a default strength, and the curve a rewrite records."""

from __future__ import annotations

import pytest

from rulewright.service.engine.edit import EditSpec
from rulewright.service.engine.generators.dcgan import DCGANGenerator
from rulewright.service.engine.rewrite import rewrite
from rulewright.service.engine.strength import (CURVE_SEEDS, CURVE_STRENGTHS, RULE, CurvePoint, Rule, StrengthCurve,
                                                choose_strength, measure_curve)
from tests.builders import dcgan_state

RULE_UNDER_TEST = Rule("test", share=0.5, side_effect=0.04, box_edge=0.55)


def curve(*rows: tuple[float, float, float, float]) -> list[CurvePoint]:
    return [CurvePoint(*row) for row in rows]


def test_rule_picks_the_smallest_strength_that_reaches_the_share():
    points = curve((0.5, 0.1, 0.01, 0.3), (1.0, 0.5, 0.02, 0.4), (1.5, 0.8, 0.03, 0.5))
    assert choose_strength(points, RULE_UNDER_TEST) == 1.0
    assert choose_strength(list(reversed(points)), RULE_UNDER_TEST) == 1.0     # order does not matter


def test_rule_stops_before_the_side_effect_or_the_box_edge_crosses_its_bound():
    by_side = curve((0.5, 0.1, 0.01, 0.3), (1.0, 0.3, 0.035, 0.4), (1.5, 0.8, 0.05, 0.5))
    assert choose_strength(by_side, RULE_UNDER_TEST) == 1.0          # share reached only past the cap
    by_edge = curve((0.5, 0.1, 0.01, 0.3), (1.0, 0.3, 0.02, 0.6), (1.5, 0.8, 0.03, 0.5))
    assert choose_strength(by_edge, RULE_UNDER_TEST) == 0.5          # capped at the first crossing, even if it recrosses
    never = curve((0.5, 0.0, 0.01, 0.3), (1.0, 0.1, 0.02, 0.3), (2.0, 0.2, 0.03, 0.3))
    assert choose_strength(never, RULE_UNDER_TEST) == 2.0            # within bounds throughout: the strongest
    peaked = curve((0.5, 0.1, 0.01, 0.3), (1.0, 0.44, 0.02, 0.3), (1.5, 0.44, 0.025, 0.3), (2.0, 0.2, 0.03, 0.3))
    assert choose_strength(peaked, RULE_UNDER_TEST) == 1.0           # never reached: where it peaks, the weaker of a tie
    over = curve((0.5, 0.9, 0.05, 0.3), (1.0, 1.0, 0.09, 0.3))
    assert choose_strength(over, RULE_UNDER_TEST) == 0.5             # even the weakest is over: the weakest
    with pytest.raises(ValueError):
        choose_strength([], RULE_UNDER_TEST)


@pytest.fixture(scope="module")
def tiny():
    return DCGANGenerator.from_state_dict(dcgan_state(z_dim=16, widths=(32, 16, 8, 3)))


# A multilayer edit of the tiny DCGAN that improves on no edit in 20 steps (a big box).
BIG = [4, 4, 28, 28]
EDIT = {"layer": "main.6", "method": "multilayer", "steps": 20, "stats": {"samples": 64}, "search": {"targets": 0},
        "copy": {"seed": 1, "box": BIG}, "paste": [{"seed": 2, "box": BIG}]}


def test_a_rewrite_records_its_curve_sets_its_strength_and_a_replay_reproduces_both(tiny):
    edit = rewrite(tiny, EDIT)
    recorded = edit.metrics["strength_curve"]
    got = StrengthCurve.from_json(recorded)
    assert [p.strength for p in got.points] == list(CURVE_STRENGTHS) and got.rule == RULE.name
    assert got.chosen == choose_strength(got.points) and got.chosen in CURVE_STRENGTHS
    assert all(0 <= p.detected <= 1 and p.side_effect > 0 for p in got.points)
    # Side effect grows with strength: the deltas scale exactly.
    assert [p.side_effect for p in got.points] == sorted(p.side_effect for p in got.points)
    assert edit.spec["strength"] == got.chosen and all(d.scale == got.chosen for d in edit.deltas)
    replay = rewrite(tiny, edit.spec)
    assert replay.metrics["strength_curve"] == recorded
    assert replay.spec["strength"] == edit.spec["strength"]
    assert [d.lam.tolist() for d in replay.deltas] == [d.lam.tolist() for d in edit.deltas]


def test_a_given_strength_is_kept_and_the_curve_still_recorded(tiny):
    edit = rewrite(tiny, {**EDIT, "strength": 0.3})
    assert edit.spec["strength"] == 0.3 and all(d.scale == 0.3 for d in edit.deltas)
    assert len(edit.metrics["strength_curve"]["points"]) == len(CURVE_STRENGTHS)
    # A validated spec keeps its strength too (the caller decides), unless told to choose.
    spec = EditSpec.from_json(EDIT, tiny)
    assert rewrite(tiny, spec).spec["strength"] == spec.strength
    chosen = rewrite(tiny, spec, choose_strength=True)
    assert chosen.spec["strength"] == chosen.metrics["strength_curve"]["chosen"]


def test_the_draft_keeps_its_strength_and_records_its_curve(tiny):
    edit = rewrite(tiny, {**EDIT, "quality": "draft"})
    assert edit.spec["strength"] == 0.6 and "strength_curve" in edit.metrics


def test_the_curve_renders_only_its_own_seeds_and_scales_exactly(tiny):
    spec = EditSpec.from_json(EDIT, tiny)
    edit = rewrite(tiny, spec)
    again = measure_curve(tiny, spec, edit.deltas)
    assert again.to_json() == edit.metrics["strength_curve"]
    fewer = measure_curve(tiny, spec, edit.deltas, seeds=range(10**11, 10**11 + CURVE_SEEDS // 2), strengths=(0.0, 1.0))
    zero = fewer.points[0]
    assert zero.strength == 0.0 and zero.detected == 0.0 and zero.side_effect == 0.0     # no edit: nothing drawn
