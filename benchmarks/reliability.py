"""Fault injection and load against real servers, one table: ``python -m benchmarks.reliability``.

Runs both parts in turn and prints their rows together:
- ``benchmarks.reliability_store``: crash rounds (kill -9 at each write of a Rewrite and of an
  import, then a retry with the same request id), duplicates after retry, the first start after a
  crash mid-bootstrap, and a retry after a crash while holding the statistics lock;
- ``benchmarks.reliability_serving``: 32 clients sampling for 60 s (served, failed, p50/p99), RSS
  before and after, an oversized request, and the S3 server paused (time to UNAVAILABLE, health
  latency, a resident version served);
- the ``benchmarks.chaos_*`` scenarios, each runnable alone too: queued Samples whose deadlines
  pass and 32 samplers beside a rewriter (``chaos_serving``), a symlinked job output location and
  two jobs on one location (``chaos_jobs``), a truncated stored statistic and a resident version
  while the store is down (``chaos_data``), slow-drip HTTP clients (``chaos_http``), and rewrites
  whose fit never leaves no edit (``chaos_rewrite``).

Exits 1 when a crash round left the registry inconsistent, a retry duplicated a version, or a
request failed under load. ``--duration`` shortens the load phase; ``--rounds`` the crash rounds; ``--parts`` picks parts by name.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from benchmarks import (chaos_data, chaos_http, chaos_jobs, chaos_rewrite, chaos_serving, reliability_serving,
                        reliability_store)

CHAOS = {"serving": chaos_serving, "jobs": chaos_jobs, "data": chaos_data, "http": chaos_http,
         "rewrite": chaos_rewrite}
PARTS = ("store", "load", *CHAOS)


def chaos_args(module, args: argparse.Namespace) -> argparse.Namespace:
    """A chaos module's own defaults, with the values of the flags it shares with this command."""
    parser = argparse.ArgumentParser(add_help=False)
    module.add_arguments(parser)
    own = parser.parse_args([])
    for name, value in vars(args).items():
        if hasattr(own, name):
            setattr(own, name, value)
    return own


def main(argv: list[str] | None = None) -> int:
    """Run both parts and print one table (and JSON with --json FILE)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__.splitlines()[0])
    reliability_serving.add_arguments(parser)          # --duration, --clients, --backends, --cache-dir
    parser.add_argument("--rounds", type=int, default=12, help="crash rounds per store backend")
    parser.add_argument("--store-backends", default="file,s3", help="comma-separated store backends for the crash rounds")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts to run (default all: {','.join(PARTS)})")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)} (known: {', '.join(PARTS)})")
    store_args = argparse.Namespace(rounds=args.rounds, backends=args.store_backends, cache_dir=args.cache_dir,
                                    json=False)
    os.environ.setdefault("RULEWRIGHT_CACHE_DIR", args.cache_dir)
    rows = reliability_store.run(store_args) if "store" in parts else []
    rows += reliability_serving.run(args) if "load" in parts else []
    for name in (n for n in CHAOS if n in parts):
        rows += CHAOS[name].run(chaos_args(CHAOS[name], args))
    print(reliability_serving.table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    bad_store = any(r["scenario"] == "crash rounds consistent" and r["result"].split("/")[0] != r["result"].split("/")[1]
                    for r in rows) or any(r["scenario"] == "duplicates after retry" and r["result"] != "0" for r in rows)
    bad_load = any(r["scenario"] == "load" and "failed 0" not in r["result"] for r in rows)
    return 1 if bad_store or bad_load else 0


if __name__ == "__main__":
    sys.exit(main())
