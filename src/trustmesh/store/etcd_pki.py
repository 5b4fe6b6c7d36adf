"""etcd's own PKI, separate from the mesh CA (as kubeadm's ``/etc/kubernetes/pki/etcd``).

etcd serves clients and peers over TLS and requires a client certificate signed by this
CA (``--client-cert-auth``, ``--peer-client-cert-auth``). Only the members, the
control-plane replicas and the operator (``up``, ``status``, ``apply --state``) get one;
hosts and pods never do (a host joins through a replica's Registry with a node token).

Layout of ``DIR`` (0700; every key created 0600 by ``os.open``, never readable by
others, not even for an instant)::

    ca.crt  ca.key                 the etcd CA (EC P-256, 10 years)
    member-NAME.crt/.key           a member: serverAuth + clientAuth (peers), IP SANs
    client-NAME.crt/.key           a client: clientAuth only (a replica, the operator)
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["EtcdPki", "PkiFiles"]

CA_DAYS = 3650
LEAF_DAYS = 365


@dataclass(frozen=True, slots=True)
class PkiFiles:
    """A certificate, its key and the CA that verifies the other side."""

    ca: Path
    cert: Path
    key: Path


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with open(fd, "wb") as out:
        out.write(data)
    os.chmod(path, mode)  # an existing file keeps its old mode through os.open


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "trustmesh etcd"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


class EtcdPki:
    """The etcd CA in ``directory``: created once, then issues member and client certs."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca_cert_path = directory / "ca.crt"
        self.ca_key_path = directory / "ca.key"

    @classmethod
    def create(cls, directory: Path, now: dt.datetime | None = None) -> EtcdPki:
        """A new CA in ``directory`` (made 0700), or the one already there."""
        pki = cls(directory)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        if pki.ca_cert_path.exists() and pki.ca_key_path.exists():
            return pki
        now = now or dt.datetime.now(dt.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        name = _name("trustmesh-etcd-ca")
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        _write(pki.ca_key_path, _key_pem(key), 0o600)
        _write(pki.ca_cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return pki

    def _issue(
        self,
        stem: str,
        common_name: str,
        usages: Sequence[x509.ObjectIdentifier],
        ips: Sequence[str] = (),
        dns: Sequence[str] = (),
        now: dt.datetime | None = None,
    ) -> PkiFiles:
        now = now or dt.datetime.now(dt.UTC)
        ca_key = serialization.load_pem_private_key(self.ca_key_path.read_bytes(), None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        ca_cert = x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_encipherment=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    content_commitment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
        )
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        files = PkiFiles(
            self.ca_cert_path, self.directory / f"{stem}.crt", self.directory / f"{stem}.key"
        )
        _write(files.key, _key_pem(key), 0o600)
        _write(files.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return files

    def member(self, name: str, ips: Sequence[str]) -> PkiFiles:
        """A member's certificate: it serves clients and peers and dials its peers."""
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        return self._issue(f"member-{name}", f"etcd-{name}", usages, ips, ["localhost"])

    def client(self, name: str) -> PkiFiles:
        """A client's certificate (a replica, the operator): clientAuth only."""
        return self._issue(f"client-{name}", name, [ExtendedKeyUsageOID.CLIENT_AUTH])
