"""Context search ranks samples by their response to a context direction."""

from __future__ import annotations

import pytest
import torch

from rulewright.service.engine import nethook
from rulewright.service.engine.errors import InvalidArgument
from rulewright.service.engine.generators.dcgan import DCGANGenerator
from rulewright.service.engine.regions import Region
from rulewright.service.engine.sampling import latents
from rulewright.service.engine.search import direction_for, response_maps, response_threshold, search
from rulewright.service.engine.stats import key_moment
from tests.builders import dcgan_state


@pytest.fixture(scope="module")
def setup():
    model = DCGANGenerator.from_state_dict(dcgan_state(z_dim=16, widths=(32, 16, 8, 3)))
    C = key_moment(model, "main.6", range(200)).moment()
    return model, C


def test_eyes_as_context_find_eyes_in_held_out_faces(faces):
    C = key_moment(faces, "main.6", range(500)).moment()
    eyes = [Region(seed=1, box=(8, 22, 56, 38)), Region(seed=9, box=(8, 20, 56, 36)),
            Region(seed=23, box=(8, 22, 56, 38))]
    d = direction_for(faces, "main.6", C, eyes, rank=1)
    matches = search(faces, "main.6", d, range(100, 300), top=20)     # seeds that took no part
    assert [m.score for m in matches] == sorted((m.score for m in matches), reverse=True)
    peaks = [torch.nonzero(m.response == m.response.max())[0].tolist() for m in matches]
    in_eye_band = sum(2 <= y <= 4 for y, _ in peaks)                   # key rows 2-4 = pixels 16-40
    assert in_eye_band >= 14, peaks
    mean_map = response_maps(faces, "main.6", d, latents(range(100, 300), 100)).mean(0)
    assert 2 <= int(mean_map.argmax()) // 8 <= 4


def test_rank_one_response_is_k_dot_d_and_threshold_is_a_high_quantile(setup):
    model, C = setup
    d = direction_for(model, "main.6", C, [Region(seed=3, box=(0, 0, 16, 16))], rank=1)
    z = latents([0, 1], 16)
    keys = nethook.latents_to_keys(model, "main.6", z).key
    assert torch.allclose(response_maps(model, "main.6", d, z), torch.einsum("nchw,c->nhw", keys, d[:, 0]), atol=1e-5)
    thr = response_threshold(model, "main.6", d, range(100), q=0.999)
    all_maps = response_maps(model, "main.6", d, latents(range(100), 16))
    share = (all_maps > thr).float().mean().item()
    assert share <= 0.002
    matches = search(model, "main.6", d, range(100), top=3, threshold=thr)
    assert matches[0].above > 0


def test_bad_direction_and_top(setup):
    model, C = setup
    with pytest.raises(InvalidArgument, match="direction"):
        response_maps(model, "main.6", torch.zeros(5, 1), latents([0], 16))
    with pytest.raises(InvalidArgument, match="top"):
        search(model, "main.6", torch.zeros(16, 1), [0], top=0)
