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
   check that a burst of outside load did not decide the ratio of totals. Batch 1 is reported
   beside the default batch (its fixed per-request costs weigh 16 times more).
2. **16 concurrent single-image clients.** ``--clients`` threads, each with its own channel (and
   its own TCP connection: ``grpc.use_local_subchannel_pool``, so channels do not share a
   subchannel), each sending sequential 1-seed PNG ``Sample`` requests for ``--seconds`` in all
   (split over ``--rounds``) after a warm-up, to a server whose domain batches dynamically
   (``max_batch`` 16, batch delays 0, 2 and 5 ms: the service default is 2 ms) and to one whose
   domain does not (every request its own forward pass). Reported: total images/s, p50/p99
   request latency (over every round's requests), the mean forward-pass batch size,
   batched/unbatched images/s at the default delay. In the same rounds, ``in_process_16``: sequential
   in-process sampling of ``--batch`` seeds with the same PNG encoding (what full batches give with
   no serving around them; its latencies are per call of ``--batch`` images), and batched images/s
   at the default delay against it. Note that an
   unbatched single image still runs a forward pass at batch 4 (``sampling.bucket``: sizes below 4
   are padded so that images do not depend on their company); that is what the service does, so
   it is part of the baseline.

``--versions`` measures serving many edited versions of the faces model instead, in one run:

3. **Many versions, 16 clients.** The same 16 single-image clients, each on its own edited
   version, against all 16 on one edited version (and, for reference, all 16 on the unedited
   import), interleaved by round as in 2 (dynamic batching, 2 ms, ``max_batch`` 16). Every
   edited version carries a rank-4 delta on every rewritable layer at strength 0.6 — the size
   and shape of the default multilayer edit — with random factors (the work per image does not
   depend on their values). Ends with ``mixed versions / one version: R.RR``.
4. **Resident memory per version.** In a fresh interpreter (so that memory freed earlier cannot
   hide growth), with the base resident: ``--version-count`` (1,000) such versions are made
   resident one after another (resolved and loaded, as a first request would); the growth of
   the process's resident set size per version is printed beside the size of one stored delta,
   ``resident bytes per version: N (delta M)``, with what the memory budget counts and what a
   dense copy of the edited weights would take.
5. **First image of a version.** Single-image gRPC Sample of a version that is not resident but
   whose base is (it is loaded: its manifest and delta read, its factors kept), alternating with
   a second image of the same version, now resident; median milliseconds of each.

Every request uses seeds no other request used. Clients and server share this process (and its
GIL), as they do in the tests; torch keeps its default intra-op threads (printed), the same for
every configuration. Each configuration gets a fresh domain and server, closed before the next.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import itertools
import json
import multiprocessing
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

from rulewright.service.domain.core import Domain  # noqa: E402
from rulewright.service.engine.delta import LowRankDelta, to_bytes  # noqa: E402
from rulewright.service.engine.edit import METHOD_DEFAULTS  # noqa: E402
from rulewright.service.importers.faces import import_faces  # noqa: E402
from rulewright.service.domain.requests import SampleRequest  # noqa: E402
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
                 max_batch: int = 16, resident: tuple[str, ...] = ()):
        self.domain = Domain.open(data_dir, device="cpu", dynamic_batching=dynamic_batching, max_batch=max_batch,
                                  batch_delay_ms=delay_ms)
        self.domain.generator(self.domain.bootstrap(MODEL, weights))     # resident before the first request
        for ref in resident:
            self.domain.generator(self.domain.resolve(ref))
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

def _drive(served: Served, clients: int, warmup_s: float, seconds: float, models: list[str] | None = None) -> dict:
    """``clients`` threads, one channel each, sequential 1-seed PNG requests; figures for the timed window.

    ``models[i]`` is what client i samples (default: the faces model's newest version).
    """
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
            model = models[i] if models else MODEL
            request = lambda: gen.SampleRequest(model=model, seeds=fresh_seeds(1), image_format=PNG)  # noqa: E731
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


