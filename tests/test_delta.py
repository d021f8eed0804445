"""Low-rank deltas: the dense form, serialization, application; upstream fingerprints for caching."""

from __future__ import annotations

import pytest
import torch

from rulewright.service.engine.delta import LowRankDelta, apply_to_state_dict, from_bytes, to_bytes
from rulewright.service.engine.generators.dcgan import DCGANGenerator
from rulewright.service.engine.generators.progan import ProGANGenerator
from tests.builders import dcgan_state, progan_state


def test_dense_contracts_the_input_axis_for_both_layouts():
    d = torch.randn(6, 2)
    lam_conv = torch.randn(4, 2, 3, 3)                      # Conv2d: (out, in→r, kh, kw)
    lam_convt = torch.randn(2, 4, 3, 3)                     # ConvTranspose2d: (in→r, out, kh, kw)
    assert torch.allclose(LowRankDelta("w", 1, d, lam_conv).dense(), torch.einsum("orhw,ir->oihw", lam_conv, d), atol=1e-6)
    assert torch.allclose(LowRankDelta("w", 0, d, lam_convt).dense(), torch.einsum("rohw,ir->iohw", lam_convt, d), atol=1e-6)
    with pytest.raises(ValueError, match="rank"):
        LowRankDelta("w", 1, torch.randn(6, 3), lam_conv)


def test_bytes_round_trip_deterministically():
    deltas = [LowRankDelta("main.6.weight", 0, torch.randn(16, 1), torch.randn(1, 8, 4, 4))]
    data = to_bytes(deltas)
    back = from_bytes(data)
    assert back[0].weight_key == "main.6.weight" and back[0].in_axis == 0
    assert torch.equal(back[0].dense(), deltas[0].dense())
    assert to_bytes(back) == data
    with pytest.raises(ValueError, match="not a low-rank delta"):
        from_bytes(b"garbage")


def test_apply_to_state_dict_changes_one_tensor_and_shares_the_rest():
    state = dcgan_state(z_dim=16, widths=(32, 16, 8, 3))
    delta = LowRankDelta("main.6.weight", 0, torch.randn(16, 1), torch.randn(1, 8, 4, 4))
    out = apply_to_state_dict(state, [delta])
    assert torch.allclose(out["main.6.weight"], state["main.6.weight"] + delta.dense())
    assert out["main.3.weight"] is state["main.3.weight"]
    with pytest.raises(KeyError):
        apply_to_state_dict(state, [LowRankDelta("nope", 0, torch.randn(16, 1), torch.randn(1, 8, 4, 4))])
    with pytest.raises(ValueError, match="expects shape"):
        apply_to_state_dict(state, [LowRankDelta("main.3.weight", 0, torch.randn(16, 1), torch.randn(1, 8, 4, 4))])


def test_upstream_names_exclude_the_layer_and_everything_after():
    model = DCGANGenerator.from_state_dict(dcgan_state(z_dim=16, widths=(32, 16, 8, 3)))
    assert model.upstream_names("main.6") == ["main.0.weight", "main.1.bias", "main.1.weight", "main.3.weight",
                                              "main.4.bias", "main.4.weight"]
    progan = ProGANGenerator.from_state_dict(progan_state(widths=(8, 8, 4)))
    assert progan.upstream_names("layer3") == ["blocks.layer1.conv.weight", "blocks.layer1.wscale.b",
                                               "blocks.layer2.conv.weight", "blocks.layer2.wscale.b"]


def test_fingerprint_changes_only_with_upstream_edits():
    model = DCGANGenerator.from_state_dict(dcgan_state(z_dim=16, widths=(32, 16, 8, 3)))
    before = {layer: model.upstream_fingerprint(layer) for layer in ("main.3", "main.6", "main.9")}
    with torch.no_grad():
        model.main[6].weight.add_(0.01)               # an edit at main.6
    after = {layer: model.upstream_fingerprint(layer) for layer in ("main.3", "main.6", "main.9")}
    assert after["main.3"] == before["main.3"] and after["main.6"] == before["main.6"]
    assert after["main.9"] != before["main.9"]
    assert len(set(before.values())) == 3


def test_non_contiguous_factors_serialize():
    d = torch.randn(2, 16).T                      # a transposed view, as QR returns
    lam = torch.randn(8, 2, 4, 4).transpose(0, 1)
    data = to_bytes([LowRankDelta("main.6.weight", 0, d, lam)])
    back = from_bytes(data)[0]
    assert torch.equal(back.direction, d) and torch.equal(back.lam, lam)
