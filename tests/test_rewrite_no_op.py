"""Small step budgets and an lr too large for the one-layer edit on the real faces model: a rewrite
either stores a version whose goal loss is lower than its parent's and whose pictures differ, or it
is refused (FAILED_PRECONDITION, EDIT_DID_NOT_IMPROVE, the losses) and stores nothing. Never a new
version identical to its parent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rulewright.service.errors import Code, Error
from rulewright.service.domain.requests import RewriteRequest, SampleRequest

GLASSES = Path(__file__).resolve().parent.parent / "examples" / "edits" / "glasses.json"


@pytest.fixture(scope="module")
def faces_domain(tmp_path_factory, faces_path):
    from rulewright.service.domain.core import Domain

    domain = Domain.open(tmp_path_factory.mktemp("no-op"), device="cpu")
    domain.bootstrap("faces", faces_path)
    yield domain
    domain.close()


def glasses(**change) -> dict:
    spec = {k: v for k, v in json.loads(GLASSES.read_text()).items() if k not in ("name", "description", "model")}
    # draft quality: the guard is the same at any quality, and the final one's 128 found targets
    # would only make each case slower
    return {**spec, "quality": "draft", "stats": {"samples": 200}, **change}


@pytest.mark.parametrize("change", [{"steps": 3}, {"steps": 5}, {"steps": 10},
                                    {"method": "single", "lr": 0.1, "steps": 100}])
def test_a_rewrite_never_stores_a_version_identical_to_its_parent(faces_domain, change):
    numbers = lambda: [v.number for v in faces_domain.registry.list_versions("faces").items]  # noqa: E731
    before = numbers()
    spec = glasses(**change)
    try:
        result = faces_domain.rewrite(RewriteRequest("faces/1", spec, author="tests"))
    except Error as exc:
        assert (exc.code, exc.reason) == (Code.FAILED_PRECONDITION, "EDIT_DID_NOT_IMPROVE"), exc
        assert float(exc.metadata["goal_loss_after"]) >= float(exc.metadata["goal_loss_before"]) > 0
        assert "did not improve on no edit" in str(exc)
        assert numbers() == before
        return
    metrics = result.version.metrics
    assert metrics["goal_loss_after"] < metrics["goal_loss_before"], metrics
    seeds = [p["seed"] for p in spec["paste"]]
    parent = faces_domain.sample(SampleRequest("faces/1", seeds=seeds)).images
    edited = faces_domain.sample(SampleRequest(f"faces/{result.version.number}", seeds=seeds)).images
    assert not torch.equal(parent, edited)
