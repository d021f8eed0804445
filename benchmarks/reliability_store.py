"""Crash safety of the registry and the statistics lock: ``python -m benchmarks.reliability_store``.

Fault injection with real processes against real servers: a filesystem registry in a temporary
folder and an S3 registry on moto's S3 server (served one request at a time, as in the tests),
with a real ``redis-server`` for the statistics cache. Each crash is a child process that
SIGKILLs itself right after a chosen write (``tests/registry/workers.py``); nothing it held in
memory survives. Rows (``run(args)`` returns them as ``{"scenario", "backend", "result",
"detail"}``):

- **crash rounds consistent k/N**: N rounds, cycling through the write points of a Rewrite's
  version (after the delta blob, the request claim, the manifest, the request record) and of an
  import (after ``model.json``, after version 1); each round retries with the same request id
  and counts as consistent when exactly one live version carries it and ``check`` finds nothing
  (no damage, no unfinished import, no orphan but a killed upload's own blob);
- **duplicates after retry**: live versions beyond one per request id over those rounds;
- **first start after a crash mid-bootstrap**: the faces import of a first start killed after
  ``model.json``; the seconds from launching ``rulewright-engine serve --bootstrap faces`` on
  that registry to SERVING (it must serve ``faces@production`` = version 1);
- **retry after a crash in statistics**: a Rewrite killed while computing C (holding the Redis
  lock, as a server would with the default cache settings); the seconds its retry waited on the
  dead holder's lock before computing C itself, and the retry's total time.

Timings shift with other load on the machine; the counts do not.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from rulewright.registry import Registry
from rulewright.registry.stores import open_store
from rulewright.registry.gc import scan
from rulewright.registry.s3store import S3Store
from tests.backends import MotoServer, RedisServer, moto_command
from tests.registry.workers import (
    bootstrap_killed_at,
    import_killed_at,
    rewrite_killed_at,
    rewrite_killed_in_statistics,
)
from tests.support import free_port

CTX = multiprocessing.get_context("spawn")
# The smallest valid safetensors file: the import rounds need a blob, not a model.
WEIGHTS = (2).to_bytes(8, "little") + b"{}"
POINTS = [
    ("rewrite", "blob", "blob"),
    ("rewrite", "claim", r"/requests/[0-9a-f]{64}\.claim\.json$"),
    ("rewrite", "manifest", r"/versions/\d{10}\.json$"),
    ("rewrite", "record", r"/requests/[0-9a-f]{64}\.json$"),
    ("import", "model.json", r"/model\.json$"),
    ("import", "version 1", r"/versions/0000000001\.json$"),
]
# A cheap edit of faces: the statistics phase is what is measured, not the optimization.
STATS_EDIT = {"layer": "main.6", "rank": 1, "goal": "value", "steps": 5, "stats": {"samples": 256},
              "keep": {"weight": 0}, "copy": {"seed": 1, "box": [24, 24, 40, 40]},
              "paste": [{"seed": 2, "box": [24, 24, 40, 40]}]}


def row(scenario: str, backend: str, result: str, detail: str) -> dict:
    """One table row in the format the combined reliability command prints."""
    return {"scenario": scenario, "backend": backend, "result": result, "detail": detail}


def killed(target, *args, timeout_s: float = 120.0) -> bool:
    """Run ``target(*args)`` in a spawned process; True if it died by SIGKILL (at its crash point)."""
    proc = CTX.Process(target=target, args=args)
    proc.start()
    proc.join(timeout=timeout_s)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return False
    return proc.exitcode == -signal.SIGKILL


class Backends:
    """The stores under test: a fresh filesystem folder or a fresh moto bucket per call of ``new``."""

    def __init__(self, names: list[str], workdir: Path):
        self.names = names
        self.workdir = workdir
        self.moto = MotoServer(moto_command()) if "s3" in names else None

    def new(self, backend: str):
        """An empty store (and the spec a child process opens it with)."""
        if backend == "file":
            store = open_store((self.workdir / uuid.uuid4().hex).as_uri())
            return store, (store.uri, None)
        store = S3Store(f"bench-{uuid.uuid4().hex[:12]}", "registry", self.moto.config())
        store.ensure_bucket()
        return store, (store.uri, store.config)

    def env(self, store) -> dict:
        """Environment a server process needs to open ``store``."""
        config = getattr(store, "config", None)
        if config is None:
            return {}
        return {"RULEWRIGHT_S3_ENDPOINT": config.endpoint, "RULEWRIGHT_S3_ACCESS_KEY": config.access_key,
                "RULEWRIGHT_S3_SECRET_KEY": config.secret_key, "RULEWRIGHT_S3_SECURE": "false"}

    def close(self) -> None:
        """Stop moto."""
        if self.moto is not None:
            self.moto.stop()


def crash_rounds(backends: Backends, backend: str, rounds: int) -> list[dict]:
    """N crash-and-retry rounds cycling through ``POINTS``: consistency and duplicates."""
    store, spec = backends.new(backend)
    registry = Registry(store)
    registry.import_model("base", arch="dcgan", config={}, weights=WEIGHTS)
    consistent, duplicates, failures = 0, 0, []
    for i in range(rounds):
        op, name, pattern = POINTS[i % len(POINTS)]
        request_id = f"round-{i}"
        ok = True
        if op == "rewrite":
            delta = f"delta of round {i}".encode()
            ok &= killed(rewrite_killed_at, spec, "base", 1, delta, request_id, pattern)
            retry = Registry(store)  # a fresh process's view
            version = retry.create_version("base", parent=1, delta=delta, spec={"request": request_id},
                                           request_id=request_id)
            live = [v.number for v in retry.list_versions("base", page_size=1000).items
                    if v.request_id == request_id]
            ok &= live == [version.number]
        else:
            model = f"imp-{i}"
            ok &= killed(import_killed_at, spec, model, WEIGHTS, request_id, pattern)
            retry = Registry(store)
            version = retry.import_model(model, arch="dcgan", config={}, weights=WEIGHTS, request_id=request_id)
            live = [v.number for v in retry.list_versions(model).items if v.request_id == request_id]
            ok &= live == [1] and version.number == 1
        duplicates += max(0, len(live) - 1)
        report = scan(store)
        ok &= report.ok and not report.incomplete_imports
        consistent += ok
        if not ok:
            failures.append(f"{op} {name}")
    store.close()
    points = ", ".join(f"{op} {name}" for op, name, _ in POINTS)
    detail = f"kill -9 after: {points}; retry with the same request_id, then check"
    if failures:
        detail += f"; inconsistent: {', '.join(failures)}"
    return [row("crash rounds consistent", backend, f"{consistent}/{rounds}", detail),
            row("duplicates after retry", backend, str(duplicates), f"live versions beyond one per request_id, "
                f"{rounds} retries")]


def _health(port: int) -> int | None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
        except grpc.RpcError:
            return None


def bootstrap_recovery(backends: Backends, backend: str, faces_path: Path, cache_dir: Path) -> dict:
    """Kill a first start's faces import after model.json; time the next real server start to SERVING."""
    from grpc_health.v1 import health_pb2

    store, spec = backends.new(backend)
    scenario = "first start after a crash mid-bootstrap"
    if not killed(bootstrap_killed_at, spec, "faces", str(faces_path), r"/model\.json$"):
        return row(scenario, backend, "error", "the first start was not killed at its crash point")
    pending = scan(store).incomplete_imports
    port = free_port()
    data_dir = Path(tempfile.mkdtemp(prefix="serve-", dir=backends.workdir))
    registry_args = ["--data-dir", str(data_dir)] if backend == "file" else ["--registry-uri", store.uri]
    if backend == "file":  # the embedded default keeps its registry in DATA_DIR/registry
        shutil.copytree(Path(store.uri.removeprefix("file://")), data_dir / "registry")
    env = {**os.environ, **backends.env(store), "RULEWRIGHT_CACHE_DIR": str(cache_dir)}
    exe = Path(sys.executable).with_name("rulewright-engine")
    start = time.perf_counter()
    proc = subprocess.Popen([str(exe), "serve", *registry_args, "--address", f"127.0.0.1:{port}",
                             "--device", "cpu", "--web-address", "off", "--bootstrap", "faces", "--grace-s", "2"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    status, elapsed = None, None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            status = _health(port)
            if status == health_pb2.HealthCheckResponse.SERVING:
                elapsed = time.perf_counter() - start
                break
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        err = proc.stderr.read() if proc.stderr else ""
    if elapsed is None:
        last = err.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return row(scenario, backend, "failed", f"never SERVING: {last[0][:200]}")
    check = Registry(open_store((data_dir / "registry").as_uri()) if backend == "file" else store)
    try:
        served = check.resolve("faces@production")
        after = scan(check.store)
    finally:
        check.close()
    clean = after.ok and not after.incomplete_imports and not after.orphans
    detail = (f"killed after model.json (check: incomplete import {pending}); "
              f"`serve --bootstrap faces` to SERVING, faces@production = version {served.number}; "
              f"check after: {'clean' if clean else 'NOT clean'}")
    return row(scenario, backend, f"{elapsed:.1f} s", detail)


def statistics_recovery(backends: Backends, backend: str, faces_path: Path, redis_url: str) -> dict:
    """Kill a Rewrite while it holds the statistics lock; time its retry's wait on that lock."""
    from rulewright.registry.stats_cache import LOCK_LEASE_S, open_stats_cache
    from rulewright.service.domain.core import Domain
    from rulewright.service.engine.progress import Progress
    from rulewright.service.domain.requests import RewriteRequest

    store, spec = backends.new(backend)
    scenario = "retry after a crash in statistics"
    domain = Domain(Registry(store), open_stats_cache(redis_url), device="cpu", dynamic_batching=False)
    try:
        domain.bootstrap("faces", faces_path)
        pttl_path = backends.workdir / f"pttl-{uuid.uuid4().hex}"
        if not killed(rewrite_killed_in_statistics, spec, redis_url, "faces", STATS_EDIT, "req-stats",
                      str(pttl_path)):
            return row(scenario, f"{backend}+redis", "error", "the Rewrite was not killed in its statistics phase")
        left_ms = int(pttl_path.read_text())
        domain.generator(domain.resolve("faces/1"))  # resident, as in a running server
        start = time.perf_counter()
        marks: dict[str, float] = {}
        waits = 0

        def progress(event) -> None:
            nonlocal waits
            if event.waiting:
                waits += 1
            elif event.stage == "statistics" and event.done > 0:
                marks.setdefault("computing", time.perf_counter())

        result = domain.rewrite(RewriteRequest("faces/1", STATS_EDIT, request_id="req-stats"), Progress(progress))
        total = time.perf_counter() - start
        live = [v.number for v in domain.registry.list_versions("faces").items if v.request_id == "req-stats"]
    finally:
        domain.close()
        store.close()
    waited = marks.get("computing", start + total) - start
    detail = (f"waited on the dead holder's lock (lease {LOCK_LEASE_S:g} s, {left_ms / 1000:.1f} s left at the kill) "
              f"with {waits} waiting progress events, then computed C itself; whole retry {total:.1f} s; "
              f"versions for the request id: {live} (new version {result.version.number if result.version else None})")
    return row(scenario, f"{backend}+redis", f"{waited:.1f} s", detail)


def run(args: argparse.Namespace) -> list[dict]:
    """Every scenario on every backend asked for; the rows of the table."""
    from rulewright.service.importers.faces import import_faces

    backends_asked = [b.strip() for b in args.backends.split(",") if b.strip()]
    cache_dir = Path(args.cache_dir or os.environ.get("RULEWRIGHT_CACHE_DIR")
                     or Path(__file__).resolve().parents[1] / ".cache" / "rulewright")
    faces_path = import_faces(cache_dir)
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (make servers installs it)")
    if "s3" in backends_asked and moto_command() is None:
        raise SystemExit("moto_server is not installed (pip install 'moto[server]')")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="reliability-store-") as tmp:
        workdir = Path(tmp)
        redis = RedisServer(binary, workdir)
        redis.start()
        backends = Backends(backends_asked, workdir)
        try:
            for backend in backends_asked:
                rows += crash_rounds(backends, backend, args.rounds)
            for backend in backends_asked:
                rows.append(bootstrap_recovery(backends, backend, faces_path, cache_dir))
            for backend in backends_asked:
                redis.flush()
                rows.append(statistics_recovery(backends, backend, faces_path, redis.url))
        finally:
            backends.close()
            redis.stop()
    return rows


def print_table(rows: list[dict]) -> None:
    """The rows as an aligned text table."""
    headers = ["scenario", "backend", "result", "detail"]
    widths = {h: max(len(h), *(len(r[h]) for r in rows)) for h in headers[:3]}
    print("  ".join(h.ljust(widths[h]) if h in widths else h for h in headers))
    for r in rows:
        print("  ".join(r[h].ljust(widths[h]) if h in widths else r[h] for h in headers))


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reliability_store",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12,
                        help="crash rounds per backend (cycling through the write points)")
    parser.add_argument("--backends", default="file,s3", help="comma-separated: file, s3")
    parser.add_argument("--cache-dir", default=None,
                        help="where the faces model is cached (default: $RULEWRIGHT_CACHE_DIR)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run and print; exit 1 if any crash round was inconsistent or any retry duplicated a version."""
    args = build_parser().parse_args(argv)
    rows = run(args)
    if args.json:
        import json

        print(json.dumps(rows, indent=2))
    else:
        print_table(rows)
    bad = any(r["scenario"] == "crash rounds consistent" and r["result"].split("/")[0] != r["result"].split("/")[1]
              for r in rows) or any(r["scenario"] == "duplicates after retry" and r["result"] != "0" for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
