"""Throwaway PKI for the TLS tests: two CAs, a localhost server certificate, client certificates."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    """PEM file paths: ``ca`` signs the server and ``client``; ``other_ca`` signs ``other_client``."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path


def _name(cn: str) -> x509.Name:
    """A subject or issuer with just a common name."""
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _sign(builder: x509.CertificateBuilder, subject_key, issuer_key, issuer: str, cn: str) -> x509.Certificate:
    """``builder`` completed with names, a day either side of now, and signed by ``issuer_key``."""
    now = dt.datetime.now(dt.timezone.utc)
    return (builder.subject_name(_name(cn)).issuer_name(_name(issuer)).public_key(subject_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key.public_key()), critical=False)
            .sign(issuer_key, hashes.SHA256()))


def make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed P-256 CA that may sign leaf certificates."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder()
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True))
    return key, _sign(builder, key, key, cn, cn)


def make_leaf(ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], cn: str,
              server: bool) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A P-256 certificate signed by ``ca``: for localhost/127.0.0.1 serving, or client auth."""
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (x509.CertificateBuilder()
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    issuer = ca_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    return key, _sign(builder, key, ca_key, issuer, cn)


def _write(directory: Path, stem: str, key, cert: x509.Certificate) -> tuple[Path, Path]:
    """``stem.crt`` and ``stem.key`` (PKCS#8, unencrypted) in ``directory``."""
    crt, pem_key = directory / f"{stem}.crt", directory / f"{stem}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem_key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return crt, pem_key


def write_pki(directory: Path) -> Pki:
    """Generate both CAs and the three leaf certificates as PEM files in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, other_ca = make_ca("rulewright test CA"), make_ca("rulewright other CA")
    ca_crt, _ = _write(directory, "ca", *ca)
    other_ca_crt, _ = _write(directory, "other-ca", *other_ca)
    server_crt, server_key = _write(directory, "server", *make_leaf(ca, "localhost", server=True))
    client_crt, client_key = _write(directory, "client", *make_leaf(ca, "client", server=False))
    other_crt, other_key = _write(directory, "other-client", *make_leaf(other_ca, "intruder", server=False))
    return Pki(ca_crt, server_crt, server_key, client_crt, client_key, other_ca_crt, other_crt, other_key)
