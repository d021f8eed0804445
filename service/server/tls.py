"""Optional TLS and mutual TLS for the gRPC server, from PEM files.

- ``TlsConfigError``: a TLS setting that cannot work; the message names the flag and variable.
- ``TlsFiles(cert, key, client_ca)``: the three paths; ``TlsFiles.from_env()`` reads
  ``RULEWRIGHT_TLS_CERT``, ``RULEWRIGHT_TLS_KEY`` and ``RULEWRIGHT_TLS_CLIENT_CA``.
- ``server_credentials(files)``: ``grpc.ServerCredentials`` for ``create_server`` (None: plaintext);
  with a client CA every client must present a certificate it signed (mTLS).
- ``channel_credentials(ca, cert, key)``: the matching client side, from paths or PEM bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import grpc

CERT = "--tls-cert / RULEWRIGHT_TLS_CERT"
KEY = "--tls-key / RULEWRIGHT_TLS_KEY"
CLIENT_CA = "--tls-client-ca / RULEWRIGHT_TLS_CLIENT_CA"
_ENV = {"cert": "RULEWRIGHT_TLS_CERT", "key": "RULEWRIGHT_TLS_KEY", "client_ca": "RULEWRIGHT_TLS_CLIENT_CA"}

PemSource = str | os.PathLike | bytes


class TlsConfigError(ValueError):
    """A TLS setting that cannot work: a half-configured pair, an unreadable or non-PEM file."""


@dataclass(frozen=True)
class TlsFiles:
    cert: str | None = None          # server certificate chain (PEM), leaf first
    key: str | None = None           # its private key (PEM)
    client_ca: str | None = None     # CA bundle (PEM) client certificates must chain to; set: mTLS

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TlsFiles:
        """The paths in ``RULEWRIGHT_TLS_CERT``, ``_KEY`` and ``_CLIENT_CA``; empty counts as unset."""
        environ = os.environ if environ is None else environ
        return cls(**{field: environ.get(name) or None for field, name in _ENV.items()})

    @property
    def enabled(self) -> bool:
        """Whether a certificate or key is configured (TLS on, or a config error)."""
        return bool(self.cert or self.key)

    @property
    def mutual(self) -> bool:
        """Whether clients must present a certificate signed by ``client_ca``."""
        return self.enabled and bool(self.client_ca)


def _read(path: str | os.PathLike, what: str, marker: str) -> bytes:
    """The bytes of ``path``, which must hold a PEM block whose type ends with ``marker``."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"{what}: cannot read {str(path)!r}: {exc.strerror or exc}") from None
    return _check_pem(data, f"{what}: {str(path)!r}", marker)


def _check_pem(data: bytes, what: str, marker: str) -> bytes:
    # gRPC reports a bad PEM only as a failed handshake (or an abort) much later; say it up front.
    if b"-----BEGIN" not in data:
        raise TlsConfigError(f"{what} is not PEM (no '-----BEGIN' line)")
    # Catches the commonest mix-up, a key passed as the certificate or the other way round.
    if f"{marker}-----".encode() not in data:
        raise TlsConfigError(f"{what} holds no PEM {marker.strip()} block")
    return data


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials | None:
    """TLS (mTLS with a client CA) credentials for ``create_server``; None when TLS is off."""
    if not files.enabled:
        if files.client_ca:
            raise TlsConfigError(f"{CLIENT_CA} needs a server certificate: set {CERT} and {KEY} too")
        return None
    if not files.cert:
        raise TlsConfigError(f"{KEY} is set but {CERT} is not: TLS needs both")
    if not files.key:
        raise TlsConfigError(f"{CERT} is set but {KEY} is not: TLS needs both")
    cert = _read(files.cert, CERT, "CERTIFICATE")
    key = _read(files.key, KEY, "PRIVATE KEY")
    if not files.client_ca:
        return grpc.ssl_server_credentials([(key, cert)])
    client_ca = _read(files.client_ca, CLIENT_CA, "CERTIFICATE")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca, require_client_auth=True)


def _pem(source: PemSource | None, what: str, marker: str) -> bytes | None:
    """PEM bytes as given, or read from a path; None stays None."""
    if source is None:
        return None
    if isinstance(source, bytes):
        return _check_pem(source, what, marker)
    return _read(source, what, marker)


def channel_credentials(ca: PemSource, cert: PemSource | None = None,
                        key: PemSource | None = None) -> grpc.ChannelCredentials:
    """Client credentials trusting ``ca``, presenting ``cert``/``key`` for mTLS; paths or PEM bytes."""
    if (cert is None) != (key is None):
        raise TlsConfigError("a client certificate and its key go together: pass both or neither")
    return grpc.ssl_channel_credentials(root_certificates=_pem(ca, "CA certificate", "CERTIFICATE"),
                                        private_key=_pem(key, "client key", "PRIVATE KEY"),
                                        certificate_chain=_pem(cert, "client certificate", "CERTIFICATE"))
