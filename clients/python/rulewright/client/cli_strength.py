"""The ``rulewright`` command's strength flags: ``sample --strength S`` and ``rescale REF STRENGTH``.

``add_strength_commands(add, sample)`` adds both to the parser ``cli.build_parser`` builds:
``--strength`` to its ``sample`` subcommand (the version's own edit drawn at S, no new version)
and the ``rescale`` subcommand (a new version: the same delta at S, no fit).
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from rulewright.client.client import Client

STRENGTH_HELP = ("strength of the version's own edit (the deltas it adds over its parent; earlier edits keep "
                 "theirs), -10 to 10")


class _AtStrength:
    """A client whose samples are drawn at one strength; every other call passes through."""

    def __init__(self, client: Client, strength: float):
        self._client, self._strength = client, strength

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def sample(self, *args: Any, **kw: Any):
        """``Client.sample`` at the flag's strength."""
        return self._client.sample(*args, strength=self._strength, **kw)


def at_strength(run: Callable[[Client, argparse.Namespace], int]) -> Callable[[Client, argparse.Namespace], int]:
    """``run`` (a subcommand) with its samples drawn at ``--strength`` when the flag is given."""
    def wrapped(client: Client, args: argparse.Namespace) -> int:
        return run(client if args.strength is None else _AtStrength(client, args.strength), args)
    return wrapped


def cmd_rescale(client: Client, args: argparse.Namespace) -> int:
    """``rulewright rescale REF STRENGTH``: print the new version and where it came from."""
    v = client.rescale(args.ref, args.strength, description=args.description, request_id=args.request_id)
    print(f"created {v.name} ({args.ref}'s edit at strength {v.strength:g}; version {v.rescaled_from}'s delta, "
          f"parent {v.parent_version}, no fit)")
    return 0


def add_strength_commands(add: Callable[..., argparse.ArgumentParser], sample: argparse.ArgumentParser) -> None:
    """``--strength`` on the ``sample`` subcommand, and the ``rescale`` subcommand."""
    sample.add_argument("--strength", type=float, help=STRENGTH_HELP + "; default: the version's own")
    sample.set_defaults(run=at_strength(sample.get_default("run")))
    p = add("rescale", "create a version of an edited version at another strength (the same delta, no fit)")
    p.add_argument("ref", help="the edited version: faces/3 or faces@staging")
    p.add_argument("strength", type=float, help=STRENGTH_HELP)
    p.add_argument("--description", help="the new version's description (default: the source's)")
    p.add_argument("--request-id", help="a retry with the same id returns the first version instead of another")
    p.set_defaults(run=cmd_rescale)
