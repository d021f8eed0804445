"""One protocol for every long operation: progress events out, cancellation in.

- ``Event``: one report — ``stage`` (``statistics``, ``search``, ``optimize``, ``full_rank``,
  ``finetune``, ``preview``, ``commit``, ``done``), ``done`` of ``total`` (samples for
  statistics, steps for an optimization), the current ``loss`` if there is one, ``waiting``
  while another caller computes the same thing, and stage-specific ``info`` (the seeds a search
  found, the edit's metrics, the best loss so far).
- ``Progress(on_event, should_stop)``: what every long operation of the engine and the domain
  takes as ``progress=``. Loops call ``report(...)`` after a unit of work and ``check(what)``
  before the next one; ``check`` raises ``Cancelled`` once ``should_stop()`` is true.
  ``Progress()`` reports nowhere and never stops.

Transports build one from their own stream (a gRPC context, an HTTP job); nothing in between
changes its shape.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from rulewright.service.engine.errors import Cancelled


@dataclasses.dataclass(frozen=True)
class Event:
    """One progress report of a long operation."""

    stage: str
    done: int = 0
    total: int = 0
    loss: float | None = None
    waiting: bool = False                 # another caller (or replica) is computing it; this one waits
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


class Progress:
    """Where a long operation reports to, and how it learns its caller wants it stopped."""

    def __init__(self, on_event: Callable[[Event], None] | None = None,
                 should_stop: Callable[[], bool] | None = None):
        self.on_event = on_event
        self.should_stop = should_stop

    def report(self, stage: str, done: int = 0, total: int = 0, loss: float | None = None,
               waiting: bool = False, **info: Any) -> None:
        """Send one ``Event`` to the listener, if there is one."""
        if self.on_event is not None:
            self.on_event(Event(stage, int(done), int(total), None if loss is None else float(loss), waiting, info))

    def stopped(self) -> bool:
        """Whether the caller has asked the operation to stop."""
        return self.should_stop is not None and bool(self.should_stop())

    def check(self, what: str) -> None:
        """Raise ``Cancelled`` (naming ``what`` was stopped) if the caller has asked to stop."""
        if self.stopped():
            raise Cancelled(f"{what} cancelled")

