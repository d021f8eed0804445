"""Typed errors for bad input to the engine, carrying the offending field.

- ``InvalidArgument(field, message)``: a ``ValueError`` for one request field (→ INVALID_ARGUMENT
  with a BadRequest field violation over the API). ``field`` is a dotted path into the edit spec
  (``paste[1].mask``, ``rank``). Defined once in ``rulewright.service.errors``, re-exported here.
- ``Cancelled``: a long job stopped because its caller asked (→ CANCELLED).
- ``EditDidNotImprove``: a fit that ended where it started, no edit (→ FAILED_PRECONDITION), with
  the goal losses as metadata.

All derive from ``rulewright.service.errors.Error``, the one base every layer's errors share.
"""

from __future__ import annotations

from rulewright.service.errors import Code, Error, InvalidArgument

__all__ = ["Cancelled", "EditDidNotImprove", "InvalidArgument"]


class Cancelled(Error):
    """The caller cancelled a running job; nothing was applied or stored."""

    code = Code.CANCELLED
    reason = "CANCELLED"


class EditDidNotImprove(Error):
    """No step of an edit's fit did better than no edit, so its factors stayed zero: nothing to store."""

    code = Code.FAILED_PRECONDITION
    reason = "EDIT_DID_NOT_IMPROVE"
