"""The one module that touches private keys and signs: keys, CSRs, certificates.

Everything else in trustmesh handles PEM bytes and the small value types defined here.
Leaf certificates are built field by field from what the CA decided, never copied from
the CSR: the CSR contributes only its public key.
"""

from __future__ import annotations

import base64
import datetime as dt
import enum
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

MAX_PEM_BYTES = 64 * 1024
MIN_RSA_BITS = 2048
ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)


class KeyType(enum.Enum):
    EC_P256 = "ec-p256"
    RSA_2048 = "rsa-2048"
    RSA_4096 = "rsa-4096"


def generate_key(kind: KeyType = KeyType.EC_P256) -> PrivateKey:
    if kind is KeyType.EC_P256:
        return ec.generate_private_key(ec.SECP256R1())
    bits = 2048 if kind is KeyType.RSA_2048 else 4096
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def key_to_pem(key: PrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_key(pem: bytes) -> PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError("CA keys must be ECDSA or RSA")
    return key


def generate_token_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def load_token_key(pem: bytes) -> ed25519.Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError("the token signing key must be Ed25519")
    return key


def _sign_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def key_pair_problem(key_pem: bytes, cert: x509.Certificate) -> str | None:
    """Why ``key_pem`` cannot serve ``cert`` (not a PEM key, another key), None if it can."""
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        return "is not an unencrypted PEM private key"
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        return "is neither an ECDSA nor an RSA key"
    if not public_keys_match(key, cert):
        return "is not the private key of the certificate"
    return None


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_certs(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


def build_csr(key: PrivateKey, uri_sans: Sequence[str], dns_sans: Sequence[str] = ()) -> bytes:
    """A PKCS#10 request as an agent sends it (``dns_sans`` exists for attack tests)."""
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uri_sans]
    names += [x509.DNSName(d) for d in dns_sans]
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, _sign_hash(key)).public_bytes(serialization.Encoding.PEM)


def build_ca_csr(key: PrivateKey) -> bytes:
    """A CSR asking for CA:true — only ever built to prove the CA refuses it."""
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )
    return builder.sign(key, _sign_hash(key)).public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True, slots=True)
class CsrInfo:
    """What the CA needs to judge a CSR; the public key is the only part it will use."""

    public_key: PublicKey
    public_key_der: bytes  # SubjectPublicKeyInfo, as a certificate carries it
    uri_sans: tuple[str, ...]
    other_sans: tuple[str, ...]
    requests_ca: bool
    key_problem: str | None


class CsrError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def inspect_csr(pem: bytes) -> CsrInfo:
    """Parse and check a CSR's signature; raises :class:`CsrError` on anything malformed."""
    if len(pem) > MAX_PEM_BYTES:
        raise CsrError("csr-too-large", f"CSR is {len(pem)} bytes, over {MAX_PEM_BYTES}")
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError as exc:
        raise CsrError("csr-malformed", f"not a PEM certificate request: {exc}") from None
    try:
        key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CsrError("weak-key", f"unsupported public key: {exc}") from None
    if not _signature_valid(csr, key):
        raise CsrError("csr-bad-signature", "CSR signature does not verify")
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise CsrError("weak-key", f"unsupported key type {type(key).__name__}")
    uris: list[str] = []
    others: list[str] = []
    requests_ca = False
    for extension in csr.extensions:
        value = extension.value
        if isinstance(value, x509.SubjectAlternativeName):
            for name in value:
                if isinstance(name, x509.UniformResourceIdentifier):
                    uris.append(name.value)
                else:
                    others.append(f"{type(name).__name__}:{name.value}")
        elif isinstance(value, x509.BasicConstraints) and value.ca:
            requests_ca = True
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return CsrInfo(key, spki, tuple(uris), tuple(others), requests_ca, _key_problem(key))


