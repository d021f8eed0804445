"""The multilayer fit's options: targets drawn in batches, a feathered paste, an edges term."""

from __future__ import annotations

import pytest
import torch

from rulewright.service.engine.edit import EditSpec
from rulewright.service.engine.errors import InvalidArgument
from rulewright.service.engine.generators.dcgan import DCGANGenerator
from rulewright.service.engine.rewrite import _feather, build_goal, rewrite
from rulewright.service.engine.stats import key_moment
from tests.builders import dcgan_state


@pytest.fixture(scope="module")
def small():
    model = DCGANGenerator.from_state_dict(dcgan_state(z_dim=16, widths=(32, 16, 8, 3)))
    return model, key_moment(model, "main.6", range(64)).moment()


def _spec(**kw) -> dict:
    b = [4, 4, 28, 28]
    spec = {"layer": "main.6", "stats": {"samples": 64}, "copy": {"seed": 1, "box": b},
            "paste": [{"seed": 2, "box": b}, {"seed": 5, "box": b}],
            "search": {"targets": 3, "candidates": 40, "seed_start": 1000}, "steps": 20}
    spec.update(kw)
    return {k: v for k, v in spec.items() if v is not None}


def test_batched_fit_is_seeded_lowers_the_loss_over_every_target_and_replays(small):
    model, C = small
    first = rewrite(model, _spec(fit={"batch": 2}), moment=C)
    again = rewrite(model, first.spec, moment=C)
    assert first.spec["fit"]["batch"] == 2
    for a, b in zip(first.deltas, again.deltas):
        assert torch.equal(a.lam, b.lam) and torch.equal(a.direction, b.direction)
    # The returned iterate is judged on all five targets, never worse than no edit.
    assert first.metrics["after"]["whole_image_loss"] <= first.metrics["before"]["whole_image_loss"]
    whole = rewrite(model, _spec(), moment=C)
    assert any(not torch.equal(a.lam, b.lam) for a, b in zip(first.deltas, whole.deltas))


def test_a_recorded_spec_without_fit_options_replays_as_it_was_fitted(small):
    model, C = small
    edit = rewrite(model, _spec(fit={"feather": 0.0}), moment=C)       # fitted as before the options existed
    old = {k: v for k, v in edit.spec.items() if k != "fit"}           # and so recorded
    assert EditSpec.from_json(old, model).fit == {"batch": 0, "feather": 0.0, "edges": 0.0}
    replay = rewrite(model, old, moment=C)
    for a, b in zip(edit.deltas, replay.deltas):
        assert torch.equal(a.lam, b.lam)


def test_feathered_paste_fades_towards_the_box_border_and_stays_inside(small):
    alpha = torch.zeros(32, 32)
    alpha[8:24, 4:28] = 1
    soft = _feather(alpha, 2.0)
    assert soft[16, 16] > 0.99                                    # the middle is pasted whole
    assert soft[8, 16] < 0.3 and soft[16, 4] < 0.3                # the border only faintly
    assert soft[alpha == 0].max() < 0.05                          # (almost) nothing outside the box
    model, _ = small
    hard = build_goal(model, EditSpec.from_json(_spec(search={"targets": 0}), model))
    feathered = build_goal(model, EditSpec.from_json(_spec(search={"targets": 0}, fit={"feather": 2.0}), model))
    assert torch.equal(hard.goal_value, feathered.goal_value)     # the value goal is the paste's
    assert not torch.equal(hard.goal_image, feathered.goal_image)


@pytest.mark.parametrize("fit, field", [({"batch": -1}, "fit.batch"), ({"batch": 1.5}, "fit.batch"),
                                        ({"feather": 17}, "fit.feather"), ({"edges": -0.1}, "fit.edges"),
                                        ({"mask": 1}, "fit")])
def test_bad_fit_options_name_the_field(small, fit, field):
    model, _ = small
    with pytest.raises(InvalidArgument) as exc:
        EditSpec.from_json(_spec(fit=fit), model)
    assert exc.value.field == field


def test_quality_picks_the_multilayer_defaults_and_a_recorded_spec_keeps_its_own(small):
    model, _ = small
    final = EditSpec.from_json(_spec(steps=None, search=None), model)
    draft = EditSpec.from_json({**_spec(steps=None, search=None), "quality": "draft"}, model)
    assert final.quality == "final" and draft.quality == "draft"
    assert (draft.steps, draft.search["targets"], draft.fit["batch"], draft.strength) == (50, 16, 0, 0.6)  # the earlier default
    assert final.steps > draft.steps and final.search["targets"] > draft.search["targets"]
    assert 0 < final.fit["batch"] < final.search["targets"]
    given = EditSpec.from_json({**_spec(), "quality": "draft"}, model)
    assert given.steps == 20 and given.search["targets"] == 3                          # given fields win
    recorded = {k: v for k, v in draft.to_json().items() if k not in ("quality", "fit")}
    recorded["found"] = []
    assert EditSpec.from_json(recorded, model).to_json() == {**draft.to_json(), "found": []}
    with pytest.raises(InvalidArgument) as exc:
        EditSpec.from_json({**_spec(), "quality": "best"}, model)
    assert exc.value.field == "quality"
