"""The registry's one exception hierarchy: a closed set of codes and stable UPPER_SNAKE reasons.

- ``Code``: the canonical codes (``rulewright.service.errors``, the one error base); names match
  ``grpc.StatusCode`` so the API layer maps them with one table.
- ``Reason``: every reason the registry raises, each bound to exactly one ``Code`` (``REASON_CODES``).
- ``RegistryError``: base class (an ``Error``); ``.code``, ``.reason`` (a ``Reason``), ``.domain``,
  ``.field`` (the request field at fault, also in ``.metadata``), ``.metadata`` (string pairs for
  ``google.rpc.ErrorInfo``) and the human message.
- One subclass per code: ``NotFound``, ``AlreadyExists``, ``FailedPrecondition``, ``Aborted``,
  ``DataLoss``, ``Unavailable``, ``Internal``.
- ``InvalidArgument``: the service's one error for a malformed field (``rulewright.service.errors``);
  the registry raises it through ``invalid(reason, field, message)``, with its reason and domain.
- ``REGISTRY_DOMAIN`` (``registry.rulewright.dev``): the ``ErrorInfo.domain`` of every registry error,
  defined with the service's ``DOMAIN`` in ``rulewright.service.errors``.

Backends translate their own errors (``OSError``, botocore, redis-py) into these at the store
boundary, so nothing above the store ever sees a backend exception.
"""

from __future__ import annotations

import enum
from typing import Any

# The one error base (and its codes) every layer shares; it imports nothing, so the registry
# still loads without torch or the server.
from rulewright.service.errors import REGISTRY_DOMAIN, Code, Error, InvalidArgument


class Reason(str, enum.Enum):
    """Stable machine-readable reasons (``ErrorInfo.reason``); the same error always gets the same one."""

    # NOT_FOUND
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    VERSION_NOT_FOUND = "VERSION_NOT_FOUND"
    ALIAS_NOT_FOUND = "ALIAS_NOT_FOUND"
    BLOB_NOT_FOUND = "BLOB_NOT_FOUND"
    OBJECT_NOT_FOUND = "OBJECT_NOT_FOUND"
    # ALREADY_EXISTS
    MODEL_EXISTS = "MODEL_EXISTS"
    OBJECT_EXISTS = "OBJECT_EXISTS"
    # FAILED_PRECONDITION
    VERSION_HAS_CHILDREN = "VERSION_HAS_CHILDREN"
    VERSION_HAS_ALIASES = "VERSION_HAS_ALIASES"
    MODEL_HAS_VERSIONS = "MODEL_HAS_VERSIONS"
    NO_EARLIER_VERSION = "NO_EARLIER_VERSION"
    REQUEST_ID_REUSED = "REQUEST_ID_REUSED"
    # ABORTED
    ALIAS_CONFLICT = "ALIAS_CONFLICT"
    VERSION_ALLOCATION_CONFLICT = "VERSION_ALLOCATION_CONFLICT"
    CONCURRENT_DELETE = "CONCURRENT_DELETE"
    # DATA_LOSS
    BLOB_CORRUPT = "BLOB_CORRUPT"
    MANIFEST_CORRUPT = "MANIFEST_CORRUPT"
    # UNAVAILABLE
    STORE_UNAVAILABLE = "STORE_UNAVAILABLE"
    # INVALID_ARGUMENT
    INVALID_NAME = "INVALID_NAME"
    INVALID_VERSION = "INVALID_VERSION"
    INVALID_PAGE_SIZE = "INVALID_PAGE_SIZE"
    INVALID_PAGE_TOKEN = "INVALID_PAGE_TOKEN"
    INVALID_REFERENCE = "INVALID_REFERENCE"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    INVALID_STORE_URI = "INVALID_STORE_URI"
    # INTERNAL: the deployment is wrong (bucket missing, credentials refused), not the request
    STORE_MISCONFIGURED = "STORE_MISCONFIGURED"