# ECDSA signature algorithms a CSR may carry, with the digest each implies (RFC 5758).
_ECDSA_CSR_ALGORITHMS: dict[x509.ObjectIdentifier, ec.ECDSA] = {
    x509.oid.SignatureAlgorithmOID.ECDSA_WITH_SHA256: ec.ECDSA(hashes.SHA256()),
    x509.oid.SignatureAlgorithmOID.ECDSA_WITH_SHA384: ec.ECDSA(hashes.SHA384()),
    x509.oid.SignatureAlgorithmOID.ECDSA_WITH_SHA512: ec.ECDSA(hashes.SHA512()),
}


def _signature_valid(csr: x509.CertificateSigningRequest, key: object) -> bool:
    """The CSR's self-signature checks out. An ECDSA-signed CSR of an EC key (every
    agent's) is verified with ``key``, already parsed (``is_signature_valid`` would parse
    it a second time: ~25 µs of a ~100 µs check); anything else by ``cryptography``."""
    algorithm = _ECDSA_CSR_ALGORITHMS.get(csr.signature_algorithm_oid)
    try:
        if algorithm is not None and isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(csr.signature, csr.tbs_certrequest_bytes, algorithm)
            return True
        return bool(csr.is_signature_valid)
    except (InvalidSignature, ValueError, TypeError):
        return False


def _key_problem(key: PublicKey) -> str | None:
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            return f"RSA key of {key.key_size} bits (minimum {MIN_RSA_BITS})"
        return None
    if not isinstance(key.curve, ALLOWED_CURVES):
        return f"unsupported curve {key.curve.name}"
    return None


def self_signed_root(
    key: PrivateKey,
    *,
    trust_domain: str,
    organization: str,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, f"trustmesh root {trust_domain}"),
        ]
    )
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, _sign_hash(key))
    )


def sign_leaf(
    *,
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    public_key: PublicKey,
    uri: str,
    not_before: dt.datetime,
    not_after: dt.datetime,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    serial: int | None = None,
) -> x509.Certificate:
    """A workload (or CA server) leaf: SAN = exactly what the CA decided."""
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
    names += [x509.DNSName(d) for d in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ip_addresses]
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        # An empty subject requires the SAN extension to be critical (RFC 5280 4.2.1.6).
        .add_extension(x509.SubjectAlternativeName(names), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, _sign_hash(ca_key))
    )


# --- workload leaves without the builder ---------------------------------------------------
#
# A workload leaf differs from the next one only in its serial, validity, public key and
# URI SAN; everything else (issuer, algorithm, four of five extensions) is fixed by the
# signing certificate. LeafSigner encodes those parts once and assembles each
# TBSCertificate from bytes: the same DER, byte for byte, that sign_leaf() builds (a test
# compares them), at a fraction of the cost.


def _der(tag: int, body: bytes) -> bytes:
    size = len(body)
    if size < 0x80:
        return bytes((tag, size)) + body
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(length))) + length + body


def _seq(*parts: bytes) -> bytes:
    return _der(0x30, b"".join(parts))


def _oid(dotted: str) -> bytes:
    first, second, *rest = (int(arc) for arc in dotted.split("."))
    body = bytearray()
    for arc in (first * 40 + second, *rest):
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(reversed(chunk))
    return _der(0x06, bytes(body))


def _time(when: dt.datetime) -> bytes:
    # RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050; whole seconds.
    when = when.astimezone(dt.UTC)
    if when.year < 2050:
        return _der(0x17, when.strftime("%y%m%d%H%M%SZ").encode())
    return _der(0x18, when.strftime("%Y%m%d%H%M%SZ").encode())


def _extension(value: x509.ExtensionType, critical: bool) -> bytes:
    flag = b"\x01\x01\xff" if critical else b""  # DER omits the FALSE default
    return _seq(_oid(value.oid.dotted_string), flag, _der(0x04, value.public_bytes()))


_SAN_OID = _oid(x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME.dotted_string)


