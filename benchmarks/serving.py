"""Serving throughput of GeneratorService.Sample on the faces model: ``python -m benchmarks.serving``.

Two measurements, each against a baseline measured in the same run and interleaved with it (call by
call in the first, configuration by configuration over several rounds in the second), so that load
from elsewhere on the machine hits both alike; every ratio is taken between totals:

1. **gRPC Sample vs in-process.** Sequential ``Sample`` calls of ``--batch`` seeds (default 16,
   PNG) from one client over a real loopback channel to a server whose domain batches dynamically,
   against the same work done in-process: ``Domain.sample`` on the same domain followed by the same
   ``convert.images_pb`` PNG encoding the servicer uses. What is left in the ratio is what serving
   adds: protobuf (de)serialization, HTTP/2 over loopback, the server's thread pool and the batcher
   hand-off. The two alternate call by call; the median of the per-pair ratios is printed too, as a
   check that a burst of outside load did not decide the ratio of totals. Goal: gRPC at least 0.85
   of in-process images/s at the default batch; batch 1 is reported for information (its fixed
   per-request costs weigh 16 times more).
2. **16 concurrent single-image clients.** ``--clients`` threads, each with its own channel (and
   its own TCP connection: ``grpc.use_local_subchannel_pool``, so channels do not share a
   subchannel), each sending sequential 1-seed PNG ``Sample`` requests for ``--seconds`` in all
   (split over ``--rounds``) after a warm-up, to a server whose domain batches dynamically
   (``max_batch`` 16, batch delays 0, 2 and 5 ms: the service default is 2 ms) and to one whose
   domain does not (every request its own forward pass). Reported: total images/s, p50/p99
   request latency (over every round's requests), the mean forward-pass batch size,
   and batched/unbatched images/s at the default delay. Note that an
   unbatched single image still runs a forward pass at batch 4 (``sampling.bucket``: sizes below 4
   are padded so that images do not depend on their company); that is what the service does, so
   it is part of the baseline.

Every request uses seeds no other request used. Clients and server share this process (and its
GIL), as they do in the tests; torch keeps its default intra-op threads (printed), the same for
every configuration. Each configuration gets a fresh domain and server, closed before the next.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")   # before grpc loads: no INFO line per closed connection

import grpc  # noqa: E402
import torch  # noqa: E402

from rulewright.service.domain import Domain  # noqa: E402
from rulewright.service.importers.faces import import_faces  # noqa: E402
from rulewright.service.requests import SampleRequest  # noqa: E402
from rulewright.service.server import convert  # noqa: E402
from rulewright.service.server.app import create_server  # noqa: E402
from rulewright.v1 import generator_service_pb2 as gen, generator_service_pb2_grpc as gen_grpc, images_pb2  # noqa: E402

MODEL = "faces"
PNG = images_pb2.IMAGE_FORMAT_PNG
DEFAULT_DELAY_MS = 2.0            # the service's default batch delay (Domain, ServeConfig)

_seeds = itertools.count(1_000_000)   # next() on a count is atomic under the GIL: distinct seeds everywhere


def fresh_seeds(n: int) -> list[int]:
    """``n`` seeds no request has used yet."""
    return [next(_seeds) for _ in range(n)]


class BatchSizes:
    """Stands in for ``server.metrics.Metrics`` on ``domain.metrics``: records forward-pass sizes."""

    def __init__(self):
        self.sizes: list[int] = []

    def observe_batch(self, size: int) -> None:
        self.sizes.append(size)

    def observe_stats_cache(self, kind: str, hit: bool) -> None:
        pass

    def mean(self) -> float:
        return statistics.fmean(self.sizes) if self.sizes else 0.0


class Served:
    """A domain on the faces model behind a started loopback server; ``close()`` stops both."""

    def __init__(self, data_dir: Path, weights: Path, dynamic_batching: bool, delay_ms: float = DEFAULT_DELAY_MS,
                 max_batch: int = 16):
        self.domain = Domain.open(data_dir, device="cpu", dynamic_batching=dynamic_batching, max_batch=max_batch,
                                  batch_delay_ms=delay_ms)
        self.domain.generator(self.domain.bootstrap(MODEL, weights))     # resident before the first request
        self.batches = BatchSizes()
        self.domain.metrics = self.batches
        self.server, self.port = create_server(self.domain, "127.0.0.1:0")

    def channel(self, own_connection: bool = True) -> grpc.Channel:
        options = [("grpc.use_local_subchannel_pool", 1)] if own_connection else []
        return grpc.insecure_channel(f"127.0.0.1:{self.port}", options=options)

    def close(self) -> None:
        self.server.stop(0).wait()
        self.domain.close()


# ---- 1. gRPC vs in-process ---------------------------------------------------------------------

def grpc_vs_inprocess(served: Served, batch: int, seconds: float, warmup: int = 3) -> dict:
    """images/s of sequential gRPC Sample calls and of in-process sample + PNG encoding, call by call.

    The two alternate call by call for about ``seconds`` in all, each call timed on its own, so
    that load from elsewhere on the machine falls on both alike; the ratio is of the summed times.
    """
    channel = served.channel()
    stub = gen_grpc.GeneratorServiceStub(channel)

    def over_grpc() -> int:
        r = stub.Sample(gen.SampleRequest(model=MODEL, seeds=fresh_seeds(batch), image_format=PNG), timeout=60)
        return len(r.images)

    def in_process() -> int:
        seeds = fresh_seeds(batch)
        images = served.domain.sample(SampleRequest(MODEL, seeds=seeds)).images
        return len(convert.images_pb(images, PNG, seeds))

    def timed(fn) -> float:
        start = time.perf_counter()
        assert fn() == batch
        return time.perf_counter() - start

    for _ in range(warmup):
        over_grpc()
        in_process()
    g_times, p_times = [], []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        if len(g_times) % 2:                # ABBA: neither side always runs first
            p_times.append(timed(in_process))
            g_times.append(timed(over_grpc))
        else:
            g_times.append(timed(over_grpc))
            p_times.append(timed(in_process))
    channel.close()
    n = len(g_times)
    g, p = n * batch / sum(g_times), n * batch / sum(p_times)
    return {"batch": batch, "calls_each": n, "grpc_images_per_s": g, "in_process_images_per_s": p, "ratio": g / p,
            "median_pair_ratio": statistics.median(b / a for a, b in zip(g_times, p_times)),
            "grpc_median_ms": 1000 * statistics.median(g_times),
            "in_process_median_ms": 1000 * statistics.median(p_times)}


# ---- 2. concurrent single-image clients --------------------------------------------------------

def _drive(served: Served, clients: int, warmup_s: float, seconds: float) -> dict:
    """``clients`` threads, one channel each, sequential 1-seed PNG requests; figures for the timed window."""
    channels = [served.channel() for _ in range(clients)]
    stubs = [gen_grpc.GeneratorServiceStub(c) for c in channels]
    ready = threading.Barrier(clients + 1)
    go = threading.Event()
    window: dict = {}
    latencies: list[list[float]] = [[] for _ in range(clients)]
    finished: list[float] = [0.0] * clients
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            stub = stubs[i]
            request = lambda: gen.SampleRequest(model=MODEL, seeds=fresh_seeds(1), image_format=PNG)  # noqa: E731
            end_warm = time.perf_counter() + warmup_s
            while time.perf_counter() < end_warm:
                stub.Sample(request(), timeout=60)
            ready.wait()
            go.wait()
            end = window["end"]
            while (t0 := time.perf_counter()) < end:
                stub.Sample(request(), timeout=60)
                t1 = time.perf_counter()
                latencies[i].append(t1 - t0)
                finished[i] = t1
        except BaseException as exc:  # noqa: BLE001 -- reported after the join
            errors.append(exc)
            try:
                ready.abort()
            except threading.BrokenBarrierError:
                pass

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    try:
        ready.wait()
    except threading.BrokenBarrierError:
        pass
    served.batches.sizes.clear()            # count only the timed window's forward passes
    window["start"] = time.perf_counter()
    window["end"] = window["start"] + seconds
    go.set()
    for t in threads:
        t.join()
    for c in channels:
        c.close()
    if errors:
        raise errors[0]
    every = sorted(x for lat in latencies for x in lat)
    elapsed = max(finished) - window["start"]
    return {"requests": len(every), "seconds": elapsed, "images_per_s": len(every) / elapsed,
            "latencies": every, "mean_batch": served.batches.mean(), "forward_passes": len(served.batches.sizes)}


def concurrent_clients(data_dir: Path, weights: Path, clients: int, delays_ms: list[float], seconds: float,
                       rounds: int, warmup_s: float) -> dict:
    """Batched (each delay) and unbatched servers under ``clients`` single-image clients, interleaved by round."""
    configs = [("unbatched", False, DEFAULT_DELAY_MS)] + [(f"batched_{d:g}ms", True, d) for d in delays_ms]
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
    for r in range(rounds):
        order = configs[r % len(configs):] + configs[:r % len(configs)]   # rotate who runs first
        for name, batching, delay in order:
            served = Served(data_dir, weights, dynamic_batching=batching, delay_ms=delay)
            try:
                runs[name].append(_drive(served, clients, warmup_s, seconds / rounds))
            finally:
                served.close()
    out: dict = {"clients": clients, "channels": "one per client, own TCP connection", "configs": {}}
    for name, batching, delay in configs:
        rs = runs[name]
        requests = sum(x["requests"] for x in rs)
        elapsed = sum(x["seconds"] for x in rs)
        passes = sum(x["forward_passes"] for x in rs)
        q = statistics.quantiles([v for x in rs for v in x["latencies"]], n=100, method="inclusive")
        out["configs"][name] = {
            "dynamic_batching": batching, "delay_ms": delay if batching else None,
            "images_per_s": requests / elapsed, "requests": requests,
            "p50_ms": 1000 * q[49], "p99_ms": 1000 * q[98],
            "mean_batch": sum(x["mean_batch"] * x["forward_passes"] for x in rs) / max(passes, 1),
            "round_images_per_s": [x["images_per_s"] for x in rs],
        }
    default = f"batched_{DEFAULT_DELAY_MS:g}ms"
    if default in out["configs"]:
        b, u = out["configs"][default], out["configs"]["unbatched"]
        out["ratio"] = b["images_per_s"] / u["images_per_s"]
        out["round_ratios"] = [x / y for x, y in zip(b["round_images_per_s"], u["round_images_per_s"])]
    return out


def run(batch: int = 16, seconds: float = 16.0, grpc_seconds: float = 16.0, rounds: int = 4, clients: int = 16,
        delays_ms: list[float] | None = None, warmup_s: float = 0.5) -> dict:
    """Measure everything; returns the figures as a dict."""
    delays_ms = [0.0, DEFAULT_DELAY_MS, 5.0] if delays_ms is None else delays_ms
    weights = import_faces()
    results: dict = {"model": "faces (dcgan 64x64)", "device": "cpu", "torch": torch.__version__,
                     "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "grpc": grpc.__version__,
                     "python": platform.python_version(), "load_average_at_start": os.getloadavg()[0],
                     "image_format": "PNG", "rounds": rounds}
    with tempfile.TemporaryDirectory(prefix="rulewright-bench-") as tmp:
        served = Served(Path(tmp), weights, dynamic_batching=True)
        try:
            results["grpc_vs_in_process"] = [grpc_vs_inprocess(served, b, s)
                                             for b, s in ((batch, grpc_seconds), (1, grpc_seconds / 2))]
        finally:
            served.close()
        results["concurrent_clients"] = concurrent_clients(Path(tmp), weights, clients, delays_ms, seconds,
                                                           rounds, warmup_s)
    results["concurrent_clients"]["seconds_per_config"] = seconds
    results["load_average_at_end"] = os.getloadavg()[0]
    return results


def print_table(r: dict) -> None:
    """The figures as text."""
    print(f"serving benchmark: {r['model']} on {r['device']} (torch {r['torch']}, {r['threads']} intra-op threads, "
          f"{r['cpus']} CPUs, grpc {r['grpc']}, {r['image_format']}, load average {r['load_average_at_start']:.2f} "
          f"at start, {r['load_average_at_end']:.2f} at end)")
    print("  1. sequential Sample, one client, loopback gRPC vs in-process (sample + the same PNG encoding),")
    print("     alternating call by call:")
    print(f"     {'batch':>5}  {'calls':>5}  {'gRPC img/s':>10}  {'in-proc img/s':>13}  {'ratio':>5}  "
          f"{'median pair':>11}  median ms gRPC / in-proc")
    for g in r["grpc_vs_in_process"]:
        print(f"     {g['batch']:>5}  {g['calls_each']:>5}  {g['grpc_images_per_s']:>10.1f}  "
              f"{g['in_process_images_per_s']:>13.1f}  {g['ratio']:>5.2f}  {g['median_pair_ratio']:>11.2f}  "
              f"{g['grpc_median_ms']:.1f} / {g['in_process_median_ms']:.1f}")
    c = r["concurrent_clients"]
    print(f"  2. {c['clients']} concurrent single-image clients ({c['channels']}), "
          f"{c['seconds_per_config']:g} s per configuration over {r['rounds']} rounds:")
    print(f"     {'server':<16}  {'img/s':>7}  {'p50 ms':>7}  {'p99 ms':>7}  {'mean batch':>10}  per round img/s")
    for name, x in c["configs"].items():
        rounds = " ".join(f"{v:.1f}" for v in x["round_images_per_s"])
        print(f"     {name:<16}  {x['images_per_s']:>7.1f}  {x['p50_ms']:>7.1f}  {x['p99_ms']:>7.1f}  "
              f"{x['mean_batch']:>10.2f}  {rounds}")
    if "ratio" in c:
        rounds = " ".join(f"{v:.2f}" for v in c["round_ratios"])
        print(f"     batched ({DEFAULT_DELAY_MS:g} ms) / unbatched: {c['ratio']:.2f}× (per round {rounds})")


def main(argv: list[str] | None = None) -> int:
    """Print the table (and save JSON with --json PATH)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="seeds per request in measurement 1")
    parser.add_argument("--grpc-seconds", type=float, default=16.0,
                        help="timed seconds (both sides together) at that batch in measurement 1; half that at batch 1")
    parser.add_argument("--seconds", type=float, default=16.0,
                        help="timed seconds per server configuration in measurement 2, split over the rounds")
    parser.add_argument("--rounds", type=int, default=4,
                        help="rounds in measurement 2 (each configuration once per round, order rotated)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent client threads in measurement 2")
    parser.add_argument("--delays", default="0,2,5", help="batch delays (ms, comma-separated) tried in measurement 2")
    parser.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds per configuration in measurement 2")
    parser.add_argument("--json", metavar="PATH", help="also save the figures as JSON to PATH")
    args = parser.parse_args(argv)
    delays = [float(d) for d in args.delays.split(",") if d.strip()]
    r = run(args.batch, args.seconds, args.grpc_seconds, args.rounds, args.clients, delays, args.warmup)
    print_table(r)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
