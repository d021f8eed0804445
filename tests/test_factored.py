"""Factored rendering: images of many versions of one base in shared passes, bit for bit as alone.

An image's bytes depend only on (version, seed, truncation): a version's low-rank term gives the
same bits whatever else shares the batch (other versions, the base, padding) and wherever the
image sits in it; and the factored image agrees with the dense-weight image within the CPU/GPU
tolerance.
"""

from __future__ import annotations

import threading

import pytest
import torch

from rulewright.service.engine import factored
from rulewright.service.engine.delta import apply_to_state_dict, with_strength
from rulewright.service.engine.device import CPU_GPU_TOLERANCE
from rulewright.service.engine.factored import Change
from rulewright.service.engine.generators.dcgan import DCGANGenerator
from rulewright.service.engine.generators.progan import ProGANGenerator
from rulewright.service.engine.generators.stylegan2 import StyleGAN2Generator
from rulewright.service.engine.loading import load_generator
from rulewright.service.engine.sampling import latents, sample
from tests.builders import dcgan_state, progan_state, random_deltas

ARCHS = ["faces", "dcgan", "progan", "stylegan2"]


@pytest.fixture(params=ARCHS)
def net(request):
    """A fresh model of each architecture (installing adds hooks, so never the session's faces)."""
    if request.param == "faces":
        return load_generator(request.getfixturevalue("faces_path"))
    if request.param == "dcgan":
        return DCGANGenerator.from_state_dict(dcgan_state())
    if request.param == "progan":
        return ProGANGenerator.from_state_dict(progan_state())
    from tests.test_stylegan2 import random_state_dict

    return StyleGAN2Generator.from_state_dict(random_state_dict())


def _versions(net, n: int = 6) -> list[list]:
    """Deltas of ``n`` versions: edits of every layer, one of a single layer, and a chain of two."""
    edits = [random_deltas(net, seed) for seed in range(n - 2)]
    one_layer = random_deltas(net, 99, rank=2, strength=1.0, layers=(net.default_layer(),))
    return edits + [one_layer, edits[0] + random_deltas(net, 100, rank=1)]


def _dense(net, deltas):
    return type(net).from_state_dict(apply_to_state_dict(net.public_state_dict(), deltas))


def test_an_image_has_the_same_bits_whatever_shares_its_batch(net):
    versions = [Change.of(d) for d in _versions(net)] + [None]          # None: the base itself
    truncations = [1.0, 0.7, 0.5] if net.supports_truncation else [1.0]
    count = 22
    rows = [(versions[i % len(versions)], truncations[i % len(truncations)]) for i in range(count)]
    z = latents(range(300, 300 + count), net.z_dim)
    alone = [sample(net, z=z[i:i + 1], changes=c, truncation=t)[0] for i, (c, t) in enumerate(rows)]
    gen = torch.Generator().manual_seed(0)
    for batch_size in (4, 8, 16, 32):
        order = torch.randperm(count, generator=gen).tolist()          # every image elsewhere each time
        together = sample(net, z=z[order], changes=[rows[i][0] for i in order],
                          truncation=[rows[i][1] for i in order], batch_size=batch_size)
        for j, i in enumerate(order):
            assert torch.equal(together[j], alone[i]), (batch_size, i)
    one = versions[0]
    same = sample(net, z=z[:13], changes=one)                             # one version, a group of 13
    assert all(torch.equal(same[i], sample(net, z=z[i:i + 1], changes=one)[0]) for i in range(13))


def test_rows_without_a_change_render_the_base_bit_for_bit(net):
    z = latents(range(8), net.z_dim)
    base = sample(net, z=z)
    edit = Change.of(random_deltas(net, 5))
    mixed = sample(net, z=z, changes=[edit if i % 3 == 0 else None for i in range(8)])
    assert all(torch.equal(mixed[i], base[i]) for i in range(8) if i % 3)
    assert not torch.equal(mixed[0], base[0])
    zero = Change.of(with_strength(random_deltas(net, 6), 0.0))             # strength 0: no change at all
    assert not zero and torch.equal(sample(net, z=z, changes=zero), base)


def test_factored_images_agree_with_dense_weights_within_the_cpu_gpu_tolerance(net):
    t = 0.7 if net.supports_truncation else 1.0
    z = latents(range(40, 48), net.z_dim)
    base = sample(net, z=z, truncation=t)
    for deltas in _versions(net):
        dense = sample(_dense(net, deltas), z=z, truncation=t)
        factored_images = sample(net, z=z, truncation=t, changes=Change.of(deltas))
        assert (dense - factored_images).abs().max() <= CPU_GPU_TOLERANCE
        assert (dense - base).abs().max() > 10 * CPU_GPU_TOLERANCE         # the edit shows


def test_a_chain_is_its_deltas_in_lineage_order():
    net = DCGANGenerator.from_state_dict(dcgan_state())
    first, second = random_deltas(net, 1), random_deltas(net, 2)
    parent = Change.of(first)
    child = parent.then(second)
    assert all(child.parts[k][0] is parent.parts[k][0] for k in parent.parts)     # the parent's tensors, shared
    z = latents(range(4), net.z_dim)
    assert torch.equal(sample(net, z=z, changes=child), sample(net, z=z, changes=Change.of(first + second)))


def test_per_image_truncations_give_the_bits_of_one_truncation():
    from tests.test_stylegan2 import random_state_dict

    net = StyleGAN2Generator.from_state_dict(random_state_dict())
    z = latents(range(8), net.z_dim)
    mixed = sample(net, z=z, truncation=[0.7, 1.0, 0.5, 0.7, 1.0, 0.0, 0.7, 0.5])
    for t in (0.7, 1.0, 0.5, 0.0):
        single = sample(net, z=z, truncation=t)
        assert all(torch.equal(mixed[i], single[i]) for i, ti in
                   enumerate([0.7, 1.0, 0.5, 0.7, 1.0, 0.0, 0.7, 0.5]) if ti == t)
    with pytest.raises(ValueError, match="truncation"):
        sample(DCGANGenerator.from_state_dict(dcgan_state()), z=z[:2, :16], truncation=[1.0, 0.5])


def test_the_hooks_act_only_in_the_rendering_thread():
    net = DCGANGenerator.from_state_dict(dcgan_state())
    factored.install(net)
    z = latents(range(4), net.z_dim)
    base = sample(net, z=z)
    edit = Change.of(random_deltas(net, 3))
    inside, other = threading.Event(), {}

    def meanwhile():
        inside.wait()
        other["images"] = sample(net, z=z)      # the same module, another thread, no change

    thread = threading.Thread(target=meanwhile)
    thread.start()
    with factored.rendering(net, [edit] * 4):
        inside.set()
        thread.join()
        with torch.no_grad():
            edited = net(z)
    assert torch.equal(other["images"], base) and not torch.equal(edited, base)
    assert torch.equal(sample(net, z=z), base)                  # nothing left behind
