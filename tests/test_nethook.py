"""Captured keys and values agree with running the layer by hand; hooks never outlive a call."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rulewright.service.engine import nethook
from rulewright.service.engine.generators.dcgan import DCGANGenerator
from rulewright.service.engine.generators.progan import ProGANGenerator
from rulewright.service.engine.sampling import latents
from tests.builders import dcgan_state, progan_state


def _dcgan():
    return DCGANGenerator.from_state_dict(dcgan_state(z_dim=16, widths=(32, 16, 8, 3)))


def test_dcgan_keys_and_values_match_the_layer_by_hand():
    model = _dcgan()
    z = latents(range(3), 16)
    with torch.no_grad(), nethook.Trace(model, "main.6") as tr:
        image = model(z)
    m = model.main
    with torch.no_grad():
        by_hand_key = m[5](m[4](m[3](m[2](m[1](m[0](z[:, :, None, None]))))))
        bn = m[7]
        conv = F.conv_transpose2d(by_hand_key, m[6].weight, stride=2, padding=1)
        by_hand_value = (conv - bn.running_mean[None, :, None, None]) / torch.sqrt(
            bn.running_var[None, :, None, None] + bn.eps) * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    assert torch.allclose(tr.key, by_hand_key, atol=1e-6)
    assert torch.allclose(tr.value, by_hand_value, atol=1e-5)
    assert torch.allclose(nethook.keys_to_values(model, "main.6", tr.key), tr.value, atol=1e-6)
    # The ReLU after the value must not have overwritten the captured value in place.
    assert (tr.value < 0).any()
    assert nethook.hook_count(model) == 0
    assert image.shape == (3, 3, 32, 32)


def test_progan_key_is_after_pixelnorm_and_upsampling():
    model = ProGANGenerator.from_state_dict(progan_state(widths=(32, 32, 16)))
    z = latents(range(2), 32)
    with torch.no_grad():
        keys = nethook.latents_to_keys(model, "layer3", z)
        before = nethook.latents_to_values(model, "layer2", z)            # layer2's conv output
        layer2_out = model.blocks.layer2.act(model.blocks.layer2.wscale(before))
        normed = layer2_out / torch.sqrt((layer2_out ** 2).mean(1, keepdim=True) + 1e-8)
        expected = F.interpolate(normed, scale_factor=2, mode="nearest")
        value = nethook.keys_to_values(model, "layer3", keys.key)
    assert keys.key.shape == (2, 32, 8, 8)
    assert torch.allclose(keys.key, expected, atol=1e-5)
    assert torch.allclose(value, F.conv2d(keys.key, model.blocks.layer3.conv.weight, padding=1), atol=1e-5)
    assert nethook.hook_count(model) == 0


def test_values_to_image_reproduces_the_forward_and_carries_gradients():
    model = _dcgan()
    z = latents(range(2), 16)
    with torch.no_grad():
        full = model(z)
        values = nethook.latents_to_values(model, "main.6", z)
    assert torch.allclose(nethook.values_to_image(model, "main.6", z, values), full, atol=1e-6)
    v = values.clone().requires_grad_(True)
    nethook.values_to_image(model, "main.6", z, v).sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert nethook.hook_count(model) == 0


def test_stop_means_the_rest_never_runs():
    model = _dcgan()
    calls = []
    handle = model.main[9].register_forward_hook(lambda *a: calls.append(1))
    try:
        nethook.latents_to_keys(model, "main.6", latents([0], 16))
        assert calls == []
        nethook.latents_to_values(model, "main.6", latents([0], 16))
        assert calls == []
    finally:
        handle.remove()


def test_replace_output_ablates_units_and_is_removed_on_exit():
    model = _dcgan()
    z = latents([0, 1], 16)
    with torch.no_grad():
        before = model(z)
        with nethook.replace_output(model, "main.3", lambda v: v * 0):
            ablated = model(z)
            with nethook.Trace(model, "main.3", retain_key=False) as tr:
                model(z)
        after = model(z)
    assert not torch.allclose(ablated, before)
    assert torch.equal(after, before)
    assert nethook.hook_count(model) == 0
    assert tr.value is not None


def test_hooks_removed_even_when_the_forward_fails():
    model = _dcgan()
    try:
        with nethook.Trace(model, "main.6"):
            model(torch.zeros(1, 5))          # wrong latent size
    except ValueError:
        pass
    assert nethook.hook_count(model) == 0
