"""TLS for the API and admin ports: server contexts, and a private CA for dev clusters.

Certificates and keys are PEM files named in the node config; private keys are
written readable by the owner only. The dev CA signs one certificate per node
(SAN: 127.0.0.1 and localhost) so SDKs can verify with `ca_bundle`.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class CertificatePaths:
    certificate: str
    key: str


def server_context(paths: CertificatePaths) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(paths.certificate, paths.key)
    return context


def certificate_expiry(path: str) -> float:
    with open(path, "rb") as handle:
        certificate = x509.load_pem_x509_certificate(handle.read())
    return certificate.not_valid_after_utc.timestamp()


def _write_key(path: str, key: ec.EllipticCurvePrivateKey) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _write_certificate(path: str, certificate: x509.Certificate) -> None:
    with open(path, "wb") as handle:
        handle.write(certificate.public_bytes(serialization.Encoding.PEM))


def make_ca(directory: str, days: int = 365) -> CertificatePaths:
    os.makedirs(directory, exist_ok=True)
    paths = CertificatePaths(os.path.join(directory, "ca.pem"),
                             os.path.join(directory, "ca-key.pem"))
    if os.path.exists(paths.certificate) and os.path.exists(paths.key):
        return paths
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kmsd dev CA")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256()))
    _write_key(paths.key, key)
    _write_certificate(paths.certificate, certificate)
    return paths


def make_node_certificate(ca: CertificatePaths, directory: str, name: str,
                          days: int = 90) -> CertificatePaths:
    paths = CertificatePaths(os.path.join(directory, "tls.pem"),
                             os.path.join(directory, "tls-key.pem"))
    with open(ca.certificate, "rb") as handle:
        ca_certificate = x509.load_pem_x509_certificate(handle.read())
    with open(ca.key, "rb") as handle:
        ca_key = serialization.load_pem_private_key(handle.read(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_certificate.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    _write_key(paths.key, key)
    _write_certificate(paths.certificate, certificate)
    return paths
