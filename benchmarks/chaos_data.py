"""Damaged data and a hung store against a real ``rulewright serve`` process: ``python -m benchmarks.chaos_data``.

1. **truncated statistic** (embedded registry): a statistics job computes a key moment; the server
   stops; its stored copy (``docs/statistics/<digest>.safetensors``) is cut in half; a server that
   may compute that many samples starts and a Rewrite asks for them (it should succeed,
   recomputing); the copy is damaged again and a server that may not compute them (a low
   ``--max-stats-samples``) gets the same Rewrite (DATA_LOSS naming the copy, not INTERNAL); the job
   runs again (the copy should be rewritten, bit for bit the first job's) and the Rewrite asks once
   more (served from the copy).
2. **resident Sample, store down** (S3 on a paused ``moto_server``, when installed): the S3 server is
   paused (SIGSTOP); a Sample of the resident version by number with a 2 s deadline at once (the
   first request to meet the outage), and again once health marks the registry NOT_SERVING and
   the store's retry interval has passed: their codes and times (neither should wait on the
   store), then SIGCONT.

A tiny random DCGAN stands in for a real model, so each scenario takes seconds. ``run(args)``
returns rows ``{"scenario", "backend", "result", "detail"}``; ``main()`` prints them.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")   # before grpc loads: no INFO line per closed connection

import grpc  # noqa: E402
from google.longrunning import operations_pb2, operations_pb2_grpc  # noqa: E402
from google.protobuf import duration_pb2  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from benchmarks.reliability_serving import Server, _prepare, _row, run_alone, timed  # noqa: E402
from rulewright.v1 import edit_pb2, images_pb2  # noqa: E402
from rulewright.v1 import generator_service_pb2 as gen, generator_service_pb2_grpc as gen_grpc  # noqa: E402
from rulewright.v1 import jobs_service_pb2 as jobs_pb, jobs_service_pb2_grpc as jobs_grpc  # noqa: E402

MODEL = "tiny"
LAYER = "main.6"
SAMPLES = 2048                 # two shards of 1,024: one float32 block each at this layer
BOUND_S = 120.0                # any one wait gives up after this long


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This module's flags."""
    parser.add_argument("--scenarios", default="statistic,resident",
                        help="comma-separated: statistic, resident (default both)")


def _tiny_weights(workdir: Path) -> Path:
    from safetensors.torch import save_file

    from tests.builders import dcgan_state

    path = workdir / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in dcgan_state(z_dim=16, widths=(32, 16, 8, 3)).items()}, str(path))
    return path


def _rewrite(server: Server) -> str:
    """A dry-run Rewrite over the job's samples: its status code name (and whether the error names the copy)."""
    spec = edit_pb2.EditSpec(
        layer=LAYER, rank=2, goal="value", steps=20,
        stats=edit_pb2.StatisticsSpec(samples=SAMPLES), keep=edit_pb2.KeepSpec(weight=0.0),
        copy=images_pb2.Region(seed=1, box=[8, 8, 16, 16]),
        paste=[images_pb2.Region(seed=2, box=[8, 8, 16, 16])])
    try:
        list(gen_grpc.GeneratorServiceStub(server.channel).Rewrite(
            gen.RewriteRequest(model=f"{MODEL}/1", spec=spec, dry_run=True), timeout=BOUND_S))
        return "OK"
    except grpc.RpcError as err:
        named = "statistics/" in (err.details() or "")
        return f"{err.code().name} ({'names the stored copy' if named else (err.details() or '')[:90]})"


def _statistics_job(server: Server) -> str:
    """Run a statistics job over the samples to the end; its final state name."""
    op = jobs_grpc.JobServiceStub(server.channel).CreateStatisticsJob(jobs_pb.CreateStatisticsJobRequest(
        model=MODEL, layer=LAYER, stats=edit_pb2.StatisticsSpec(samples=SAMPLES), shard_size=1024,
        request_id=uuid.uuid4().hex), timeout=BOUND_S)
    operations = operations_pb2_grpc.OperationsStub(server.channel)
    deadline = time.monotonic() + BOUND_S
    while not op.done and time.monotonic() < deadline:
        op = operations.WaitOperation(operations_pb2.WaitOperationRequest(
            name=op.name, timeout=duration_pb2.Duration(seconds=5)), timeout=10)
    if not op.done:
        return "not done"
    meta = jobs_pb.StatisticsJobMetadata()
    op.metadata.Unpack(meta)
    return jobs_pb.DatasetJobMetadata.State.Name(meta.state)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "absent"


