"""The per-edit detector: seeds of its own, and it learns to tell an edit's ideal from the original."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import detectors
from benchmarks.edit_quality import HELDOUT_START
from rulewright.service.engine.detector import DetectorConfig, detector_key, model_fingerprint, train_detector
from rulewright.service.engine.edit import DEFAULTS, EditSpec
from rulewright.service.engine.evaluate import heldout_metrics, ideal_images
from rulewright.service.engine.generators.dcgan import DCGANGenerator
from rulewright.service.engine.strength import CURVE_SEEDS, CURVE_START
from tests.builders import dcgan_state

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "edits"
STATS_MAX, POOL_MAX, CANDIDATES_MAX = 10_000_000, 100_000, 100_000     # the bounds EditSpec accepts


def _other_seed_sets() -> dict[str, range]:
    """Every seed range an edit or its benchmark draws from, at the largest sizes a spec may ask for."""
    sets = {"statistics": range(DEFAULTS["stats"]["seed_start"], DEFAULTS["stats"]["seed_start"] + STATS_MAX),
            "keep pool": range(DEFAULTS["keep"]["pool_start"], DEFAULTS["keep"]["pool_start"] + POOL_MAX),
            "search": range(DEFAULTS["search"]["seed_start"], DEFAULTS["search"]["seed_start"] + CANDIDATES_MAX),
            # held-out faces of the benchmarks, as many as fit below the keep pool
            "held-out": range(HELDOUT_START, DEFAULTS["keep"]["pool_start"])}
    for path in sorted(EXAMPLES.glob("*.json")):
        spec = json.loads(path.read_text())
        regions = [spec["copy"]] if "copy" in spec else []
        regions += spec.get("paste", []) + spec.get("context", [])
        for i, region in enumerate(regions):
            sets[f"{path.stem} region {i}"] = range(region["seed"], region["seed"] + 1)
        stats = {**DEFAULTS["stats"], **spec.get("stats", {})}
        keep = {**DEFAULTS["keep"], **spec.get("keep", {})}
        search = {**DEFAULTS["search"], **spec.get("search", {})}
        sets[f"{path.stem} statistics"] = range(stats["seed_start"], stats["seed_start"] + stats["samples"])
        sets[f"{path.stem} keep pool"] = range(keep["pool_start"], keep["pool_start"] + keep["pool_size"])
        sets[f"{path.stem} search"] = range(search["seed_start"], search["seed_start"] + search["candidates"])
    return sets


def _overlap(a: range, b: range) -> bool:
    return max(a.start, b.start) < min(a.stop, b.stop)


def test_detector_seeds_are_disjoint_from_every_other_seed_set():
    config = DetectorConfig()
    train, check = config.train_seeds(), config.check_seeds()
    assert len(train) > 0 and len(check) > 0
    assert not _overlap(train, check)
    for name, seeds in _other_seed_sets().items():
        assert not _overlap(train, seeds), f"detector training seeds overlap the {name} seeds"
        assert not _overlap(check, seeds), f"detector check seeds overlap the {name} seeds"
    # At the largest sizes a config could reasonably take, still disjoint from each other.
    big = DetectorConfig(train=100_000, check=100_000)
    assert not _overlap(big.train_seeds(), big.check_seeds())


def test_strength_curve_seeds_are_disjoint_from_every_other_seed_set():
    curve = range(CURVE_START, CURVE_START + CURVE_SEEDS)
    big = DetectorConfig(train=100_000, check=100_000)
    sets = {**_other_seed_sets(), "detector training": big.train_seeds(), "detector check": big.check_seeds()}
    for name, seeds in sets.items():
        assert not _overlap(curve, seeds), f"strength curve seeds overlap the {name} seeds"
    # Room for a hundred times as many curve seeds below the detector's.
    assert not _overlap(range(CURVE_START, CURVE_START + 100 * CURVE_SEEDS), big.train_seeds())


@pytest.fixture(scope="module")
def tiny():
    return DCGANGenerator.from_state_dict(dcgan_state(z_dim=16, widths=(32, 16, 8, 3)))


# A strong paste on the tiny 32x32 DCGAN: the copy's 8x8 block of seed 1 onto the same place.
TINY_EDIT = {"layer": "main.6", "copy": {"seed": 1, "box": [8, 8, 24, 24]}, "paste": [{"seed": 2, "box": [8, 8, 24, 24]}],
             "search": {"targets": 0}, "stats": {"samples": 64}}
TINY_CONFIG = DetectorConfig(train=48, check=32, epochs=4, batch=16, width=4)


def test_detector_trains_reproducibly_and_scores_ideals_above_originals(tiny):
    spec = EditSpec.from_json(TINY_EDIT, tiny)
    detector, info = train_detector(tiny, spec, TINY_CONFIG)
    again, _ = train_detector(tiny, spec, TINY_CONFIG)
    for (name, a), (_, b) in zip(detector.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name                                     # seeded: the same detector
    assert info["train_seeds"] == [TINY_CONFIG.train_seeds().start, 48]
    assert info["check_seeds"] == [TINY_CONFIG.check_seeds().start, 32]
    assert 0.0 <= info["check_accuracy"] <= 1.0
    seeds = range(HELDOUT_START, HELDOUT_START + 24)
    ideal = heldout_metrics(tiny, spec, seeds, lambda z: ideal_images(tiny, spec, z), detect=detector.probability)
    unedited = heldout_metrics(tiny, spec, seeds, lambda z: tiny(z), detect=detector.probability)
    assert ideal["probability"] > unedited["probability"], (ideal, unedited)
    assert ideal["detected"] >= unedited["detected"]
    assert ideal["efficacy"] == pytest.approx(1.0) and unedited["efficacy"] == pytest.approx(0.0)
    assert unedited["side_effect"] == 0.0 and unedited["box_edge"] == 0.0


def test_cached_detector_is_reused_only_for_the_same_inputs(tiny, tmp_path):
    spec = EditSpec.from_json(TINY_EDIT, tiny)
    first, info = detectors.load_or_train(tiny, spec, TINY_CONFIG, cache=tmp_path)
    second, again = detectors.load_or_train(tiny, spec, TINY_CONFIG, cache=tmp_path)
    assert not info["cached"] and again["cached"] and info["key"] == again["key"]
    z = torch.randn(8, tiny.z_dim)
    assert torch.equal(first.probability(tiny(z)), second.probability(tiny(z)))
    fingerprint = model_fingerprint(tiny)
    moved = EditSpec.from_json({**TINY_EDIT, "copy": {"seed": 3, "box": [8, 8, 24, 24]}}, tiny)
    assert detector_key(tiny, moved, TINY_CONFIG, fingerprint) != info["key"]          # another ideal
    assert detector_key(tiny, spec, DetectorConfig(train=49), fingerprint) != info["key"]   # other seeds
    other = DCGANGenerator.from_state_dict(dcgan_state(z_dim=16, widths=(32, 16, 8, 3), seed=1))
    assert detector_key(other, spec, TINY_CONFIG) != info["key"]                           # other weights
    # A fit setting leaves the ideal, so the detector, unchanged.
    assert detector_key(tiny, EditSpec.from_json({**TINY_EDIT, "steps": 7}, tiny), TINY_CONFIG, fingerprint) == info["key"]
