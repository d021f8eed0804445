"""The ``rulewright rescale REF STRENGTH`` command: a version of an edited version at another strength.

(``sample --strength S`` draws a version's own edit at S without making a version; it is a flag of
``sample``, in ``cli_generator``.)
"""

from __future__ import annotations

import argparse
from typing import Callable

from rulewright.client.cli_args import STRENGTH_HELP
from rulewright.client.client import Client


def cmd_rescale(client: Client, args: argparse.Namespace) -> int:
    """``rulewright rescale REF STRENGTH``: print the new version and where it came from."""
    v = client.rescale(args.ref, args.strength, description=args.description, request_id=args.request_id)
    print(f"created {v.name} ({args.ref}'s edit at strength {v.strength:g}; version {v.rescaled_from}'s delta, "
          f"parent {v.parent_version}, no fit)")
    return 0


def register(sub, add: Callable[..., argparse.ArgumentParser]) -> None:
    """Add the ``rescale`` subcommand."""
    p = add("rescale", "create a version of an edited version at another strength (the same delta, no fit)")
    p.add_argument("ref", help="the edited version: faces/3 or faces@staging")
    p.add_argument("strength", type=float, help=STRENGTH_HELP)
    p.add_argument("--description", help="the new version's description (default: the source's)")
    p.add_argument("--request-id", help="a retry with the same id returns the first version instead of another")
    p.set_defaults(run=cmd_rescale)
