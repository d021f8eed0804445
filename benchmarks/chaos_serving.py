"""Queued work that is abandoned, and admission under mixed load, against a real ``rulewright serve``
process: ``python -m benchmarks.chaos_serving``.

One server process (embedded filesystem registry, the faces model, Prometheus metrics on loopback)
runs both scenarios in turn:

1. **queued cancels**: 16 client threads send 1-seed PNG ``Sample`` calls, each with a deadline drawn
   from 50-400 ms, for ``--cancel-duration`` seconds (20). Reported: calls by status code, INTERNAL
   answers (the server's own count and its error log lines), and whether the batch queue drained:
   no forward pass runs from one second after the clients stop to three seconds after, and a
   probe ``Sample`` then answers at once. The images the server computed are set against those it
   served (abandoned requests should not be computed).
2. **32 samplers + a rewriter**: 32 threads send 1-seed ``Sample`` calls (10 s deadline) while one
   more sends ``Rewrite`` (dry run, one after another, 120 s deadline) for ``--duration`` seconds
   (60). Reported: Samples served and failed by code (DEADLINE_EXCEEDED apart: those are not
   within their deadline), p50/p99, and Rewrites completed, refused (RESOURCE_EXHAUSTED) and
   failed otherwise.

``run(args) -> list[dict]`` returns rows ``{"scenario", "backend", "result", "detail"}``; ``main()``
prints them (``--json FILE`` also writes them).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")   # before grpc loads: no INFO line per closed connection

import grpc  # noqa: E402

from benchmarks.reliability_serving import MODEL, REPO, Server, _percentile, _prepare, _row, run_alone  # noqa: E402
from rulewright.v1 import edit_pb2, generator_service_pb2 as gen, generator_service_pb2_grpc as gen_grpc  # noqa: E402
from rulewright.v1 import images_pb2  # noqa: E402

BACKEND = "embedded"
CANCEL_CLIENTS = 16
DEADLINES_S = (0.05, 0.4)
SAMPLERS = 32
SAMPLE_DEADLINE_S = 10.0
REWRITE_DEADLINE_S = 120.0
BOX = [24, 24, 40, 40]
REWRITE = gen.RewriteRequest(model=f"{MODEL}/1", dry_run=True, spec=edit_pb2.EditSpec(
    layer="main.6", rank=1, goal="value", steps=30, stats=edit_pb2.StatisticsSpec(samples=256),
    keep=edit_pb2.KeepSpec(weight=0.0), copy=images_pb2.Region(seed=1, box=BOX),
    paste=[images_pb2.Region(seed=2, box=BOX)]))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This module's flags."""
    parser.add_argument("--duration", type=float, default=60.0,
                        help="seconds of the 32 samplers + a rewriter scenario (default 60)")
    parser.add_argument("--cancel-duration", type=float, default=20.0,
                        help="seconds of the queued cancels scenario (default 20)")
    parser.add_argument("--cache-dir", help="where the faces model is (fetched on first use)",
                        default=os.environ.get("RULEWRIGHT_CACHE_DIR", str(REPO / ".cache" / "rulewright")))


class Scrape:
    """The figures of one ``/metrics`` read: RPCs by (method, code), forward passes and their images."""

    LINE = re.compile(r'^(rulewright_requests_total|rulewright_sample_batch_size_(?:count|sum))(\{[^}]*\})? (\S+)$')

    def __init__(self, url: str):
        self.calls: collections.Counter = collections.Counter()
        self.passes = self.images = 0.0
        with urllib.request.urlopen(url, timeout=10) as reply:
            for line in reply.read().decode().splitlines():
                if not (m := self.LINE.match(line)):
                    continue
                name, value = m.group(1), float(m.group(3))
                labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
                if name == "rulewright_requests_total":
                    self.calls[(labels.get("rpc", ""), labels.get("code", ""))] += value
                elif name.endswith("_count"):
                    self.passes = value
                else:
                    self.images = value

    def internal(self) -> float:
        """INTERNAL answers of every method."""
        return sum(n for (_, code), n in self.calls.items() if code == "INTERNAL")


def _metrics_port() -> int:
    from tests.support import free_port

    return free_port()


