"""The second-generation rewrite: multilayer low-rank deltas, found targets, best iterate, strength."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from rulewright.service.engine.delta import LowRankDelta, apply_to_state_dict, from_bytes, to_bytes, with_strength
from rulewright.service.engine.edit import EditSpec, apply_edit, render_edited
from rulewright.service.engine.generators.dcgan import DCGANGenerator
from rulewright.service.engine.progress import Progress
from rulewright.service.engine.rewrite import _capture, context_direction, build_goal, rewrite
from rulewright.service.engine.sampling import latents
from rulewright.service.engine.stats import key_moment
from tests.builders import dcgan_state


@pytest.fixture(scope="module")
def small():
    model = DCGANGenerator.from_state_dict(dcgan_state(z_dim=16, widths=(32, 16, 8, 3)))
    return model, key_moment(model, "main.6", range(64)).moment()


def _spec(**kw) -> dict:
    b = [4, 4, 28, 28]            # a big box: this random model's images are nearly flat
    spec = {"layer": "main.6", "stats": {"samples": 64}, "copy": {"seed": 1, "box": b},
            "paste": [{"seed": 2, "box": b}, {"seed": 5, "box": b}],
            "search": {"targets": 3, "candidates": 40, "seed_start": 1000}}
    spec.update(kw)
    return spec


def test_multilayer_is_the_default_and_edits_every_layer(small):
    model, C = small
    edit = rewrite(model, _spec(steps=20), moment=C)
    spec = EditSpec.from_json(edit.spec, model)
    assert spec.method == "multilayer" and spec.rank == 4
    assert sorted(d.weight_key for d in edit.deltas) == sorted(i.weight_key for i in model.layer_infos())
    for d in edit.deltas:                                      # stored D orthonormal (Λ absorbed R)
        assert torch.allclose(d.direction.T @ d.direction, torch.eye(d.rank), atol=1e-5)
    assert edit.metrics["goal_loss_after"] < edit.metrics["goal_loss_before"]


def test_found_targets_are_recorded_and_a_replay_is_exact(small):
    model, C = small
    events = []
    first = rewrite(model, _spec(steps=10), moment=C, progress=Progress(events.append))
    found = first.spec["found"]
    seeds = [r["seed"] for r in found]
    assert len(seeds) == 3 and len(set(seeds)) == 3
    assert all(1000 <= s < 1040 and s not in (1, 2, 5) for s in seeds)
    assert [e for e in events if e.stage == "search"][0].info["found"] == seeds
    again = rewrite(model, first.spec, moment=C)               # the recorded spec skips the search
    assert again.spec == first.spec
    for a, b in zip(first.deltas, again.deltas):
        assert torch.equal(a.lam, b.lam) and torch.equal(a.direction, b.direction)
    # A pruned list is used as given; an empty one means the user's targets only.
    pruned = rewrite(model, {**first.spec, "found": found[:1]}, moment=C)
    assert [r["seed"] for r in pruned.spec["found"]] == seeds[:1]


def test_found_targets_respond_more_than_the_typical_candidate(small):
    model, C = small
    spec = EditSpec.from_json(_spec(search={"targets": 5, "candidates": 60, "seed_start": 1000}), model)
    edit = rewrite(model, spec, moment=C)
    found = {r["seed"] for r in edit.spec["found"]}
    goal = build_goal(model, dataclasses.replace(spec, found=[]))
    d = context_direction(C, goal.context_keys, spec.rank, spec.ridge)
    key, _, _ = _capture(model, "main.6", latents(list(range(1000, 1060)), 16), 1.0)
    box = goal.key_box[0]
    score = ((torch.einsum("nchw,cr->nrhw", key, d).norm(dim=1) * box).sum(dim=(1, 2)) / box.sum())
    ranked = [1000 + int(i) for i in torch.argsort(score, descending=True)]
    assert found == set(ranked[:5])                            # both paste boxes are the same here


@pytest.mark.parametrize("method,lr", [("multilayer", 5.0), ("single", 10.0)])
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_no_step_budget_returns_an_edit_worse_than_no_edit(small, method, lr, steps):
    model, C = small
    # A step size far too large makes Adam diverge at once: the best iterate must still win.
    spec = _spec(method=method, steps=steps, lr=lr, keep={"weight": 0}, search={"targets": 2, "candidates": 20,
                                                                               "seed_start": 1000})
    edit = rewrite(model, spec, moment=C)
    key = "whole_image_loss" if method == "multilayer" else "image_loss"
    assert edit.metrics["after"][key] <= edit.metrics["before"][key], edit.metrics


def test_no_step_budget_is_worse_than_no_edit_on_faces(faces):
    C = key_moment(faces, "main.6", range(200)).moment()
    spec = {"layer": "main.6", "copy": {"seed": 35, "box": [8, 22, 56, 38]},
            "paste": [{"seed": 1, "box": [8, 22, 56, 38]}, {"seed": 23, "box": [8, 22, 56, 38]}],
            "search": {"targets": 2, "candidates": 30}}
    for steps, lr in ((1, 1e-3), (3, 0.5)):
        edit = rewrite(faces, {**spec, "steps": steps, "lr": lr}, moment=C)
        m = edit.metrics
        assert m["after"]["whole_image_loss"] <= m["before"]["whole_image_loss"], (steps, lr, m)


def test_strength_scales_the_delta_exactly_and_zero_is_the_parent_bit_for_bit(small):
    model, C = small
    edit = rewrite(model, _spec(steps=30), moment=C)     # 15 feathered steps stay at no edit on this model
    z = latents([7, 8, 9], 16)
    with torch.no_grad():
        parent = model(z)
    zero = dataclasses.replace(edit, deltas=with_strength(edit.deltas, 0.0))
    assert torch.equal(render_edited(model, [zero], z), parent)
    with apply_edit(model, zero):
        with torch.no_grad():
            assert torch.equal(model(z), parent)
    state = dict(model.public_parameters())
    out = apply_to_state_dict(state, zero.deltas)
    assert all(out[k] is state[k] for k in state)              # nothing even copied
    # The final quality's default strength: the one its strength curve picks.
    assert all(d.scale == edit.metrics["strength_curve"]["chosen"] for d in edit.deltas)
    half = with_strength(edit.deltas, 0.5)
    for a, b in zip(with_strength(edit.deltas, 1.0), half):
        assert torch.allclose(b.dense(), 0.5 * a.dense(), atol=1e-7)
    assert not torch.equal(render_edited(model, [edit], z), parent)


def test_strength_round_trips_through_the_delta_blob():
    d = LowRankDelta("main.6.weight", 0, torch.randn(16, 2), torch.randn(2, 8, 4, 4))
    def fmt(blob: bytes) -> int:
        header = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])
        return json.loads(header["__metadata__"]["rulewright"])["format"]

    assert fmt(to_bytes([d])) == 1                             # strength 1 keeps the first format
    scaled = to_bytes(with_strength([d], 0.25))
    assert fmt(scaled) == 2
    back = from_bytes(scaled)[0]
    assert back.scale == 0.25 and torch.allclose(back.dense(), 0.25 * d.dense(), atol=1e-7)
    with pytest.raises(ValueError):
        LowRankDelta("w", 0, torch.randn(4, 1), torch.randn(1, 2, 1, 1), float("nan"))


def test_strength_in_the_spec_is_recorded_and_applied(small):
    model, C = small
    spec = _spec(steps=15, found=[])
    full = rewrite(model, {**spec, "strength": 1.0}, moment=C)
    weak = rewrite(model, {**spec, "strength": 0.3}, moment=C)
    assert weak.spec["strength"] == 0.3 and all(d.scale == 0.3 for d in weak.deltas)
    for a, b in zip(full.deltas, weak.deltas):
        assert torch.allclose(b.dense(), 0.3 * a.dense(), atol=1e-6)


def test_specs_of_the_first_release_replay_as_the_one_layer_edit(small):
    model, _ = small
    legacy = {**_spec(), "solver": "optimize", "rank": 2, "steps": 5}
    legacy.pop("search")
    spec = EditSpec.from_json(legacy, model)
    assert spec.method == "single" and spec.solver == "adam" and spec.search["targets"] == 0
    assert spec.keep["weight"] == 16.0 and spec.lr == 0.05 and spec.strength == 1.0


@pytest.mark.parametrize("change,field", [
    ({"method": "nope"}, "method"), ({"factors": "x"}, "factors"), ({"strength": "1"}, "strength"),
    ({"strength": 11}, "strength"), ({"layers": ["main.6", "main.6"]}, "layers"), ({"layers": ["zz"]}, "layers[0]"),
    ({"search": {"targets": -1}}, "search.targets"), ({"goal": "value", "method": "multilayer"}, "goal"),
    ({"found": [{"seed": 3}]}, "found[0]"),
    ({"found": [{"seed": 3, "box": [0, 0, 4, 4]}] * 257}, "found"),
    ({"method": "single", "layers": ["main.3", "main.6"]}, "layers"),     # one layer: `layer` names it
    ({"method": "single", "layers": ["main.6"]}, "layers"),
    ({"op": "zero", "context": [{"seed": 3, "box": [0, 0, 4, 4]}], "layers": ["main.3"]}, "layers"),
])
def test_bad_new_fields_name_the_field(small, change, field):
    from rulewright.service.engine.errors import InvalidArgument

    model, _ = small
    with pytest.raises(InvalidArgument) as err:
        EditSpec.from_json(_spec(**change), model)
    assert err.value.field == field, err.value


def test_context_factors_fix_each_layers_input_factor(small):
    model, C = small
    edit = rewrite(model, _spec(steps=10, factors="context", layers=["main.3", "main.6"]), moment=C)
    assert sorted(d.weight_key for d in edit.deltas) == ["main.3.weight", "main.6.weight"]


def test_low_rank_side_paths_render_what_the_replaced_weights_render(small):
    from rulewright.service.engine import nethook
    from rulewright.service.engine.rewrite import LowRankPaths, _dense, render_with

    model, _ = small
    g = torch.Generator().manual_seed(3)
    parts, weights = [], {}
    for info in model.layer_infos():
        layer = model.layer(info.name)
        assert LowRankPaths.supports(layer)
        w = layer.weight
        d = torch.randn(w.shape[layer.in_axis], 2, generator=g)
        shape = list(w.shape)
        shape[layer.in_axis] = 2
        lam = 0.05 * torch.randn(shape, generator=g)
        parts.append((layer.modules[0], d, lam))
        name = [n for n, p in model.named_parameters() if p is w][0]
        weights[name] = w + _dense(lam, d, layer.in_axis)
    z = latents([1, 2, 3], 16)
    with torch.no_grad():
        with LowRankPaths(parts):
            side = model(z)
        replaced = render_with(model, weights, z)
    assert torch.allclose(side, replaced, atol=1e-5), (side - replaced).abs().max()
    assert nethook.hook_count(model) == 0                        # the hooks left with the context


def test_erase_finds_more_samples_to_erase_and_keeps_the_users_units(small):
    model, C = small
    b = [4, 4, 28, 28]
    spec = {"op": "erase", "layer": "main.6", "steps": 5, "stats": {"samples": 64}, "erase": {"units": 3},
            "context": [{"seed": 2, "box": b}, {"seed": 5, "box": b}],
            "search": {"targets": 2, "candidates": 20, "seed_start": 1000}}
    edit = rewrite(model, spec, moment=C)
    assert [r["box"] for r in edit.spec["found"]] == [b, b]
    alone = rewrite(model, {**spec, "found": []}, moment=C)
    assert edit.metrics["erased_units"] == alone.metrics["erased_units"]
    assert edit.metrics["found_targets"] == 2 and alone.metrics["found_targets"] == 0


def test_orthonormalizing_the_direction_keeps_the_delta():
    from rulewright.service.engine.rewrite import _dense, orthonormalize

    g = torch.Generator().manual_seed(0)
    d, lam = torch.randn(12, 3, generator=g), torch.randn(3, 5, 4, 4, generator=g)
    q, lam_q = orthonormalize(d, lam, 0)
    assert torch.allclose(q.T @ q, torch.eye(3), atol=1e-6)
    assert torch.allclose(_dense(lam_q, q, 0), _dense(lam, d, 0), atol=1e-5)


def test_the_side_path_solver_agrees_with_adam_on_replaced_weights(small):
    # The fast path changes how each step is computed, not the optimization: over 20 Adam steps both
    # reach the same factors within 1e-4 (float rounding of two orders of summation).
    from rulewright.service.engine.rewrite import Objective, build_goal, solve_multilayer

    model, C = small
    spec = EditSpec.from_json(_spec(steps=20, found=[]), model)
    goal = build_goal(model, spec)
    fast = solve_multilayer(Objective(model, spec, goal), spec)
    plain = solve_multilayer(Objective(model, spec, goal), spec, side_paths=False)
    for a, b in zip(fast, plain):
        assert a.weight_key == b.weight_key
        assert torch.allclose(a.dense(), b.dense(), atol=1e-4), (a.dense() - b.dense()).abs().max()
    assert any(d.dense().abs().max() > 1e-3 for d in fast)      # and the edit is not nothing
