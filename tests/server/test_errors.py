"""Every row of the error table through a real channel: code, ErrorInfo{reason, domain}, field
violations named as the request spells them, a generic message for INTERNAL, and the server
serving on afterwards."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2

from rulewright.registry.errors import Aborted, Reason
from rulewright.service.engine.errors import Cancelled, InvalidArgument
from rulewright.service.errors import Error
from rulewright.service.server.errors import ERROR_TABLE, GENERIC_INTERNAL, classify
from rulewright.v1 import generator_service_pb2 as gen, images_pb2, registry_service_pb2 as reg

from .conftest import detail, error_info
from .test_generator import spec_pb


def fails(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=30)
    return err.value


def still_serving(generator) -> None:
    assert generator.Sample(gen.SampleRequest(model="tiny", seeds=[0]), timeout=30).version == "models/tiny/versions/1"


ROWS = [
    (Aborted(Reason.ALIAS_CONFLICT, "moved", current_version=2), grpc.StatusCode.ABORTED, "ALIAS_CONFLICT",
     "registry.rulewright.dev"),
    (InvalidArgument("seeds", "bad seed"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "rulewright.dev"),
    (Cancelled("stopped"), grpc.StatusCode.CANCELLED, "CANCELLED", "rulewright.dev"),
    (grpc.RpcError(), grpc.StatusCode.CANCELLED, "STREAM_BROKEN", "rulewright.dev"),
    (LookupError("no layer 'x'"), grpc.StatusCode.NOT_FOUND, "NOT_FOUND", "rulewright.dev"),
    (ValueError("bad"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "rulewright.dev"),
    (RuntimeError("secret detail"), grpc.StatusCode.INTERNAL, "INTERNAL", "rulewright.dev"),
]


def test_every_table_row_is_driven_and_errors_carry_their_own_code():
    """Each row of ERROR_TABLE is the first match of one of ROWS' plain exceptions; every
    ``Error`` (registry, engine, auth, limits) skips the table: its code is its own."""
    def first_row(exc):
        return next((kind for kind, *_ in ERROR_TABLE if isinstance(exc, kind)), None)
    plain = [row[0] for row in ROWS if not isinstance(row[0], Error)]
    assert {first_row(exc) for exc in plain} - {None} == {kind for kind, *_ in ERROR_TABLE}
    for exc, code, reason, err_domain in ROWS:
        if isinstance(exc, Error):
            assert classify(exc) == (code, reason, err_domain)


@pytest.mark.parametrize("exc,code,reason,err_domain", ROWS, ids=lambda v: type(v).__name__ if isinstance(v, Exception) else None)
def test_each_row_maps_the_same_way_on_unary_and_streaming_rpcs(generator, domain, monkeypatch, exc, code, reason,
                                                                 err_domain):
    def boom(*a, **k):
        raise exc
    monkeypatch.setattr(domain, "list_layers", boom)
    monkeypatch.setattr(domain, "rewrite", boom)
    unary = fails(generator.ListLayers, gen.ListLayersRequest(model="tiny"))
    stream = fails(lambda r, timeout: list(generator.Rewrite(r, timeout=timeout)),
                   gen.RewriteRequest(model="tiny", spec=spec_pb()))
    for err in (unary, stream):
        info = error_info(err)
        assert (err.code(), info.reason, info.domain) == (code, reason, err_domain)
    if code is grpc.StatusCode.INTERNAL:
        assert unary.details() == GENERIC_INTERNAL and "secret" not in str(unary.trailing_metadata())
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        assert detail(unary, error_details_pb2.BadRequest).field_violations
    monkeypatch.undo()
    still_serving(generator)


def test_unknown_model_is_not_found_with_its_reason(generator, registry):
    err = fails(generator.Sample, gen.SampleRequest(model="nope", seeds=[1]))
    info = error_info(err)
    assert err.code() == grpc.StatusCode.NOT_FOUND and info.reason == "MODEL_NOT_FOUND"
    assert info.domain == "registry.rulewright.dev" and info.metadata["model"] == "nope"
    err = fails(registry.GetVersion, reg.GetVersionRequest(name="models/tiny/versions/9"))
    assert err.code() == grpc.StatusCode.NOT_FOUND and error_info(err).reason == "VERSION_NOT_FOUND"
    still_serving(generator)


def test_bad_spec_field_is_named_as_the_request_spells_it(generator):
    spec = spec_pb()
    spec.paste[0].box[2] = 99                    # x1
    err = fails(lambda r, timeout: list(generator.Rewrite(r, timeout=timeout)), gen.RewriteRequest(model="tiny", spec=spec))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = detail(err, error_details_pb2.BadRequest).field_violations
    assert [v.field for v in violations] == ["spec.paste[0].box"] and "x1" in violations[0].description
    spec = spec_pb()
    spec.paste[0].mask.CopyFrom(images_pb2.Mask(encoding=images_pb2.Mask.ENCODING_RAW, width=32, height=32, data=b"x"))
    err = fails(lambda r, timeout: list(generator.Rewrite(r, timeout=timeout)), gen.RewriteRequest(model="tiny", spec=spec))
    assert detail(err, error_details_pb2.BadRequest).field_violations[0].field == "spec.paste[0].mask.data"
    still_serving(generator)


def test_bad_sample_requests_name_their_fields(generator):
    err = fails(generator.Sample, gen.SampleRequest(model="tiny"))
    assert detail(err, error_details_pb2.BadRequest).field_violations[0].field == "seeds"
    err = fails(generator.Sample, gen.SampleRequest(model="tiny", latents=gen.Latents(count=1, dim=3, values=[0, 0, 0])))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert detail(err, error_details_pb2.BadRequest).field_violations[0].field == "latents"
    err = fails(generator.Sample, gen.SampleRequest(model="Not A Ref!", seeds=[1]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and error_info(err).reason == "INVALID_REFERENCE"
    assert detail(err, error_details_pb2.BadRequest).field_violations[0].field == "model"
    still_serving(generator)


def test_set_alias_with_a_stale_expectation_is_aborted_naming_the_current_version(generator, registry):
    err = fails(registry.SetAlias, reg.SetAliasRequest(name="models/tiny/aliases/production", version=1,
                                                       expected_version=7))
    info = error_info(err)
    assert err.code() == grpc.StatusCode.ABORTED and info.reason == "ALIAS_CONFLICT"
    assert info.metadata["current_version"] == "1"
    still_serving(generator)
