"""The strength curve over a real channel: in the RewriteResult, in the version's metrics, on the client."""

from __future__ import annotations

from google.protobuf import json_format

from rulewright.client.spec import spec_dict
from rulewright.client.types import RewriteResult
from rulewright.service.domain.requests import RewriteRequest
from rulewright.v1 import edit_pb2, generator_service_pb2 as gen
from rulewright.v1 import registry_service_pb2 as reg

from .test_generator import spec_pb


def multilayer_pb() -> edit_pb2.EditSpec:
    """A multilayer edit of the tiny model that improves on no edit (a big box), naming no strength."""
    big = [4, 4, 28, 28]
    spec = spec_pb(steps=20, copy={"seed": 1, "box": big}, paste=[{"seed": 2, "box": big}])
    spec.goal = "image"
    spec.method = "multilayer"
    spec.search.targets = 0
    return spec


def test_the_curve_is_returned_recorded_and_read_by_the_client_and_a_replay_reproduces_it(generator, registry,
                                                                                          domain):
    result = list(generator.Rewrite(gen.RewriteRequest(model="tiny@production", spec=multilayer_pb()),
                                    timeout=600))[-1].result
    assert result.HasField("strength_curve")
    curve = result.strength_curve
    strengths = [p.strength for p in curve.points]
    assert len(strengths) >= 3 and strengths == sorted(strengths) and curve.rule
    assert curve.chosen in strengths and result.spec.strength == curve.chosen
    version = registry.GetVersion(reg.GetVersionRequest(name=result.version.name), timeout=30)
    stored = json_format.MessageToDict(version.metrics)["strength_curve"]
    assert stored == json_format.MessageToDict(result.metrics)["strength_curve"]
    assert stored["chosen"] == curve.chosen and stored["rule"] == curve.rule
    assert [p["strength"] for p in stored["points"]] == strengths
    assert [p["detected"] for p in stored["points"]] == [p.detected for p in curve.points]
    assert all(set(p) == {"strength", "detected", "side_effect", "box_edge"} for p in stored["points"])
    client = RewriteResult.from_pb(result).strength_curve
    assert client.chosen == curve.chosen and [p.side_effect for p in client.points] == [p.side_effect for p in curve.points]
    # Replaying the recorded spec (its strength now given) reproduces the curve and the strength.
    replay = domain.rewrite(RewriteRequest("tiny/1", spec=spec_dict(result.spec), author="test", dry_run=True))
    assert replay.edit.metrics["strength_curve"] == json_format.MessageToDict(result.metrics)["strength_curve"]
    assert replay.edit.spec["strength"] == curve.chosen


def test_a_given_strength_is_kept_and_the_curve_still_returned(generator):
    spec = multilayer_pb()
    spec.strength = 0.3
    result = list(generator.Rewrite(gen.RewriteRequest(model="tiny", spec=spec, dry_run=True), timeout=600))[-1].result
    assert result.spec.strength == 0.3 and len(result.strength_curve.points) >= 3