def _in_process(served: Served, batch: int, seconds: float) -> dict:
    """Sequential in-process ``Domain.sample`` of ``batch`` seeds plus the servicer's PNG encoding, for
    ``seconds``: what full batches give with no serving around them (in ``_drive``'s figures)."""
    latencies = []
    start = time.perf_counter()
    while (t0 := time.perf_counter()) - start < seconds:
        seeds = fresh_seeds(batch)
        images = served.domain.sample(SampleRequest(MODEL, seeds=seeds)).images
        assert len(convert.images_pb(images, PNG, seeds)) == batch
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    return {"requests": batch * len(latencies), "seconds": elapsed, "images_per_s": batch * len(latencies) / elapsed,
            "latencies": sorted(latencies), "mean_batch": float(batch), "forward_passes": len(latencies)}


def concurrent_clients(data_dir: Path, weights: Path, clients: int, delays_ms: list[float], seconds: float,
                       rounds: int, warmup_s: float, batch: int = 16) -> dict:
    """Batched (each delay) and unbatched servers under ``clients`` single-image clients, and in-process
    sampling of ``batch`` seeds at a time, interleaved by round."""
    full = f"in_process_{batch}"
    configs = ([("unbatched", False, DEFAULT_DELAY_MS)] + [(f"batched_{d:g}ms", True, d) for d in delays_ms]
               + [(full, True, DEFAULT_DELAY_MS)])
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
    for r in range(rounds):
        order = configs[r % len(configs):] + configs[:r % len(configs)]   # rotate who runs first
        for name, batching, delay in order:
            served = Served(data_dir, weights, dynamic_batching=batching, delay_ms=delay)
            try:
                runs[name].append(_in_process(served, batch, seconds / rounds) if name == full
                                  else _drive(served, clients, warmup_s, seconds / rounds))
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
        f = out["configs"][full]
        out["full_batch"] = batch
        out["full_ratio"] = b["images_per_s"] / f["images_per_s"]
        out["round_full_ratios"] = [x / y for x, y in zip(b["round_images_per_s"], f["round_images_per_s"])]
    return out


# ---- 3-5. many edited versions ------------------------------------------------------------------

EDIT_RANK = METHOD_DEFAULTS["multilayer"]["rank"]          # the default edit's rank on each layer
EDIT_STRENGTH = METHOD_DEFAULTS["multilayer"]["strength"]


