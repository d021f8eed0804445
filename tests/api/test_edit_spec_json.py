"""One edit spec format: the proto EditSpec's JSON form is the shipped examples' JSON, and what a
version records (any release's) reads back into the message."""

from __future__ import annotations

import base64
import json
import zlib
from pathlib import Path

import pytest
from google.protobuf import json_format

from rulewright.v1 import edit_pb2

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples" / "edits").glob("*.json"))


def _numbers(value):
    """proto3 JSON writes 64-bit integers as strings; the examples write numbers."""
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return int(value) if isinstance(value, str) and value.isdigit() else value


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_shipped_example_is_an_edit_spec_in_its_json_form(path):
    text = path.read_text()
    spec = json_format.Parse(text, edit_pb2.EditSpec())          # as grpcurl or reflection would send it
    assert spec.name == path.stem and spec.paste or spec.context
    assert all(len(r.box) == 4 for r in [*spec.paste, *spec.context])
    back = json_format.MessageToDict(spec, preserving_proto_field_name=True)
    assert _numbers(back) == json.loads(text)
    assert json_format.Parse(json_format.MessageToJson(spec), edit_pb2.EditSpec()) == spec


def test_examples_are_shipped():
    assert len(EXAMPLES) >= 5
    assert any(json.loads(p.read_text()).get("op") == "erase" for p in EXAMPLES)


def test_a_first_release_spec_reads_back_into_the_message():
    from rulewright.service.server.convert import spec_pb

    alpha = bytes([0, 255] * 8)
    legacy = {"op": "rewrite", "solver": "optimize", "layer": "main.6", "rank": 2, "steps": 5, "found": [],
              "copy": {"seed": 2**63 - 1, "mask": {"encoding": "zlib-base64-u8", "size": [4, 4],
                                                   "data": base64.b64encode(zlib.compress(alpha)).decode()}},
              "paste": [{"seed": 3, "box": [0, 0, 4, 4]}], "keep": {"weight": 16.0, "pool_start": 10**6}}
    spec = spec_pb(legacy)
    assert spec.solver == "optimize" and spec.found_given and not spec.found
    mask = spec.copy.mask
    assert spec.copy.seed == 2**63 - 1 and (mask.width, mask.height) == (4, 4)
    assert mask.encoding == mask.ENCODING_ZLIB and zlib.decompress(mask.data) == alpha
    assert list(spec.paste[0].box) == [0, 0, 4, 4] and spec.keep.weight == 16.0
