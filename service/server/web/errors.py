"""The HTTP side's own refusals and the one mapping from any exception to an HTTP JSON error.

``error_body(exc)`` maps through ``errors.to_status`` (the one ``ERROR_TABLE`` gRPC uses too) to
``{"error": {"code", "message", "reason", "domain", "metadata", "field_violations"}}`` and an
HTTP status (``HTTP_STATUS``; an error's own ``http_status`` refines it).
"""

from __future__ import annotations

import logging
from typing import Any

from google.rpc import code_pb2, error_details_pb2

from rulewright.service.errors import Code, Error
from rulewright.service.server.errors import to_status

log = logging.getLogger(__name__)

# gRPC code name → HTTP status (docs/web-api.md); anything else: 500.
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "OUT_OF_RANGE": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403,
               "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "ABORTED": 409, "FAILED_PRECONDITION": 412,
               "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}


class RouteNotFound(Error):
    """No endpoint at that path (→ NOT_FOUND)."""

    code = Code.NOT_FOUND
    reason = "NOT_FOUND"


class MethodNotAllowed(RouteNotFound):
    """An endpoint that does not take this HTTP method (→ NOT_FOUND's code, HTTP 405)."""

    http_status = 405

    def __init__(self, message: str, allow: list[str]):
        super().__init__(message)
        self.allow = allow


class RenderNotFound(RouteNotFound):
    """A computed image no longer (or never) in the LRU (→ NOT_FOUND)."""


class Refused(Error):
    """A refusal of the HTTP side itself (a limit, a method or a request it cannot parse) with its
    own code and reason; ``http_status`` refines the HTTP status (413 for a body, 501 for a method)."""

    def __init__(self, code: Code, reason: str, message: str, http_status: int, **metadata: Any):
        super().__init__(message, reason=reason, **metadata)
        self.code = code
        self.http_status = http_status


class BodyTooLarge(Refused):
    """A request body over the HTTP side's limit (→ RESOURCE_EXHAUSTED, HTTP 413)."""

    def __init__(self, message: str, **metadata: Any):
        super().__init__(Code.RESOURCE_EXHAUSTED, "BODY_TOO_LARGE", message, 413, **metadata)


def error_body(exc: BaseException) -> tuple[int, dict]:
    """(HTTP status, ``{"error": ...}``) for ``exc``, through ``errors.to_status`` (``ERROR_TABLE``)."""
    status = to_status(exc)
    code = code_pb2.Code.Name(status.code)
    out: dict[str, Any] = {"code": code, "message": status.message, "reason": "", "domain": "", "metadata": {},
                           "field_violations": []}
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            out.update(reason=info.reason, domain=info.domain, metadata=dict(info.metadata))
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out["field_violations"] = [{"field": v.field, "description": v.description}
                                       for v in bad.field_violations]
    if code == "INTERNAL":
        log.error("unhandled error", exc_info=exc, extra={"event": "web_internal_error"})
    return getattr(exc, "http_status", None) or HTTP_STATUS.get(code, 500), {"error": out}
