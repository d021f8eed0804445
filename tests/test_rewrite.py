"""The rewrite math, checked exactly; edits apply and come off; bad input leaves the model alone."""

from __future__ import annotations

import copy

import pytest
import torch

from rulewright.service.engine import nethook
from rulewright.service.engine.edit import EditSpec, apply_edit, apply_lineage, render_edited
from rulewright.service.engine.errors import Cancelled, InvalidArgument
from rulewright.service.engine.generators.dcgan import DCGANGenerator
from rulewright.service.engine.generators.progan import ProGANGenerator
from rulewright.service.engine.progress import Progress
from rulewright.service.engine.rewrite import context_direction, rewrite
from rulewright.service.engine.sampling import latents, sample
from tests.builders import TinyGenerator, dcgan_state, progan_state


def _spd(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.5 * torch.eye(d, dtype=torch.float64)


def _px(x: int, y: int) -> list[int]:
    return [x, y, x + 1, y + 1]


@pytest.mark.parametrize("transpose", [False, True], ids=["conv2d", "convtranspose2d"])
def test_closed_form_is_the_rank_one_formula(transpose):
    model = TinyGenerator(transpose=transpose)
    C = _spd(6)
    spec = {"layer": "edit", "rank": 1, "goal": "value", "solver": "closed_form", "ridge": 0.0, "keep": {"weight": 0},
            "copy": {"seed": 3, "box": _px(2, 5)}, "paste": [{"seed": 7, "box": _px(4, 1)}]}
    edit = rewrite(model, spec, moment=C)
    with torch.no_grad():
        k_src = nethook.latents_to_keys(model, "edit", latents([3], 8)).key[0, :, 5, 2].double()
        k_star = nethook.latents_to_keys(model, "edit", latents([7], 8)).key[0, :, 1, 4].double()
    w = model.edit.weight.detach().double()
    W = (w[:, :, 0, 0].T if transpose else w[:, :, 0, 0])          # (out, in)
    v_star = W @ k_src                                               # the copied value
    c_inv_k = torch.linalg.solve(C, k_star)
    expected = W + torch.outer(v_star - W @ k_star, c_inv_k) / (k_star @ c_inv_k)
    with apply_edit(model, edit):
        got = model.edit.weight.detach().double()
        got = got[:, :, 0, 0].T if transpose else got[:, :, 0, 0]
        assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert torch.equal(model.edit.weight.detach().double()[:, :, 0, 0], w[:, :, 0, 0])   # removed exactly


def test_rank_one_direction_of_one_key_is_c_inverse_k():
    C = _spd(9, seed=1)
    k = torch.randn(9, dtype=torch.float64)
    d = context_direction(C, k[None], rank=1, ridge=0.0).double()[:, 0]
    expected = torch.linalg.solve(C, k)
    cos = (d @ expected) / (d.norm() * expected.norm())
    assert cos.item() == pytest.approx(1.0, abs=1e-6)


def _small(kind: str):
    if kind == "dcgan":
        return DCGANGenerator.from_state_dict(dcgan_state(z_dim=16, widths=(32, 16, 8, 3))), "main.6", 32
    return ProGANGenerator.from_state_dict(progan_state(widths=(16, 16, 8))), "layer3", 16


def _box_spec(layer: str, res: int, **kw) -> dict:
    b = [res // 4, res // 4, res // 2, res // 2]
    spec = {"layer": layer, "rank": 2, "goal": "value", "steps": 300, "stats": {"samples": 64}, "keep": {"weight": 0},
            "copy": {"seed": 1, "box": b}, "paste": [{"seed": 2, "box": b}, {"seed": 5, "box": b}]}
    spec.update(kw)
    return spec


@pytest.mark.parametrize("kind", ["dcgan", "progan"])
@pytest.mark.parametrize("solver", ["optimize", "closed_form"])
def test_update_lies_in_the_span_of_d_along_the_input_axis(kind, solver):
    model, layer, res = _small(kind)
    edit = rewrite(model, _box_spec(layer, res, solver=solver, steps=50))
    delta = edit.deltas[0]
    dense = delta.dense().movedim(delta.in_axis, -1).reshape(-1, delta.direction.shape[0]).double()
    d = delta.direction.double()
    assert torch.allclose(d.T @ d, torch.eye(2, dtype=torch.float64), atol=1e-5)     # orthonormal
    residual = dense - dense @ d @ d.T                                                 # outside span(D)
    assert dense.norm() > 0 and residual.norm() / dense.norm() < 1e-5
    assert delta.weight_shape == tuple(model.layer(layer).weight.shape)


@pytest.mark.parametrize("kind", ["dcgan", "progan"])
def test_optimization_lowers_the_goal_loss_tenfold(kind):
    model, layer, res = _small(kind)
    x = res // 4
    spec = _box_spec(layer, res, rank=4, steps=400, copy={"seed": 1, "box": [x, x, x + res // 8, x + res // 8]},
                     paste=[{"seed": 2, "box": [x, x, x + res // 8, x + res // 8]}],
                     context=[{"seed": 2, "box": [0, 0, res // 2, res // 2]}])
    events = []
    edit = rewrite(model, spec, progress=Progress(events.append))
    assert edit.metrics["goal_loss_after"] * 10 <= edit.metrics["goal_loss_before"], edit.metrics
    steps = [e.done for e in events if e.stage == "optimize"]
    assert steps[0] == 1 and steps[-1] == 400 and events[-1].stage == "done"


def test_keys_orthogonal_to_d_in_the_c_metric_see_no_change():
    model, layer, res = _small("dcgan")
    edit = rewrite(model, _box_spec(layer, res, steps=100))
    d = edit.deltas[0].direction
    keys = nethook.latents_to_keys(model, layer, latents(range(4), 16)).key
    flat = keys.permute(0, 2, 3, 1)
    orth = (flat - flat @ d @ d.T).permute(0, 3, 1, 2).contiguous()      # Dᵀk = 0 at every location
    inside = (flat @ d @ d.T).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        before_orth, before_in = nethook.keys_to_values(model, layer, orth), nethook.keys_to_values(model, layer, inside)
        with apply_edit(model, edit):
            after_orth = nethook.keys_to_values(model, layer, orth)
            after_in = nethook.keys_to_values(model, layer, inside)
    assert torch.allclose(after_orth, before_orth, atol=1e-5)
    assert (after_in - before_in).abs().max() > 1e-3


def test_apply_remove_and_lineage_restore_weights_bit_for_bit():
    model, layer, res = _small("dcgan")
    original = copy.deepcopy(model.state_dict())
    a = rewrite(model, _box_spec(layer, res, steps=30))
    b = rewrite(model, _box_spec("main.3", res, steps=30))
    z = latents([11, 12], 16)
    with apply_lineage(model, [a, b]):
        chained = sample(model, z=z)
    assert torch.allclose(render_edited(model, [a, b], z), chained, atol=1e-6)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    with apply_edit(model, a):
        assert not torch.equal(model.main[6].weight, original["main.6.weight"])
    assert torch.equal(model.main[6].weight, original["main.6.weight"])


def test_spec_is_complete_and_replays_to_the_same_delta():
    model, layer, res = _small("progan")
    first = rewrite(model, _box_spec(layer, res, steps=40))
    assert set(first.spec) >= {"op", "layer", "rank", "goal", "solver", "steps", "lr", "keep", "stats", "copy"}
    again = rewrite(model, first.spec)
    assert again.spec == first.spec
    assert torch.equal(again.deltas[0].lam, first.deltas[0].lam)


def test_erase_and_zero():
    model, layer, res = _small("dcgan")
    ctx = [{"seed": 2, "box": [8, 8, 20, 20]}, {"seed": 3, "box": [8, 8, 20, 20]}]
    erase = rewrite(model, {"op": "erase", "layer": layer, "rank": 2, "goal": "value", "steps": 200, "keep": {"weight": 0},
                            "stats": {"samples": 32}, "erase": {"units": 3}, "context": ctx})
    assert len(erase.metrics["erased_units"]) == 3
    assert erase.metrics["goal_loss_after"] < erase.metrics["goal_loss_before"]
    zero = rewrite(model, {"op": "zero", "layer": layer, "rank": 2, "stats": {"samples": 32}, "context": ctx})
    d = zero.deltas[0].direction
    with apply_edit(model, zero):
        w = model.main[6].weight.detach().movedim(0, -1)             # ConvTranspose2d: input axis 0
        assert (w @ d).abs().max() < 1e-5                            # no component left along D


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("change,field", [
    ({"copy": {"seed": 1, "mask": {"encoding": "zlib-base64-u8", "size": [8, 8], "data": "eJxjYBgFAAF4AAE="}}},
     "copy.mask"),
    ({"paste": [{"seed": 2, "box": [4, 4, 4, 9]}]}, "paste[0].box"),
    ({"layer": "main.7"}, "layer"),
    ({"layer": "main.0"}, "layer"),
    ({"rank": 17}, "rank"),
    ({"rank": 0}, "rank"),
    ({"goal": "pixels"}, "goal"),
    ({"copy": None}, "copy"),
    ({"keep": {"wieght": 1}}, "keep"),
    ({"solver": "closed_form", "goal": "image"}, "solver"),
])
def test_bad_input_names_the_field_and_leaves_the_model_alone(change, field):
    model, layer, res = _small("dcgan")
    before = _weights(model)
    spec = _box_spec(layer, res)
    spec.update(change)
    with pytest.raises(InvalidArgument) as err:
        rewrite(model, spec)
    assert err.value.field == field, str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert nethook.hook_count(model) == 0


def test_empty_and_wrongly_sized_masks_are_refused_precisely():
    import base64
    import zlib

    model, layer, res = _small("dcgan")

    def mask(size: int, fill: int) -> dict:
        data = base64.b64encode(zlib.compress(bytes([fill]) * size * size)).decode()
        return {"encoding": "zlib-base64-u8", "size": [size, size], "data": data}

    with pytest.raises(InvalidArgument, match=r"copy.mask: must be 32x32 \(the image resolution\), got 16x16"):
        rewrite(model, _box_spec(layer, res, copy={"seed": 1, "mask": mask(16, 255)}))
    with pytest.raises(InvalidArgument, match=r"paste\[0\].mask: is empty"):
        rewrite(model, _box_spec(layer, res, paste=[{"seed": 1, "mask": mask(32, 0)}]))


def test_nan_latents_are_refused():
    model, _, _ = _small("dcgan")
    z = latents([0, 1], 16)
    z[1, 3] = float("nan")
    with pytest.raises(InvalidArgument, match="z: row 1 holds NaN"):
        sample(model, z=z)


def test_cancellation_stops_promptly_and_changes_nothing():
    model, layer, res = _small("dcgan")
    before = _weights(model)
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 5

    with pytest.raises(Cancelled):
        rewrite(model, _box_spec(layer, res, steps=10_000), progress=Progress(None, stop))
    assert len(calls) == 6
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_spec_json_round_trip_keeps_masks_exact():
    model, layer, res = _small("dcgan")
    alpha = torch.zeros(32, 32, dtype=torch.uint8)
    alpha[5:9, 6:12] = 200
    from rulewright.service.engine.regions import Region

    spec = _box_spec(layer, res, copy=Region(seed=1, mask=alpha).to_spec())
    parsed = EditSpec.from_json(spec, model)
    assert torch.equal(parsed.copy.mask, alpha)
    assert EditSpec.from_json(parsed.to_json(), model).to_json() == parsed.to_json()
