"""What the ``rulewright`` command modules share: the reference syntax, argument types, errors
and progress bars.

- ``Ref`` / ``reference(text)``: the one reference syntax of every command: ``faces`` (what the
  server's default alias, ``production`` unless configured, points to), ``faces@staging`` (an
  alias), ``faces/3`` (a version); ``models/faces/versions/3`` is read as ``faces/3``.
- ``version_number(client, ref)``: the number a reference names now (a bare name asks the server,
  so its configured default alias decides).
- ``UsageError``: a command line that cannot be run; ``main`` prints the subcommand's usage and
  exits 2. ``spec_error(exc)``: a spec refused before sending, as the server would refuse it.
- ``seeds``, ``seed_range``, ``region``: argparse types; ``when(t)``: a time as the listings print it.
- ``Bars``: one tqdm bar per stage of a long call, on stderr.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

import grpc
from tqdm import tqdm

from rulewright.client.client import Client
from rulewright.client.errors import RulewrightError
from rulewright.client.spec import parse_reference, parse_region, parse_seeds
from rulewright.client.types import Progress

REF_HELP = "model reference: faces (its default alias, production unless the server says otherwise), faces@ALIAS or faces/N"
STRENGTH_HELP = ("strength of the version's own edit (the deltas it adds over its parent; earlier edits keep "
                 "theirs), -10 to 10")


class UsageError(Exception):
    """A command line that cannot be run as given (exit 2, with the subcommand's usage)."""


@dataclass(frozen=True)
class Ref:
    """A parsed reference: a model and at most one of a version number and an alias."""

    model: str
    number: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        return self.model + (f"/{self.number}" if self.number is not None else "") + (
            f"@{self.alias}" if self.alias is not None else "")


def reference(text: str) -> Ref:
    """``faces``, ``faces@alias``, ``faces/N`` (or ``models/faces/versions/N``) as a ``Ref``."""
    try:
        return Ref(*parse_reference(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def version_arg(text: str) -> Ref | int:
    """A version: a number (0: none, to unset an alias) or a reference (``faces/2``, ``faces@staging``)."""
    return int(text) if text.isdigit() else reference(text)


def version_number(client: Client, ref: Ref) -> int:
    """The version ``ref`` names now: its number, the alias's version, or (a bare name) the
    version the server resolves it to, so its configured default alias decides."""
    if ref.number is not None:
        return ref.number
    if ref.alias is not None:
        return client.alias(ref.model, ref.alias).version
    return int(client.layers(ref.model).version.rsplit("/", 1)[-1])


def spec_error(exc: ValueError) -> RulewrightError:
    """A spec field refused here (``strength: must be a number``) as the server names it: INVALID_ARGUMENT
    with the violation of ``spec.<field>``, printed and exiting 1 like any refused call."""
    field, _, description = str(exc).partition(": ")
    field = field if field == "spec" or field.startswith("spec.") else f"spec.{field}"
    return RulewrightError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {description}", "INVALID_ARGUMENT",
                           field_violations=[(field, description)])


def seeds(text: str) -> list[int]:
    """``--seeds``: ``0-15``, ``1,5,9`` or ``0-3,10``, counted before a range is expanded."""
    try:
        return parse_seeds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def seed_range(text: str) -> range:
    """``A-B`` (inclusive) or one seed ``A``: a dataset job's seeds are one contiguous range."""
    lo, dash, hi = text.partition("-")
    try:
        first, last = int(lo), int(hi if dash else lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds {text!r}: expected a range like 0-9999") from None
    if last < first or first < 0:
        raise argparse.ArgumentTypeError(f"seeds {text!r}: expected a non-empty range of seeds >= 0")
    return range(first, last + 1)


def region(text: str) -> dict[str, Any]:
    """``SEED:x0,y0,x1,y1`` as a region dict."""
    try:
        return parse_region(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def short(name: str) -> str:
    """``models/faces/versions/3`` → ``faces/3`` (a model reference)."""
    if not name.startswith("models/"):
        return name
    model, number, _ = parse_reference(name)
    return f"{model}/{number}"


def when(t) -> str:
    """A timestamp as listings print it; ``-`` for none."""
    return t.strftime("%Y-%m-%d %H:%M:%S") if t else "-"


class Bars:
    """One tqdm bar per stage of a long call, on stderr."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar: tqdm | None = None
        self.stage = ""

    def update(self, p: Progress) -> None:
        """Advance (or start) the bar of ``p``'s stage."""
        if not self.enabled:
            return
        if p.stage != self.stage:
            self.close()
            self.stage = p.stage
            self.bar = tqdm(total=p.steps or None, desc=p.stage, unit="sample" if p.stage == "statistics" else "step",
                            file=sys.stderr, leave=True, dynamic_ncols=True)
        assert self.bar is not None
        if p.steps:
            self.bar.total = p.steps
        self.bar.update(p.step - self.bar.n)
        if p.loss is not None:
            self.bar.set_postfix(loss=f"{p.loss:.4f}")

    def close(self) -> None:
        """End the current bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
