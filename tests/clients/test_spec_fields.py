"""The client's edit spec JSON: a mistyped or unknown field is refused before anything is sent,
naming its path in the spec (no server needed: the API's EditSpec descriptor is the schema)."""

from __future__ import annotations

import pytest

from rulewright.client.spec import edit_spec_pb, region_pb, spec_dict

COPY = {"seed": 1, "box": [8, 8, 16, 16]}


@pytest.mark.parametrize("spec, message", [
    ({"strength": "high"}, "strength: must be a number, got 'high'"),
    ({"paste": [{"seed": 2, "bbox": [4, 4, 28, 28]}]}, "paste[0].bbox: unknown field"),
    ({"strenght": 1.0}, "strenght: unknown field"),
    ({"rank": 2.5}, "rank: must be an integer, got 2.5"),
    ({"stats": {"samples": "many"}}, "stats.samples: must be an integer, got 'many'"),
    ({"stats": {"sample": 10}}, "stats.sample: unknown field"),
    ({"fit": {"feather": "soft"}}, "fit.feather: must be a number, got 'soft'"),
    ({"copy": {"seed": 1, "box": [8, 8, "x", 16]}}, "copy.box[2]: must be an integer, got 'x'"),
    ({"context": {"seed": 1, "box": [8, 8, 16, 16]}}, "context: must be a list"),
    ({"description": 7}, "description: must be a string, got 7"),
    ({"stats": [{"samples": 64}]}, "stats: must be one value, not a list"),
])
def test_a_bad_field_is_named_by_its_path(spec, message):
    with pytest.raises(ValueError) as err:
        edit_spec_pb({"copy": COPY, **spec})
    assert str(err.value) == message


def test_the_json_forms_proto3_allows_still_parse():
    spec = edit_spec_pb({"copy": COPY, "paste": [{"seed": "2", "box": [1, 2, 3, 4]}], "strength": "0.5",
                         "stats": {"samples": "64", "seedStart": 3}, "layer": None, "goal": "image"})
    assert (spec.strength, spec.stats.samples, spec.stats.seed_start, spec.paste[0].seed) == (0.5, 64, 3, 2)
    assert edit_spec_pb(spec_dict(spec)) == spec                   # a recorded spec sent again


def test_a_region_names_its_own_path():
    with pytest.raises(ValueError, match=r"^region\.bbox: unknown field$"):
        region_pb({"seed": 1, "bbox": [1, 2, 3, 4]})
