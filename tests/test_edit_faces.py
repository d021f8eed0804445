"""The shipped example edit on the real faces model reaches faces that took no part in it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rulewright.service.engine import nethook
from rulewright.service.engine.edit import EditSpec, render_edited
from rulewright.service.engine.evaluate import heldout_metrics
from rulewright.service.engine.rewrite import rewrite
from rulewright.service.engine.stats import key_moment

pytestmark = pytest.mark.network
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "edits"


@pytest.fixture(scope="module")
def moment(faces):
    return key_moment(faces, "main.6", range(1000))


def test_every_shipped_example_is_a_valid_spec(faces):
    files = sorted(EXAMPLES.glob("*.json"))
    assert files, "examples/edits/ ships at least one edit"
    for path in files:
        spec = EditSpec.from_json(json.loads(path.read_text()), faces)
        assert len(spec.paste if spec.op == "rewrite" else spec.context) >= 3, path.name


def test_glasses_edit_reaches_held_out_faces(faces, moment):
    spec = json.loads((EXAMPLES / "glasses.json").read_text())
    before = {k: v.clone() for k, v in faces.state_dict().items()}
    edit = rewrite(faces, spec, moment=moment)
    assert all(torch.equal(v, before[k]) for k, v in faces.state_dict().items())   # the model is untouched
    # The default (final quality, strength 1) closes well over 30% of the loss inside the paste boxes.
    assert edit.metrics["goal_loss_after"] < 0.7 * edit.metrics["goal_loss_before"]
    heldout = range(50_000, 50_040)                       # no part in the edit, the stats or the keep pool
    metrics = heldout_metrics(faces, spec, heldout, lambda z: render_edited(faces, [edit], z))
    # The default edit reaches these 40 faces (benchmarks.edit_quality gives the measured figures).
    assert metrics["efficacy"] > 0.05, metrics
    assert metrics["side_effect"] < 0.06, metrics
    assert nethook.hook_count(faces) == 0
