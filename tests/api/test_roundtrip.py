"""Real gRPC round trips through tiny in-test servicers on a port-0 server: every streaming shape
(unary, server-, client-streaming), oneof events, google.rpc error details in the trailer, and
health and reflection serving the generated descriptors."""

from __future__ import annotations

import hashlib

import grpc
import pytest
from google.protobuf import any_pb2, empty_pb2, json_format, struct_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from rulewright.v1 import (
    edit_pb2,
    generator_service_pb2 as gen,
    generator_service_pb2_grpc as gen_grpc,
    images_pb2,
    registry_service_pb2 as reg,
    registry_service_pb2_grpc as reg_grpc,
    resources_pb2,
)

from .conftest import serve

VERSION = "models/faces/versions/3"
DETAILS_KEY = "grpc-status-details-bin"
DOMAIN = "registry.rulewright.dev"


def pixels(seed: int, size: int = 2) -> bytes:
    """Canned raw RGB8 pixels for a seed."""
    return bytes((seed * 7 + i) % 256 for i in range(size * size * 3))


def abort_with_details(context: grpc.ServicerContext, code: grpc.StatusCode, message: str, *details) -> None:
    """Abort with a google.rpc.Status carrying ``details`` in the trailer (the plan for errors)."""
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=packed)
    context.set_trailing_metadata(((DETAILS_KEY, status.SerializeToString()),))
    context.abort(code, message)


def rpc_status(err: grpc.RpcError) -> status_pb2.Status:
    """The google.rpc.Status a failed call carried in its trailer."""
    for key, value in err.trailing_metadata() or ():
        if key == DETAILS_KEY:
            return status_pb2.Status.FromString(value)
    raise AssertionError(f"no {DETAILS_KEY} trailer on {err.code()}: {err.details()}")


def unpack(status: status_pb2.Status, cls):
    out = []
    for a in status.details:
        if a.Is(cls.DESCRIPTOR):
            m = cls()
            a.Unpack(m)
            out.append(m)
    return out


