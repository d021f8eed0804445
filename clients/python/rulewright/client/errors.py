"""``RulewrightError``: a failed call, with the server's google.rpc details decoded.

The server puts a serialized ``google.rpc.Status`` in the ``grpc-status-details-bin`` trailer of
every error: ``ErrorInfo`` (a stable UPPER_SNAKE ``reason``, a ``domain``, string ``metadata``)
always, ``BadRequest`` field violations for INVALID_ARGUMENT (fields named as the request spells
them, e.g. ``spec.paste[1].box``) and ``PreconditionFailure`` for FAILED_PRECONDITION.
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

__all__ = ["RulewrightError", "from_rpc_error"]

DETAILS_KEY = "grpc-status-details-bin"


class RulewrightError(Exception):
    """A call that failed: its gRPC code, the server's message and the structured details.

    Attributes:
        code: the canonical gRPC status code (``grpc.StatusCode.INVALID_ARGUMENT``, ...).
        message: the server's message (or the client's, for errors found here).
        reason: ``ErrorInfo.reason`` (``MODEL_NOT_FOUND``, ``ALIAS_CONFLICT``, ...); "" if none.
        domain: ``ErrorInfo.domain``; "" if none.
        metadata: ``ErrorInfo.metadata`` (what failed: ``field``, ``model``, ``version``, ...).
        field_violations: ``BadRequest`` violations as ``(field, description)`` pairs.
        precondition_violations: ``PreconditionFailure`` violations as ``(type, subject,
            description)`` triples.
    """

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "", *,
                 field_violations: list[tuple[str, str]] | None = None, domain: str = "",
                 metadata: dict[str, str] | None = None,
                 precondition_violations: list[tuple[str, str, str]] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata = dict(metadata or {})
        self.field_violations = list(field_violations or [])
        self.precondition_violations = list(precondition_violations or [])

    def __str__(self) -> str:
        head = f"{self.code.name}: {self.message}" + (f" ({self.reason})" if self.reason else "")
        return "\n".join([head] + [f"  {f}: {d}" for f, d in self.field_violations])

    def __repr__(self) -> str:
        return (f"RulewrightError({self.code.name}, {self.message!r}, reason={self.reason!r}, "
                f"field_violations={self.field_violations!r})")


def _status(err: grpc.RpcError) -> status_pb2.Status | None:
    """The google.rpc.Status in the error's trailers, if the server sent one."""
    trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == DETAILS_KEY:
            try:
                return status_pb2.Status.FromString(value)
            except Exception:  # noqa: BLE001 -- a malformed trailer leaves only the code and message
                return None
    return None


def from_rpc_error(err: grpc.RpcError) -> RulewrightError:
    """A ``RulewrightError`` for a failed gRPC call (its details decoded where present)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = (err.details() if hasattr(err, "details") else None) or str(err)
    status = _status(err)
    kwargs: dict = {"field_violations": [], "precondition_violations": []}
    reason = ""
    if status is not None:
        message = status.message or message
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, kwargs["domain"], kwargs["metadata"] = info.reason, info.domain, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                kwargs["field_violations"] += [(v.field, v.description) for v in bad.field_violations]
            elif detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
                pre = error_details_pb2.PreconditionFailure()
                detail.Unpack(pre)
                kwargs["precondition_violations"] += [(v.type, v.subject, v.description) for v in pre.violations]
    return RulewrightError(code, message, reason, **kwargs)
