"""RegistryService over a real channel: models, versions (paginated), aliases with compare-and-set
and history, delete with preconditions, export."""

from __future__ import annotations

import hashlib

import grpc
import pytest
from google.rpc import error_details_pb2
from safetensors.torch import load

from rulewright.service.domain.requests import RewriteRequest
from rulewright.v1 import generator_service_pb2 as gen, registry_service_pb2 as reg, resources_pb2

from .conftest import SPEC, detail, error_info


@pytest.fixture
def three_versions(domain):
    domain.rewrite(RewriteRequest("tiny/1", SPEC))
    domain.rewrite(RewriteRequest("tiny/2", SPEC))


def test_models_and_get_model(registry):
    models = registry.ListModels(reg.ListModelsRequest(), timeout=30).models
    assert [m.name for m in models] == ["models/tiny"] and models[0].arch == "dcgan"
    m = registry.GetModel(reg.GetModelRequest(name="models/tiny"), timeout=30)
    assert m.latest_version == 1 and [(a.name, a.version) for a in m.aliases] == [("models/tiny/aliases/production", 1)]
    with pytest.raises(grpc.RpcError) as err:
        registry.GetModel(reg.GetModelRequest(name="tiny"), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert detail(err.value, error_details_pb2.BadRequest).field_violations[0].field == "name"


def test_versions_paginate_and_get(registry, three_versions):
    first = registry.ListVersions(reg.ListVersionsRequest(parent="models/tiny", page_size=2), timeout=30)
    rest = registry.ListVersions(reg.ListVersionsRequest(parent="models/tiny", page_size=2,
                                                         page_token=first.next_page_token), timeout=30)
    assert [v.number for v in first.versions] == [1, 2] and [v.number for v in rest.versions] == [3]
    assert rest.next_page_token == ""
    v3 = registry.GetVersion(reg.GetVersionRequest(name="models/tiny/versions/3"), timeout=30)
    assert (v3.kind, v3.parent_version, list(v3.lineage)) == (resources_pb2.Version.KIND_EDIT, 2, [1, 2, 3])
    assert v3.blobs[0].role == "delta" and v3.metrics["goal_loss_after"] < v3.metrics["goal_loss_before"]
    with pytest.raises(grpc.RpcError) as err:
        registry.ListVersions(reg.ListVersionsRequest(parent="models/tiny", page_size=-1), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error_info(err.value).reason == "INVALID_PAGE_SIZE"


def test_set_alias_compare_and_set_history_and_rollback(registry, generator, three_versions):
    name = "models/tiny/aliases/production"
    first = registry.GetModel(reg.GetModelRequest(name="models/tiny"), timeout=30).aliases[0].etag
    moved = registry.SetAlias(reg.SetAliasRequest(name=name, version=3, expected_version=1, reason="ship"), timeout=30)
    assert moved.version == 3
    assert generator.Sample(gen.SampleRequest(model="tiny@production", seeds=[0]), timeout=30).version == \
        "models/tiny/versions/3"
    with pytest.raises(grpc.RpcError) as err:
        registry.SetAlias(reg.SetAliasRequest(name=name, version=2, etag=first), timeout=30)
    assert err.value.code() == grpc.StatusCode.ABORTED and error_info(err.value).metadata["current_version"] == "3"
    back = registry.SetAlias(reg.SetAliasRequest(name=name, version=1, etag=moved.etag, reason="rollback"), timeout=30)
    assert back.version == 1 and back.etag != moved.etag
    moves = registry.ListAliasHistory(reg.ListAliasHistoryRequest(parent=name), timeout=30).moves
    assert [(m.from_version, m.to_version) for m in moves] == [(0, 1), (1, 3), (3, 1)] and moves[-1].reason == "rollback"
    new = registry.SetAlias(reg.SetAliasRequest(name="models/tiny/aliases/staging", version=2, expected_version=0),
                            timeout=30)
    assert new.version == 2


def test_rollback_alias_moves_back_then_forward_recording_author_and_reason(registry, three_versions):
    name = "models/tiny/aliases/production"
    shipped = registry.SetAlias(reg.SetAliasRequest(name=name, version=3, expected_version=1, reason="ship"),
                                timeout=30)
    back = registry.RollbackAlias(reg.RollbackAliasRequest(name=name, etag=shipped.etag, reason="caps broke faces"),
                                  timeout=30)
    assert (back.name, back.version) == (name, 1) and back.etag != shipped.etag
    assert registry.GetModel(reg.GetModelRequest(name="models/tiny"), timeout=30).aliases[0].version == 1
    forward = registry.RollbackAlias(reg.RollbackAliasRequest(name=name), timeout=30)   # like `cd -`
    assert forward.version == 3
    moves = registry.ListAliasHistory(reg.ListAliasHistoryRequest(parent=name), timeout=30).moves
    assert [(m.from_version, m.to_version, m.author, m.reason) for m in moves][1:] == [
        (1, 3, "anonymous", "ship"), (3, 1, "anonymous", "caps broke faces"),
        (1, 3, "anonymous", "rollback to version 3")]


def test_rollback_alias_with_a_stale_etag_is_aborted_and_moves_nothing(registry, three_versions):
    name = "models/tiny/aliases/production"
    first = registry.SetAlias(reg.SetAliasRequest(name=name, version=2, expected_version=1), timeout=30)
    registry.SetAlias(reg.SetAliasRequest(name=name, version=3, etag=first.etag, reason="someone else"), timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        registry.RollbackAlias(reg.RollbackAliasRequest(name=name, etag=first.etag), timeout=30)
    info = error_info(err.value)
    assert err.value.code() == grpc.StatusCode.ABORTED and info.reason == "ALIAS_CONFLICT"
    assert info.metadata["current_version"] == "3"
    moves = registry.ListAliasHistory(reg.ListAliasHistoryRequest(parent=name), timeout=30).moves
    assert [m.to_version for m in moves] == [1, 2, 3]          # the other writer's move was not undone


def test_rollback_alias_needs_an_earlier_version_and_a_well_formed_name(registry):
    name = "models/tiny/aliases/production"                     # only ever moved from nowhere to 1
    with pytest.raises(grpc.RpcError) as err:
        registry.RollbackAlias(reg.RollbackAliasRequest(name=name), timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(err.value).reason == "NO_EARLIER_VERSION" and "no earlier version" in err.value.details()
    assert detail(err.value, error_details_pb2.PreconditionFailure).violations[0].type == "NO_EARLIER_VERSION"
    with pytest.raises(grpc.RpcError) as err:
        registry.RollbackAlias(reg.RollbackAliasRequest(name="models/tiny/aliases/never"), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and error_info(err.value).reason == "ALIAS_NOT_FOUND"
    with pytest.raises(grpc.RpcError) as err:
        registry.RollbackAlias(reg.RollbackAliasRequest(name="tiny/production"), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert detail(err.value, error_details_pb2.BadRequest).field_violations[0].field == "name"


def test_delete_version_needs_no_alias_and_no_children(registry, three_versions):
    with pytest.raises(grpc.RpcError) as err:
        registry.DeleteVersion(reg.DeleteVersionRequest(name="models/tiny/versions/2"), timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(err.value).reason == "VERSION_HAS_CHILDREN"
    assert detail(err.value, error_details_pb2.PreconditionFailure).violations[0].type == "VERSION_HAS_CHILDREN"
    registry.DeleteVersion(reg.DeleteVersionRequest(name="models/tiny/versions/3", reason="bad"), timeout=30)
    versions = registry.ListVersions(reg.ListVersionsRequest(parent="models/tiny"), timeout=30).versions
    assert [v.number for v in versions] == [1, 2]


def test_export_streams_metadata_then_the_verified_file(registry, domain):
    chunks = list(registry.ExportVersion(reg.ExportVersionRequest(name="models/tiny/versions/1"), timeout=30))
    meta = chunks[0].metadata
    data = b"".join(c.chunk for c in chunks[1:])
    assert meta.version.name == "models/tiny/versions/1" and meta.size_bytes == len(data)
    assert meta.sha256 == hashlib.sha256(data).hexdigest()
    state = load(data)
    model = domain.generator(domain.resolve("tiny/1")).model
    assert set(state) == set(model.state_dict())


def test_delete_model_needs_force(registry):
    with pytest.raises(grpc.RpcError) as err:
        registry.DeleteModel(reg.DeleteModelRequest(name="models/tiny"), timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and error_info(err.value).reason == "MODEL_HAS_VERSIONS"
    registry.DeleteModel(reg.DeleteModelRequest(name="models/tiny", force=True), timeout=30)
    assert not registry.ListModels(reg.ListModelsRequest(), timeout=30).models


def test_every_rpc_is_implemented_empty_requests_get_invalid_argument(registry, generator):
    for call, request in ((generator.Dissect, gen.DissectRequest(model="tiny")),
                          (generator.SearchContext, gen.SearchContextRequest(model="tiny", seeds=[1]))):
        with pytest.raises(grpc.RpcError) as err:
            call(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error_info(err.value).reason