class Generator(gen_grpc.GeneratorServiceServicer):
    """Canned answers; validates just enough to exercise the error details."""

    def Sample(self, request, context):
        if not request.seeds and not request.HasField("latents"):
            abort_with_details(
                context, grpc.StatusCode.INVALID_ARGUMENT, "give seeds or latents",
                error_details_pb2.ErrorInfo(reason="INVALID_ARGUMENT", domain="rulewright.dev"),
                error_details_pb2.BadRequest(field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field="seeds", description="give seeds or latents"),
                ]),
            )
        fmt = request.image_format or images_pb2.IMAGE_FORMAT_PNG
        return gen.SampleResponse(
            version=VERSION,
            images=[images_pb2.Image(format=fmt, width=2, height=2, data=pixels(s), seed=s) for s in request.seeds],
        )

    def Rewrite(self, request, context):
        steps = request.spec.steps or 2001
        for step in (1, steps // 2, steps):
            yield gen.RewriteResponse(progress=gen.Progress(
                stage=gen.Progress.STAGE_OPTIMIZE, step=step, steps=steps, loss=1.0 / step))
        yield gen.RewriteResponse(preview=gen.RewritePreview(images=[
            images_pb2.Image(format=images_pb2.IMAGE_FORMAT_RAW_RGB8, width=2, height=2, data=pixels(s), seed=s)
            for s in request.preview_seeds
        ]))
        metrics = struct_pb2.Struct()
        metrics.update({"goal_loss_before": 0.5, "goal_loss_after": 0.25})
        spec = json_format.ParseDict({"op": "rewrite", "paste": [{"seed": 9223372036854775807, "box": [0, 0, 2, 2]}]},
                                     edit_pb2.EditSpec())
        version = None if request.dry_run else resources_pb2.Version(
            name="models/faces/versions/4", number=4, parent_version=3, kind=resources_pb2.Version.KIND_EDIT,
            spec=spec, metrics=metrics, author="alice", request_id=request.request_id, lineage=[1, 3, 4],
        )
        yield gen.RewriteResponse(result=gen.RewriteResult(
            version=version, parent=VERSION, spec=spec, metrics=metrics, dry_run=request.dry_run))


class Registry(reg_grpc.RegistryServiceServicer):
    """Canned answers: an import reassembled from chunks, an export in chunks, an alias CAS."""

    export = bytes(range(256)) * 41  # 10,496 bytes: several chunks

    def __init__(self):
        self.alias = resources_pb2.Alias(name="models/faces/aliases/production", version=3, etag='"7"')

    def ImportModel(self, request_iterator, context):
        first = next(request_iterator)
        if first.WhichOneof("content") != "metadata":
            abort_with_details(context, grpc.StatusCode.INVALID_ARGUMENT, "metadata first",
                               error_details_pb2.ErrorInfo(reason="INVALID_ARGUMENT", domain=DOMAIN))
        meta = first.metadata
        data = b"".join(r.chunk for r in request_iterator)
        if len(data) != meta.size_bytes or hashlib.sha256(data).hexdigest() != meta.sha256:
            abort_with_details(context, grpc.StatusCode.INVALID_ARGUMENT, "weights do not match",
                               error_details_pb2.ErrorInfo(reason="INVALID_ARGUMENT", domain=DOMAIN))
        blob = resources_pb2.Blob(role="weights", sha256=meta.sha256, size_bytes=len(data))
        return reg.ImportModelResponse(
            model=resources_pb2.Model(name=f"models/{meta.model_id}", arch=meta.arch, config_json=meta.config_json,
                                      latest_version=1),
            version=resources_pb2.Version(name=f"models/{meta.model_id}/versions/1", number=1,
                                          kind=resources_pb2.Version.KIND_IMPORT, blobs=[blob], lineage=[1]),
        )

    def ExportVersion(self, request, context):
        yield reg.ExportVersionResponse(metadata=reg.ExportMetadata(
            version=resources_pb2.Version(name=request.name), size_bytes=len(self.export),
            sha256=hashlib.sha256(self.export).hexdigest()))
        for start in range(0, len(self.export), 4096):
            yield reg.ExportVersionResponse(chunk=self.export[start:start + 4096])

    def SetAlias(self, request, context):
        which = request.WhichOneof("expectation")
        holds = (which == "etag" and request.etag == self.alias.etag) or (
            which == "expected_version" and request.expected_version == self.alias.version)
        if which is None:
            abort_with_details(
                context, grpc.StatusCode.INVALID_ARGUMENT, "state expected_version or etag",
                error_details_pb2.ErrorInfo(reason="INVALID_ARGUMENT", domain=DOMAIN),
                error_details_pb2.BadRequest(field_violations=[error_details_pb2.BadRequest.FieldViolation(
                    field="expected_version", description="state expected_version or etag")]),
            )
        if not holds:
            abort_with_details(
                context, grpc.StatusCode.ABORTED, "alias moved",
                error_details_pb2.ErrorInfo(reason="ALIAS_CONFLICT", domain=DOMAIN, metadata={
                    "current_version": str(self.alias.version), "etag": self.alias.etag}),
            )
        seq = int(self.alias.etag.strip('"')) + 1
        self.alias = resources_pb2.Alias(name=request.name, version=request.version, etag=f'"{seq}"')
        return self.alias

    def DeleteVersion(self, request, context):
        abort_with_details(
            context, grpc.StatusCode.FAILED_PRECONDITION, "version 3 is the target of aliases production",
            error_details_pb2.ErrorInfo(reason="VERSION_HAS_ALIASES", domain=DOMAIN, metadata={"aliases": "production"}),
            error_details_pb2.PreconditionFailure(violations=[error_details_pb2.PreconditionFailure.Violation(
                type="ALIAS", subject="models/faces/aliases/production", description="points at version 3")]),
        )
        return empty_pb2.Empty()


SERVICES = ("rulewright.v1.GeneratorService", "rulewright.v1.RegistryService")


def register(server: grpc.Server) -> None:
    gen_grpc.add_GeneratorServiceServicer_to_server(Generator(), server)
    reg_grpc.add_RegistryServiceServicer_to_server(Registry(), server)
    checker = health.HealthServicer()
    for name in ("", *SERVICES):
        checker.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    reflection.enable_server_reflection((*SERVICES, reflection.SERVICE_NAME, health.SERVICE_NAME), server)


@pytest.fixture
def channel(channel_to):
    with serve(register) as address:
        yield channel_to(address)


def test_sample_round_trip(channel):
    stub = gen_grpc.GeneratorServiceStub(channel)
    seeds = [0, 2**62 + 1]
    response = stub.Sample(gen.SampleRequest(
        model="faces@production", seeds=seeds, image_format=images_pb2.IMAGE_FORMAT_RAW_RGB8), timeout=10)
    assert response.version == VERSION
    assert [im.seed for im in response.images] == seeds
    assert [im.data for im in response.images] == [pixels(s) for s in seeds]
    assert {im.format for im in response.images} == {images_pb2.IMAGE_FORMAT_RAW_RGB8}


def test_rewrite_streams_progress_then_preview_then_result(channel):
    stub = gen_grpc.GeneratorServiceStub(channel)
    spec = edit_pb2.EditSpec(
        op="rewrite", layer="main.6", rank=8, steps=100,
        copy=images_pb2.Region(seed=35, box=[22, 26, 42, 34]),
        paste=[images_pb2.Region(seed=1, box=[20, 26, 44, 34])],
        keep=edit_pb2.KeepSpec(weight=16.0),
    )
    events = list(stub.Rewrite(gen.RewriteRequest(
        model="faces@production", spec=spec, preview_seeds=[5, 6], request_id="r-1"), timeout=10))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["progress"] * 3 + ["preview", "result"]
    assert [e.progress.step for e in events[:3]] == [1, 50, 100]
    assert all(e.progress.HasField("loss") for e in events[:3])
    assert [im.seed for im in events[3].preview.images] == [5, 6]
    result = events[-1].result
    assert result.parent == VERSION and not result.dry_run
    assert result.version.name == "models/faces/versions/4"
    assert result.version.kind == resources_pb2.Version.KIND_EDIT
    assert result.version.request_id == "r-1"
    assert list(result.version.lineage) == [1, 3, 4]
    assert result.metrics["goal_loss_after"] == 0.25
    assert result.version.spec.paste[0].seed == 9223372036854775807 == result.spec.paste[0].seed

    dry = list(stub.Rewrite(gen.RewriteRequest(model="faces", spec=spec, dry_run=True), timeout=10))[-1].result
    assert dry.dry_run and not dry.HasField("version")


def test_import_model_client_streaming(channel):
    stub = reg_grpc.RegistryServiceStub(channel)
    weights = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(range(256)) * 20
    meta = reg.ImportModelMetadata(
        model_id="faces", arch="dcgan", config_json='{"z_dim": 100}', size_bytes=len(weights),
        sha256=hashlib.sha256(weights).hexdigest(), request_id="import-1")

    def requests():
        yield reg.ImportModelRequest(metadata=meta)
        for start in range(0, len(weights), 1000):
            yield reg.ImportModelRequest(chunk=weights[start:start + 1000])

    response = stub.ImportModel(requests(), timeout=10)
    assert response.model.name == "models/faces"
    assert response.version.kind == resources_pb2.Version.KIND_IMPORT
    assert response.version.blobs[0].sha256 == meta.sha256
    assert response.version.blobs[0].size_bytes == len(weights)


def test_export_version_server_streaming(channel):
    stub = reg_grpc.RegistryServiceStub(channel)
    stream = iter(stub.ExportVersion(reg.ExportVersionRequest(name=VERSION), timeout=10))
    first = next(stream)
    assert first.WhichOneof("content") == "metadata"
    data = b"".join(m.chunk for m in stream)
    assert len(data) == first.metadata.size_bytes
    assert hashlib.sha256(data).hexdigest() == first.metadata.sha256
    assert first.metadata.version.name == VERSION


def test_set_alias_compare_and_set(channel):
    stub = reg_grpc.RegistryServiceStub(channel)
    name = "models/faces/aliases/production"
    moved = stub.SetAlias(reg.SetAliasRequest(name=name, version=4, etag='"7"', reason="promote"), timeout=10)
    assert (moved.version, moved.etag) == (4, '"8"')
    back = stub.SetAlias(reg.SetAliasRequest(name=name, version=3, expected_version=4), timeout=10)
    assert back.version == 3

    with pytest.raises(grpc.RpcError) as info:  # a stale etag loses the compare-and-set
        stub.SetAlias(reg.SetAliasRequest(name=name, version=4, etag='"7"'), timeout=10)
    assert info.value.code() == grpc.StatusCode.ABORTED
    status = rpc_status(info.value)
    assert status.code == code_pb2.ABORTED
    (error,) = unpack(status, error_details_pb2.ErrorInfo)
    assert (error.reason, error.domain) == ("ALIAS_CONFLICT", DOMAIN)
    assert dict(error.metadata) == {"current_version": "3", "etag": '"9"'}


def test_error_details_travel_in_the_trailer(channel):
    gen_stub = gen_grpc.GeneratorServiceStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        gen_stub.Sample(gen.SampleRequest(model="faces@production"), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status(info.value)
    (bad,) = unpack(status, error_details_pb2.BadRequest)
    assert [v.field for v in bad.field_violations] == ["seeds"]
    assert unpack(status, error_details_pb2.ErrorInfo)[0].reason == "INVALID_ARGUMENT"

    reg_stub = reg_grpc.RegistryServiceStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        reg_stub.DeleteVersion(reg.DeleteVersionRequest(name=VERSION), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    status = rpc_status(info.value)
    (failure,) = unpack(status, error_details_pb2.PreconditionFailure)
    assert failure.violations[0].subject == "models/faces/aliases/production"
    assert unpack(status, error_details_pb2.ErrorInfo)[0].reason == "VERSION_HAS_ALIASES"


def test_unimplemented_rpcs_answer_unimplemented(channel):
    stub = gen_grpc.GeneratorServiceStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.ListLayers(gen.ListLayersRequest(model="faces"), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_health_and_reflection_serve_the_generated_descriptors(channel):
    check = health_pb2_grpc.HealthStub(channel).Check
    for name in SERVICES:
        assert check(health_pb2.HealthCheckRequest(service=name), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
    db = ProtoReflectionDescriptorDatabase(channel)
    assert set(SERVICES) <= set(db.get_services())
    # reflection hands out the full file, so grpcurl-style clients can build requests
    from google.protobuf.descriptor_pool import DescriptorPool

    pool = DescriptorPool(db)
    method = pool.FindServiceByName("rulewright.v1.GeneratorService").methods_by_name["Rewrite"]
    assert method.server_streaming and method.output_type.full_name == "rulewright.v1.RewriteResponse"
