"""One table from exception to gRPC status, and the one decorator every servicer method wears.

- Every error raised on purpose is a ``rulewright.service.errors.Error`` and carries its own
  code, reason, domain and field. ``ERROR_TABLE`` holds the rest: a request stream gRPC broke
  off, and the plain ``ValueError``/``LookupError`` the engine's math helpers raise for bad
  input; anything else is INTERNAL (a bug; its message stays in the log).
- ``Unauthenticated``, ``PermissionDenied``: raised by ``auth.AuthInterceptor``.
- ``to_status(exc, fields)``: the ``google.rpc.Status`` for an exception (ErrorInfo always;
  BadRequest for INVALID_ARGUMENT; PreconditionFailure for FAILED_PRECONDITION).
- ``rpc(fields=...)``: decorator for unary and server-streaming methods; turns any exception into
  an abort with ``grpc-status-details-bin`` and logs one line per call; store calls the method
  makes end with the RPC's deadline (the store contract's ``call_deadline``).
- ``renamed(names)``: a context that renames error fields where a transport spells them
  differently from the domain.

Fields are named as the domain's requests spell them (``spec.paste[1].mask``, ``latents.count``);
``fields`` renames a first segment as an RPC's request does (``model`` → ``name``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import time
from typing import Callable, Mapping

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from rulewright.registry.blobstore import call_deadline
from rulewright.service.errors import InvalidArgument
from rulewright.service.errors import DOMAIN, Code, Error

log = logging.getLogger(__name__)

GENERIC_INTERNAL = "internal error; see the server log"


class AuthError(Error):
    """A call the auth interceptor refuses; it carries its own code, ``reason`` and ``metadata``."""

    code = Code.UNAUTHENTICATED

    def __init__(self, reason: str, message: str, metadata: Mapping[str, str] | None = None):
        super().__init__(message, reason=reason, **dict(metadata or {}))   # TOKEN_MISSING, TOKEN_INVALID, ...


class Unauthenticated(AuthError):
    """No token, or one nobody configured: UNAUTHENTICATED."""


class PermissionDenied(AuthError):
    """A valid token whose role is too weak for the method: PERMISSION_DENIED."""

    code = Code.PERMISSION_DENIED


# (exception type, code, reason) for what is not an ``Error``; the first row whose type matches wins.
ERROR_TABLE: list[tuple[type[BaseException], grpc.StatusCode, str]] = [
    # A request stream gRPC broke off (the client cancelled, or a message was over max_message_mb):
    # the client already has its status; this only names it in the log, without a traceback.
    (grpc.RpcError, grpc.StatusCode.CANCELLED, "STREAM_BROKEN"),
    (LookupError, grpc.StatusCode.NOT_FOUND, "NOT_FOUND"),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
]


def classify(exc: BaseException) -> tuple[grpc.StatusCode, str, str]:
    """(code, reason, domain) for ``exc``: its own for an ``Error``, else the first matching table row."""
    if isinstance(exc, Error):
        return grpc.StatusCode[exc.code.value], str(getattr(exc.reason, "value", exc.reason)), exc.domain
    for kind, code, reason in ERROR_TABLE:
        if isinstance(exc, kind):
            return code, reason, DOMAIN
    return grpc.StatusCode.INTERNAL, "INTERNAL", DOMAIN


def request_field(field: str, fields: Mapping[str, str] | None = None) -> str:
    """``field`` as the request spells it: its first segment renamed by ``fields``."""
    head, sep, rest = field.partition(".")
    base, bracket, index = head.partition("[")
    base = (fields or {}).get(base, base)
    return base + bracket + index + sep + rest


@contextlib.contextmanager
def renamed(names: Mapping[str, str]):
    """Fields of ``InvalidArgument`` errors renamed where a transport spells them differently.

    ``names`` maps a field the domain names (``seeds``, ``regions[0]``) to the transport's; a
    field under it (``regions[0].mask``) keeps its tail.
    """
    try:
        yield
    except InvalidArgument as exc:
        for old, new in names.items():
            if exc.field == old or exc.field.startswith((old + ".", old + "[")):
                raise InvalidArgument(new + exc.field[len(old):], exc.description) from None
        raise


def _pack(*messages) -> list[any_pb2.Any]:
    out = []
    for m in messages:
        a = any_pb2.Any()
        a.Pack(m)
        out.append(a)
    return out


def to_status(exc: BaseException, fields: Mapping[str, str] | None = None) -> status_pb2.Status:
    """The google.rpc.Status for ``exc`` (message generic for INTERNAL)."""
    code, reason, domain = classify(exc)
    metadata = dict(getattr(exc, "metadata", {}) or {})
    message = str(exc) if code is not grpc.StatusCode.INTERNAL else GENERIC_INTERNAL
    details = []
    field = request_field(exc.field, fields) if isinstance(exc, Error) and exc.field else ""
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


def _abort(context: grpc.ServicerContext, exc: BaseException, method: str, fields) -> None:
    status = to_status(exc, fields)
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


def rpc(fields: Mapping[str, str] | None = None) -> Callable:
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
                    _abort(context, exc, method, fields)
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
                _abort(context, exc, method, fields)
            done(started, "OK")
            return response
        return unary

    return wrap

