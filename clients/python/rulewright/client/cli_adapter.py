"""``rulewright adapter export REF FILE`` and ``rulewright adapter import MODEL FILE``.

An adapter is a version's edit alone, one safetensors file that imports onto any server holding
the same base weights (docs/adapters.md).
"""

from __future__ import annotations

import argparse
from typing import Callable

from rulewright.client.cli_args import reference
from rulewright.client.client import Client


def _reference(text: str) -> str:
    """A reference the client can resolve (``faces/3``, ``faces@staging``, ``faces``), else a usage error."""
    return str(reference(text))


def cmd_adapter_export(client: Client, args: argparse.Namespace) -> int:
    """Write a version's adapter to FILE; print what was written."""
    done = client.export_adapter(args.ref, args.file)
    print(f"{done.version.name}: {done.path} ({done.size_bytes} bytes, sha256 {done.sha256}, "
          f"base {done.base_fingerprint})")
    return 0


def cmd_adapter_import(client: Client, args: argparse.Namespace) -> int:
    """Create a version from an adapter file; print the new version."""
    version = client.import_adapter(args.model, args.file, args.description, request_id=args.request_id)
    print(f"{version.name} (from {version.adapter['source_version'] if version.adapter else 'an adapter'})")
    return 0


def register(sub, add: Callable) -> None:
    """The ``adapter`` command and its ``export`` and ``import`` actions."""
    about = "a version's edit alone as one safetensors file, to import onto the same base elsewhere"
    adapter = sub.add_parser("adapter", help=about, description=about)
    adapter.set_defaults(parser=adapter)   # a missing action prints this command's usage
    actions = adapter.add_subparsers(dest="adapter_command", required=True, metavar="ACTION")
    p = add("export", "download a version's adapter (sha256 checked)", actions)
    p.add_argument("ref", type=_reference, help="an edited version: faces/3, faces@staging, or faces (the server's default alias)")
    p.add_argument("file", help="file to write (safetensors)")
    p.set_defaults(run=cmd_adapter_export)
    p = add("import", "create a version from an adapter made on the same base weights", actions)
    p.add_argument("model", type=_reference, help="model to import onto (its base must match the adapter's fingerprint), or a "
                   "version to stack it on: faces/3, faces@staging")
    p.add_argument("file", help="adapter file (safetensors, as adapter export writes it)")
    p.add_argument("--description", help="replaces the description recorded in the version's spec")
    p.add_argument("--request-id", help="idempotency key (default: a fresh one; retries reuse it)")
    p.set_defaults(run=cmd_adapter_import)