REASON_CODES: dict[Reason, Code] = {
    Reason.MODEL_NOT_FOUND: Code.NOT_FOUND,
    Reason.VERSION_NOT_FOUND: Code.NOT_FOUND,
    Reason.ALIAS_NOT_FOUND: Code.NOT_FOUND,
    Reason.BLOB_NOT_FOUND: Code.NOT_FOUND,
    Reason.OBJECT_NOT_FOUND: Code.NOT_FOUND,
    Reason.MODEL_EXISTS: Code.ALREADY_EXISTS,
    Reason.OBJECT_EXISTS: Code.ALREADY_EXISTS,
    Reason.VERSION_HAS_CHILDREN: Code.FAILED_PRECONDITION,
    Reason.VERSION_HAS_ALIASES: Code.FAILED_PRECONDITION,
    Reason.MODEL_HAS_VERSIONS: Code.FAILED_PRECONDITION,
    Reason.NO_EARLIER_VERSION: Code.FAILED_PRECONDITION,
    Reason.REQUEST_ID_REUSED: Code.FAILED_PRECONDITION,
    Reason.ALIAS_CONFLICT: Code.ABORTED,
    Reason.VERSION_ALLOCATION_CONFLICT: Code.ABORTED,
    Reason.CONCURRENT_DELETE: Code.ABORTED,
    Reason.BLOB_CORRUPT: Code.DATA_LOSS,
    Reason.MANIFEST_CORRUPT: Code.DATA_LOSS,
    Reason.STORE_UNAVAILABLE: Code.UNAVAILABLE,
    Reason.INVALID_NAME: Code.INVALID_ARGUMENT,
    Reason.INVALID_VERSION: Code.INVALID_ARGUMENT,
    Reason.INVALID_PAGE_SIZE: Code.INVALID_ARGUMENT,
    Reason.INVALID_PAGE_TOKEN: Code.INVALID_ARGUMENT,
    Reason.INVALID_REFERENCE: Code.INVALID_ARGUMENT,
    Reason.INVALID_ARGUMENT: Code.INVALID_ARGUMENT,
    Reason.INVALID_STORE_URI: Code.INVALID_ARGUMENT,
    Reason.STORE_MISCONFIGURED: Code.INTERNAL,
}


class RegistryError(Error):
    """A registry failure with a canonical ``code``, a stable ``reason`` and string ``metadata``."""

    code: Code = Code.INTERNAL
    domain = REGISTRY_DOMAIN

    def __init__(self, reason: Reason, message: str, **metadata: Any):
        expected = REASON_CODES[reason]
        if expected is not self.code:
            # A programming error in the registry, never a user's: fail loudly where it is raised.
            raise TypeError(f"reason {reason.value} belongs to {expected.value}, not {type(self).__name__}")
        field = metadata.pop("field", None)
        super().__init__(message, field=str(field or ""), **metadata)
        if field is not None:
            self.metadata["field"] = str(field)
        self.reason = reason                # the enum (a str): registry code compares reasons by identity

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason.value}: {self.message})"


def _kind(name: str, code: Code, doc: str) -> type[RegistryError]:
    return type(name, (RegistryError,), {"code": code, "__doc__": doc, "__module__": __name__})


# One subclass per code but INVALID_ARGUMENT (that is the shared ``InvalidArgument``).
NotFound = _kind("NotFound", Code.NOT_FOUND, "A model, version, alias or blob does not exist (→ NOT_FOUND).")
AlreadyExists = _kind("AlreadyExists", Code.ALREADY_EXISTS,
                      "A create found the name taken (→ ALREADY_EXISTS), also a store's conditional create's.")
FailedPrecondition = _kind("FailedPrecondition", Code.FAILED_PRECONDITION,
                           "The registry's state forbids the operation, e.g. deleting a version an alias uses.")
Aborted = _kind("Aborted", Code.ABORTED, "A compare-and-set lost a race (→ ABORTED); re-read and retry.")
DataLoss = _kind("DataLoss", Code.DATA_LOSS,
                 "Stored bytes do not match their sha256, or a manifest is unreadable (→ DATA_LOSS).")
Unavailable = _kind("Unavailable", Code.UNAVAILABLE,
                    "The object store cannot be reached right now (→ UNAVAILABLE); retrying may help.")
Internal = _kind("Internal", Code.INTERNAL,
                 "The deployment is misconfigured (bucket missing, credentials refused) (→ INTERNAL).")


ERROR_CLASSES: dict[Code, type[RegistryError]] = {
    cls.code: cls
    for cls in (NotFound, AlreadyExists, FailedPrecondition, Aborted, DataLoss, Unavailable, Internal)
}


def invalid(reason: Reason, field: str, message: str, **metadata: Any) -> InvalidArgument:
    """The shared ``InvalidArgument`` for ``field``, with a registry ``reason`` and the registry's domain."""
    if REASON_CODES[reason] is not Code.INVALID_ARGUMENT:
        raise TypeError(f"reason {reason.value} belongs to {REASON_CODES[reason].value}, not INVALID_ARGUMENT")
    exc = InvalidArgument(field, message, domain=REGISTRY_DOMAIN, **metadata)
    exc.reason = reason                     # the enum (a str), as on every registry error
    if field:
        exc.metadata["field"] = field
    return exc


def error(reason: Reason, message: str, **metadata: Any) -> Error:
    """The exception of the right class for ``reason`` (for code that picks the reason at run time)."""
    if REASON_CODES[reason] is Code.INVALID_ARGUMENT:
        return invalid(reason, str(metadata.pop("field", "") or ""), message, **metadata)
    return ERROR_CLASSES[REASON_CODES[reason]](reason, message, **metadata)
