"""Over HTTP a rewrite whose fit never improves on no edit ends its job with the refusal the gRPC
side gives (FAILED_PRECONDITION, reason EDIT_DID_NOT_IMPROVE, the losses) and stores nothing."""

from __future__ import annotations

from tests.builders import TINY_SPEC
from tests.web.conftest import events, request


def test_over_http_the_rewrite_job_ends_with_the_same_refusal(web):
    base, domain = web
    resp = request(base, "POST", "/api/rewrites", {"model": "tiny", "version": 1,
                                                   "spec": {**TINY_SPEC, "steps": 2, "lr": 10.0}})
    assert resp.status == 202, resp
    stream = events(base, resp.json()["events_url"])
    name, data = stream[-1][1], stream[-1][2]
    assert name == "error", stream[-1]
    error = data["error"]
    assert (error["code"], error["reason"]) == ("FAILED_PRECONDITION", "EDIT_DID_NOT_IMPROVE")
    assert float(error["metadata"]["goal_loss_after"]) == float(error["metadata"]["goal_loss_before"])
    job = request(base, "GET", f"/api/rewrites/{resp.json()['job']}").json()
    assert job["state"] == "failed" and job["error"]["reason"] == "EDIT_DID_NOT_IMPROVE"
    assert [v.number for v in domain.registry.list_versions("tiny").items] == [1]