def edit_deltas(domain: Domain, seed: int) -> list[LowRankDelta]:
    """Deltas shaped like the default multilayer edit (rank 4 on every rewritable layer), random factors."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for spec in domain.generator(domain.resolve(f"{MODEL}/1")).model.layer_specs():
        shape = list(spec.weight.shape)
        d_in, shape[spec.in_axis] = shape[spec.in_axis], EDIT_RANK
        direction = torch.linalg.qr(torch.randn(d_in, EDIT_RANK, generator=g))[0]
        lam = 0.1 * float(spec.weight.abs().mean()) * torch.randn(shape, generator=g)
        out.append(LowRankDelta(spec.weight_key, spec.in_axis, direction, lam, EDIT_STRENGTH))
    return out


def create_versions(data_dir: Path, weights: Path, count: int) -> dict:
    """``count`` edited versions of the faces model, each a child of the import; their numbers and sizes."""
    domain = Domain.open(data_dir, device="cpu", dynamic_batching=False)
    try:
        domain.bootstrap(MODEL, weights)
        numbers, sizes = [], []
        for i in range(count):
            blob = to_bytes(edit_deltas(domain, seed=i))
            sizes.append(len(blob))
            numbers.append(domain.registry.create_version(MODEL, parent=1, delta=blob, spec={"benchmark": i}).number)
        edited = {d.weight_key for d in edit_deltas(domain, 0)}
        state = domain.generator(domain.resolve(f"{MODEL}/1")).model.public_state_dict()
        dense = sum(state[k].numel() * state[k].element_size() for k in edited)
    finally:
        domain.close()
    return {"numbers": numbers, "delta_bytes": statistics.median(sizes), "dense_edited_bytes": dense}


def versions_throughput(data_dir: Path, weights: Path, numbers: list[int], clients: int, seconds: float,
                        rounds: int, warmup_s: float) -> dict:
    """16 single-image clients on 16 versions vs on one version (and on the import), interleaved by round."""
    mixed = [f"{MODEL}/{n}" for n in numbers[:clients]]
    configs = [("one_version", [mixed[0]] * clients), ("mixed_versions", mixed),
               ("import", [f"{MODEL}/1"] * clients)]
    runs: dict[str, list[dict]] = {name: [] for name, _ in configs}
    for r in range(rounds):
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        for name, models in order:
            served = Served(data_dir, weights, dynamic_batching=True, resident=tuple(dict.fromkeys(models)))
            try:
                runs[name].append(_drive(served, clients, warmup_s, seconds / rounds, models))
            finally:
                served.close()
    out: dict = {"clients": clients, "versions": len(set(mixed)), "configs": {}}
    for name, _ in configs:
        rs = runs[name]
        requests, elapsed = sum(x["requests"] for x in rs), sum(x["seconds"] for x in rs)
        passes = sum(x["forward_passes"] for x in rs)
        q = statistics.quantiles([v for x in rs for v in x["latencies"]], n=100, method="inclusive")
        out["configs"][name] = {
            "images_per_s": requests / elapsed, "requests": requests, "p50_ms": 1000 * q[49], "p99_ms": 1000 * q[98],
            "mean_batch": sum(x["mean_batch"] * x["forward_passes"] for x in rs) / max(passes, 1),
            "round_images_per_s": [x["images_per_s"] for x in rs]}
    one, mix = out["configs"]["one_version"], out["configs"]["mixed_versions"]
    out["ratio"] = mix["images_per_s"] / one["images_per_s"]
    out["round_ratios"] = [a / b for a, b in zip(mix["round_images_per_s"], one["round_images_per_s"])]
    out["one_version_vs_import"] = one["images_per_s"] / out["configs"]["import"]["images_per_s"]
    return out


def _rss() -> int:
    """This process's resident set size in bytes, after handing free heap pages back to the system.

    Without the trim, pages freed earlier (reading the base weights, building its module) stay
    resident and absorb later allocations, hiding growth.
    """
    gc.collect()
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _resident_growth_child(data_dir: str, numbers: list[int], out) -> None:
    """In a fresh interpreter: RSS and budget bytes before and after making ``numbers`` resident."""
    domain = Domain.open(data_dir, device="cpu", dynamic_batching=False)
    try:
        domain.generator(domain.resolve(f"{MODEL}/1"))
        domain.generator(domain.resolve(f"{MODEL}/{numbers[0]}"))     # the first load's one-off costs
        rss0, budget0 = _rss(), domain.resident_bytes()
        start = time.perf_counter()
        for n in numbers[1:]:
            domain.generator(domain.resolve(f"{MODEL}/{n}"))
        elapsed = time.perf_counter() - start
        out.put({"versions": len(numbers) - 1, "rss_growth": _rss() - rss0,
                 "budget_growth": domain.resident_bytes() - budget0, "resident": len(domain.resident_versions()),
                 "load_ms_each": 1000 * elapsed / (len(numbers) - 1), "rss_before": rss0})
    finally:
        domain.close()


def resident_growth(data_dir: Path, numbers: list[int], delta_bytes: float, dense_bytes: int) -> dict:
    """Resident-set growth per version as ``numbers`` are made resident one after another (fresh process)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_resident_growth_child, args=(str(data_dir), numbers, queue))
    child.start()
    r = queue.get(timeout=1800)
    child.join()
    r["rss_per_version"] = r["rss_growth"] / r["versions"]
    r["budget_per_version"] = r["budget_growth"] / r["versions"]
    r["delta_bytes"] = delta_bytes
    r["dense_edited_bytes"] = dense_bytes
    return r


