"""Typed errors for bad input to the engine, carrying the offending field.

- ``InvalidArgument(field, message)``: a ``ValueError`` for one request field (→ INVALID_ARGUMENT
  with a BadRequest field violation over the API). ``field`` is a dotted path into the edit spec
  (``paste[1].mask``, ``rank``).
- ``Cancelled``: a long job stopped because its caller asked (→ CANCELLED).
- ``EditDidNotImprove``: a fit that ended where it started, no edit (→ FAILED_PRECONDITION), with
  the goal losses as metadata.

All derive from ``rulewright.service.errors.Error``, the one base every layer's errors share.
"""

from __future__ import annotations

from rulewright.service.errors import Code, Error


class InvalidArgument(Error, ValueError):
    """A request field is malformed; ``field`` names it, the message says what is wrong."""

    code = Code.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}", field=field, description=message)


class Cancelled(Error):
    """The caller cancelled a running job; nothing was applied or stored."""

    code = Code.CANCELLED
    reason = "CANCELLED"


class EditDidNotImprove(Error):
    """No step of an edit's fit did better than no edit, so its factors stayed zero: nothing to store."""

    code = Code.FAILED_PRECONDITION
    reason = "EDIT_DID_NOT_IMPROVE"
