"""Dissection: unit maps, thresholds, region ranking, segmenter labels and unit interventions.

The math is checked on a small random DCGAN against direct computations; the headline test
ablates the units ranked for the mouth of a real face and measures where the image changes.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from rulewright.service.engine import dissect, nethook
from rulewright.service.engine.errors import InvalidArgument
from rulewright.service.engine.generators.dcgan import DCGANGenerator
from rulewright.service.engine.regions import Region
from rulewright.service.engine.sampling import latents, sample
from rulewright.service.engine.stats import value_quantiles
from tests.builders import dcgan_state

# TorchScript is how segmentation models are registered, deprecated or not.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")

R = 32    # the small model's image resolution; main.3 values are (16, 8, 8), main.6 (8, 16, 16)


@pytest.fixture
def small():
    return DCGANGenerator.from_state_dict(dcgan_state(z_dim=16, widths=(32, 16, 8, 3)))


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before) -> bool:
    return nethook.hook_count(model) == 0 and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _box_mask(x0, y0, x1, y1, value=1.0, size=R):
    m = torch.zeros(size, size)
    m[y0:y1, x0:x1] = value
    return m


# ------------------------------------------------------------------------------ maps, thresholds


def test_unit_maps_equal_the_values_nethook_captures(small):
    z = latents([0, 1, 2], 16)
    with torch.no_grad(), nethook.Trace(small, "main.3") as tr:
        small(z)
    maps = dissect.unit_maps(small, "main.3", seeds=[0, 1, 2], batch_size=2)
    assert maps.shape == (3, 16, 8, 8)
    assert torch.equal(maps, tr.value)
    assert torch.equal(dissect.unit_maps(small, "main.3", z=z), maps)
    assert nethook.hook_count(small) == 0


def test_thresholds_are_the_exact_quantile_of_every_location(small):
    # 3 seeds × 64 locations is below the sketch's capacity, so the quantile is exact.
    values = dissect.unit_maps(small, "main.3", seeds=[0, 1, 2])
    expected = torch.quantile(values.permute(1, 0, 2, 3).reshape(16, -1), 0.99, dim=1)
    thr = dissect.unit_thresholds(small, "main.3", [0, 1, 2])
    assert torch.allclose(thr, expected, atol=1e-5)
    stat = value_quantiles(small, "main.3", [0, 1, 2])
    assert torch.equal(dissect.unit_thresholds(small, "main.3", quantiles=stat), thr)
    assert torch.allclose(dissect.unit_thresholds(small, "main.3", quantiles=stat, q=0.5),
                          values.permute(1, 0, 2, 3).reshape(16, -1).median(dim=1).values, atol=0.05)


# ---------------------------------------------------------------------------------- region scores


def test_region_scores_on_a_hand_made_case():
    # Maps already at image resolution (no upsampling): every number can be written down.
    maps = torch.zeros(1, 3, 8, 8)
    maps[0, 0, 2:6, 2:6] = 5.0          # unit 0 fires exactly on the box
    maps[0, 1, 2:6, 2:4] = 5.0          # unit 1 on half of the box
    maps[0, 2] = 1.0                    # unit 2 never exceeds its threshold, flat everywhere
    alpha = _box_mask(2, 2, 6, 6, size=8)[None]
    s = dissect.region_scores(maps, alpha, torch.tensor([1.0, 1.0, 1.0]))
    assert torch.allclose(s["iou"], torch.tensor([1.0, 0.5, 0.0]))
    assert torch.allclose(s["inside"], torch.tensor([5.0, 2.5, 1.0]))
    assert torch.allclose(s["outside"], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(s["contrast"], torch.tensor([5.0, 2.5, 0.0]))
    # A soft mask counts pixels fractionally: alpha 0.5 on the box gives IoU 8 / 16 for unit 0.
    soft = dissect.region_scores(maps, alpha * 0.5, torch.tensor([1.0, 1.0, 1.0]))
    assert soft["iou"][0].item() == pytest.approx(0.5)
    assert soft["inside"][0].item() == pytest.approx(5.0)


def test_region_scores_match_an_independent_computation():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(2, 4, 4, 4, generator=g)
    alphas = torch.rand(2, 16, 16, generator=g) * (torch.rand(2, 16, 16, generator=g) > 0.5)
    thr = torch.tensor([0.5, 0.0, 1.0, -0.5])
    s = dissect.region_scores(maps, alphas, thr)
    for u in range(4):
        inter = union = wi = wo = si = so = 0.0
        for n in range(2):
            up = F.interpolate(maps[n : n + 1, u : u + 1], size=(16, 16), mode="bilinear", align_corners=False)[0, 0]
            for y in range(16):
                for x in range(16):
                    on, a, v = float(up[y, x] > thr[u]), float(alphas[n, y, x]), float(up[y, x])
                    inter, union = inter + min(on, a), union + max(on, a)
                    si, wi, so, wo = si + a * v, wi + a, so + (1 - a) * v, wo + (1 - a)
        assert s["iou"][u].item() == pytest.approx(inter / union, abs=1e-5)
        assert s["inside"][u].item() == pytest.approx(si / wi, abs=1e-5)
        assert s["outside"][u].item() == pytest.approx(so / wo, abs=1e-5)


def test_a_unit_set_inside_a_box_ranks_first_for_that_box(small):
    thr = dissect.unit_thresholds(small, "main.3", range(20))
    box = (8, 8, 24, 24)                      # cells 2..5 of the 8×8 value grid
    planted = dissect.Intervention([5], mode="set", value=50.0, mask=_box_mask(*box))
    region = Region(seed=3, box=box)
    with dissect.intervene(small, "main.3", planted):
        ranked = dissect.rank_units(small, "main.3", region, thr)
        by_contrast = dissect.rank_units(small, "main.3", region, thr, by="contrast")
        maps = dissect.unit_maps(small, "main.3", seeds=[3])
    assert nethook.hook_count(small) == 0
    assert ranked[0].unit == 5 and by_contrast[0].unit == 5
    assert ranked[0].iou > 0.5 and ranked[1].iou < 0.3
    assert ranked[0].inside > 30 and abs(ranked[0].outside) < 5
    # The records are the region scores of the captured (planted) maps.
    direct = dissect.region_scores(maps, region.alpha(R)[None], thr)
    assert ranked[0].iou == pytest.approx(direct["iou"][5].item())
    assert ranked[0].contrast == pytest.approx(direct["contrast"][5].item())


def test_ranking_orders_by_iou_then_contrast(small):
    thr = dissect.unit_thresholds(small, "main.6", range(20))
    regions = [Region(seed=0, box=(4, 4, 20, 16)), Region(seed=1, mask=_box_mask(10, 12, 30, 30, value=0.7))]
    ranked = dissect.rank_units(small, "main.6", regions, thr)
    assert sorted(r.unit for r in ranked) == list(range(8))
    keys = [(r.iou, r.contrast) for r in ranked]
    assert keys == sorted(keys, reverse=True)
    by_contrast = dissect.rank_units(small, "main.6", regions, thr, by="contrast")
    assert [r.contrast for r in by_contrast] == sorted((r.contrast for r in ranked), reverse=True)
    assert all(r.contrast == pytest.approx(r.inside - r.outside) for r in ranked)
    assert set(ranked[0].to_dict()) == {"unit", "iou", "inside", "outside", "contrast"}


# ------------------------------------------------------------------------------ segmenter labels


def _saved_and_loaded(module: torch.nn.Module) -> torch.jit.ScriptModule:
    """Script, save and load a module, as a registered segmentation model would arrive."""
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


class _ChannelLogits(torch.nn.Module):
    """The image itself as 3-class logits: class c is where channel c is the largest."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _ChannelLabels(torch.nn.Module):
    """The same classes as integer labels at half resolution (resized back by the engine)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, ::2, ::2].argmax(1)


def test_segmenter_labels_units_by_class_iou(small):
    # main.9's units are the pre-tanh R, G, B channels: unit c fires where channel c dominates.
    thr = dissect.unit_thresholds(small, "main.9", range(100))
    seeds = list(range(30))
    logits = _saved_and_loaded(_ChannelLogits())
    iou = dissect.class_iou(small, "main.9", seeds, logits, thr)
    labels = dissect.label_units(small, "main.9", seeds, logits, thr)
    assert sorted((lab.unit, lab.label) for lab in labels) == [(0, 0), (1, 1), (2, 2)]

    # Independently: pooled IoU of each unit's mask with each class's pixels.
    images = sample(small, seeds)
    classes = images.argmax(1)
    on = dissect.unit_masks(dissect.unit_maps(small, "main.9", seeds=seeds), thr, R)
    for u in range(3):
        for c in range(3):
            cls = (classes == c)
            expected = (on[:, u] & cls).sum() / (on[:, u] | cls).sum()
            assert iou[u, c].item() == pytest.approx(expected.item(), abs=1e-6)
    assert labels[0].iou == pytest.approx(iou.max().item())

    # Integer labels at half resolution are resized (nearest) to the image before counting.
    coarse = dissect.class_iou(small, "main.9", seeds, _saved_and_loaded(_ChannelLabels()), thr)
    half = images[:, :, ::2, ::2].argmax(1).repeat_interleave(2, -1).repeat_interleave(2, -2)
    for u in range(3):
        for c in range(3):
            expected = (on[:, u] & (half == c)).sum() / (on[:, u] | (half == c)).sum()
            assert coarse[u, c].item() == pytest.approx(expected.item(), abs=1e-6)
    assert nethook.hook_count(small) == 0


def test_a_segmenter_with_the_wrong_output_is_rejected_and_leaves_no_hooks(small):
    class Flat(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)

    before = _weights(small)
    thr = dissect.unit_thresholds(small, "main.6", range(5))
    with pytest.raises(InvalidArgument) as err:
        dissect.class_iou(small, "main.6", [0, 1], _saved_and_loaded(Flat()), thr)
    assert err.value.field == "segmenter"
    assert _unchanged(small, before)


# ---------------------------------------------------------------------------------- interventions


def _captured(model, layer, seeds, interventions=None):
    z = latents(seeds, model.z_dim)
    with torch.no_grad():
        if interventions is None:
            with nethook.Trace(model, layer) as tr:
                image = model(z)
        else:
            with dissect.intervene(model, layer, interventions), nethook.Trace(model, layer) as tr:
                image = model(z)
    return tr.value, image


def test_ablation_changes_only_the_chosen_units_inside_the_mask(small):
    before = _weights(small)
    base, base_image = _captured(small, "main.3", [0, 1])
    mask = _box_mask(8, 8, 24, 24)                         # cells 2..5 of the 8×8 grid
    value, image = _captured(small, "main.3", [0, 1], dissect.Intervention([3, 7], mask=mask))
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[2:6, 2:6] = True
    others = [u for u in range(16) if u not in (3, 7)]
    assert torch.equal(value[:, others], base[:, others])
    assert torch.equal(value[:, [3, 7]][..., ~inside], base[:, [3, 7]][..., ~inside])
    assert (value[:, [3, 7]][..., inside] == 0).all()
    assert (base[:, [3, 7]][..., inside] != 0).all()
    assert not torch.equal(image, base_image)
    assert _unchanged(small, before)


def test_set_blends_inside_a_soft_mask_and_everywhere_without_one(small):
    base, _ = _captured(small, "main.3", [4])
    soft = _box_mask(0, 0, 16, 32, value=128).to(torch.uint8)   # left half at alpha 128/255
    value, _ = _captured(small, "main.3", [4], [dissect.Intervention([1], "set", 4.0, soft),
                                                  dissect.Intervention([2], "set", -3.0)])
    a = 128 / 255
    assert torch.allclose(value[:, 1, :, :4], base[:, 1, :, :4] * (1 - a) + 4.0 * a, atol=1e-6)
    assert torch.equal(value[:, 1, :, 4:], base[:, 1, :, 4:])
    assert (value[:, 2] == -3.0).all()
    assert torch.equal(value[:, 0], base[:, 0])


def test_sample_with_interventions_renders_through_the_hook_and_removes_it(small):
    plain = sample(small, [0, 1])
    same = dissect.sample_with_interventions(small, [0, 1], "main.6", [])
    assert torch.equal(same, plain)
    ablated = dissect.sample_with_interventions(small, [0, 1], "main.6", dissect.Intervention(list(range(8))))
    z = latents([0, 1], 16)
    by_hand = nethook.values_to_image(small, "main.6", z, torch.zeros(2, 8, 16, 16))
    assert torch.allclose(ablated, by_hand, atol=1e-6)
    assert nethook.hook_count(small) == 0


def test_intervene_removes_its_hook_when_the_body_raises(small):
    with pytest.raises(RuntimeError, match="midway"):
        with dissect.intervene(small, "main.3", dissect.Intervention([0])):
            assert nethook.hook_count(small) == 1
            raise RuntimeError("midway")
    assert nethook.hook_count(small) == 0


# ---------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, field, message",
    [
        (lambda m, t: dissect.rank_units(m, "main.3", Region(0, mask=torch.ones(16, 16)), t),
         "regions[0].mask", "must be 32x32"),
        (lambda m, t: dissect.rank_units(m, "main.3", [Region(0, box=(0, 0, 4, 4)), Region(1, mask=torch.zeros(R, R))], t),
         "regions[1].mask", "is empty"),
        (lambda m, t: dissect.rank_units(m, "main.3", [], t), "regions", "at least one region"),
        (lambda m, t: dissect.rank_units(m, "main.3", Region(0, box=(0, 0, 4, 4)), t[:5]),
         "thresholds", "must have shape (16,)"),
        (lambda m, t: dissect.rank_units(m, "main.3", Region(0, box=(0, 0, 4, 4)), t, by="size"), "by", "'iou' or 'contrast'"),
        (lambda m, t: dissect.sample_with_interventions(m, [0], "main.3", dissect.Intervention([3, 16])),
         "interventions[0].units", "unit 16 out of range"),
        (lambda m, t: dissect.sample_with_interventions(m, [0], "main.3", [dissect.Intervention([1]), dissect.Intervention([-1])]),
         "interventions[1].units", "unit -1 out of range"),
        (lambda m, t: dissect.sample_with_interventions(m, [0], "main.3", dissect.Intervention([1], mask=torch.ones(8, 8))),
         "interventions[0].mask", "must be 32x32"),
        (lambda m, t: dissect.sample_with_interventions(m, [0], "main.3", dissect.Intervention([1], "set", float("nan"))),
         "interventions[0].value", "finite"),
        (lambda m, t: dissect.sample_with_interventions(m, [0], "main.3", dissect.Intervention([1], "boost"))
         , "interventions[0].mode", "'zero' or 'set'"),
        (lambda m, t: dissect.unit_maps(m, "main.3", z=torch.full((2, 16), float("nan"))), "z", "finite"),
        (lambda m, t: dissect.sample_with_interventions(m, None, "main.3", [], z=torch.tensor([[float("nan")] * 16])),
         "z", "finite"),
        (lambda m, t: dissect.unit_maps(m, "main.3", seeds=[]), "seeds", "must not be empty"),
        (lambda m, t: dissect.unit_thresholds(m, "main.3", [0], q=1.5), "q", "between 0 and 1"),
        (lambda m, t: dissect.unit_maps(m, "main.3", seeds=[0], batch_size=0), "batch_size", "positive integer"),
        (lambda m, t: dissect.rank_units(m, "main.3", Region(-1, box=(0, 0, 4, 4)), t), "regions[0].seed", "integer"),
    ],
)
def test_bad_input_raises_a_typed_error_and_leaves_the_model_alone(small, call, field, message):
    thr = dissect.unit_thresholds(small, "main.3", range(4))
    before = _weights(small)
    with pytest.raises(InvalidArgument) as err:
        call(small, thr)
    assert err.value.field == field
    assert message in str(err.value)
    assert _unchanged(small, before)


def test_an_unknown_layer_is_a_lookup_error(small):
    with pytest.raises(LookupError, match="main.4"):
        dissect.unit_maps(small, "main.4", seeds=[0])
    with pytest.raises(LookupError):
        dissect.intervene(small, "nope", []).__enter__()
    assert nethook.hook_count(small) == 0


# ------------------------------------------------------------------------ the faces model (headline)

LAYER = "main.6"                 # 128 value units at 16×16
MOUTH_SEED, MOUTH_BOX = 0, (22, 46, 46, 60)    # the smiling woman's open mouth (x0, y0, x1, y1)
K = 10


def _change_inside_outside(images, base, alpha):
    """Mean absolute pixel change (over channels and samples) weighted by alpha and 1 - alpha."""
    d = (images - base).abs().mean(1)
    return float((d * alpha).sum() / (alpha.sum() * len(d))), float((d * (1 - alpha)).sum() / ((1 - alpha).sum() * len(d)))


@pytest.fixture(scope="module")
def face_thresholds(faces):
    return dissect.unit_thresholds(faces, LAYER, range(200))


def test_units_ranked_for_a_mouth_draw_that_mouth(faces, face_thresholds):
    region = Region(MOUTH_SEED, box=MOUTH_BOX)
    alpha = region.alpha(faces.resolution)
    ranked = dissect.rank_units(faces, LAYER, region, face_thresholds)
    base = sample(faces, [MOUTH_SEED])

    def ablate(units, mask=None):
        images = dissect.sample_with_interventions(faces, [MOUTH_SEED], LAYER, dissect.Intervention(units, mask=mask))
        return _change_inside_outside(images, base, alpha)

    top = [r.unit for r in ranked[:K]]
    bottom = [r.unit for r in ranked[-K:]]
    randoms = torch.randperm(len(ranked), generator=torch.Generator().manual_seed(0))[:K].tolist()
    top_in, top_out = ablate(top)                 # measured: 0.088 vs 0.032
    bot_in, bot_out = ablate(bottom)              # measured: 0.013 vs 0.039
    rnd_in, _ = ablate(randoms)                   # measured: 0.030
    assert top_in >= 2 * top_out                  # switched off everywhere, they change the mouth most
    assert top_in >= 3 * bot_in and top_in >= 2 * rnd_in
    assert bot_in < bot_out                       # the bottom units draw elsewhere
    # Switched off only inside the box, the ranking still decides how much the mouth changes.
    top_box, _ = ablate(top, alpha)               # measured: 0.077
    bot_box, _ = ablate(bottom, alpha)            # measured: 0.008
    assert top_box >= 4 * bot_box
    assert nethook.hook_count(faces) == 0


def test_mouth_units_from_four_faces_draw_the_mouths_of_others(faces, face_thresholds):
    # Faces are roughly aligned: one box covers the mouths of held-out seeds (checked by eye).
    context = {0: (22, 46, 46, 60), 1: (18, 46, 42, 57), 7: (20, 44, 44, 56), 11: (20, 44, 46, 58)}
    held_out, box = [5, 8, 9, 16, 17, 19], (20, 46, 44, 58)
    ranked = dissect.rank_units(faces, LAYER, [Region(s, box=b) for s, b in context.items()], face_thresholds)
    alpha = Region(0, box=box).alpha(faces.resolution)
    base = sample(faces, held_out)
    top = dissect.sample_with_interventions(faces, held_out, LAYER, dissect.Intervention([r.unit for r in ranked[:K]]))
    bottom = dissect.sample_with_interventions(faces, held_out, LAYER, dissect.Intervention([r.unit for r in ranked[-K:]]))
    top_in, top_out = _change_inside_outside(top, base, alpha)      # measured: 0.066 vs 0.030
    bot_in, bot_out = _change_inside_outside(bottom, base, alpha)   # measured: 0.033 vs 0.073
    assert top_in >= 1.8 * top_out
    assert top_in >= 1.5 * bot_in and bot_in < bot_out
