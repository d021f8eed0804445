"""Bearer-token auth over a real channel: UNAUTHENTICATED without a (known) token,
PERMISSION_DENIED for too weak a role, the principal recorded as author, health open, the
loopback rule, token parsing, and no token in the logs."""

from __future__ import annotations

import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rulewright.service import cli
from rulewright.service.server import auth
from rulewright.service.domain.requests import RewriteRequest
from rulewright.service.server.app import JsonFormatter, create_server
from rulewright.v1 import generator_service_pb2 as gen, generator_service_pb2_grpc as gen_grpc
from rulewright.v1 import registry_service_pb2 as reg, registry_service_pb2_grpc as reg_grpc

from .conftest import SPEC, error_info
from .test_generator import spec_pb

READER, EDITOR, ADMIN = "rd-7f3a9c0e51", "ed-0b6d2e8f44", "ad-9e1c5a7b23"
TOKENS_TEXT = f"""# token role principal
{READER} reader alice
{EDITOR} editor bob   # trailing comment
{ADMIN} admin carol
"""


@pytest.fixture
def secured(domain):
    server, port = create_server(domain, tokens=auth.parse_tokens(TOKENS_TEXT))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield gen_grpc.GeneratorServiceStub(ch), reg_grpc.RegistryServiceStub(ch), ch
    server.stop(0).wait()


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def fail(call, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        result = call(*args, **kw)
        if hasattr(result, "__iter__") and not hasattr(result, "SerializeToString"):
            list(result)
    return err.value


SAMPLE = gen.SampleRequest(model="tiny", seeds=[0])


def test_no_token_is_unauthenticated(secured):
    generator, registry, _ = secured
    err = fail(generator.Sample, SAMPLE, timeout=30)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and error_info(err).reason == "TOKEN_MISSING"
    err = fail(generator.Rewrite, gen.RewriteRequest(model="tiny", spec=spec_pb()), timeout=30)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    err = fail(registry.ListModels, reg.ListModelsRequest(), timeout=30,
               metadata=(("authorization", f"Basic {READER}"),))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


def test_unknown_token_is_unauthenticated(secured):
    generator, registry, _ = secured
    err = fail(generator.Sample, SAMPLE, timeout=30, metadata=bearer("not-a-token"))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    info = error_info(err)
    assert info.reason == "TOKEN_INVALID" and info.domain == "rulewright.dev"
    err = fail(registry.ListModels, reg.ListModelsRequest(), timeout=30, metadata=bearer(READER + "x"))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


def test_reader_samples_but_may_not_rewrite(secured):
    generator, registry, _ = secured
    assert generator.Sample(SAMPLE, timeout=30, metadata=bearer(READER)).version == "models/tiny/versions/1"
    assert registry.ListModels(reg.ListModelsRequest(), timeout=30, metadata=bearer(READER)).models
    err = fail(generator.Rewrite, gen.RewriteRequest(model="tiny", spec=spec_pb()), timeout=30,
               metadata=bearer(READER))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    info = error_info(err)
    assert info.reason == "ROLE_INSUFFICIENT" and info.metadata["required_role"] == "editor"
    assert info.metadata["principal"] == "alice"
    err = fail(registry.SetAlias, reg.SetAliasRequest(name="models/tiny/aliases/x", version=1, expected_version=0),
               timeout=30, metadata=bearer(READER))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    err = fail(registry.ImportModel, iter([reg.ImportModelRequest()]), timeout=30, metadata=bearer(READER))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED                       # client streaming
    assert registry.ExportVersion(reg.ExportVersionRequest(name="models/tiny/versions/1"), timeout=30,
                                  metadata=bearer(READER)).next()                # server streaming
    versions = registry.ListVersions(reg.ListVersionsRequest(parent="models/tiny"), metadata=bearer(READER))
    assert [v.number for v in versions.versions] == [1]


def test_a_reader_exports_adapters_and_an_editor_imports_them(secured):
    _, registry, _ = secured
    err = fail(registry.ExportAdapter, reg.ExportAdapterRequest(name="models/tiny/versions/1"), timeout=30,
               metadata=bearer(READER))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and error_info(err).reason == "NOT_AN_EDIT"  # let in
    err = fail(registry.ImportAdapter, iter([reg.ImportAdapterRequest()]), timeout=30, metadata=bearer(READER))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and error_info(err).metadata["required_role"] == "editor"
    err = fail(registry.ImportAdapter, iter([reg.ImportAdapterRequest()]), timeout=30, metadata=bearer(EDITOR))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT                        # let in: no metadata sent


def test_editor_rewrites_as_its_principal_but_may_not_move_aliases(secured):
    generator, registry, _ = secured
    events = list(generator.Rewrite(gen.RewriteRequest(model="tiny", spec=spec_pb()), timeout=60,
                                    metadata=bearer(EDITOR)))
    result = events[-1].result
    assert result.version.name == "models/tiny/versions/2" and result.version.author == "bob"
    got = registry.GetVersion(reg.GetVersionRequest(name="models/tiny/versions/2"), metadata=bearer(EDITOR))
    assert got.author == "bob"
    err = fail(registry.SetAlias, reg.SetAliasRequest(name="models/tiny/aliases/production", version=2,
                                                      expected_version=1), timeout=30, metadata=bearer(EDITOR))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and error_info(err).metadata["required_role"] == "admin"


def test_admin_set_alias_records_the_principal(secured):
    generator, registry, _ = secured
    name = "models/tiny/aliases/staging"
    moved = registry.SetAlias(reg.SetAliasRequest(name=name, version=1, expected_version=0, reason="try"),
                              timeout=30, metadata=bearer(ADMIN))
    assert moved.version == 1
    moves = registry.ListAliasHistory(reg.ListAliasHistoryRequest(parent=name), metadata=bearer(READER)).moves
    assert [(m.to_version, m.author, m.reason) for m in moves] == [(1, "carol", "try")]
    assert generator.Sample(SAMPLE, timeout=30, metadata=bearer(ADMIN)).images   # admin includes reader


def test_rollback_alias_needs_the_role_set_alias_needs_and_records_the_principal(domain, secured):
    generator, registry, _ = secured
    assert auth.METHOD_ROLES["/rulewright.v1.RegistryService/RollbackAlias"] == \
        auth.METHOD_ROLES["/rulewright.v1.RegistryService/SetAlias"] == "admin"
    domain.rewrite(RewriteRequest("tiny/1", SPEC))
    name = "models/tiny/aliases/production"
    registry.SetAlias(reg.SetAliasRequest(name=name, version=2, expected_version=1), timeout=30,
                      metadata=bearer(ADMIN))
    for token in (READER, EDITOR):
        err = fail(registry.RollbackAlias, reg.RollbackAliasRequest(name=name), timeout=30, metadata=bearer(token))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_info(err).reason == "ROLE_INSUFFICIENT" and error_info(err).metadata["required_role"] == "admin"
    back = registry.RollbackAlias(reg.RollbackAliasRequest(name=name, reason="bad edit"), timeout=30,
                                  metadata=bearer(ADMIN))
    assert back.version == 1
    moves = registry.ListAliasHistory(reg.ListAliasHistoryRequest(parent=name), metadata=bearer(READER)).moves
    assert [(m.from_version, m.to_version, m.author, m.reason) for m in moves][-1] == (2, 1, "carol", "bad edit")


def test_health_needs_no_token(secured):
    *_, channel = secured
    r = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
    assert r.status == health_pb2.HealthCheckResponse.SERVING


def test_auth_off_only_on_loopback(domain):
    for address in ("127.0.0.1:50051", "localhost:1", "[::1]:50051", "127.0.0.2:9", "unix:/tmp/x.sock"):
        auth.check_auth_config(address, None)
    for address in ("0.0.0.0:50051", "[::]:50051", "10.1.2.3:50051", "example.com:443"):
        with pytest.raises(auth.AuthConfigError, match="without auth"):
            auth.check_auth_config(address, [])
        auth.check_auth_config(address, auth.parse_tokens(TOKENS_TEXT))
    with pytest.raises(auth.AuthConfigError):
        create_server(domain, address="0.0.0.0:0")


def test_serve_refuses_a_public_address_without_tokens(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RULEWRIGHT_TOKENS", raising=False)
    monkeypatch.delenv("RULEWRIGHT_TOKENS_FILE", raising=False)
    assert cli.main(["serve", "--data-dir", str(tmp_path / "d"), "--address", "0.0.0.0:0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refusing to serve 0.0.0.0:0 without auth" in err
    assert not (tmp_path / "d").exists()


def test_tokens_from_file_and_environment(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(TOKENS_TEXT)
    tokens = auth.tokens_from_env(None, {"RULEWRIGHT_TOKENS_FILE": str(path),
                                         "RULEWRIGHT_TOKENS": "t1 admin ops;t2 reader ci"})
    assert [(t.role, t.principal) for t in tokens] == [("reader", "alice"), ("editor", "bob"), ("admin", "carol"),
                                                       ("admin", "ops"), ("reader", "ci")]
    assert READER not in repr(tokens)
    with pytest.raises(auth.AuthConfigError, match="entry 1: unknown role") as err:
        auth.parse_tokens("sekrit-xyz root me")
    assert "sekrit-xyz" not in str(err.value)
    with pytest.raises(auth.AuthConfigError, match="entry 2"):
        auth.parse_tokens("a reader x\nb editor")
    with pytest.raises(auth.AuthConfigError, match="twice"):
        auth.load_tokens(text="a reader x;a admin y")
    with pytest.raises(auth.AuthConfigError, match="cannot read"):
        auth.load_tokens(tmp_path / "missing")


def test_tokens_never_appear_in_logs(secured, caplog):
    generator, registry, _ = secured
    caplog.set_level(logging.DEBUG)
    generator.Sample(SAMPLE, timeout=30, metadata=bearer(READER))
    fail(generator.Sample, SAMPLE, timeout=30, metadata=bearer("unknown-tok-55"))
    fail(generator.Rewrite, gen.RewriteRequest(model="tiny", spec=spec_pb()), timeout=30, metadata=bearer(READER))
    fail(registry.DeleteModel, reg.DeleteModelRequest(name="models/tiny"), timeout=30, metadata=bearer(EDITOR))
    fail(generator.Sample, SAMPLE, timeout=30)
    text = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    assert "rpc_denied" in text and "ROLE_INSUFFICIENT" in text
    for secret in (READER, EDITOR, ADMIN, "unknown-tok-55"):
        assert secret not in text
