"""The stubs exist because the build of protos/ generated them, in the right namespace, with the
RPCs and streaming shapes the design names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor

from .conftest import REPO

GENERATOR_RPCS = {
    # name: (client streaming, server streaming)
    "ListLayers": (False, False),
    "Sample": (False, False),
    "Dissect": (False, False),
    "SearchContext": (False, False),
    "ComputeStatistics": (False, True),
    "Rewrite": (False, True),
}
REGISTRY_RPCS = {
    "ListModels": (False, False),
    "GetModel": (False, False),
    "ImportModel": (True, False),
    "DeleteModel": (False, False),
    "ListVersions": (False, False),
    "GetVersion": (False, False),
    "DeleteVersion": (False, False),
    "ExportVersion": (False, True),
    "SetAlias": (False, False),
    "RollbackAlias": (False, False),
    "ListAliasHistory": (False, False),
    "ExportAdapter": (False, True),
    "ImportAdapter": (True, False),
    "RescaleVersion": (False, False),
}


def test_stubs_import():
    from rulewright.v1 import (  # noqa: F401
        edit_pb2,
        generator_service_pb2,
        generator_service_pb2_grpc,
        images_pb2,
        registry_service_pb2,
        registry_service_pb2_grpc,
        resources_pb2,
    )

    assert generator_service_pb2_grpc.GeneratorServiceStub
    assert registry_service_pb2_grpc.RegistryServiceServicer
    assert generator_service_pb2.SampleRequest.DESCRIPTOR.full_name == "rulewright.v1.SampleRequest"


def test_stubs_come_from_the_build_not_the_source_tree():
    from rulewright.v1 import generator_service_pb2

    installed = Path(generator_service_pb2.__file__).resolve()
    assert REPO / "protos" not in installed.parents, f"stubs imported from the source tree: {installed}"
    assert installed.with_suffix(".pyi").exists(), "the build generates type stubs too"
    generated = [
        p for p in (REPO / "protos").rglob("*_pb2*.py*")
        if "build" not in p.relative_to(REPO / "protos").parts
    ]
    assert generated == [], f"generated files in the source tree: {generated}"


def test_rulewright_is_one_namespace_across_distributions():
    import rulewright
    import rulewright.registry
    import rulewright.service
    import rulewright.v1

    assert getattr(rulewright, "__file__", None) is None, "rulewright must stay a namespace package"
    for entry in rulewright.__path__:
        assert not (Path(entry) / "__init__.py").exists(), entry
    # the API distribution's stubs and the server's packages resolve through the same namespace
    assert Path(rulewright.v1.__file__).parent.name == "v1"
    assert Path(rulewright.service.__file__).parent.name == "service"


def test_v1_never_loads_the_inference_protocol():
    """Clients may use tritonclient beside rulewright.v1: the OIP stubs must stay unloaded."""
    code = (
        "import sys\n"
        "from rulewright.v1 import generator_service_pb2_grpc, registry_service_pb2_grpc\n"
        "assert 'rulewright.inference' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def _methods(module, service: str) -> dict[str, tuple[bool, bool]]:
    svc = module.DESCRIPTOR.services_by_name[service]
    return {m.name: (m.client_streaming, m.server_streaming) for m in svc.methods}


def test_services_have_the_designed_rpcs_and_streaming_shapes():
    from rulewright.v1 import generator_service_pb2, registry_service_pb2

    assert _methods(generator_service_pb2, "GeneratorService") == GENERATOR_RPCS
    assert _methods(registry_service_pb2, "RegistryService") == REGISTRY_RPCS


def test_sample_request_carries_model_reference_and_int64_seeds():
    from rulewright.v1 import generator_service_pb2 as g

    fields = g.SampleRequest.DESCRIPTOR.fields_by_name
    assert fields["model"].type == descriptor.FieldDescriptor.TYPE_STRING
    assert fields["seeds"].type == descriptor.FieldDescriptor.TYPE_INT64
    assert fields["seeds"].is_repeated
    # 64-bit seeds survive the wire exactly (the JSON spec keeps them exact too)
    big = 2**63 - 1
    assert g.SampleRequest.FromString(g.SampleRequest(seeds=[big]).SerializeToString()).seeds == [big]


def _enums(file: descriptor.FileDescriptor):
    yield from file.enum_types_by_name.values()
    stack = list(file.message_types_by_name.values())
    while stack:
        m = stack.pop()
        yield from m.enum_types
        stack.extend(m.nested_types)


def test_every_enum_starts_with_an_unspecified_zero():
    from rulewright.v1 import edit_pb2, generator_service_pb2, images_pb2, registry_service_pb2, resources_pb2

    enums = [e for mod in (edit_pb2, generator_service_pb2, images_pb2, registry_service_pb2, resources_pb2)
             for e in _enums(mod.DESCRIPTOR)]
    assert len(enums) >= 7           # the edit spec's choices are strings, as its JSON form spells them
    for enum in enums:
        zero = enum.values_by_number[0].name
        assert zero.endswith("_UNSPECIFIED"), f"{enum.full_name}: {zero}"


def test_unset_and_zero_differ_where_zero_is_a_setting():
    from rulewright.v1 import edit_pb2

    spec = edit_pb2.EditSpec()
    assert not spec.HasField("truncation") and not spec.HasField("ridge")
    spec.truncation = 0.0
    assert spec.HasField("truncation")
    keep = edit_pb2.KeepSpec(weight=0.0)
    assert keep.HasField("weight") and not keep.HasField("pool_start")
