"""The ``rulewright`` command: sample, dissect, rewrite and manage versions over the API.

Commands: ``models``, ``layers``, ``sample``, ``dissect``, ``rewrite``, ``versions``, ``version
show``, ``aliases``, ``alias set|history``, ``rollback``, ``export`` (``cli_generator``,
``cli_registry``), ``rescale`` (a version at another strength, ``cli_strength``), ``adapter
export|import`` (a version's edits alone, ``cli_adapter``), ``dataset create|get|list|cancel`` and
``stats create|get|list|cancel`` (long-running jobs, ``cli_jobs``), and ``serve`` (the server itself, when it is installed: ``pip
install rulewright``).

Every command names a version the same way: ``faces`` (the version the server's default alias
points to: ``production`` unless the server sets ``--default-alias``), ``faces@staging`` (an
alias) or ``faces/3`` (a version); every result names the version it used.

Exit status:

- 0: done.
- 1: the call failed: the server refused it or could not be reached, a job did not succeed, or
  the request was refused here by the server's own rules (an edit spec's field of the wrong type
  or unknown). Printed as ``rulewright: error: <message>`` and one ``  <field>: <description>``
  line per field at fault.
- 2: the command line is wrong (an unknown command or flag, a malformed value, a missing
  argument): the subcommand's usage and the problem, before anything is sent.
- 130: interrupted (Ctrl-C; a job keeps running on the server).

A command module (``cli_generator`` and the others) exports ``register(sub, add)``: ``add(name,
help, parent=sub)`` makes a subcommand parser that takes the connection flags and knows itself
(``args.parser``); the module sets ``run=function(client, args) -> int`` on each parser it adds
and raises ``UsageError`` (``cli_args``) for a command line it cannot run. ``COMMANDS`` lists the
modules in the order their commands appear in ``--help``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from rulewright.client import cli_adapter, cli_generator, cli_jobs, cli_registry, cli_strength
from rulewright.client.cli_args import UsageError
from rulewright.client.client import Client
from rulewright.client.errors import RulewrightError

DEFAULT_ADDRESS = "127.0.0.1:50051"
SERVE_MISSING = "rulewright serve needs the server: pip install rulewright"
# The modules whose register(sub, add) add the subcommands, in --help order.
COMMANDS = (cli_generator, cli_strength, cli_registry, cli_adapter, cli_jobs)


# ---- the parser ------------------------------------------------------------------------------

def _connection_flags(p: argparse.ArgumentParser, suppress: bool) -> None:
    """``--address``, ``--token``, ``--timeout``, ``--retries`` (on every subcommand too)."""
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)   # subcommands must not reset the globals
    p.add_argument("--address", default=d(os.environ.get("RULEWRIGHT_ADDRESS") or DEFAULT_ADDRESS),
                   help="host:port of the server (default: $RULEWRIGHT_ADDRESS or 127.0.0.1:50051)")
    p.add_argument("--token", default=d(os.environ.get("RULEWRIGHT_TOKEN") or None),
                   help="bearer token (default: $RULEWRIGHT_TOKEN; none: no auth)")
    p.add_argument("--timeout", type=float, default=d(60.0),
                   help="seconds a call may take, retries included (rewrite and export: an hour)")
    p.add_argument("--retries", type=int, default=d(4), help="retries of a call the server is unavailable for")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``rulewright``: the global flags, then each of ``COMMANDS``' subcommands."""
    parser = argparse.ArgumentParser(prog="rulewright", description="Sample, dissect and rewrite GANs served by "
                                     "rulewright, and manage their versions and aliases.")
    _connection_flags(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _connection_flags(common, suppress=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str, parent=sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help, parents=[common])
        p.set_defaults(parser=p)       # usage errors print this subcommand's usage
        return p

    sub.add_parser("serve", help="run the server (needs the rulewright package); see rulewright serve --help",
                   add_help=False)
    for module in COMMANDS:
        module.register(sub, add)
    return parser


def serve(argv: Sequence[str]) -> int:
    """``rulewright serve ...``: the server's own command, if the server is installed."""
    try:
        from rulewright.service.cli import server_main
    except ImportError:
        print(SERVE_MISSING, file=sys.stderr)
        return 2
    return server_main(["serve", *argv])


def print_error(err: RulewrightError) -> None:
    """``rulewright: error: <message>`` and one ``  <field>: <description>`` line per violation."""
    print(f"rulewright: error: {err.message}", file=sys.stderr)
    for field, description in err.field_violations:
        print(f"  {field}: {description}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``rulewright``; returns the exit status (0 done, 1 a failed call, 2 usage, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        return serve(argv[1:])
    args = build_parser().parse_args(argv)       # a usage error exits 2 with the subcommand's usage
    with Client(args.address, args.token, timeout=args.timeout, retries=args.retries) as client:
        try:
            return args.run(client, args)
        except UsageError as exc:
            args.parser.print_usage(sys.stderr)
            print(f"{args.parser.prog}: error: {exc}", file=sys.stderr)
            return 2
        except RulewrightError as err:
            print_error(err)
            return 1
        except OSError as err:
            print(f"rulewright: error: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130


if __name__ == "__main__":
    sys.exit(main())
