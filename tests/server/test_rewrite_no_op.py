"""A Rewrite whose fit never improves on no edit is refused over a real channel, on both backends:
FAILED_PRECONDITION with ErrorInfo and PreconditionFailure (reason EDIT_DID_NOT_IMPROVE, the goal
losses before and after), no version is created, and the same spec with a budget that fits is
stored as before. (Over HTTP: tests/web/test_web_rewrite_no_op.py.)"""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2

from rulewright.v1 import generator_service_pb2 as gen
from rulewright.v1 import registry_service_pb2 as reg

from .conftest import detail, error_info
from .test_generator import spec_pb

REASON = "EDIT_DID_NOT_IMPROVE"


def no_op_spec():
    """The one-layer edit with two Adam steps at the largest lr: every step overshoots, so the
    best iterate is the start (no edit)."""
    spec = spec_pb(steps=2)
    spec.lr = 10.0
    return spec


def versions(registry) -> list[int]:
    return [v.number for v in registry.ListVersions(reg.ListVersionsRequest(parent="models/tiny")).versions]


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_rewrite_that_does_not_improve_is_refused_and_stores_nothing(generator, registry, dry_run):
    with pytest.raises(grpc.RpcError) as err:
        list(generator.Rewrite(gen.RewriteRequest(model="tiny@production", spec=no_op_spec(), dry_run=dry_run,
                                                  request_id="" if dry_run else "no-op-1"), timeout=120))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
    info = error_info(err.value)
    assert info.reason == REASON and info.domain == "rulewright.dev"
    before, after = float(info.metadata["goal_loss_before"]), float(info.metadata["goal_loss_after"])
    assert before > 0 and after == before
    assert info.metadata["steps"] == "2" and info.metadata["goal"] == "value"
    (violation,) = detail(err.value, error_details_pb2.PreconditionFailure).violations
    assert violation.type == REASON and "goal_loss_before=" in violation.subject
    assert "did not improve on no edit" in violation.description and "nothing was stored" in violation.description
    assert versions(registry) == [1]
    # A budget that fits is stored as before, under the same request id.
    spec = no_op_spec()
    spec.lr, spec.steps = 0.0, 60                   # proto3 0: the method's default lr
    result = list(generator.Rewrite(gen.RewriteRequest(model="tiny@production", spec=spec, dry_run=dry_run,
                                                       request_id="" if dry_run else "no-op-1"), timeout=120))[-1]
    assert result.result.metrics["goal_loss_after"] < result.result.metrics["goal_loss_before"]
    assert versions(registry) == ([1] if dry_run else [1, 2])

