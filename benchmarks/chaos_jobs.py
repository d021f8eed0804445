"""Dataset-job output locations under attack, against a real server process: ``python -m benchmarks.chaos_jobs``.

A fresh server process (embedded filesystem registry, a small random DCGAN as ``faces``, output
prefixes ``file://{tmp}/allowed`` and, when moto is installed, ``s3://{bucket}/out`` on a
``moto_server``) meets:

1. **symlinked output location**: ``allowed/link -> ../outside``, then a CreateDatasetJob with
   ``output_uri=file://{tmp}/allowed/link/e6``: the status it gets, the files written under
   ``outside/`` and the jobs the server recorded;
2. **two jobs on one location** (per store, file and S3): a job of ``--job-images`` images on a fresh
   location, then at once a second job on the same location: the second's status and how fast it
   came, the jobs recorded, and what the first job still did (it is cancelled afterwards).

``run(args) -> list[dict]`` returns rows ``{"scenario", "backend", "result", "detail"}`` (for a
combined reliability command); ``main()`` prints them as a table and, with ``--json``, writes them.
Loopback only; each scenario takes seconds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")   # before grpc loads: no INFO line per closed connection

import grpc  # noqa: E402
from google.longrunning import operations_pb2, operations_pb2_grpc  # noqa: E402

from benchmarks.reliability_serving import MODEL, Server, _prepare, _row, run_alone  # noqa: E402
from rulewright.v1 import generator_service_pb2 as gen, jobs_service_pb2 as jobs_pb  # noqa: E402
from rulewright.v1 import jobs_service_pb2_grpc as jobs_grpc  # noqa: E402

IMAGES = 2000                  # the first job on a shared location: long enough to still run when the second comes
STORES = "file,s3"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This benchmark's flags."""
    parser.add_argument("--job-images", type=int, default=IMAGES, help="images of the first job on a shared "
                                                                       f"location (default {IMAGES})")
    parser.add_argument("--job-stores", default=STORES, help="output stores for the shared-location scenario: "
                                                             f"file, s3 (default {STORES}; s3 needs moto)")


def _create(channel, output_uri: str, count: int, request_id: str):
    """CreateDatasetJob; the operation, or the error's code name and the seconds it took."""
    started = time.monotonic()
    try:
        op = jobs_grpc.JobServiceStub(channel).CreateDatasetJob(jobs_pb.CreateDatasetJobRequest(
            model=f"{MODEL}/1", seeds=gen.SeedRange(start=0, count=count), shard_size=100, output_uri=output_uri,
            request_id=request_id), timeout=30)
        return op, "OK", time.monotonic() - started
    except grpc.RpcError as err:
        return None, err.code().name, time.monotonic() - started


def _operations(channel) -> list:
    ops = operations_pb2_grpc.OperationsStub(channel)
    return list(ops.ListOperations(operations_pb2.ListOperationsRequest(name="operations"), timeout=30).operations)


def _files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.exists() else []


def symlinked(server: Server, root: Path) -> dict:
    """A link below the allowed prefix that points outside it."""
    before = len(_operations(server.channel))
    os.symlink("../outside", root / "allowed" / "link")
    _, code, seconds = _create(server.channel, (root / "allowed").as_uri() + "/link/e6", 40, "")
    time.sleep(1.0)                      # a job that was accepted would have written by now
    outside, recorded = _files(root / "outside"), len(_operations(server.channel)) - before
    refused = code != "OK" and not outside and not recorded
    return _row("symlinked output location", "file", f"{'refused' if refused else 'ESCAPED'}: {code}",
                f"allowed/link -> ../outside, output_uri allowed/link/e6: answered in {seconds * 1e3:.0f} ms; "
                f"files written outside: {len(outside)}; jobs recorded: {recorded}")


