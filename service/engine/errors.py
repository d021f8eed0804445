"""Typed errors for bad input to the engine, carrying the offending field.

- ``InvalidArgument(field, message)``: a ``ValueError`` for one request field (→ INVALID_ARGUMENT
  with a BadRequest field violation over the API). ``field`` is a dotted path into the edit spec
  (``paste[1].mask``, ``rank``).
- ``Cancelled``: a long job stopped because its caller asked (→ CANCELLED).
"""

from __future__ import annotations


class InvalidArgument(ValueError):
    """A request field is malformed; ``field`` names it, the message says what is wrong."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.description = message
        super().__init__(f"{field}: {message}")


class Cancelled(Exception):
    """The caller cancelled a running job; nothing was applied or stored."""
