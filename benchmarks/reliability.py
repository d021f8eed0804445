"""Fault injection and load against real servers, one table: ``python -m benchmarks.reliability``.

Runs both parts in turn and prints their rows together:
- ``benchmarks.reliability_store``: crash rounds (kill -9 at each write of a Rewrite and of an
  import, then a retry with the same request id), duplicates after retry, the first start after a
  crash mid-bootstrap, and a retry after a crash while holding the statistics lock;
- ``benchmarks.reliability_serving``: 32 clients sampling for 60 s (served, failed, p50/p99), RSS
  before and after, an oversized request, and the S3 server paused (time to UNAVAILABLE, health
  latency, a resident version served).

Exits 1 when a crash round left the registry inconsistent, a retry duplicated a version, or a
request failed under load. ``--duration`` shortens the load phase; ``--rounds`` the crash rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from benchmarks import reliability_serving, reliability_store


def main(argv: list[str] | None = None) -> int:
    """Run both parts and print one table (and JSON with --json FILE)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__.splitlines()[0])
    reliability_serving.add_arguments(parser)          # --duration, --clients, --backends, --cache-dir
    parser.add_argument("--rounds", type=int, default=12, help="crash rounds per store backend")
    parser.add_argument("--store-backends", default="file,s3", help="comma-separated store backends for the crash rounds")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    store_args = argparse.Namespace(rounds=args.rounds, backends=args.store_backends, cache_dir=args.cache_dir,
                                    json=False)
    os.environ.setdefault("RULEWRIGHT_CACHE_DIR", args.cache_dir)
    rows = reliability_store.run(store_args) + reliability_serving.run(args)
    print(reliability_serving.table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    bad_store = any(r["scenario"] == "crash rounds consistent" and r["result"].split("/")[0] != r["result"].split("/")[1]
                    for r in rows) or any(r["scenario"] == "duplicates after retry" and r["result"] != "0" for r in rows)
    bad_load = any(r["scenario"] == "load" and "failed 0" not in r["result"] for r in rows)
    return 1 if bad_store or bad_load else 0


if __name__ == "__main__":
    sys.exit(main())
