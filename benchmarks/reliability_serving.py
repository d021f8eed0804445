"""Load and faults against a real ``rulewright serve`` process: ``python -m benchmarks.reliability_serving``.

For each backend (the embedded filesystem registry; S3 on a ``moto_server`` with a real
``redis-server``, when both are installed) a fresh server process serves the faces model and:

1. **load**: ``--clients`` (32) threads, each with its own channel, send 1-seed PNG ``Sample``
   calls (a 30 s deadline) for ``--duration`` seconds (60): calls served and failed, p50/p99
   latency, images/s;
2. **rss**: the server's resident memory before and after the load;
3. **oversized**: one ``Sample`` of 20,000 seeds (a 10 s deadline): the status it gets, how fast,
   and the server's memory after it;
4. (S3 only) with the S3 server paused (SIGSTOP): **s3_paused_sample**, the time an alias
   ``Sample`` (10 s deadline) takes to answer and the code (first call, then the next ones);
   **s3_paused_health**, health check latency during the pause; **s3_paused_resident**, whether a
   resident version named by number is still served; then SIGCONT.

``run(args) -> list[dict]`` returns rows ``{"scenario", "backend", "result", "detail"}`` (for a
combined reliability command); ``main()`` prints them as a table and, with ``--json``, writes
them. The clients share this process; the server has its own (its RSS is read from /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")   # before grpc loads: no INFO line per closed connection

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from rulewright.v1 import generator_service_pb2 as gen, generator_service_pb2_grpc as gen_grpc  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL = "faces"
OVERSIZED_SEEDS = 20_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This benchmark's flags."""
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load per backend (default 60)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent Sample clients (default 32)")
    parser.add_argument("--backends", default="embedded,s3+redis",
                        help="comma-separated: embedded, s3+redis (default both)")
    parser.add_argument("--cache-dir", default=os.environ.get("RULEWRIGHT_CACHE_DIR", str(REPO / ".cache" / "rulewright")),
                        help="where the faces model is (fetched on first use)")


def _row(scenario: str, backend: str, result: str, detail: str = "") -> dict:
    return {"scenario": scenario, "backend": backend, "result": result, "detail": detail}


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _free_port() -> int:
    from tests.support import free_port

    return free_port()


