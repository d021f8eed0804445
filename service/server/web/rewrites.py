"""The editor's rewrites as background jobs (``jobs.editor``): ``Domain.rewrite`` on the job's
thread, its progress as the stages gRPC streams, its result as JSON (``views.rewrite``).

``start`` answers once the rewrite has been accepted: ``Domain.rewrite`` checks the request, the
version and the spec before its first progress event, so a refusal there (a client error) is
raised to the caller as the answer itself, and no check is made twice; everything after is the
job's to report.
"""

from __future__ import annotations

import hashlib
import json

from rulewright.service.domain.requests import Progress, RewriteRequest
from rulewright.service.jobs.editor import CANCELLED, FAILED
from rulewright.service.server.web import views
from rulewright.service.server.web.errors import error_body

ACCEPT_POLL_S = 1.0                # how often ``start`` looks whether the job has passed its checks


def _key(model: str, request: RewriteRequest, body: dict):
    """What makes a retry the same job: a request id (not a dry run) and the very same body."""
    if not request.request_id or request.dry_run:
        return None
    return model, request.request_id, hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def start(web, request: RewriteRequest, body: dict, model: str, parent: int):
    """The job running ``request`` on ``model``'s version ``parent`` (``body``: the request as sent),
    once it passed ``Domain.rewrite``'s checks; their refusal is raised."""
    refusals: list[BaseException] = []

    def work(emit, should_stop) -> dict:
        def event(e) -> None:
            if (data := views.progress(e)) is not None:
                emit(data)
        result = web.domain.rewrite(request, Progress(event, should_stop))
        return views.rewrite(result, request.preview_seeds, web.renders)

    def on_error(exc: BaseException) -> tuple[str, dict]:
        status, err = error_body(exc)
        if status < 500:
            refusals.append(exc)
        return (CANCELLED if err["error"]["code"] == "CANCELLED" else FAILED), err

    job, _ = web.jobs.start(work, on_error, _key(model, request, body), info={"model": model, "parent": parent})
    while True:
        events, finished = job.wait(0, ACCEPT_POLL_S)
        if events or finished:
            break
    if refusals and job.events and job.events[0][0] == "error":
        raise refusals[0]                 # refused before any work began: the answer, not a job
    return job
