"""Seeds name images: same seed, same pixels, whatever the batch; latents drawn on the CPU."""

from __future__ import annotations

import pytest
import torch

from rulewright.service.engine.generators.dcgan import DCGANGenerator
from rulewright.service.engine.generators.progan import ProGANGenerator
from rulewright.service.engine.sampling import bucket, grid, latents, sample, to_uint8
from tests.builders import dcgan_state, progan_state



@pytest.fixture(params=["dcgan", "progan"])
def model(request):
    if request.param == "dcgan":
        return DCGANGenerator.from_state_dict(dcgan_state())
    return ProGANGenerator.from_state_dict(progan_state())


def test_latent_of_a_seed_is_fixed_and_independent_of_neighbours():
    a = latents([7], 100)[0]
    b = latents([3, 7, 11], 100)[1]
    assert torch.equal(a, b)
    gen = torch.Generator().manual_seed(7)
    assert torch.equal(a, torch.randn(100, generator=gen))
    assert not torch.equal(latents([8], 100)[0], a)


def test_same_seed_twice_gives_identical_tensors(model):
    assert torch.equal(sample(model, seeds=[0, 1, 2]), sample(model, seeds=[0, 1, 2]))


def test_image_does_not_depend_on_its_batch(model):
    alone = sample(model, seeds=[5], batch_size=1)[0]
    for seeds, batch_size, index in [([1, 2, 3, 4, 5], 5, 4), ([5, 9, 13], 3, 0), (list(range(20)), 8, 5),
                                     (list(range(3, 40)), 64, 2)]:
        together = sample(model, seeds=seeds, batch_size=batch_size)[index]
        assert torch.equal(alone, together), (seeds, batch_size)     # bitwise: forward passes run in buckets
    assert (alone - sample(model, seeds=[6], batch_size=1)[0]).abs().max() > 0.01


def test_buckets_are_powers_of_two_from_four():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17)] == [4, 4, 4, 4, 8, 8, 16, 16, 32]


def _stylegan2():
    from rulewright.service.engine.generators.stylegan2 import StyleGAN2Generator
    from tests.test_stylegan2 import random_state_dict

    return StyleGAN2Generator.from_state_dict(random_state_dict())


@pytest.mark.parametrize("arch", ["faces", "dcgan", "progan", "stylegan2"])
def test_every_bucket_computes_an_image_with_the_same_bits(arch, request):
    """What padding rests on: a latent's image is bitwise the same in every bucket size."""
    net = {"faces": lambda: request.getfixturevalue("faces"), "dcgan": lambda: DCGANGenerator.from_state_dict(dcgan_state()),
           "progan": lambda: ProGANGenerator.from_state_dict(progan_state()), "stylegan2": _stylegan2}[arch]()
    z = latents(range(64), net.z_dim)
    with torch.no_grad():
        ref = net(z)
        for n in (4, 8, 16, 32):
            assert torch.equal(net(z[:n]), ref[:n]), n
        perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
        assert torch.equal(net(z[:16][perm]), ref[:16][perm])     # nor does its place in the batch matter


def test_raw_latents_equal_seeded_sampling(model):
    z = latents([3, 4], model.z_dim)
    assert torch.equal(sample(model, z=z), sample(model, seeds=[3, 4]))


@pytest.mark.parametrize("seeds", [[-1], [2**63], [1.5], [True]])
def test_bad_seeds_are_refused(model, seeds):
    with pytest.raises(ValueError, match=r"seeds\[0\]"):
        sample(model, seeds=seeds)


def test_pixels_and_grid():
    images = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    px = to_uint8(images)
    assert px.shape == (2, 2, 2, 3) and px[0, 0, 0].tolist() == [0, 128, 255]
    g = grid(images, columns=2, pad=1)
    assert g.shape == (1 * 3 + 1, 2 * 3 + 1, 3)
    assert g[1, 1].tolist() == [0, 128, 255] and g[0, 0].tolist() == [255, 255, 255]