def _error_lines(log: Path) -> list[str]:
    """The server log's error lines (JSON ``level`` error or worse)."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            level = json.loads(line).get("level")
        except ValueError:
            continue
        if level in ("error", "critical"):
            out.append(line)
    return out


def _clients(n: int, port: int, duration: float, call) -> collections.Counter:
    """Status codes of ``call(stub, rng)`` sent back to back by ``n`` threads (own channels) for ``duration`` s."""
    stop_at = time.monotonic() + duration
    codes: collections.Counter = collections.Counter()
    lock = threading.Lock()

    def client(i: int) -> None:
        rng = random.Random(i)
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            stub = gen_grpc.GeneratorServiceStub(ch)
            while time.monotonic() < stop_at:
                try:
                    call(stub, rng)
                    code = "OK"
                except grpc.RpcError as err:
                    code = err.code().name
                with lock:
                    codes[code] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return codes


def queued_cancels(server: Server, metrics_url: str, log: Path, duration: float) -> list[dict]:
    """16 clients with 50-400 ms deadlines: INTERNAL count, queue drained, calls served."""
    seeds = iter(range(10_000_000, 10**9))
    before, errors_before = Scrape(metrics_url), len(_error_lines(log))

    def call(stub, rng):
        stub.Sample(gen.SampleRequest(model=f"{MODEL}/1", seeds=[next(seeds)]), timeout=rng.uniform(*DEADLINES_S))

    codes = _clients(CANCEL_CLIENTS, server.port, duration, call)
    time.sleep(1.0)
    settled = Scrape(metrics_url)
    time.sleep(2.0)
    later = Scrape(metrics_url)
    started = time.monotonic()
    try:
        stub = gen_grpc.GeneratorServiceStub(server.channel)
        stub.Sample(gen.SampleRequest(model=f"{MODEL}/1", seeds=[7]), timeout=10)
        probe = f"OK in {(time.monotonic() - started) * 1e3:.0f} ms"
    except grpc.RpcError as err:
        probe = f"{err.code().name} in {(time.monotonic() - started) * 1e3:.0f} ms"
    internal = later.internal() - before.internal()
    error_lines = len(_error_lines(log)) - errors_before
    drained = later.passes == settled.passes
    calls = sum(codes.values())
    return [
        _row("queued cancels: INTERNAL", BACKEND, f"{internal:.0f} of {calls} calls",
             f"{CANCEL_CLIENTS} clients x {duration:g} s, deadlines "
             f"{DEADLINES_S[0] * 1e3:.0f}-{DEADLINES_S[1] * 1e3:.0f} ms; server error log lines {error_lines}; codes {dict(codes)}"),
        _row("queued cancels: queue drained", BACKEND, "yes" if drained else "no",
             f"forward passes 1-3 s after the clients stopped: {later.passes - settled.passes:.0f}; probe Sample "
             f"{probe}"),
        _row("queued cancels: served", BACKEND, f"{codes.get('OK', 0)} of {calls}",
             f"images computed {later.images - before.images:.0f} in {later.passes - before.passes:.0f} passes "
             f"for {codes.get('OK', 0)} served"),
    ]


def samplers_and_rewriter(server: Server, duration: float) -> list[dict]:
    """32 sampling clients and one rewriting client: errors by code, latency, Rewrites completed."""
    seeds = iter(range(20_000_000, 10**9))
    latencies: list[float] = []
    rewrites: collections.Counter = collections.Counter()
    rewrite_s: list[float] = []
    stop_at = time.monotonic() + duration

    def sample(stub, rng):
        started = time.monotonic()
        stub.Sample(gen.SampleRequest(model=f"{MODEL}/1", seeds=[next(seeds)]), timeout=SAMPLE_DEADLINE_S)
        latencies.append(time.monotonic() - started)

    def rewriter():
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = gen_grpc.GeneratorServiceStub(ch)
            while time.monotonic() < stop_at:
                started = time.monotonic()
                try:
                    replies = list(stub.Rewrite(REWRITE, timeout=REWRITE_DEADLINE_S))
                    code = "OK" if replies and replies[-1].HasField("result") else "NO_RESULT"
                except grpc.RpcError as err:
                    code = err.code().name
                rewrites[code] += 1
                rewrite_s.append(time.monotonic() - started)

    rewriting = threading.Thread(target=rewriter)
    rewriting.start()
    codes = _clients(SAMPLERS, server.port, duration, sample)
    rewriting.join()
    served = codes.pop("OK", 0)
    late = codes.pop("DEADLINE_EXCEEDED", 0)
    errors = sum(codes.values())
    return [
        _row("32 samplers + a rewriter: Samples", BACKEND, f"served {served}, errors {errors}",
             f"{SAMPLERS} clients x {duration:g} s ({SAMPLE_DEADLINE_S:g} s deadline): errors by code {dict(codes)}, "
             f"past their deadline {late}; p50 {_percentile(latencies, 0.5) * 1e3:.0f} ms, p99 "
             f"{_percentile(latencies, 0.99) * 1e3:.0f} ms, {served / duration:.1f} images/s"),
        _row("32 samplers + a rewriter: Rewrites", BACKEND,
             f"completed {rewrites.get('OK', 0)}, refused {rewrites.get('RESOURCE_EXHAUSTED', 0)}",
             f"dry-run Rewrites one after another: codes {dict(rewrites)}; "
             f"longest {max(rewrite_s, default=float('nan')):.1f} s"),
    ]


def run(args) -> list[dict]:
    """Both scenarios on one fresh server process; rows ``{"scenario", "backend", "result", "detail"}``."""
    from rulewright.service.importers.faces import import_faces

    cache_dir = getattr(args, "cache_dir", None) or os.environ.get("RULEWRIGHT_CACHE_DIR") \
        or str(REPO / ".cache" / "rulewright")
    duration = float(getattr(args, "duration", 60.0))
    cancel_duration = float(getattr(args, "cancel_duration", 20.0))
    faces = import_faces(cache_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RULEWRIGHT_")}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="rulewright-chaos-serving-") as tmp:
        workdir = Path(tmp)
        data = workdir / "data"
        (data / "registry").mkdir(parents=True)
        _prepare((data / "registry").resolve().as_uri(), faces, env)
        metrics_port = _metrics_port()
        server = Server(workdir, env, ["--data-dir", str(data), "--metrics-address", f"127.0.0.1:{metrics_port}"])
        try:
            stub = gen_grpc.GeneratorServiceStub(server.channel)
            stub.Sample(gen.SampleRequest(model=f"{MODEL}/1", seeds=[0]), timeout=60)      # loaded, warmed
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            rows += queued_cancels(server, url, workdir / "server.log", cancel_duration)
            rows += samplers_and_rewriter(server, duration)
        finally:
            server.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run both scenarios and print the rows as a table (and JSON with --json FILE)."""
    return run_alone("benchmarks.chaos_serving", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