class Server:
    """``rulewright-engine serve`` in its own process on a free port, over a prepared registry."""

    def __init__(self, workdir: Path, env: dict[str, str], extra: list[str]):
        self.port = _free_port()
        exe = Path(sys.executable).with_name("rulewright-engine")
        command = [str(exe)] if exe.exists() else [sys.executable, "-m", "rulewright.service"]
        self.log = open(workdir / "server.log", "w")
        self.proc = subprocess.Popen(
            command + ["serve", "--bootstrap", "none", "--address", f"127.0.0.1:{self.port}", "--web-address", "off",
                       "--device", "cpu", *extra],
            env=env, stdout=subprocess.DEVNULL, stderr=self.log, cwd=workdir)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        deadline = time.monotonic() + 120
        while self.health() != health_pb2.HealthCheckResponse.SERVING:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start; see {workdir / 'server.log'}")
            time.sleep(0.2)

    def health(self, timeout: float = 2.0):
        try:
            return health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status
        except grpc.RpcError as err:
            return err.code()

    def stop(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def load(server: Server, clients: int, duration: float) -> tuple[int, int, list[float], dict[str, int]]:
    """(served, failed, latencies in s, failure codes) of ``clients`` threads sampling for ``duration`` s."""
    stop_at = time.monotonic() + duration
    lock = threading.Lock()
    served, failed, latencies, codes = [0], [0], [], {}

    def client(n: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            stub = gen_grpc.GeneratorServiceStub(ch)
            seed = n * 1_000_000
            while time.monotonic() < stop_at:
                seed += 1
                started = time.monotonic()
                try:
                    stub.Sample(gen.SampleRequest(model=f"{MODEL}/1", seeds=[seed]), timeout=30)
                    ok, code = True, None
                except grpc.RpcError as err:
                    ok, code = False, err.code().name
                with lock:
                    if ok:
                        served[0] += 1
                        latencies.append(time.monotonic() - started)
                    else:
                        failed[0] += 1
                        codes[code] = codes.get(code, 0) + 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return served[0], failed[0], latencies, codes


def timed(call) -> tuple[str, float]:
    """(status code name, seconds) of ``call()``."""
    started = time.monotonic()
    try:
        call()
        code = "OK"
    except grpc.RpcError as err:
        code = err.code().name
    return code, time.monotonic() - started


def _prepare(registry_uri: str, faces: Path, env: dict[str, str], author: str = "benchmark",
             model: str = MODEL) -> None:
    """A model's weights as version 1 (alias production) in the registry the server will open."""
    from rulewright.registry import Registry
    from rulewright.registry.s3store import S3Config
    from rulewright.service.domain.core import Domain
    from rulewright.service.engine.loading import ARCHITECTURES, detect_architecture, read_state_dict

    s3 = None
    if registry_uri.startswith("s3://"):
        s3 = S3Config(endpoint=env["RULEWRIGHT_S3_ENDPOINT"], access_key=env["RULEWRIGHT_S3_ACCESS_KEY"],
                      secret_key=env["RULEWRIGHT_S3_SECRET_KEY"], secure=False)
    registry = Registry.open(registry_uri, s3=s3)
    if s3 is not None:
        registry.store.ensure_bucket()
    data = faces.read_bytes()
    state = read_state_dict(data)
    arch = detect_architecture(state)
    registry.import_model(model, arch=arch, config=ARCHITECTURES[arch].from_state_dict(state).config(), weights=data,
                          author=author)
    registry.set_alias(model, "production", 1, expected_version=None, author=author)
    del Domain    # imported only to make sure the server's package is importable here too
    registry.close()


def run_backend(backend: str, args, faces: Path, workdir: Path) -> list[dict]:
    """Every scenario on one backend."""
    rows: list[dict] = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("RULEWRIGHT_")}
    extra: list[str] = []
    moto = redis = None
    try:
        if backend == "embedded":
            data = workdir / "data"
            (data / "registry").mkdir(parents=True)
            _prepare((data / "registry").resolve().as_uri(), faces, env)
            extra += ["--data-dir", str(data)]
        else:
            from tests.backends import MotoServer, RedisServer, moto_command

            command, binary = moto_command(), shutil.which("redis-server")
            if command is None or binary is None:
                return [_row("all", backend, "skipped", "moto_server or redis-server is not installed")]
            moto, redis = MotoServer(command), RedisServer(binary, workdir)
            redis.start()
            cfg = moto.config()
            env.update(RULEWRIGHT_S3_ENDPOINT=cfg.endpoint, RULEWRIGHT_S3_ACCESS_KEY=cfg.access_key,
                       RULEWRIGHT_S3_SECRET_KEY=cfg.secret_key, RULEWRIGHT_S3_SECURE="false")
            uri = f"s3://bench-{uuid.uuid4().hex[:10]}/registry"
            _prepare(uri, faces, env)
            extra += ["--registry-uri", uri, "--stats-cache", redis.url]
        server = Server(workdir, env, extra)
        try:
            stub = gen_grpc.GeneratorServiceStub(server.channel)
            stub.Sample(gen.SampleRequest(model=f"{MODEL}/1", seeds=[0]), timeout=60)     # loaded, warmed
            before = rss_mb(server.proc.pid)
            served, failed, lat, codes = load(server, args.clients, args.duration)
            after = rss_mb(server.proc.pid)
            rows.append(_row("load", backend, f"served {served}, failed {failed}",
                             f"{args.clients} clients x {args.duration:.0f} s: p50 {_percentile(lat, 0.5) * 1e3:.0f} ms, "
                             f"p99 {_percentile(lat, 0.99) * 1e3:.0f} ms, {served / args.duration:.1f} images/s"
                             + (f"; failures {codes}" if codes else "")))
            rows.append(_row("rss", backend, f"{before:.0f} -> {after:.0f} MiB", "server RSS before and after the load"))
            code, seconds = timed(lambda: stub.Sample(gen.SampleRequest(model=f"{MODEL}/1",
                                                                         seeds=range(OVERSIZED_SEEDS)), timeout=10))
            rows.append(_row("oversized", backend, f"{code} in {seconds * 1e3:.0f} ms",
                             f"Sample of {OVERSIZED_SEEDS:,} seeds; server RSS after {rss_mb(server.proc.pid):.0f} MiB"))
            if moto is not None:
                rows += paused_s3(server, moto, backend)
        finally:
            server.stop()
    finally:
        if moto is not None:
            moto.proc.send_signal(signal.SIGCONT)
            moto.stop()
        if redis is not None:
            redis.stop()
    return rows


def paused_s3(server: Server, moto, backend: str) -> list[dict]:
    """Sample, health and a resident version while the S3 server is paused (SIGSTOP)."""
    stub = gen_grpc.GeneratorServiceStub(server.channel)
    rows = []
    moto.proc.send_signal(signal.SIGSTOP)
    try:
        checks: list[float] = []
        stop = threading.Event()

        def probe() -> None:
            while not stop.is_set():
                started = time.monotonic()
                server.health(timeout=5)
                checks.append(time.monotonic() - started)
                stop.wait(0.2)

        prober = threading.Thread(target=probe)
        prober.start()
        sample = lambda: stub.Sample(gen.SampleRequest(model=f"{MODEL}@production", seeds=[1]), timeout=10)  # noqa: E731
        first = timed(sample)
        later = [timed(sample) for _ in range(5)]
        resident = timed(lambda: stub.Sample(gen.SampleRequest(model=f"{MODEL}/1", seeds=[2]), timeout=10))
        stop.set()
        prober.join()
        rows.append(_row("s3_paused_sample", backend, f"{first[0]} in {first[1]:.2f} s",
                         f"alias Sample, 10 s deadline; the next 5: {sorted({c for c, _ in later})} in at most "
                         f"{max(s for _, s in later) * 1e3:.0f} ms"))
        rows.append(_row("s3_paused_health", backend, f"p50 {statistics.median(checks) * 1e3:.1f} ms, "
                         f"max {max(checks) * 1e3:.1f} ms", f"{len(checks)} health checks during the pause"))
        rows.append(_row("s3_paused_resident", backend, f"{resident[0]} in {resident[1] * 1e3:.0f} ms",
                         "Sample of a resident version named by number during the pause"))
    finally:
        moto.proc.send_signal(signal.SIGCONT)
    return rows


def run(args) -> list[dict]:
    """Every scenario on every backend asked for; rows ``{"scenario", "backend", "result", "detail"}``."""
    from rulewright.service.importers.faces import import_faces

    faces = import_faces(args.cache_dir)
    rows: list[dict] = []
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        with tempfile.TemporaryDirectory(prefix=f"rulewright-bench-{backend.replace('+', '-')}-") as tmp:
            rows += run_backend(backend, args, faces, Path(tmp))
    return rows


def table(rows: list[dict]) -> str:
    """The rows as an aligned text table."""
    keys = ("scenario", "backend", "result", "detail")
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in keys}
    line = lambda r: "  ".join(str(r[k]).ljust(widths[k]) for k in keys).rstrip()  # noqa: E731
    return "\n".join([line({k: k for k in keys}), line({k: "-" * widths[k] for k in keys})] + [line(r) for r in rows])


def run_alone(prog: str, doc: str, add_arguments, run, argv: list[str] | None = None, ok=lambda rows: True) -> int:
    """A scenario module's command: its flags and --json, its rows as a table; 0 when ``ok(rows)``."""
    parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=doc.split("\n")[0])
    add_arguments(parser)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    rows = run(args)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if ok(rows) else 1


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its table."""
    return run_alone("benchmarks.reliability_serving", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