def shared(server: Server, backend: str, prefix: str, images: int) -> dict:
    """Two jobs on one fresh location, the second right after the first."""
    target = f"{prefix}/shared-{uuid.uuid4().hex[:8]}"
    before = {o.name for o in _operations(server.channel)}
    first, first_code, _ = _create(server.channel, target, images, "")
    second, code, seconds = _create(server.channel, target, images, "")
    ops = operations_pb2_grpc.OperationsStub(server.channel)
    recorded = [o for o in _operations(server.channel) if o.name not in before]
    state = "not created"
    if first is not None:
        meta = jobs_pb.DatasetJobMetadata()
        ops.GetOperation(operations_pb2.GetOperationRequest(name=first.name), timeout=30).metadata.Unpack(meta)
        state = f"{jobs_pb.DatasetJobMetadata.State.Name(meta.state)}, {meta.images_done}/{meta.images_total} images"
        ops.CancelOperation(operations_pb2.CancelOperationRequest(name=first.name), timeout=30)
    if second is not None:
        ops.CancelOperation(operations_pb2.CancelOperationRequest(name=second.name), timeout=30)
    refused = first_code == "OK" and code != "OK" and len(recorded) == 1
    return _row("two jobs on one location", backend, f"{'second refused' if refused else 'BOTH ACCEPTED'}: {code}",
                f"second create answered in {seconds * 1e3:.0f} ms; jobs recorded: {len(recorded)} (the second "
                f"{'left nothing' if refused else 'runs'}); first job then: {state}")


def _model(workdir: Path) -> Path:
    """A small random DCGAN as a safetensors file (the scenarios need a model, not a good one)."""
    from safetensors.torch import save_file

    from tests.builders import dcgan_state

    path = workdir / "model.safetensors"
    save_file({k: v.contiguous() for k, v in dcgan_state(z_dim=32, widths=(64, 32, 16, 3)).items()}, str(path))
    return path


def run(args) -> list[dict]:
    """Every scenario; rows ``{"scenario", "backend", "result", "detail"}`` (``args`` may lack this
    module's flags: a combined command's namespace gets the defaults)."""
    images = getattr(args, "job_images", IMAGES)
    backends = [b.strip() for b in getattr(args, "job_stores", STORES).split(",") if b.strip()]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="rulewright-chaos-jobs-") as tmp:
        root = Path(tmp)
        (root / "allowed").mkdir()
        (root / "outside").mkdir()
        (root / "data" / "registry").mkdir(parents=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RULEWRIGHT_")}
        prefixes, moto = [(root / "allowed").as_uri()], None
        if "s3" in backends:
            from tests.backends import MotoServer, moto_command

            command = moto_command()
            if command is None:
                rows.append(_row("two jobs on one location", "s3", "skipped", "moto is not installed"))
            else:
                from rulewright.registry.stores import open_store

                moto = MotoServer(command)
                cfg = moto.config()
                env.update(RULEWRIGHT_S3_ENDPOINT=cfg.endpoint, RULEWRIGHT_S3_ACCESS_KEY=cfg.access_key,
                           RULEWRIGHT_S3_SECRET_KEY=cfg.secret_key, RULEWRIGHT_S3_SECURE="false")
                bucket = f"chaos-{uuid.uuid4().hex[:10]}"
                with open_store(f"s3://{bucket}", s3=cfg) as store:
                    store.ensure_bucket()
                prefixes.append(f"s3://{bucket}/out")
        try:
            _prepare((root / "data" / "registry").resolve().as_uri(), _model(root), env)
            server = Server(root, env, ["--data-dir", str(root / "data"), "--job-output-prefixes", ",".join(prefixes)])
            try:
                rows.append(symlinked(server, root))
                for backend, prefix in zip(["file", "s3"], prefixes):
                    if backend in backends:
                        rows.append(shared(server, backend, prefix if backend == "s3" else prefix + "/jobs", images))
            finally:
                server.stop()
        finally:
            if moto is not None:
                moto.stop()
            shutil.rmtree(root / "outside", ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios and print their table."""
    return run_alone("benchmarks.chaos_jobs", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
