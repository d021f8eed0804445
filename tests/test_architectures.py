"""DCGAN and ProGAN load their public layouts, match the originals, and refuse malformed dicts."""

from __future__ import annotations

import pytest
import torch

from rulewright.service.engine.generators.base import StateDictMismatch
from rulewright.service.engine.generators.dcgan import DCGANGenerator
from rulewright.service.engine.generators.progan import ProGANGenerator
from rulewright.service.engine.sampling import latents
from tests.builders import dcgan_state, progan_reference, progan_state, tutorial_dcgan


def test_dcgan_loads_tutorial_layout_and_matches_it():
    tutorial = tutorial_dcgan(z_dim=16, widths=(32, 16, 8, 3))
    model = DCGANGenerator.from_state_dict(tutorial.state_dict())
    assert model.config() == {"z_dim": 16, "widths": [32, 16, 8, 3], "kernel_size": 4, "resolution": 32}
    z = latents(range(4), 16)
    with torch.no_grad():
        assert torch.allclose(model(z), tutorial(z), atol=1e-6)
    assert set(model.public_state_dict()) == set(tutorial.state_dict())


def test_progan_matches_reference_forward():
    state = progan_state(widths=(32, 32, 16))
    model = ProGANGenerator.from_state_dict(state)
    assert model.resolution == 16 and model.z_dim == 32
    z = latents(range(3), 32)
    with torch.no_grad():
        assert torch.allclose(model(z), progan_reference(state, z), atol=1e-5)
    assert set(model.public_state_dict()) == set(state)


@pytest.mark.parametrize(
    "cls,state_fn",
    [(DCGANGenerator, lambda: dcgan_state()), (ProGANGenerator, lambda: progan_state())],
    ids=["dcgan", "progan"],
)
def test_missing_key_is_named(cls, state_fn):
    state = state_fn()
    victim = sorted(k for k in state if k.endswith("bias") or k.endswith(".b"))[0]
    del state[victim]
    with pytest.raises(StateDictMismatch) as err:
        cls.from_state_dict(state)
    assert err.value.missing == [victim]
    assert f"missing keys: {victim}" in str(err.value)


@pytest.mark.parametrize(
    "cls,state_fn", [(DCGANGenerator, dcgan_state), (ProGANGenerator, progan_state)], ids=["dcgan", "progan"]
)
def test_unexpected_key_is_named(cls, state_fn):
    state = state_fn()
    state["extra.thing"] = torch.zeros(3)
    with pytest.raises(StateDictMismatch) as err:
        cls.from_state_dict(state)
    assert err.value.unexpected == ["extra.thing"]
    assert "unexpected keys: extra.thing" in str(err.value)


def test_dcgan_mismatched_shape_names_both_shapes():
    state = dcgan_state(z_dim=16, widths=(32, 16, 8, 3))
    state["main.4.running_var"] = torch.ones(17)
    with pytest.raises(StateDictMismatch) as err:
        DCGANGenerator.from_state_dict(state)
    assert err.value.mismatched == [("main.4.running_var", (16,), (17,))]
    assert "main.4.running_var expected (16) got (17)" in str(err.value)


def test_dcgan_chain_mismatch_is_reported_on_the_downstream_weight():
    state = dcgan_state(z_dim=16, widths=(32, 16, 8, 3))
    state["main.3.weight"] = torch.zeros(31, 16, 4, 4)   # in-channels must equal main.0's out (32)
    with pytest.raises(StateDictMismatch) as err:
        DCGANGenerator.from_state_dict(state)
    assert ("main.3.weight", (32, 16, 4, 4), (31, 16, 4, 4)) in err.value.mismatched


def test_progan_mismatched_shape_names_both_shapes():
    state = progan_state(widths=(32, 32, 16))
    state["layer4.conv.weight"] = torch.zeros(32, 32, 5, 5)
    with pytest.raises(StateDictMismatch) as err:
        ProGANGenerator.from_state_dict(state)
    assert err.value.mismatched == [("layer4.conv.weight", (32, 32, 3, 3), (32, 32, 5, 5))]


def test_progan_gap_in_block_numbers_is_explained():
    state = progan_state(widths=(32, 32, 16))
    del state["layer3.conv.weight"], state["layer3.wscale.b"]
    with pytest.raises(StateDictMismatch, match="layer1..layerN"):
        ProGANGenerator.from_state_dict(state)


def test_dcgan_without_first_conv_names_it():
    state = dcgan_state()
    del state["main.0.weight"]
    with pytest.raises(StateDictMismatch) as err:
        DCGANGenerator.from_state_dict(state)
    assert err.value.missing == ["main.0.weight"]


def test_truncation_refused_where_architecture_lacks_it():
    model = DCGANGenerator.from_state_dict(dcgan_state())
    with pytest.raises(ValueError, match="no truncation"):
        model(latents([0], model.z_dim), 0.5)


def test_layers_listed_with_shapes_and_defaults():
    model = DCGANGenerator.from_state_dict(dcgan_state(z_dim=16, widths=(32, 16, 8, 3)))
    infos = {i.name: i for i in model.layer_infos()}
    assert list(infos) == ["main.3", "main.6", "main.9"]
    assert infos["main.3"].key_shape == (32, 4, 4) and infos["main.3"].value_shape == (16, 8, 8)
    assert infos["main.9"].value_shape == (3, 32, 32) and infos["main.9"].weight_shape == (8, 3, 4, 4)
    assert model.default_layer() == "main.6"
    assert infos["main.6"].to_dict()["resolution"] == 8
    progan = ProGANGenerator.from_state_dict(progan_state(widths=(32, 32, 16, 16, 8)))   # 64×64
    assert progan.default_layer() == "layer3"                                           # keys 8×8
    assert {i.name: i.key_shape for i in progan.layer_infos()}["layer3"] == (32, 8, 8)
    with pytest.raises(LookupError, match="main.6"):
        model.layer("main.7")
