"""The Rewrite request's one path: JSON (the HTTP side's body) and gRPC read into the same typed
request, the spec parsed once with its masks decoded once (their size refused before decoding),
and the parent passed as a typed reference rather than text parsed back."""

from __future__ import annotations

import base64
import json
import zlib
from pathlib import Path

import pytest
import torch

from rulewright.service.domain.limits import Limits
from rulewright.service.domain.requests import RewriteRequest, VersionRef
from rulewright.service.engine import regions
from rulewright.service.engine.edit import EditDraft
from rulewright.service.engine.errors import InvalidArgument
from rulewright.service.server.convert import edit_draft, rewrite_request_json, spec_pb
from tests.builders import TINY_SPEC, tiny_domain

GLASSES = json.loads((Path(__file__).resolve().parents[2] / "examples" / "edits" / "glasses.json").read_text())


def _mask(alpha: torch.Tensor, legacy: bool = False) -> dict:
    data = base64.b64encode(zlib.compress(alpha.numpy().tobytes())).decode()
    if legacy:
        return {"encoding": "zlib-base64-u8", "size": list(alpha.shape), "data": data}
    return {"encoding": "ENCODING_ZLIB", "width": alpha.shape[1], "height": alpha.shape[0], "data": data}


def test_an_example_body_reads_as_the_engine_reads_the_example():
    call = rewrite_request_json({"model": "faces", "version": 3, "spec": GLASSES, "request_id": "r-1",
                                 "dry_run": True, "preview_seeds": [5, 6]}, "alice", Limits())
    assert call.model == VersionRef("faces", 3) and str(call.model) == "faces/3"
    assert (call.author, call.request_id, call.dry_run, list(call.preview_seeds)) == ("alice", "r-1", True, [5, 6])
    assert call.spec == EditDraft.from_json(GLASSES)                 # the same parse as the JSON form's
    assert call.spec == edit_draft(spec_pb(GLASSES))                 # and as gRPC's, from the message
    assert call.typed(Limits()) is call                              # already parsed: nothing is decoded again


def test_masks_of_either_release_decode_once_to_the_same_pixels(monkeypatch):
    alpha = torch.zeros(32, 32, dtype=torch.uint8)
    alpha[4:9, 6:20] = 200
    decoded = []
    real = regions.decode_pixels
    monkeypatch.setattr(regions, "decode_pixels", lambda *a: decoded.append(a[0]) or real(*a))
    from rulewright.service.server import convert
    monkeypatch.setattr(convert, "decode_pixels", regions.decode_pixels)
    for legacy in (False, True):
        decoded.clear()
        spec = {**TINY_SPEC, "copy": {"seed": 1, "mask": _mask(alpha, legacy)}}
        call = rewrite_request_json({"model": "tiny", "version": 1, "spec": spec}, "a", Limits())
        call.check(Limits())
        assert torch.equal(call.spec.copy.mask, alpha) and decoded == ["ENCODING_ZLIB"]


def test_a_huge_declared_mask_is_refused_before_it_is_inflated():
    bomb = base64.b64encode(zlib.compress(bytes(64 << 20))).decode()     # 64 MiB of zeros, a small body
    spec = {**TINY_SPEC, "copy": {"seed": 1, "mask": {"encoding": "ENCODING_ZLIB", "width": 8192, "height": 8192,
                                                      "data": bomb}}}
    with pytest.raises(InvalidArgument) as err:
        rewrite_request_json({"model": "tiny", "version": 1, "spec": spec}, "a", Limits())
    assert err.value.field == "spec.copy.mask" and "max_mask_pixels" in err.value.description
    small = {**spec, "copy": {"seed": 1, "mask": {"encoding": "ENCODING_ZLIB", "width": 32, "height": 32,
                                                    "data": bomb}}}
    with pytest.raises(InvalidArgument, match="inflates to more than"):
        rewrite_request_json({"model": "tiny", "version": 1, "spec": small}, "a", Limits())


@pytest.mark.parametrize("body,field", [
    ({"model": "tiny", "spec": TINY_SPEC}, "version"),
    ({"model": "tiny", "version": 0, "spec": TINY_SPEC}, "version"),
    ({"model": "tiny", "version": 1}, "spec"),
    # an unknown key is named by its own path, not its parent's
    ({"model": "tiny", "version": 1, "spec": {**TINY_SPEC, "colour": "red"}}, "spec.colour"),
    ({"model": "tiny", "version": 1, "spec": TINY_SPEC, "colour": "red"}, "colour"),
    ({"model": "tiny", "version": 1, "spec": {**TINY_SPEC, "paste": [{"seed": 2, "box": [0, 0, 4, 4]}] * 65}},
     "spec.paste"),
])
def test_bad_bodies_name_the_field(body, field):
    with pytest.raises(InvalidArgument) as err:
        rewrite_request_json(body, "a", Limits())
    assert err.value.field == field, err.value


def test_a_typed_reference_resolves_and_checks_without_text(tmp_path):
    domain = tiny_domain(tmp_path)
    try:
        version = domain.resolve(VersionRef("tiny", 1))
        assert (version.model, version.number) == ("tiny", 1)
        call = rewrite_request_json({"model": "tiny", "version": 1, "spec": TINY_SPEC}, "a", domain.limits)
        checked = domain.check_edit(call.spec, call.model)
        assert checked.layer == "main.6" and checked.rank == 2 and checked.copy.box == (8, 8, 16, 16)
        as_json = RewriteRequest("tiny", TINY_SPEC)
        assert isinstance(as_json.typed(domain.limits).spec, EditDraft)
        assert as_json.typed(domain.limits).spec is as_json.typed(domain.limits).spec     # parsed once
    finally:
        domain.close()
