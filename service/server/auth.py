"""Bearer-token auth: tokens mapped to roles, enforced by one ``grpc.ServerInterceptor``.

- Roles, weakest first: ``reader`` (ListLayers, Sample, Dissect, SearchContext; registry List*,
  Get*, ExportVersion, ExportAdapter, ListAliasHistory), ``editor`` (+ Rewrite, ComputeStatistics,
  ImportAdapter, RescaleVersion), ``admin``
  (+ ImportModel, DeleteModel, DeleteVersion, SetAlias, RollbackAlias). The Open Inference
  Protocol's ModelReady, ServerMetadata, ModelMetadata and ModelInfer need a reader. ``grpc.health.v1``,
  reflection and OIP ServerLive and ServerReady (the OIP's health probes, which say no more than
  ``grpc.health.v1`` does) need no token; any other method of our services not listed needs an
  admin (deny by default).
- Token format (file and ``RULEWRIGHT_TOKENS`` alike): one ``token role principal`` per line,
  whitespace separated; blank lines and ``#`` comments are ignored; in the environment ``;``
  also separates entries. ``load_tokens(path, text)`` reads both and merges them.
- ``AuthInterceptor(tokens)``: reads ``authorization: Bearer <token>``; a missing token is
  UNAUTHENTICATED (``TOKEN_MISSING``), an unknown one UNAUTHENTICATED (``TOKEN_INVALID``), too
  weak a role PERMISSION_DENIED (``ROLE_INSUFFICIENT``), each with ErrorInfo through
  ``errors.to_status``. Tokens are compared with ``hmac.compare_digest`` and never logged.
- ``current_principal()``: the authenticated principal of the RPC running on this thread
  (``"anonymous"`` with auth off); the servicers record it as the author of what they change.
- ``check_auth_config(address, tokens)``: auth may be off only on a loopback address.
- ``around(behavior, response_streaming, scope)``: a gRPC method's behaviour run inside a context
  manager (until its stream ends), for interceptors that scope a call.
"""

from __future__ import annotations

import contextlib
import contextvars
import hmac
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterable

import grpc
from grpc_status import rpc_status

from rulewright.service.server.errors import PermissionDenied, Unauthenticated, to_status

log = logging.getLogger(__name__)

ROLES = ("reader", "editor", "admin")            # weakest first; each includes the ones before
ANONYMOUS = "anonymous"
_GEN = "/rulewright.v1.GeneratorService/"
_REG = "/rulewright.v1.RegistryService/"
_OIP = "/inference.GRPCInferenceService/"
_JOBS = "/rulewright.v1.JobService/"
_OPS = "/google.longrunning.Operations/"
METHOD_ROLES: dict[str, str] = {
    **{_GEN + m: "reader" for m in ("ListLayers", "Sample", "Dissect", "SearchContext")},
    **{_GEN + m: "editor" for m in ("Rewrite", "ComputeStatistics")},
    **{_REG + m: "reader" for m in ("ListModels", "GetModel", "ListVersions", "GetVersion", "ExportVersion",
                                    "ListAliasHistory")},
    _REG + "RescaleVersion": "editor",      # makes a version, as Rewrite does (no fit)
    **{_REG + m: "admin" for m in ("ImportModel", "DeleteModel", "DeleteVersion", "SetAlias",
                                   "RollbackAlias")},
    _REG + "ExportAdapter": "reader",
    _REG + "ImportAdapter": "editor",         # a new edit version, as a Rewrite makes
    # Jobs: anyone who may sample may watch; starting, cancelling and deleting bulk work is an editor's.
    **{_OPS + m: "reader" for m in ("GetOperation", "ListOperations", "WaitOperation")},
    **{_OPS + m: "editor" for m in ("CancelOperation", "DeleteOperation")},
    _JOBS + "CreateDatasetJob": "editor",
    **{_OIP + m: "reader" for m in ("ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer")},
}
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                   "/grpc.reflection.v1.ServerReflection/")
PUBLIC_METHODS = frozenset({_OIP + "ServerLive", _OIP + "ServerReady"})   # probes, as open as grpc.health

_principal: contextvars.ContextVar[str] = contextvars.ContextVar("rulewright_principal", default=ANONYMOUS)


def current_principal() -> str:
    """The principal of the RPC running on this thread; ``"anonymous"`` with auth off."""
    return _principal.get()


@dataclass(frozen=True)
class Token:
    secret: bytes = b""
    role: str = "reader"
    principal: str = ANONYMOUS

    def __repr__(self) -> str:                   # never show the secret
        return f"Token(role={self.role!r}, principal={self.principal!r})"


class AuthConfigError(ValueError):
    """A token file or environment entry that does not parse, or auth off on a public address."""


