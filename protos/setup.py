"""Build hook of rulewright-api: generate the Python stubs from the .proto files.

``build_py`` runs ``grpc_tools.protoc`` (grpcio-tools, a build requirement) on every .proto
file of the packages below and writes ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` straight
into the build directory, so they land in every wheel and never in the source tree. The proto
root is this folder: a file's path under it is its import path (``rulewright/v1/x.proto`` →
``rulewright.v1.x_pb2``), which is why the Open Inference Protocol file lives under
``rulewright/inference/`` although its proto package is ``inference``. ``google/`` holds copies of
the googleapis protos the API imports (``google/longrunning/operations.proto`` and what it
imports): protoc reads them to compile our files, but they are not generated here; their Python
modules come from googleapis-common-protos at run time.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.errors import SetupError

ROOT = Path(__file__).resolve().parent

# package → the docstring of its generated __init__.py (which imports nothing: importing
# rulewright.v1 must not load rulewright.inference, see grpc_predict_v2.proto)
PACKAGES = {
    "rulewright.v1": (
        '"""rulewright\'s gRPC API, generated from protos/rulewright/v1/*.proto.\n\n'
        "- ``generator_service_pb2(_grpc)``: GeneratorService (ListLayers, Sample, Dissect, SearchContext,\n"
        "  ComputeStatistics, Rewrite) and its messages.\n"
        "- ``registry_service_pb2(_grpc)``: RegistryService (models, versions, aliases).\n"
        "- ``jobs_service_pb2(_grpc)``: JobService (CreateDatasetJob, a google.longrunning.Operation) and\n"
        "  DatasetJob, DatasetShard, DatasetJobMetadata.\n"
        "- ``resources_pb2``: Model, Version, Blob, Alias, AliasMove.\n"
        "- ``edit_pb2``: EditSpec, KeepSpec, StatisticsSpec, EraseSpec.\n"
        "- ``images_pb2``: Image, ImageFormat, Box, Mask, Region.\n"
        '"""\n'
    ),
    "rulewright.inference": (
        '"""The Open Inference Protocol (package ``inference``), generated from\n'
        "protos/rulewright/inference/grpc_predict_v2.proto: ``grpc_predict_v2_pb2(_grpc)``.\n\n"
        "Not importable in one process with tritonclient.grpc or KServe's stubs: they register the\n"
        "same ``inference.*`` protobuf symbols.\n"
        '"""\n'
    ),
}
GENERATED = ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py")


class build_py_with_stubs(build_py):
    """``build_py`` that also generates the gRPC stubs into the build directory."""

    def run(self) -> None:
        super().run()
        if not self.dry_run:
            generate(Path(self.build_lib))


def generate(out: Path) -> None:
    """Run protoc on every .proto of PACKAGES, writing the Python stubs under ``out``."""
    from grpc_tools import protoc

    protos = []
    for package, doc in PACKAGES.items():
        target = out.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for pattern in GENERATED:  # stubs of a since-deleted .proto must not linger in the build tree
            for stale in target.glob(pattern):
                stale.unlink()
        (target / "__init__.py").write_text(doc)
        (target / "py.typed").write_text("")
        protos += sorted(ROOT.joinpath(*package.split(".")).glob("*.proto"))
    if not protos:
        raise SetupError(f"no .proto files under {ROOT}")
    well_known = importlib.resources.files("grpc_tools") / "_proto"   # google/protobuf/*.proto
    args = [
        "grpc_tools.protoc",
        f"--proto_path={ROOT}",
        f"--proto_path={well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *map(str, protos),
    ]
    if protoc.main(args) != 0:
        raise SetupError("grpc_tools.protoc failed on " + " ".join(p.relative_to(ROOT).as_posix() for p in protos))


setup(cmdclass={"build_py": build_py_with_stubs})
