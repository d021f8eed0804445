"""``python -m rulewright.registry check|gc --store URI``: consistency check and garbage collection.

- ``check``: report orphan blobs, missing or corrupt blobs of live manifests, unreadable
  manifests, broken lineages, imports killed before their version 1; exit 1 if anything is
  found, 0 if the store is clean.
- ``gc``: remove orphan blobs (and abandoned uploads, stale deletion markers) older than
  ``--grace``, keeping the weights of unfinished imports; report damaged manifests without
  repairing them; exit 1 if any are found.
- Exit 2: bad arguments or an unreachable store.

S3 credentials come from ``RULEWRIGHT_S3_*`` (never from flags, which ``ps`` would show).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys

from rulewright.registry import errors
from rulewright.registry.blobstore import default_store_uri
from rulewright.registry.stores import open_store
from rulewright.registry.gc import DEFAULT_GRACE_S, Report, collect, scan
from rulewright.registry.s3store import S3Config

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``1h`` or ``2d``."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (examples: 90s, 15m, 1h, 2d)")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``check`` and ``gc`` with their flags."""
    parser = argparse.ArgumentParser(prog="python -m rulewright.registry", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("check", "report orphan blobs and damaged manifests; change nothing"),
        ("gc", "remove orphan blobs older than the grace period; report damaged manifests"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--store",
            default=None,
            help="store URI: file:///path or s3://bucket/prefix (default: $RULEWRIGHT_REGISTRY_URI or the local cache)",
        )
        p.add_argument(
            "--s3-endpoint", default=None, help="S3 endpoint host:port or URL (default: $RULEWRIGHT_S3_ENDPOINT)"
        )
        p.add_argument(
            "--s3-insecure", action="store_true", help="use http:// for an S3 endpoint given without a scheme"
        )
        p.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
        p.add_argument(
            "--grace",
            type=parse_duration,
            default=DEFAULT_GRACE_S,
            help="leave blobs and uploads younger than this alone (e.g. 30m, 1h; default 1h)",
        )
        if name == "check":
            p.add_argument(
                "--no-verify", action="store_true", help="only check that referenced blobs exist, do not hash them"
            )
        else:
            p.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
            p.add_argument("--verify", action="store_true", help="also hash every referenced blob, as check does")
    return parser


def _print_text(report: Report, command: str) -> None:
    print(
        f"store {report.store}: {report.blobs} blobs, {report.manifests} live versions referencing {report.referenced}"
    )
    for blob in report.orphans:
        state = (
            "removed"
            if blob.sha256 in report.removed
            else ("kept (younger than grace)" if blob.sha256 in report.kept else "orphan")
        )
        print(f"  orphan blob {blob.sha256} ({blob.size} bytes): {state}")
    for name in report.abandoned_uploads:
        print(f"  abandoned upload {name}" + (": removed" if command == "gc" else ""))
    for key in report.stale_markers:
        print(f"  stale deletion marker {key}" + (": removed" if command == "gc" else ""))
    for name in report.incomplete_imports:
        print(
            f"  incomplete import: model {name!r} has no version 1 (killed midway; its weights are kept); "
            "the next start with --bootstrap or a retry of the import with its request id finishes it"
        )
    for problem in report.problems:
        sha = f" {problem.sha256}" if problem.sha256 else ""
        print(f"  PROBLEM {problem.kind}: {problem.key}{sha}: {problem.detail}")
    clean = command == "gc" or not (report.orphans or report.incomplete_imports)
    print("ok" if report.ok and clean else "problems found")


def main(argv: list[str] | None = None) -> int:
    """Run the command; the exit status says whether problems were found."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    s3 = S3Config.from_env()
    if args.s3_endpoint:
        s3.endpoint = args.s3_endpoint
    if args.s3_insecure:
        s3.secure = False
    try:
        with open_store(args.store or default_store_uri(), s3=s3) as store:
            if args.command == "check":
                report = scan(store, verify=not args.no_verify, grace_s=args.grace)
            else:
                report = collect(store, grace_s=args.grace, dry_run=args.dry_run, verify=args.verify)
    except (errors.RegistryError, errors.InvalidArgument) as exc:
        print(f"error: {exc.reason.value}: {exc.message}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    else:
        _print_text(report, args.command)
    problems = bool(report.problems) or (
        args.command == "check" and bool(report.orphans or report.stale_markers or report.incomplete_imports)
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
