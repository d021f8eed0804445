"""rulewright's one error base class, shared by every layer (it imports nothing of ours).

- ``Code``: the canonical codes an error can carry; the names are gRPC's (``grpc.StatusCode``), so
  every transport maps them with one table (HTTP statuses in ``server/web/errors.py``).
- ``Error``: the base of every error the service raises on purpose: ``code``, a stable
  UPPER_SNAKE ``reason`` (``google.rpc.ErrorInfo.reason``), a ``domain``, the ``field`` at fault
  (a request path such as ``spec.paste[1].mask``; empty when none), string ``metadata`` and the
  human message. Subclasses fix ``code`` (and usually ``reason``) as class attributes.

- ``DOMAIN`` (``rulewright.dev``) and ``REGISTRY_DOMAIN`` (``registry.rulewright.dev``): the
  ``ErrorInfo.domain`` values clients see, defined here once.
- ``InvalidArgument(field, message)``: the one error for a malformed request field, whichever
  layer finds it (a ``ValueError`` too); the registry raises it with its own reasons and domain.

The engine's ``Cancelled``, the registry's ``RegistryError`` family and the server's auth and
limit errors all derive from ``Error``; anything else a request raises is a bug and answers
INTERNAL.
"""

from __future__ import annotations

import enum
from typing import Any

DOMAIN = "rulewright.dev"
# The registry's errors carry their own domain, a subdomain of this one.
REGISTRY_DOMAIN = f"registry.{DOMAIN}"


class Code(str, enum.Enum):
    """Canonical codes (a subset of gRPC's) that errors carry."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    CANCELLED = "CANCELLED"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAVAILABLE = "UNAVAILABLE"
    DATA_LOSS = "DATA_LOSS"
    INTERNAL = "INTERNAL"


class Error(Exception):
    """An error with a canonical ``code``, a stable ``reason``, the ``field`` at fault and ``metadata``."""

    code: Code = Code.INTERNAL
    reason: str = "INTERNAL"
    domain: str = DOMAIN

    def __init__(self, message: str, *, reason: str | None = None, field: str = "", domain: str | None = None,
                 description: str | None = None, **metadata: Any):
        super().__init__(message)
        self.message = message
        self.description = message if description is None else description   # without the field's name
        if reason is not None:
            self.reason = str(getattr(reason, "value", reason))
        if domain is not None:
            self.domain = domain
        self.field = field
        # ErrorInfo.metadata is map<string, string>: render values once, here.
        self.metadata = {k: "" if v is None else str(v) for k, v in metadata.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({getattr(self.reason, 'value', self.reason)}: {self.message})"


class InvalidArgument(Error, ValueError):
    """A request field is malformed; ``field`` names it, the message says what is wrong.

    ``details`` are ``Error``'s keywords: a more specific ``reason``, another ``domain``, metadata.
    """

    code = Code.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str, **details: Any):
        super().__init__(f"{field}: {message}" if field else message, field=field, description=message, **details)
