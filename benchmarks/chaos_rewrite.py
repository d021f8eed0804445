"""Rewrites too short (or too steep) to fit, against a real ``rulewright serve`` process: ``python -m benchmarks.chaos_rewrite``.

**no-op rewrite** (embedded registry, the faces model): the glasses edit
(``examples/edits/glasses.json``, its key statistic over 200 samples) with 3, 5 and 10
optimization steps, and as the one-layer edit (``method: single``) with lr 0.1 and 100 steps.
Each is sent as a Rewrite; a row per budget gives the status code and reason it got, the versions
before and after it, and the goal losses (from the error's metadata, or the new version's
metrics). A fit that stays at no edit should be refused (FAILED_PRECONDITION,
EDIT_DID_NOT_IMPROVE) with the versions unchanged; one that fits should create a version whose
goal loss is lower.

``run(args) -> list[dict]`` returns rows ``{"scenario", "backend", "result", "detail"}``; ``main()``
prints them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")   # before grpc loads: no INFO line per closed connection

import grpc  # noqa: E402
from google.rpc import error_details_pb2, status_pb2  # noqa: E402

from benchmarks.reliability_serving import MODEL, REPO, Server, _prepare, _row, run_alone  # noqa: E402
from rulewright.v1 import edit_pb2, images_pb2  # noqa: E402
from rulewright.v1 import generator_service_pb2 as gen, generator_service_pb2_grpc as gen_grpc  # noqa: E402
from rulewright.v1 import registry_service_pb2 as reg, registry_service_pb2_grpc as reg_grpc  # noqa: E402

SCENARIO = "no-op rewrite"
# (label, spec changes): the budgets that stored a version identical to its parent before.
CASES = [("steps 3", {"steps": 3}), ("steps 5", {"steps": 5}), ("steps 10", {"steps": 10}),
         ("single lr 0.1 steps 100", {"method": "single", "lr": 0.1, "steps": 100})]
DEADLINE_S = 300.0             # one Rewrite gives up after this long
STATS_SAMPLES = 200            # fewer than the spec's 1,000: the statistic is not what is measured here


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This module's flags."""
    default = os.environ.get("RULEWRIGHT_CACHE_DIR", str(REPO / ".cache" / "rulewright"))
    parser.add_argument("--cache-dir", default=default, help="where the faces model is (fetched on first use)")


def glasses_spec(**change) -> edit_pb2.EditSpec:
    """The shipped glasses edit as the API's EditSpec (unset fields: the server's defaults), changed."""
    d = json.loads((REPO / "examples" / "edits" / "glasses.json").read_text())
    box = list
    return edit_pb2.EditSpec(layer=d["layer"], stats=edit_pb2.StatisticsSpec(samples=STATS_SAMPLES),
                             copy=images_pb2.Region(seed=d["copy"]["seed"], box=box(d["copy"]["box"])),
                             paste=[images_pb2.Region(seed=p["seed"], box=box(p["box"])) for p in d["paste"]],
                             **change)


def _error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return info
    return None


def one_case(stub, registry, label: str, change: dict) -> dict:
    """One Rewrite: its code and reason, the versions before and after, the goal losses."""
    listing = lambda: [v.number for v in registry.ListVersions(  # noqa: E731
        reg.ListVersionsRequest(parent=f"models/{MODEL}"), timeout=30).versions]
    before = listing()
    try:
        result = list(stub.Rewrite(gen.RewriteRequest(model=f"{MODEL}/1", spec=glasses_spec(**change)),
                                   timeout=DEADLINE_S))[-1].result
        metrics = result.metrics
        outcome = f"OK, new version {result.version.name.rsplit('/', 1)[-1]}"
        losses = f"goal loss {metrics['goal_loss_before']:.4f} -> {metrics['goal_loss_after']:.4f}"
    except grpc.RpcError as err:
        info = _error_info(err)
        outcome = f"{err.code().name} {info.reason if info else ''}".strip()
        meta = dict(info.metadata) if info else {}
        losses = (f"goal loss {float(meta['goal_loss_before']):.4f} -> {float(meta['goal_loss_after']):.4f}"
                  if "goal_loss_before" in meta else (err.details() or "")[:120])
    return _row(SCENARIO, "embedded", f"{label}: {outcome}", f"versions {before} -> {listing()}; {losses}")


def run(args) -> list[dict]:
    """The no-op rewrite scenario on the embedded registry; rows ``{"scenario", "backend", "result", "detail"}``."""
    from rulewright.service.importers.faces import import_faces

    faces = import_faces(getattr(args, "cache_dir", None) or str(REPO / ".cache" / "rulewright"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RULEWRIGHT_")}
    with tempfile.TemporaryDirectory(prefix="rulewright-chaos-rewrite-") as tmp:
        workdir = Path(tmp)
        data = workdir / "data"
        (data / "registry").mkdir(parents=True)
        _prepare((data / "registry").resolve().as_uri(), faces, env)
        server = Server(workdir, env, ["--data-dir", str(data)])
        try:
            stub, registry = gen_grpc.GeneratorServiceStub(server.channel), reg_grpc.RegistryServiceStub(server.channel)
            return [one_case(stub, registry, label, change) for label, change in CASES]
        finally:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    """Run the scenario and print its rows."""
    return run_alone("benchmarks.chaos_rewrite", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