class LeafSigner:
    """Signs workload leaves (one URI SAN) for one signing key and certificate."""

    def __init__(self, ca_key: PrivateKey, ca_cert: x509.Certificate) -> None:
        self._key = ca_key
        digest = _sign_hash(ca_key)
        if isinstance(ca_key, ec.EllipticCurvePrivateKey):
            oid = (
                "1.2.840.10045.4.3.3"
                if isinstance(digest, hashes.SHA384)
                else "1.2.840.10045.4.3.2"
            )
            self._algorithm = _seq(_oid(oid))  # ecdsa-with-SHA256/384: no parameters
        else:
            self._algorithm = _seq(_oid("1.2.840.113549.1.1.11"), b"\x05\x00")  # sha256WithRSA
        self._digest = digest
        self._ecdsa = ec.ECDSA(digest)
        self._head = _der(0xA0, _der(0x02, b"\x02"))  # version v3
        self._issuer = ca_cert.subject.public_bytes()
        usage = x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=True,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=False,
            crl_sign=False,
            encipher_only=False,
            decipher_only=False,
        )
        eku = x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        )
        self._before_san = b"".join(
            (
                _extension(x509.BasicConstraints(ca=False, path_length=None), critical=True),
                _extension(usage, critical=True),
                _extension(eku, critical=False),
            )
        )
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())  # type: ignore[arg-type]
        self._after_san = _extension(aki, critical=False)

    def tbs(
        self,
        serial: int,
        public_key_der: bytes,
        uri: str,
        not_before: dt.datetime,
        not_after: dt.datetime,
    ) -> bytes:
        """The TBSCertificate DER: what :func:`sign_leaf` signs for the same inputs."""
        san = _seq(_der(0x86, uri.encode("ascii")))  # uniformResourceIdentifier [6] IA5String
        extensions = _der(
            0xA3,
            _seq(
                self._before_san, _seq(_SAN_OID, b"\x01\x01\xff", _der(0x04, san)), self._after_san
            ),
        )
        return _seq(
            self._head,
            _der(0x02, serial.to_bytes(serial.bit_length() // 8 + 1, "big")),
            self._algorithm,
            self._issuer,
            _seq(_time(not_before), _time(not_after)),
            b"\x30\x00",  # empty subject: the identity is the SAN (critical, RFC 5280)
            public_key_der,
            extensions,
        )

    def sign_leaf_pem(
        self, public_key_der: bytes, *, uri: str, not_before: dt.datetime, not_after: dt.datetime
    ) -> tuple[int, str]:
        """(serial, certificate PEM) for a leaf whose only SAN is ``uri``."""
        serial = int.from_bytes(os.urandom(20), "big") >> 1  # as x509.random_serial_number
        while not serial:
            serial = int.from_bytes(os.urandom(20), "big") >> 1
        tbs = self.tbs(serial, public_key_der, uri, not_before, not_after)
        if isinstance(self._key, ec.EllipticCurvePrivateKey):
            signature = self._key.sign(tbs, self._ecdsa)
        else:
            signature = self._key.sign(tbs, padding.PKCS1v15(), self._digest)
        der = _seq(tbs, self._algorithm, _der(0x03, b"\x00" + signature))
        text = base64.encodebytes(der).decode().replace("\n", "")
        lines = "\n".join(text[i : i + 64] for i in range(0, len(text), 64))
        return serial, f"-----BEGIN CERTIFICATE-----\n{lines}\n-----END CERTIFICATE-----\n"


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def issued_by(leaf: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Issuer name and key identifiers agree (the signature was checked by TLS)."""
    if leaf.issuer != issuer.subject:
        return False
    try:
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        # no key identifiers to compare (e.g. a plug-in intermediate): check the signature
        try:
            leaf.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True
    return aki.key_identifier == ski.digest


def public_keys_match(key: PrivateKey, cert: x509.Certificate) -> bool:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    return bool(key.public_key().public_bytes(enc, fmt) == cert.public_key().public_bytes(enc, fmt))


def verify_client_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    now: dt.datetime,
) -> None:
    """RFC 5280 path validation of a client certificate; raises ValueError if it fails."""
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    verifier = PolicyBuilder().store(Store(list(roots))).time(now).build_client_verifier()
    try:
        verifier.verify(leaf, list(intermediates))
    except VerificationError as exc:
        raise ValueError(f"client certificate does not verify: {exc}") from None
