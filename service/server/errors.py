"""One table from exception to gRPC status, and the one decorator every servicer method wears.

- ``ERROR_TABLE``: ordered (exception type, gRPC code, ErrorInfo reason, ErrorInfo domain); the
  first row whose type matches wins. Registry errors and auth errors (``Unauthenticated``,
  ``PermissionDenied``, raised by ``auth.AuthInterceptor``) carry their own code and reason.
- ``to_status(exc, fields)``: the ``google.rpc.Status`` for an exception (ErrorInfo always;
  BadRequest for INVALID_ARGUMENT; PreconditionFailure for FAILED_PRECONDITION).
- ``rpc(fields=..., prefix=...)``: decorator for unary and server-streaming methods; turns any
  exception into an abort with ``grpc-status-details-bin`` and logs one line per call; store
  calls the method makes end with the RPC's deadline (``s3store.call_deadline``).

Engine fields are named as the engine spells them (``paste[1].mask``); ``prefix`` and ``fields``
rename them as the request does (``spec.paste[1].mask``, ``z`` → ``latents``). Registry fields
(ErrorInfo metadata ``field``) are already request-level; only ``fields`` renames them.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from typing import Callable, Mapping

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from rulewright.registry.errors import RegistryError
from rulewright.registry.s3store import call_deadline
from rulewright.service.engine.errors import Cancelled, InvalidArgument

log = logging.getLogger(__name__)

DOMAIN = "rulewright.dev"
GENERIC_INTERNAL = "internal error; see the server log"


class AuthError(Exception):
    """A call the auth interceptor refuses; it carries its own code, ``reason`` and ``metadata``."""

    code = grpc.StatusCode.UNAUTHENTICATED
    domain = DOMAIN

    def __init__(self, reason: str, message: str, metadata: Mapping[str, str] | None = None):
        super().__init__(message)
        self.reason = reason                 # TOKEN_MISSING, TOKEN_INVALID, ROLE_INSUFFICIENT
        self.metadata = dict(metadata or {})


class Unauthenticated(AuthError):
    """No token, or one nobody configured: UNAUTHENTICATED."""


class PermissionDenied(AuthError):
    """A valid token whose role is too weak for the method: PERMISSION_DENIED."""

    code = grpc.StatusCode.PERMISSION_DENIED


# (exception type(s), code, reason, domain); None: taken from the exception (registry and auth errors).
ERROR_TABLE: list[tuple[type[BaseException] | tuple[type[BaseException], ...], grpc.StatusCode | None, str | None,
                        str | None]] = [
    ((RegistryError, AuthError), None, None, None),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", DOMAIN),
    (Cancelled, grpc.StatusCode.CANCELLED, "CANCELLED", DOMAIN),
    # A request stream gRPC broke off (the client cancelled, or a message was over max_message_mb):
    # the client already has its status; this only names it in the log, without a traceback.
    (grpc.RpcError, grpc.StatusCode.CANCELLED, "STREAM_BROKEN", DOMAIN),
    (LookupError, grpc.StatusCode.NOT_FOUND, "NOT_FOUND", DOMAIN),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", DOMAIN),
    (Exception, grpc.StatusCode.INTERNAL, "INTERNAL", DOMAIN),
]


def classify(exc: BaseException) -> tuple[grpc.StatusCode, str, str]:
    """(code, reason, domain) for ``exc``: the first matching row of ``ERROR_TABLE``."""
    for kind, code, reason, domain in ERROR_TABLE:
        if isinstance(exc, kind):
            if code is None and isinstance(exc, RegistryError):
                return grpc.StatusCode[exc.code.value], exc.reason.value, exc.domain
            if code is None:
                return exc.code, exc.reason, exc.domain
            return code, reason, domain
    return grpc.StatusCode.INTERNAL, "INTERNAL", DOMAIN


def request_field(field: str, fields: Mapping[str, str] | None = None, prefix: str = "") -> str:
    """``field`` as the request spells it: its first segment renamed by ``fields``, then prefixed."""
    head, sep, rest = field.partition(".")
    base, bracket, index = head.partition("[")
    base = (fields or {}).get(base, base)
    return prefix + base + bracket + index + sep + rest


def _pack(*messages) -> list[any_pb2.Any]:
    out = []
    for m in messages:
        a = any_pb2.Any()
        a.Pack(m)
        out.append(a)
    return out


def to_status(exc: BaseException, fields: Mapping[str, str] | None = None, prefix: str = "") -> status_pb2.Status:
    """The google.rpc.Status for ``exc`` (message generic for INTERNAL)."""
    code, reason, domain = classify(exc)
    metadata = dict(getattr(exc, "metadata", {}) or {})
    message = str(exc) if code is not grpc.StatusCode.INTERNAL else GENERIC_INTERNAL
    details = []
    if getattr(exc, "field", None):          # an engine field, relative to what the RPC hands the engine
        field = request_field(exc.field, fields, prefix)
    elif metadata.get("field"):               # a registry field, already named as the request does
        field = request_field(metadata["field"], fields)
    else:
        field = ""
    if field:
        metadata["field"] = field
    details.append(error_details_pb2.ErrorInfo(reason=reason, domain=domain, metadata=metadata))
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        description = getattr(exc, "description", None) or getattr(exc, "message", None) or str(exc)
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field or "", description=description)]))
    elif code is grpc.StatusCode.FAILED_PRECONDITION:
        details.append(error_details_pb2.PreconditionFailure(violations=[
            error_details_pb2.PreconditionFailure.Violation(type=reason, subject=",".join(
                f"{k}={v}" for k, v in sorted(metadata.items())), description=message)]))
    return status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=_pack(*details))


def _abort(context: grpc.ServicerContext, exc: BaseException, method: str, fields, prefix) -> None:
    status = to_status(exc, fields, prefix)
    if status.code == code_pb2.INTERNAL:
        log.error("unhandled error", exc_info=exc, extra={"event": "rpc_internal_error", "method": method})
    context.abort_with_status(rpc_status.to_status(status))


def _remaining(context) -> float | None:
    """Seconds left before the RPC's deadline (None: none, or a context that cannot say)."""
    try:
        left = context.time_remaining()
    except Exception:  # noqa: BLE001 -- stand-in contexts in tests
        return None
    return float(left) if isinstance(left, (int, float)) else None


def rpc(fields: Mapping[str, str] | None = None, prefix: str = "") -> Callable:
    """Decorator: map every exception of a servicer method through ``ERROR_TABLE``; log each call."""

    def wrap(fn: Callable) -> Callable:
        method = fn.__name__

        def done(started: float, code: str) -> None:
            log.info("rpc", extra={"event": "rpc", "method": method, "code": code,
                                   "ms": round((time.perf_counter() - started) * 1e3, 2)})

        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def stream(self, request, context):
                started = time.perf_counter()
                try:
                    with call_deadline(_remaining(context)):
                        yield from fn(self, request, context)
                except Exception as exc:  # noqa: BLE001 -- every error becomes a status
                    done(started, classify(exc)[0].name)
                    _abort(context, exc, method, fields, prefix)
                else:
                    done(started, "OK")
            return stream

        @functools.wraps(fn)
        def unary(self, request, context):
            started = time.perf_counter()
            try:
                with call_deadline(_remaining(context)):     # store calls end with the RPC's deadline
                    response = fn(self, request, context)
            except Exception as exc:  # noqa: BLE001 -- every error becomes a status
                done(started, classify(exc)[0].name)
                _abort(context, exc, method, fields, prefix)
            done(started, "OK")
            return response
        return unary

    return wrap