def truncated_statistic(workdir: Path) -> list[dict]:
    """The truncated-statistic scenario on the embedded registry (see the module docstring)."""
    data = workdir / "data"
    (data / "registry").mkdir(parents=True)
    _prepare((data / "registry").resolve().as_uri(), _tiny_weights(workdir), {}, author="chaos", model=MODEL)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RULEWRIGHT_")}
    start = lambda *extra: Server(workdir, env, ["--data-dir", str(data), *extra])   # noqa: E731
    low = ["--max-stats-samples", "1000"]           # below SAMPLES: only a job's copy may serve them

    server = start()
    try:
        first = _statistics_job(server)
    finally:
        server.stop()
    folder = data / "registry" / "docs" / "statistics"
    [copy] = sorted(folder.glob("*.safetensors"))
    good = copy.read_bytes()
    saved = {path.name: path.read_bytes() for path in folder.iterdir()}    # the copy and anything beside it

    def truncate() -> None:
        # What the job left, then only the copy cut short (a bad disk, a partial restore).
        folder.mkdir(parents=True, exist_ok=True)
        for name, content in saved.items():
            (folder / name).write_bytes(content)
        copy.write_bytes(good[: len(good) // 2])

    truncate()
    server = start()
    try:
        computing = _rewrite(server)
    finally:
        server.stop()
    dropped = not copy.exists()

    truncate()
    server = start(*low)
    try:
        refused = _rewrite(server)
        again = _statistics_job(server)
        rewritten = copy.exists() and copy.read_bytes() == good
        after = _rewrite(server)
    finally:
        server.stop()
    return [_row("truncated statistic", "embedded",
                 f"Rewrite {refused}; job again {again}, copy rewritten: {'yes' if rewritten else 'no'}; "
                 f"Rewrite then {after}",
                 f"first job {first}; {len(good):,}-byte copy cut to {len(good) // 2:,} bytes between restarts; "
                 f"a server allowed to compute {SAMPLES:,} samples: Rewrite {computing}, damaged copy dropped: "
                 f"{'yes' if dropped else 'no'}; the refusal came from a server with --max-stats-samples 1000")]


def _health(server: Server, service: str) -> int | None:
    try:
        return health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                                timeout=1).status
    except grpc.RpcError as err:
        return err.code()


def resident_while_store_down(workdir: Path) -> list[dict]:
    """A resident version's Sample while the paused S3 server is marked down (see the module docstring)."""
    from rulewright.registry.s3store import S3Store
    from tests.backends import MotoServer, moto_command

    command = moto_command()
    if command is None:
        return [_row("resident Sample, store down", "s3", "skipped", "moto_server is not installed")]
    moto = MotoServer(command)
    server = None
    try:
        cfg = moto.config()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RULEWRIGHT_")}
        env.update(RULEWRIGHT_S3_ENDPOINT=cfg.endpoint, RULEWRIGHT_S3_ACCESS_KEY=cfg.access_key,
                   RULEWRIGHT_S3_SECRET_KEY=cfg.secret_key, RULEWRIGHT_S3_SECURE="false")
        uri = f"s3://chaos-{uuid.uuid4().hex[:10]}/registry"
        _prepare(uri, _tiny_weights(workdir), env, author="chaos", model=MODEL)
        server = Server(workdir, env, ["--registry-uri", uri])
        stub = gen_grpc.GeneratorServiceStub(server.channel)
        stub.Sample(gen.SampleRequest(model=f"{MODEL}/1", seeds=[0]), timeout=60)           # now resident
        sample = lambda seed: timed(lambda: stub.Sample(gen.SampleRequest(model=f"{MODEL}/1", seeds=[seed]),  # noqa: E731
                                                        timeout=2))
        moto.proc.send_signal(signal.SIGSTOP)
        at_once = sample(1)
        deadline = time.monotonic() + 30
        while (_health(server, "rulewright.v1.RegistryService") != health_pb2.HealthCheckResponse.NOT_SERVING
               and time.monotonic() < deadline):
            time.sleep(0.2)
        marked = time.monotonic()
        time.sleep(S3Store.RETRY_S + 0.5)     # past the retry interval: a request could be the one to try S3
        down = sample(2)
        later = [sample(3) for _ in range(5)]
        return [_row("resident Sample, store down", "s3",
                     f"at the pause {at_once[0]} in {at_once[1] * 1e3:.0f} ms; marked down {down[0]} in "
                     f"{down[1] * 1e3:.0f} ms",
                     f"Sample of {MODEL}/1, 2 s deadline: first right after SIGSTOP, then "
                     f"{time.monotonic() - marked:.1f} s after health marked the registry NOT_SERVING (past the "
                     f"store's retry interval); the next 5: {sorted({c for c, _ in later})} in at most "
                     f"{max(s for _, s in later) * 1e3:.0f} ms")]
    finally:
        moto.proc.send_signal(signal.SIGCONT)
        if server is not None:
            server.stop()
        moto.stop()


SCENARIOS = {"statistic": truncated_statistic, "resident": resident_while_store_down}


def run(args) -> list[dict]:
    """Every scenario asked for; rows ``{"scenario", "backend", "result", "detail"}``."""
    rows: list[dict] = []
    for name in [s.strip() for s in getattr(args, "scenarios", ",".join(SCENARIOS)).split(",") if s.strip()]:
        with tempfile.TemporaryDirectory(prefix=f"rulewright-chaos-{name}-") as tmp:
            try:
                rows += SCENARIOS[name](Path(tmp))
            except Exception as exc:  # noqa: BLE001 -- one scenario's failure is a row, not the end of the run
                log = Path(tmp, "server.log")
                tail = log.read_text()[-400:] if log.exists() else ""
                rows.append(_row(name, "-", f"error: {type(exc).__name__}: {exc}", tail.replace("\n", " ")))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios and print their table."""
    return run_alone("benchmarks.chaos_data", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
