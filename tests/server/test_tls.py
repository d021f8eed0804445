"""TLS and mutual TLS over real loopback channels: trusted, plaintext, untrusted-CA and missing or
foreign client certificates, bearer tokens over TLS, and the configuration errors."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rulewright.service.server import auth
from rulewright.service.server.app import create_server
from rulewright.service.server.tls import TlsConfigError, TlsFiles, channel_credentials, server_credentials
from rulewright.v1 import generator_service_pb2 as gen, generator_service_pb2_grpc as gen_grpc
from tests.certs import write_pki

from .conftest import error_info

LAYERS = gen.ListLayersRequest(model="tiny")
READER = "rd-tls-4c1e9a"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return write_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def serve(domain):
    """Start servers with the given credentials (and tokens); stop them all afterwards."""
    servers = []

    def start(credentials, tokens=None) -> int:
        server, port = create_server(domain, credentials=credentials, tokens=tokens)
        servers.append(server)
        return port
    yield start
    for server in servers:
        server.stop(0).wait()


def list_layers(port: int, creds: grpc.ChannelCredentials | None, host: str = "localhost", metadata=None):
    """One ListLayers call over a fresh channel (secure when ``creds`` is given)."""
    target = f"{host}:{port}"
    with (grpc.secure_channel(target, creds) if creds else grpc.insecure_channel(target)) as ch:
        return gen_grpc.GeneratorServiceStub(ch).ListLayers(LAYERS, timeout=10, metadata=metadata)


def refused(port: int, creds: grpc.ChannelCredentials | None, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        list_layers(port, creds, **kw)
    return err.value


def tls(pki) -> TlsFiles:
    return TlsFiles(str(pki.server_cert), str(pki.server_key))


def test_tls_client_trusting_the_ca_is_served(pki, serve):
    port = serve(server_credentials(tls(pki)))
    reply = list_layers(port, channel_credentials(str(pki.ca)))
    assert reply.version == "models/tiny/versions/1" and reply.layers
    # 127.0.0.1 verifies against the IP SAN; PEM bytes work as well as paths.
    assert list_layers(port, channel_credentials(pki.ca.read_bytes()), host="127.0.0.1").layers
    with grpc.secure_channel(f"localhost:{port}", channel_credentials(pki.ca)) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_client_is_refused_by_a_tls_server(pki, serve):
    port = serve(server_credentials(tls(pki)))
    assert refused(port, None).code() == grpc.StatusCode.UNAVAILABLE


def test_client_trusting_another_ca_is_refused(pki, serve):
    port = serve(server_credentials(tls(pki)))
    assert refused(port, channel_credentials(pki.other_ca)).code() == grpc.StatusCode.UNAVAILABLE


def test_tls_client_is_refused_by_a_plaintext_server(serve):
    port = serve(None)
    assert list_layers(port, None).layers                          # the server itself is fine
    # No certificate is needed to fail: the handshake never starts.
    creds = grpc.ssl_channel_credentials()
    assert refused(port, creds).code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_needs_a_client_certificate_from_the_client_ca(pki, serve):
    files = TlsFiles(str(pki.server_cert), str(pki.server_key), str(pki.ca))
    assert files.enabled and files.mutual
    port = serve(server_credentials(files))
    assert list_layers(port, channel_credentials(pki.ca, pki.client_cert, pki.client_key)).layers
    assert refused(port, channel_credentials(pki.ca)).code() == grpc.StatusCode.UNAVAILABLE
    foreign = channel_credentials(pki.ca, pki.other_client_cert, pki.other_client_key)
    assert refused(port, foreign).code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_trusts_the_client_ca_not_the_servers_own_ca(pki, serve):
    port = serve(server_credentials(TlsFiles(str(pki.server_cert), str(pki.server_key), str(pki.other_ca))))
    assert list_layers(port, channel_credentials(pki.ca, pki.other_client_cert, pki.other_client_key)).layers
    own_ca = channel_credentials(pki.ca, pki.client_cert.read_bytes(), pki.client_key.read_bytes())
    assert refused(port, own_ca).code() == grpc.StatusCode.UNAVAILABLE


def test_bearer_tokens_still_apply_over_tls(pki, serve):
    port = serve(server_credentials(tls(pki)), tokens=auth.parse_tokens(f"{READER} reader alice"))
    creds = channel_credentials(pki.ca)
    assert list_layers(port, creds, metadata=(("authorization", f"Bearer {READER}"),)).layers
    err = refused(port, creds)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and error_info(err).reason == "TOKEN_MISSING"
    err = refused(port, creds, metadata=(("authorization", "Bearer nope"),))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and error_info(err).reason == "TOKEN_INVALID"


def test_no_files_means_plaintext():
    files = TlsFiles()
    assert not files.enabled and not files.mutual
    assert server_credentials(files) is None


def test_half_configured_pairs_name_the_missing_setting(pki):
    with pytest.raises(TlsConfigError, match="--tls-key / RULEWRIGHT_TLS_KEY is not") as err:
        server_credentials(TlsFiles(cert=str(pki.server_cert)))
    assert "--tls-cert / RULEWRIGHT_TLS_CERT is set" in str(err.value)
    with pytest.raises(TlsConfigError, match="--tls-cert / RULEWRIGHT_TLS_CERT is not"):
        server_credentials(TlsFiles(key=str(pki.server_key)))
    with pytest.raises(TlsConfigError, match="--tls-client-ca / RULEWRIGHT_TLS_CLIENT_CA needs a server cert"):
        server_credentials(TlsFiles(client_ca=str(pki.ca)))
    assert not TlsFiles(client_ca=str(pki.ca)).mutual
    with pytest.raises(TlsConfigError, match="go together"):
        channel_credentials(pki.ca, cert=pki.client_cert)


def test_unreadable_and_non_pem_files_are_named(pki, tmp_path):
    missing = tmp_path / "missing.key"
    with pytest.raises(TlsConfigError, match="RULEWRIGHT_TLS_KEY: cannot read") as err:
        server_credentials(TlsFiles(str(pki.server_cert), str(missing)))
    assert str(missing) in str(err.value)
    with pytest.raises(TlsConfigError, match="RULEWRIGHT_TLS_CLIENT_CA: cannot read"):
        server_credentials(TlsFiles(str(pki.server_cert), str(pki.server_key), str(missing)))

    der = tmp_path / "server.der"
    der.write_bytes(b"\x30\x82\x01\x0a not pem at all")
    with pytest.raises(TlsConfigError, match=r"RULEWRIGHT_TLS_CERT: .*server\.der.* is not PEM") as err:
        server_credentials(TlsFiles(str(der), str(pki.server_key)))
    assert "--tls-cert" in str(err.value)
    # Swapped files are PEM, but of the wrong kind.
    with pytest.raises(TlsConfigError, match="RULEWRIGHT_TLS_CERT: .* no PEM CERTIFICATE block"):
        server_credentials(TlsFiles(str(pki.server_key), str(pki.server_cert)))
    with pytest.raises(TlsConfigError, match="RULEWRIGHT_TLS_CLIENT_CA: .* no PEM CERTIFICATE block"):
        server_credentials(TlsFiles(str(pki.server_cert), str(pki.server_key), str(pki.client_key)))
    with pytest.raises(TlsConfigError, match="CA certificate is not PEM"):
        channel_credentials(b"garbage")


def test_files_from_the_environment(monkeypatch):
    env = {"RULEWRIGHT_TLS_CERT": "/etc/rw/tls.crt", "RULEWRIGHT_TLS_KEY": "/etc/rw/tls.key",
           "RULEWRIGHT_TLS_CLIENT_CA": "/etc/rw/clients.pem", "OTHER": "x"}
    assert TlsFiles.from_env(env) == TlsFiles("/etc/rw/tls.crt", "/etc/rw/tls.key", "/etc/rw/clients.pem")
    assert TlsFiles.from_env({"RULEWRIGHT_TLS_CERT": "", "RULEWRIGHT_TLS_KEY": ""}) == TlsFiles()
    for name in ("RULEWRIGHT_TLS_CERT", "RULEWRIGHT_TLS_KEY", "RULEWRIGHT_TLS_CLIENT_CA"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RULEWRIGHT_TLS_CERT", "/srv/cert.pem")
    files = TlsFiles.from_env()
    assert files == TlsFiles(cert="/srv/cert.pem") and files.enabled and not files.mutual
