"""TLS material of a mesh: a development CA, the hub's certificate, and edges' HTTP ones.

``tandem mesh init --tls-host`` writes the CA and the hub's certificate when the
operator has no PKI of their own; nodes then trust the hub with ``--nats-tls-ca
DIR/tls/ca.pem``. ``tandem mesh issue-cert`` signs more server certificates with the
same CA, for an edge's HTTPS API (``tandem edge serve --tls-certfile``); its clients
trust the same ``ca.pem``. An operator with certificates of their own points the hub's
``tls`` block (the nats-server documentation's ``cert_file`` / ``key_file``) and the
edges' ``--tls-certfile`` / ``--tls-keyfile`` at them instead.

Layout of ``DIR/tls``::

    ca.pem, ca-key.pem          the dev CA (its key mode 0600: it signs whatever is issued)
    hub.pem, hub-key.pem        the hub's certificate (tandem mesh init --tls-host)
    NAME-http.pem, -key.pem     edge NAME's HTTPS certificate (tandem mesh issue-cert)
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

_VALID_DAYS = 825  # what browsers accept for a leaf certificate; renew by re-issuing
_CA_NAME = "Tandem mesh dev CA"


@dataclass(frozen=True)
class HubTls:
    """Where a hub's TLS files are."""

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class ServerTls:
    """Where one server's certificate and private key are."""

    cert: Path
    key: Path


def write_dev_ca(directory: Path, hosts: list[str]) -> HubTls:
    """A new CA and a hub certificate for ``hosts`` (names or IPs) in ``directory``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _ca_certificate(ca_key)
    ca_file, ca_key_file = _ca_files(directory)
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_private(ca_key_file, ca_key)
    hub = issue_cert(directory, "hub", hosts)
    return HubTls(ca=ca_file, cert=hub.cert, key=hub.key)


def install_operator_tls(directory: Path, ca: Path, cert: Path, key: Path) -> HubTls:
    """The operator's own CA and hub certificate (``tandem mesh init --tls-ca/--tls-cert/
    --tls-key``), checked and copied into ``directory`` as the dev CA's files would be, so
    that bundles carry the CA and the hub's config names files inside the mesh directory.
    ValueError naming the file that is missing or not PEM, or a key that is not the
    certificate's."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    def read(path: Path, what: str) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc

    try:
        ca_pem, cert_pem, key_pem = read(ca, "CA"), read(cert, "certificate"), read(key, "key")
        x509.load_pem_x509_certificates(ca_pem)
        hub = x509.load_pem_x509_certificate(cert_pem)
        hub_key = serialization.load_pem_private_key(key_pem, password=None)
    except ValueError as exc:
        raise ValueError(f"TLS files {ca}, {cert}, {key}: not usable PEM ({exc})") from exc
    public = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if hub.public_key().public_bytes(*public) != hub_key.public_key().public_bytes(*public):
        raise ValueError(f"the key {key} is not the key of the certificate {cert}")
    directory.mkdir(parents=True, exist_ok=True)
    files = HubTls(ca=_ca_files(directory)[0], cert=directory / "hub.pem",
                   key=directory / "hub-key.pem")  # fmt: skip
    files.ca.write_bytes(ca_pem)
    files.cert.write_bytes(cert_pem)
    fd = os.open(files.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    return files


def issue_cert(
    directory: Path, stem: str, hosts: list[str], *, valid_days: float = _VALID_DAYS
) -> ServerTls:
    """A server certificate for ``hosts`` (names or IPs) signed by the dev CA in
    ``directory``: ``STEM.pem`` and ``STEM-key.pem`` there (replaced if present).

    ``valid_days`` from now; zero or less issues a certificate that has already expired
    (how the tests check that nodes refuse one)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise ValueError("a server certificate needs at least one host name or address")
    ca, ca_key = _load_ca(directory)
    now = datetime.datetime.now(datetime.UTC)
    not_after = now + datetime.timedelta(days=valid_days)
    # Five minutes of slack for clocks behind ours; an expired one began a day before.
    not_before = min(now - datetime.timedelta(minutes=5), not_after - datetime.timedelta(days=1))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = ServerTls(cert=directory / f"{stem}.pem", key=directory / f"{stem}-key.pem")
    _write_private(files.key, key)
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files


def _ca_files(directory: Path) -> tuple[Path, Path]:
    return directory / "ca.pem", directory / "ca-key.pem"


def _ca_certificate(ca_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _CA_NAME)])
    usage = x509.KeyUsage(
        digital_signature=False, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from mesh.security import MeshConfigError

    ca_file, ca_key_file = _ca_files(directory)
    if not ca_file.exists() or not ca_key_file.exists():
        raise MeshConfigError(
            f"no dev CA with its key in {directory}: tandem mesh init --tls-host makes one "
            "(meshes made before issue-cert did not keep the CA's key)"
        )
    key = serialization.load_pem_private_key(ca_key_file.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey), "the dev CA's key is an EC key"
    return x509.load_pem_x509_certificate(ca_file.read_bytes()), key


def _names(hosts: list[str]) -> list[x509.GeneralName]:
    from cryptography import x509

    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """A private key, readable by its owner only from the first byte on (mode 0600)."""
    from cryptography.hazmat.primitives import serialization

    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fresh = path.with_name(f".{path.name}.new")
    fresh.unlink(missing_ok=True)
    fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.replace(fresh, path)