def first_image(data_dir: Path, weights: Path, numbers: list[int]) -> dict:
    """Median ms of a version's first image (not resident, base resident) and of its second (resident)."""
    served = Served(data_dir, weights, dynamic_batching=True)
    channel = served.channel()
    stub = gen_grpc.GeneratorServiceStub(channel)

    def timed(ref: str) -> float:
        start = time.perf_counter()
        stub.Sample(gen.SampleRequest(model=ref, seeds=fresh_seeds(1), image_format=PNG), timeout=60)
        return 1000 * (time.perf_counter() - start)

    try:
        for _ in range(3):
            timed(f"{MODEL}/1")
        cold, warm = [], []
        for n in numbers:
            ref = f"{MODEL}/{n}"
            assert (MODEL, n) not in served.domain.resident_versions()
            cold.append(timed(ref))
            warm.append(timed(ref))
    finally:
        channel.close()
        served.close()
    return {"versions": len(numbers), "not_resident_median_ms": statistics.median(cold),
            "resident_median_ms": statistics.median(warm),
            "ratio": statistics.median(cold) / statistics.median(warm),
            "not_resident_ms": cold, "resident_ms": warm}


def run_versions(count: int = 1000, clients: int = 16, seconds: float = 16.0, rounds: int = 4,
                 warmup_s: float = 0.5, first: int = 30) -> dict:
    """Measure 3-5; returns the figures as a dict."""
    weights = import_faces()
    results: dict = {"model": "faces (dcgan 64x64)", "device": "cpu", "torch": torch.__version__,
                     "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "grpc": grpc.__version__,
                     "python": platform.python_version(), "load_average_at_start": os.getloadavg()[0],
                     "image_format": "PNG", "rounds": rounds,
                     "edit": {"rank_per_layer": EDIT_RANK, "strength": EDIT_STRENGTH, "layers": "every rewritable"}}
    with tempfile.TemporaryDirectory(prefix="rulewright-bench-") as tmp:
        made = create_versions(Path(tmp), weights, max(count, clients) + first)
        numbers = made["numbers"]
        results["many_versions"] = versions_throughput(Path(tmp), weights, numbers, clients, seconds, rounds,
                                                       warmup_s)
        results["many_versions"]["seconds_per_config"] = seconds
        results["resident_memory"] = resident_growth(Path(tmp), numbers[:count + 1], made["delta_bytes"],
                                                     made["dense_edited_bytes"])
        results["first_image"] = first_image(Path(tmp), weights, numbers[-first:])
    results["load_average_at_end"] = os.getloadavg()[0]
    return results


