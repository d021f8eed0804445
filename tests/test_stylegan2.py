"""StyleGAN2 generator: the port's layout loads, the split modulated convolution equals the
port's grouped one, sampling is deterministic, malformed dicts are named, hooks see the right keys.

The reference forward below is written from the port's description, independently of the engine
module: per-sample weights, grouped convolutions, zero insertion by strided assignment.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rulewright.service.engine.generators.base import StateDictMismatch
from rulewright.service.engine.generators.stylegan2 import StyleGAN2Generator, normalize_checkpoint
from rulewright.service.engine.nethook import Trace, hook_count, keys_to_values

SIZE, STYLE_DIM, N_MLP = 32, 32, 2
CHANNELS = [32, 24, 16, 12]          # at 4, 8, 16, 32: all different, so in/out mix-ups show


# ---------------------------------------------------------------------------------------------
# Test data


def blur_kernel() -> torch.Tensor:
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    k = torch.outer(k, k)
    return k / k.sum() * 4


def random_state_dict(size=SIZE, style_dim=STYLE_DIM, n_mlp=N_MLP, channels=CHANNELS, kernel=3,
                      seed=0, latent_avg=True) -> dict[str, torch.Tensor]:
    """Every key of the port's g_ema layout, random (no zeros), plus latent_avg."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, offset=0.0):
        return torch.randn(*shape, generator=g) * scale + offset

    sd: dict[str, torch.Tensor] = {}
    for i in range(1, n_mlp + 1):
        sd[f"style.{i}.weight"] = rnd(style_dim, style_dim, scale=100.0)  # stored / lr_mul
        sd[f"style.{i}.bias"] = rnd(style_dim, scale=10.0)
    sd["input.input"] = rnd(1, channels[0], 4, 4)

    def styled(prefix, cin, cout, up):
        sd[f"{prefix}.conv.weight"] = rnd(1, cout, cin, kernel, kernel)
        sd[f"{prefix}.conv.modulation.weight"] = rnd(cin, style_dim)
        sd[f"{prefix}.conv.modulation.bias"] = rnd(cin, scale=0.2, offset=1.0)
        if up:
            sd[f"{prefix}.conv.blur.kernel"] = blur_kernel()
        sd[f"{prefix}.noise.weight"] = rnd(1, scale=0.3)
        sd[f"{prefix}.activate.bias"] = rnd(cout, scale=0.2)

    def to_rgb(prefix, cin, up):
        sd[f"{prefix}.conv.weight"] = rnd(1, 3, cin, 1, 1)
        sd[f"{prefix}.conv.modulation.weight"] = rnd(cin, style_dim)
        sd[f"{prefix}.conv.modulation.bias"] = rnd(cin, scale=0.2, offset=1.0)
        sd[f"{prefix}.bias"] = rnd(1, 3, 1, 1, scale=0.2)
        if up:
            sd[f"{prefix}.upsample.kernel"] = blur_kernel()

    styled("conv1", channels[0], channels[0], False)
    to_rgb("to_rgb1", channels[0], False)
    for j in range(len(channels) - 1):
        styled(f"convs.{2 * j}", channels[j], channels[j + 1], True)
        styled(f"convs.{2 * j + 1}", channels[j + 1], channels[j + 1], False)
        to_rgb(f"to_rgbs.{j}", channels[j + 1], True)
    num_layers = (int(math.log2(size)) - 2) * 2 + 1
    for i in range(num_layers):
        r = 2 ** ((i + 5) // 2)
        sd[f"noises.noise_{i}"] = rnd(1, 1, r, r)
    if latent_avg:
        sd["latent_avg"] = rnd(style_dim, scale=0.5)
    return sd


def latents(seeds, dim=STYLE_DIM) -> torch.Tensor:
    return torch.stack([torch.randn(dim, generator=torch.Generator().manual_seed(s)) for s in seeds])


@pytest.fixture(scope="module")
def state():
    return random_state_dict()


@pytest.fixture(scope="module")
def model(state):
    return StyleGAN2Generator.from_state_dict(state)


# ---------------------------------------------------------------------------------------------
# The port's forward, grouped convolution per sample (independent reference)


def ref_upfirdn(x, kernel, up, pad0, pad1):
    n, c, h, w = x.shape
    if up > 1:
        z = x.new_zeros(n, c, h * up, w * up)
        z[:, :, ::up, ::up] = x
        x = z
    x = F.pad(x, [pad0, pad1, pad0, pad1])
    y = F.conv2d(x.reshape(n * c, 1, *x.shape[2:]), torch.flip(kernel, [0, 1])[None, None])
    return y.reshape(n, c, *y.shape[2:])


def ref_linear(x, weight, bias, lr_mul, act):
    scale = lr_mul / math.sqrt(weight.shape[1])
    if act:
        return F.leaky_relu(F.linear(x, weight * scale) + bias * lr_mul, 0.2) * math.sqrt(2)
    return F.linear(x, weight * scale, bias * lr_mul)


def ref_modconv(sd, p, x, w, demodulate, upsample):
    weight = sd[f"{p}.weight"]
    _, cout, cin, k, _ = weight.shape
    b, _, h, wd = x.shape
    s = ref_linear(w, sd[f"{p}.modulation.weight"], sd[f"{p}.modulation.bias"], 1.0, False)
    weight = weight / math.sqrt(cin * k * k) * s.view(b, 1, cin, 1, 1)
    if demodulate:
        d = torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8)
        weight = weight * d.view(b, cout, 1, 1, 1)
    x = x.reshape(1, b * cin, h, wd)
    if upsample:
        wt = weight.transpose(1, 2).reshape(b * cin, cout, k, k)
        y = F.conv_transpose2d(x, wt, stride=2, padding=0, groups=b)
        y = y.reshape(b, cout, *y.shape[2:])
        pp = (4 - 2) - (k - 1)
        return ref_upfirdn(y, sd[f"{p}.blur.kernel"], 1, (pp + 1) // 2 + 1, pp // 2 + 1)
    y = F.conv2d(x, weight.reshape(b * cout, cin, k, k), padding=k // 2, groups=b)
    return y.reshape(b, cout, h, wd)


def ref_styled(sd, p, x, w, noise, upsample):
    y = ref_modconv(sd, f"{p}.conv", x, w, True, upsample)
    y = y + sd[f"{p}.noise.weight"] * noise
    return F.leaky_relu(y + sd[f"{p}.activate.bias"].view(1, -1, 1, 1), 0.2) * math.sqrt(2)


def ref_to_rgb(sd, p, x, w, skip):
    y = ref_modconv(sd, f"{p}.conv", x, w, False, False) + sd[f"{p}.bias"]
    if skip is not None:
        y = y + ref_upfirdn(skip, sd[f"{p}.upsample.kernel"], 2, 2, 1)
    return y


def ref_forward(sd, z, truncation):
    w = z * torch.rsqrt(z.pow(2).mean(1, keepdim=True) + 1e-8)
    i = 1
    while f"style.{i}.weight" in sd:
        w = ref_linear(w, sd[f"style.{i}.weight"], sd[f"style.{i}.bias"], 0.01, True)
        i += 1
    if truncation < 1:
        w = sd["latent_avg"] + truncation * (w - sd["latent_avg"])
    x = sd["input.input"].repeat(z.shape[0], 1, 1, 1)
    x = ref_styled(sd, "conv1", x, w, sd["noises.noise_0"], False)
    skip = ref_to_rgb(sd, "to_rgb1", x, w, None)
    j = 0
    while f"to_rgbs.{j}.bias" in sd:
        x = ref_styled(sd, f"convs.{2 * j}", x, w, sd[f"noises.noise_{2 * j + 1}"], True)
        x = ref_styled(sd, f"convs.{2 * j + 1}", x, w, sd[f"noises.noise_{2 * j + 2}"], False)
        skip = ref_to_rgb(sd, f"to_rgbs.{j}", x, w, skip)
        j += 1
    return skip


# ---------------------------------------------------------------------------------------------
# Loading


def test_loads_the_port_layout(state, model):
    assert model.config() == {"size": 32, "style_dim": 32, "n_mlp": 2, "channels": CHANNELS,
                              "kernel_size": 3, "lr_mlp": 0.01, "z_dim": 32, "resolution": 32}
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, tensor in state.items():
        assert loaded[key].shape == tensor.shape, key
        assert torch.equal(loaded[key], tensor), key
    public = model.public_state_dict()
    again = StyleGAN2Generator.from_state_dict(public)
    z = latents([3, 4])
    with torch.no_grad():
        assert torch.equal(again(z, 0.7), model(z, 0.7))


@pytest.mark.parametrize("truncation", [1.0, 0.7])
def test_split_equals_grouped_reference(state, model, truncation):
    z = latents([0, 1, 2, 3])
    with torch.no_grad():
        image = model(z, truncation)
        expected = ref_forward(state, z, truncation)
    assert image.shape == (4, 3, SIZE, SIZE)
    assert expected.abs().max() > 0.1           # a real picture, not a vanishing one
    torch.testing.assert_close(image, expected, atol=1e-5, rtol=1e-5)


def test_split_equals_reference_with_kernel_5():
    state = random_state_dict(size=16, style_dim=8, n_mlp=1, channels=[8, 6, 4], kernel=5, seed=1)
    model = StyleGAN2Generator.from_state_dict(state)
    z = latents([5, 6], dim=8)
    with torch.no_grad():
        torch.testing.assert_close(model(z, 0.5), ref_forward(state, z, 0.5), atol=1e-5, rtol=1e-5)


def test_latent_avg_defaults_to_the_mean_of_w():
    state = random_state_dict(latent_avg=False)
    model = StyleGAN2Generator.from_state_dict(state)
    z = torch.randn(4096, STYLE_DIM, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.style(z).mean(0)
    torch.testing.assert_close(model.latent_avg, expected)
    assert "latent_avg" in model.public_state_dict()


# ---------------------------------------------------------------------------------------------
# Determinism and truncation


def test_same_seed_same_image_whatever_the_batch(model):
    with torch.no_grad():
        first = model(latents([7, 8, 9]), 0.8)
        second = model(latents([7, 8, 9]), 0.8)
        alone = model(latents([8]), 0.8)
        other_batch = model(latents([1, 8]), 0.8)
    assert torch.equal(first, second)
    torch.testing.assert_close(alone[0], first[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(other_batch[1], first[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(first[0], first[1])


def test_truncation_zero_is_one_image(model):
    with torch.no_grad():
        images = model(latents([0, 11, 222]), 0.0)
    torch.testing.assert_close(images[1], images[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(images[2], images[0], atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        model(latents([0]), 1.5)


# ---------------------------------------------------------------------------------------------
# Malformed state dicts


def test_missing_key_is_named(state):
    broken = {k: v for k, v in state.items() if k != "convs.3.noise.weight"}
    with pytest.raises(StateDictMismatch) as err:
        StyleGAN2Generator.from_state_dict(broken)
    assert err.value.missing == ["convs.3.noise.weight"]
    assert "missing keys: convs.3.noise.weight" in str(err.value)


def test_missing_size_key_is_named(state):
    broken = {k: v for k, v in state.items() if k != "convs.2.conv.weight"}
    with pytest.raises(StateDictMismatch) as err:
        StyleGAN2Generator.from_state_dict(broken)
    assert "convs.2.conv.weight" in err.value.missing


def test_unexpected_key_is_named(state):
    broken = dict(state, **{"convs.1.conv.extra": torch.zeros(2)})
    with pytest.raises(StateDictMismatch) as err:
        StyleGAN2Generator.from_state_dict(broken)
    assert err.value.unexpected == ["convs.1.conv.extra"] and not err.value.missing
    assert "unexpected keys: convs.1.conv.extra" in str(err.value)


@pytest.mark.parametrize("key, shape, expected", [
    ("convs.1.conv.weight", (1, 24, 23, 3, 3), "(1, 24, 24, 3, 3)"),
    ("to_rgbs.2.bias", (1, 4, 1, 1), "(1, 3, 1, 1)"),
    ("latent_avg", (1, 32), "(32)"),
    ("noises.noise_4", (1, 1, 8, 8), "(1, 1, 16, 16)"),
])
def test_mismatched_shape_is_named(state, key, shape, expected):
    broken = dict(state, **{key: torch.zeros(shape)})
    with pytest.raises(StateDictMismatch) as err:
        StyleGAN2Generator.from_state_dict(broken)
    found = "(" + ", ".join(str(s) for s in shape) + ")"
    assert [m[0] for m in err.value.mismatched] == [key]
    assert f"{key} expected {expected} got {found}" in str(err.value)


def test_normalize_checkpoint_forms(state):
    flat_g = {k: v for k, v in state.items() if k != "latent_avg"}
    nested = {"g_ema": flat_g, "latent_avg": state["latent_avg"], "g": {"x": torch.zeros(1)},
              "d": {"y": torch.zeros(1)}, "g_optim": {"state": {}}, "args": object()}
    out = normalize_checkpoint(nested)
    assert set(out) == set(state)
    assert out["latent_avg"] is state["latent_avg"]
    prefixed = {f"g_ema.{k}": v for k, v in flat_g.items()}
    prefixed.update({"latent_avg": state["latent_avg"], "d.convs.0.weight": torch.zeros(1)})
    assert set(normalize_checkpoint(prefixed)) == set(state)
    assert normalize_checkpoint(state) == state
    assert "latent_avg" not in normalize_checkpoint({"g_ema": flat_g})
    with pytest.raises(StateDictMismatch, match="input.input"):
        normalize_checkpoint({"g_ema": dict(flat_g, **{"input.input": [1, 2]})})


# ---------------------------------------------------------------------------------------------
# Hooks and layers


def test_trace_key_is_the_style_modulated_input(model):
    z = latents([0, 1])
    with torch.no_grad():
        plain = model(z)
        with Trace(model, "convs.0") as before, Trace(model, "convs.1", stop=False) as tr:
            traced = model(z)
        assert hook_count(model) == 0
        assert torch.equal(traced, plain)
        s, noise = tr.extras
        assert tr.key.shape == (2, 24, 8, 8) and s.shape == (2, 24)
        assert noise is model.noises.noise_2
        w = model.style(z)
        s_hand = model.convs[1].conv.modulation(w)
        torch.testing.assert_close(s, s_hand)
        torch.testing.assert_close(tr.key, before.value * s_hand[:, :, None, None])
        value = keys_to_values(model, "convs.1", tr.key, *tr.extras)
        assert hook_count(model) == 0
    torch.testing.assert_close(value, tr.value, atol=1e-6, rtol=1e-6)


def test_layer_infos_follow_the_resolutions(model):
    infos = model.layer_infos()
    assert hook_count(model) == 0
    assert [i.name for i in infos] == ["conv1"] + [f"convs.{n}" for n in range(6)]
    expected = [((32, 4, 4), (32, 4, 4))]
    for j in range(3):
        r, cin, cout = 4 * 2**j, CHANNELS[j], CHANNELS[j + 1]
        expected.append(((cin, r, r), (cout, 2 * r, 2 * r)))
        expected.append(((cout, 2 * r, 2 * r), (cout, 2 * r, 2 * r)))
    assert [(i.key_shape, i.value_shape) for i in infos] == expected
    for info in infos:
        cout, cin = info.value_shape[0], info.key_shape[0]
        assert info.weight_shape == (1, cout, cin, 3, 3)
        assert info.in_axis == 2 and info.linear is False
    spec = model.layer("convs.2")
    assert spec.weight is model.convs[2].conv.weight and spec.modules == (model.convs[2],)
    with pytest.raises(LookupError):
        model.layer("to_rgbs.0")


def test_default_layer_rule(model):
    assert model.default_layer() == "conv1"                      # 32: keys >= 4
    big = StyleGAN2Generator(size=64, style_dim=8, n_mlp=1, channels=[8, 8, 8, 8, 8])
    assert big.default_layer() == "convs.1"                      # 64: keys >= 8
    infos = big.layer_infos()
    assert [i.key_shape[1] for i in infos[:3]] == [4, 4, 8]      # conv1, convs.0 below; convs.1 first at 8
    assert hook_count(big) == 0
