"""``Registry.rescale_version`` on each store: the source's delta blob shared (nothing written but the
manifest), its weights the source's delta at the new strength, and the blob kept by gc after the
source is deleted."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save as st_save

from rulewright.registry import Registry, errors, gc
from rulewright.service.domain.weights import materialize
from rulewright.service.engine.delta import apply_to_state_dict, to_bytes, with_strength
from rulewright.service.engine.loading import load_generator
from tests.builders import dcgan_state

from .test_weights import random_delta


def test_a_rescaled_version_shares_the_blob_and_applies_it_at_its_strength(store):
    base = dcgan_state()
    registry = Registry(store)
    model = load_generator(base)
    registry.import_model("faces", arch=model.arch, config=model.config(), weights=st_save(base))
    deltas = [random_delta(base, "main.3", 2, seed=2)]
    source = registry.create_version("faces", parent=1, delta=to_bytes(deltas), spec={"layer": "main.3"},
                                     metrics={"strength_curve": {"chosen": 1.0}, "loss": 0.5})
    blobs = {b.sha256 for b in store.iter_blobs()}
    v = registry.rescale_version("faces", source.number, strength=0.25, author="ann", request_id="r-1")
    assert {b.sha256 for b in store.iter_blobs()} == blobs and v.blobs == source.blobs and v.stored_bytes == 0
    assert (v.parent, v.rescaled_from, v.strength, v.edit_strength, v.author) == (1, source.number, 0.25, 0.25, "ann")
    assert v.spec == {"layer": "main.3", "strength": 0.25} and v.metrics == {"strength_curve": {"chosen": 1.0}}
    assert registry.get_version("faces", v.number) == v                      # the manifest round-trips
    assert registry.rescale_version("faces", source.number, strength=0.25, request_id="r-1") == v
    expected = apply_to_state_dict(base, with_strength(deltas, 0.25))
    torch.testing.assert_close(materialize(registry, "faces", v.number)["main.3.weight"], expected["main.3.weight"],
                               rtol=0, atol=0)

    registry.delete_version("faces", source.number)
    report = gc.collect(store, grace_s=0)
    assert report.ok and {b.sha256 for b in store.iter_blobs()} == blobs      # still referenced: kept
    torch.testing.assert_close(materialize(registry, "faces", v.number)["main.3.weight"], expected["main.3.weight"],
                               rtol=0, atol=0)
    with pytest.raises(errors.InvalidArgument) as err:
        registry.rescale_version("faces", 1, strength=0.5)                      # an import has no edit
    assert err.value.field == "strength"