def print_versions(r: dict) -> None:
    """The many-versions figures as text."""
    print(f"serving benchmark, many versions: {r['model']} on {r['device']} (torch {r['torch']}, {r['threads']} "
          f"intra-op threads, {r['cpus']} CPUs, grpc {r['grpc']}, {r['image_format']}, load average "
          f"{r['load_average_at_start']:.2f} at start, {r['load_average_at_end']:.2f} at end)")
    e = r["edit"]
    print(f"  every edited version: rank {e['rank_per_layer']} on {e['layers']} layer, strength {e['strength']}")
    c = r["many_versions"]
    print(f"  3. {c['clients']} concurrent single-image clients, dynamic batching ({DEFAULT_DELAY_MS:g} ms), "
          f"{c['seconds_per_config']:g} s per configuration over {r['rounds']} rounds:")
    print(f"     {'clients on':<16}  {'img/s':>7}  {'p50 ms':>7}  {'p99 ms':>7}  {'mean batch':>10}  per round img/s")
    labels = {"one_version": "one version", "mixed_versions": f"{c['versions']} versions", "import": "the import"}
    for name, x in c["configs"].items():
        rounds = " ".join(f"{v:.1f}" for v in x["round_images_per_s"])
        print(f"     {labels[name]:<16}  {x['images_per_s']:>7.1f}  {x['p50_ms']:>7.1f}  {x['p99_ms']:>7.1f}  "
              f"{x['mean_batch']:>10.2f}  {rounds}")
    print(f"     one edited version / the import: {c['one_version_vs_import']:.2f}")
    print(f"     per round: {' '.join(f'{v:.2f}' for v in c['round_ratios'])}")
    print(f"     mixed versions / one version: {c['ratio']:.2f}")
    m = r["resident_memory"]
    print(f"  4. {m['versions']} edited versions made resident one after another (fresh process, base resident):")
    print(f"     resident set growth {m['rss_growth'] / 2**20:.1f} MiB, memory budget count "
          f"{m['budget_growth'] / 2**20:.1f} MiB, {m['resident']} versions resident, "
          f"{m['load_ms_each']:.2f} ms to load each")
    print(f"     a dense copy of the edited weights would be {m['dense_edited_bytes']:,} bytes per version")
    print(f"     resident bytes per version: {m['rss_per_version']:.0f} (delta {m['delta_bytes']:.0f})")
    f = r["first_image"]
    print(f"  5. first image of a version, single-image gRPC Sample, median over {f['versions']} versions:")
    print(f"     not resident (base resident): {f['not_resident_median_ms']:.1f} ms; resident: "
          f"{f['resident_median_ms']:.1f} ms; ratio {f['ratio']:.2f}")


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
                                                           rounds, warmup_s, batch)
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
    if "full_ratio" in c:
        rounds = " ".join(f"{v:.2f}" for v in c["round_full_ratios"])
        print(f"     batched ({DEFAULT_DELAY_MS:g} ms) / in-process batch {c['full_batch']}: {c['full_ratio']:.2f}× "
              f"(per round {rounds})")


def main(argv: list[str] | None = None) -> int:
    """Print the table (and save JSON with --json PATH)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="seeds per request in measurement 1")
    parser.add_argument("--grpc-seconds", type=float, default=16.0,
                        help="timed seconds (both sides together) at that batch in measurement 1; half that at batch 1")
    parser.add_argument("--seconds", type=float, default=16.0,
                        help="timed seconds per server configuration in measurements 2 and 3, split over the rounds")
    parser.add_argument("--rounds", type=int, default=4,
                        help="rounds in measurements 2 and 3 (each configuration once per round, order rotated)")
    parser.add_argument("--clients", type=int, default=16,
                        help="concurrent client threads in measurements 2 and 3 (and versions in 3)")
    parser.add_argument("--delays", default="0,2,5", help="batch delays (ms, comma-separated) tried in measurement 2")
    parser.add_argument("--warmup", type=float, default=0.5,
                        help="warm-up seconds per configuration in measurements 2 and 3")
    parser.add_argument("--versions", action="store_true",
                        help="measure many edited versions instead (3-5: mixed-version batches, memory, first image)")
    parser.add_argument("--version-count", type=int, default=1000, help="versions made resident in measurement 4")
    parser.add_argument("--first-images", type=int, default=30, help="versions whose first image measurement 5 times")
    parser.add_argument("--json", metavar="PATH", help="also save the figures as JSON to PATH")
    args = parser.parse_args(argv)
    if args.versions:
        r = run_versions(args.version_count, args.clients, args.seconds, args.rounds, args.warmup, args.first_images)
        print_versions(r)
        if args.json:
            Path(args.json).write_text(json.dumps(r, indent=1) + "\n")
        return 0
    delays = [float(d) for d in args.delays.split(",") if d.strip()]
    r = run(args.batch, args.seconds, args.grpc_seconds, args.rounds, args.clients, delays, args.warmup)
    print_table(r)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