def parse_tokens(text: str, source: str = "tokens", separators: str = "\n") -> list[Token]:
    """Entries ``token role principal`` from ``text``; errors name the line, never the token."""
    for sep in separators[1:]:
        text = text.replace(sep, separators[0])
    out: list[Token] = []
    for n, line in enumerate(text.split(separators[0]), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3:
            raise AuthConfigError(f"{source} entry {n}: expected 'token role principal' ({len(parts)} fields)")
        secret, role, principal = parts
        if role not in ROLES:
            raise AuthConfigError(f"{source} entry {n}: unknown role {role!r} (one of {', '.join(ROLES)})")
        out.append(Token(secret.encode(), role, principal))
    return out


def load_tokens(path: str | Path | None = None, text: str | None = None) -> list[Token]:
    """Tokens from a file and from ``RULEWRIGHT_TOKENS``-style text, merged; no duplicates."""
    tokens: list[Token] = []
    if path:
        try:
            content = Path(path).read_text()
        except OSError as exc:
            raise AuthConfigError(f"cannot read tokens file {str(path)!r}: {exc.strerror}") from None
        tokens += parse_tokens(content, f"tokens file {str(path)!r}")
    if text:
        tokens += parse_tokens(text, "RULEWRIGHT_TOKENS", "\n;")
    secrets = [t.secret for t in tokens]
    if len(set(secrets)) != len(secrets):
        raise AuthConfigError("the same token is configured twice")
    return tokens


def tokens_from_env(path: str | Path | None = None, environ=os.environ) -> list[Token]:
    """``path`` (else ``RULEWRIGHT_TOKENS_FILE``) merged with ``RULEWRIGHT_TOKENS``."""
    return load_tokens(path or environ.get("RULEWRIGHT_TOKENS_FILE") or None, environ.get("RULEWRIGHT_TOKENS"))


def is_loopback(address: str) -> bool:
    """Whether a ``host:port`` (or ``unix:`` path) listens only on this machine."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.rsplit(":", 1)[0] if ":" in address else address
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_auth_config(address: str, tokens: Iterable[Token] | None) -> None:
    """Raise ``AuthConfigError`` when no tokens are configured and ``address`` is not loopback."""
    if not tokens and not is_loopback(address):
        raise AuthConfigError(f"refusing to serve {address} without auth: configure tokens (--tokens-file, "
                              "RULEWRIGHT_TOKENS_FILE or RULEWRIGHT_TOKENS) or bind a loopback address")


def _bearer(metadata) -> bytes | None:
    """The token of the ``authorization: Bearer <token>`` metadata; ``b""`` for another scheme."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            scheme, _, token = value.strip().partition(" ")
            return token.strip().encode() if scheme.lower() == "bearer" else b""
    return None


class AuthInterceptor(grpc.ServerInterceptor):
    """Checks every call's bearer token against the method's role; sets the principal."""

    def __init__(self, tokens: Iterable[Token]):
        self.tokens = list(tokens)

    def lookup(self, secret: bytes) -> Token | None:
        """The entry for ``secret``: every entry compared in constant time, no early exit."""
        found = None
        for t in self.tokens:
            if hmac.compare_digest(t.secret, secret) and found is None:
                found = t
        return found

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = continuation(handler_call_details)
        if handler is None or method.startswith(PUBLIC_PREFIXES) or method in PUBLIC_METHODS:
            return handler
        try:
            token = self.authorize(method, _bearer(handler_call_details.invocation_metadata))
        except (Unauthenticated, PermissionDenied) as exc:
            return self._deny(handler, method, exc, exc.metadata.get("principal", ""))
        return _with_principal(handler, token.principal)

    def authorize(self, method: str, secret: bytes | None,
                  missing: str = "missing bearer token (metadata 'authorization: Bearer <token>')") -> Token:
        """The entry of ``secret`` if its role may call ``method`` (a full gRPC method name).

        Raises ``Unauthenticated`` (TOKEN_MISSING, TOKEN_INVALID) or ``PermissionDenied``
        (ROLE_INSUFFICIENT); the HTTP side (``server/web/``) calls this with its endpoints' methods.
        """
        required = METHOD_ROLES.get(method, "admin")
        if not secret:
            raise Unauthenticated("TOKEN_MISSING", missing)
        token = self.lookup(secret)
        if token is None:
            raise Unauthenticated("TOKEN_INVALID", "unknown bearer token")
        if ROLES.index(token.role) < ROLES.index(required):
            raise PermissionDenied(
                "ROLE_INSUFFICIENT", f"{method.rsplit('/', 1)[-1]} needs role {required}; {token.principal} is "
                f"{token.role}", metadata={"required_role": required, "role": token.role,
                                           "principal": token.principal})
        return token

    @staticmethod
    def _deny(handler, method: str, exc: Exception, principal: str = "") -> grpc.RpcMethodHandler:
        log.warning("rpc denied", extra={"event": "rpc_denied", "method": method.rsplit("/", 1)[-1],
                                         "reason": exc.reason, "principal": principal})
        status = rpc_status.to_status(to_status(exc))

        def abort(request_or_iterator, context):
            context.abort_with_status(status)
        return _replace(handler, lambda _behavior: abort, streaming_response=False)


def _replace(handler, wrap, streaming_response: bool | None = None) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour replaced by ``wrap(behavior)``, serializers kept."""
    kinds = {(False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
             (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
             (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
             (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler)}
    attr, make = kinds[(handler.request_streaming, handler.response_streaming)]
    behavior = wrap(getattr(handler, attr))
    if streaming_response is False and handler.response_streaming:
        inner = behavior

        def behavior(request_or_iterator, context):     # an abort that is also a (never-yielding) generator
            inner(request_or_iterator, context)
            yield from ()
    return make(behavior, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def around(behavior, response_streaming: bool, scope: Callable[[], ContextManager]):
    """``behavior`` (a gRPC method's) run inside ``scope()``; for a stream, until the stream ends."""
    if response_streaming:
        def streaming(request_or_iterator, context):
            with scope():
                yield from behavior(request_or_iterator, context)
        return streaming

    def unary(request_or_iterator, context):
        with scope():
            return behavior(request_or_iterator, context)
    return unary


@contextlib.contextmanager
def _acting_as(principal: str):
    _principal.set(principal)
    try:
        yield
    finally:                  # set, not reset: a stream may be closed from another context
        _principal.set(ANONYMOUS)


def _with_principal(handler, principal: str) -> grpc.RpcMethodHandler:
    return _replace(handler, lambda behavior: around(behavior, handler.response_streaming,
                                                     lambda: _acting_as(principal)))
