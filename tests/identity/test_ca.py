"""The CA with real crypto: openssl accepts what it issues, and it refuses attacks."""

from __future__ import annotations

import datetime as dt
import os
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from trustmesh.identity import pki
from trustmesh.identity.ca import CaConfig, CertificateAuthority, IssueRejected
from trustmesh.identity.revocation import RevocationList
from trustmesh.identity.spiffe import SpiffeId
from trustmesh.identity.store import StoreError
from trustmesh.identity.tokens import TokenRejected, issue_token

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
SLEEP = SpiffeId("cluster.local", "foo", "sleep")


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca", CaConfig(), NOW)


def csr_for(identity: SpiffeId | None = SLEEP, key: pki.PrivateKey | None = None) -> bytes:
    return pki.build_csr(key or pki.generate_key(), [identity.uri] if identity else [])


def openssl_verify(chain_pem: tuple[str, ...], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    leaf, *middle, root = chain_pem
    (tmp_path / "leaf.pem").write_text(leaf)
    (tmp_path / "root.pem").write_text(root)
    (tmp_path / "untrusted.pem").write_text("".join(middle) or root)
    return subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(tmp_path / "root.pem"),
            "-untrusted",
            str(tmp_path / "untrusted.pem"),
            "-purpose",
            "sslclient",
            "-attime",
            str(int(NOW.timestamp())),
            str(tmp_path / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def test_issued_leaf_is_exactly_what_istio_issues(ca: CertificateAuthority, tmp_path: Path) -> None:
    issued = ca.issue(csr_for(), SLEEP, NOW)
    leaf = x509.load_pem_x509_certificate(issued.chain_pem[0].encode())
    assert pki.uri_sans(leaf) == [SLEEP.uri]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert len(list(san)) == 1
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment and not usage.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {o.dotted_string for o in eku} == {"1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"}
    assert leaf.not_valid_after_utc - NOW == dt.timedelta(hours=24)
    result = openssl_verify(issued.chain_pem, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    result = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(tmp_path / "root.pem"),
            "-purpose",
            "sslserver",
            "-attime",
            str(int(NOW.timestamp())),
            str(tmp_path / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout


def test_serials_are_random_and_ttl_is_capped(ca: CertificateAuthority) -> None:
    serials = {ca.issue(csr_for(), SLEEP, NOW).serial for _ in range(20)}
    assert len(serials) == 20 and min(serials).bit_length() > 100
    capped = ca.issue(csr_for(), SLEEP, NOW, ttl=dt.timedelta(days=400))
    assert capped.not_after - NOW == dt.timedelta(days=90)
    late = NOW + dt.timedelta(days=3650) - dt.timedelta(hours=1)
    near_end = ca.issue(csr_for(), SLEEP, late)
    assert near_end.not_after <= ca.active.cert.not_valid_after_utc


def test_csr_without_san_gets_the_callers_identity(ca: CertificateAuthority) -> None:
    issued = ca.issue(csr_for(None), SLEEP, NOW)
    assert pki.uri_sans(x509.load_pem_x509_certificate(issued.chain_pem[0].encode())) == [SLEEP.uri]


@pytest.mark.parametrize(
    ("csr", "code"),
    [
        (lambda: csr_for(SpiffeId("cluster.local", "foo", "admin")), "san-mismatch"),
        (lambda: pki.build_csr(pki.generate_key(), [SLEEP.uri], ["evil.example.com"]), "extra-san"),
        (lambda: pki.build_csr(pki.generate_key(), [SLEEP.uri, SLEEP.uri + "x"]), "san-mismatch"),
        (lambda: pki.build_ca_csr(pki.generate_key()), "csr-requests-ca"),
        (lambda: csr_for(key=rsa.generate_private_key(65537, 1024)), "weak-key"),
        (lambda: csr_for(key=ec.generate_private_key(ec.SECP224R1())), "weak-key"),
        (
            lambda: (
                b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
            ),
            "csr-malformed",
        ),
        (lambda: b"x" * 70_000, "csr-too-large"),
    ],
)
def test_bad_csrs_are_rejected_with_a_code(ca: CertificateAuthority, csr, code: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(IssueRejected) as caught:
        ca.issue(csr(), SLEEP, NOW)
    assert caught.value.code == code


def test_csr_with_a_forged_signature_is_rejected(ca: CertificateAuthority) -> None:
    good = x509.load_pem_x509_csr(csr_for())
    der = bytearray(good.public_bytes(pki.serialization.Encoding.DER))  # type: ignore[attr-defined]
    der[-5] ^= 0x01  # flip a bit inside the signature
    forged = x509.load_der_x509_csr(bytes(der)).public_bytes(pki.serialization.Encoding.PEM)  # type: ignore[attr-defined]
    with pytest.raises(IssueRejected) as caught:
        ca.issue(forged, SLEEP, NOW)
    assert caught.value.code == "csr-bad-signature"


@pytest.mark.parametrize(
    "key",
    [
        lambda: ec.generate_private_key(ec.SECP256R1()),  # verified with the parsed key
        lambda: ec.generate_private_key(ec.SECP384R1()),  # ecdsa-with-SHA384
        lambda: rsa.generate_private_key(65537, 2048),  # through is_signature_valid
    ],
)
def test_csr_signature_is_checked_on_every_path(ca: CertificateAuthority, key) -> None:  # type: ignore[no-untyped-def]
    private = key()
    good = pki.build_csr(private, [SLEEP.uri])
    assert ca.issue(good, SLEEP, NOW).identity == SLEEP
    der = bytearray(x509.load_pem_x509_csr(good).public_bytes(pki.serialization.Encoding.DER))  # type: ignore[attr-defined]
    # a bit of the signature, then a byte of the signed SAN (the same signature, other TBS)
    at_san = der.find(SLEEP.uri.encode()) + len("spiffe://")
    for where in (len(der) - 5, at_san):
        forged = bytearray(der)
        forged[where] ^= 0x01
        pem = x509.load_der_x509_csr(bytes(forged)).public_bytes(pki.serialization.Encoding.PEM)  # type: ignore[attr-defined]
        with pytest.raises(IssueRejected) as caught:
            ca.issue(pem, SLEEP, NOW)
        assert caught.value.code == "csr-bad-signature", where


def test_tokens_bind_identity_expire_and_are_single_use(ca: CertificateAuthority) -> None:
    token = ca.token("foo", "sleep", NOW, ttl=dt.timedelta(minutes=10))
    grant = ca.redeem_token(token, NOW)
    assert grant.identity("cluster.local") == SLEEP
    with pytest.raises(TokenRejected) as reused:
        ca.redeem_token(token, NOW)
    assert reused.value.code == "token-reused"
    expired = ca.token("foo", "sleep", NOW, ttl=dt.timedelta(minutes=10))
    with pytest.raises(TokenRejected) as late:
        ca.redeem_token(expired, NOW + dt.timedelta(minutes=11))
    assert late.value.code == "token-expired"
    foreign = issue_token(
        pki.generate_token_key(), namespace="foo", service_account="sleep", now=NOW
    )
    with pytest.raises(TokenRejected) as forged:
        ca.redeem_token(foreign, NOW)
    assert forged.value.code == "token-signature"


def test_used_tokens_and_revocations_survive_a_restart(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", CaConfig(), NOW)
    token = ca.token("foo", "sleep", NOW)
    ca.redeem_token(token, NOW)
    issued = ca.issue(csr_for(), SLEEP, NOW)
    ca.revoke(issued.serial)
    again = CertificateAuthority.load(tmp_path / "ca")
    with pytest.raises(TokenRejected):
        again.redeem_token(token, NOW)
    with pytest.raises(IssueRejected) as revoked:
        again.identity_of_peer(issued.chain_pem[0].encode(), NOW)
    assert revoked.value.code == "renewal-revoked"
    assert again.active.root == ca.active.root


def test_revocations_appended_by_another_writer_apply_to_the_next_check(
    ca: CertificateAuthority,
) -> None:
    first = ca.issue(csr_for(), SLEEP, NOW)
    second = ca.issue(csr_for(), SLEEP, NOW)
    record = ca.store.root / "revoked.jsonl"
    other_process = RevocationList(record)  # what `trustmesh ca revoke` does
    other_process.add(first.serial)
    with pytest.raises(IssueRejected) as revoked:
        ca.identity_of_peer(first.chain_pem[0].encode(), NOW)
    assert revoked.value.code == "renewal-revoked"
    assert ca.identity_of_peer(second.chain_pem[0].encode(), NOW) == SLEEP
    # half a line (a write in progress) is not read yet; once complete it is
    line = f'{{"serial": {second.serial}}}\n'.encode()
    with open(record, "ab") as out:
        out.write(line[:10])
    assert ca.revoked == {first.serial}
    with open(record, "ab") as out:
        out.write(line[10:])
    assert ca.revoked == {first.serial, second.serial}
    # a replaced record (an operator's edit) is read again from the start
    replacement = record.with_name("revoked.new")
    replacement.write_text(f'{{"serial": "{second.serial:x}"}}\n')
    os.replace(replacement, record)
    assert ca.revoked == {second.serial}
    assert ca.identity_of_peer(first.chain_pem[0].encode(), NOW) == SLEEP


def test_an_unreadable_revocation_record_refuses_every_renewal(ca: CertificateAuthority) -> None:
    issued = ca.issue(csr_for(), SLEEP, NOW)
    record = ca.store.root / "revoked.jsonl"
    record.write_text('{"serial": 1}\n{"serial": "not hex"}\n')
    with pytest.raises(IssueRejected) as refused:
        ca.identity_of_peer(issued.chain_pem[0].encode(), NOW)
    assert refused.value.code == "renewal-revocations-unreadable"
    assert f"{record}:2: not a revocation record" in refused.value.message
    with pytest.raises(StoreError, match=r"revoked.jsonl:2: not a revocation record"):
        CertificateAuthority.load(ca.store.root)  # and a restart refuses to start


def test_renewal_identity_comes_from_a_valid_unrevoked_certificate(
    ca: CertificateAuthority,
) -> None:
    issued = ca.issue(csr_for(), SLEEP, NOW)
    assert ca.identity_of_peer(issued.chain_pem[0].encode(), NOW) == SLEEP
    with pytest.raises(IssueRejected) as expired:
        ca.identity_of_peer(issued.chain_pem[0].encode(), NOW + dt.timedelta(days=2))
    assert expired.value.code == "renewal-untrusted"
    other = CertificateAuthority.init(ca.store.root.parent / "other", CaConfig(), NOW)
    stranger = other.issue(csr_for(), SLEEP, NOW)
    with pytest.raises(IssueRejected):
        ca.identity_of_peer(stranger.chain_pem[0].encode(), NOW)


def test_key_files_are_private_and_loose_permissions_refuse_to_start(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", CaConfig(), NOW)
    root = ca.store.root
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    for key in [root / "token-key.pem", *root.glob("slots/*/ca-key.pem")]:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    key = next(root.glob("slots/*/ca-key.pem"))
    os.chmod(key, 0o644)
    with pytest.raises(StoreError, match="must be 0600"):
        CertificateAuthority.load(root)


def test_plugin_intermediate_in_istio_cacerts_layout(tmp_path: Path) -> None:
    root_key = pki.generate_key()
    root = pki.self_signed_root(
        root_key,
        trust_domain="corp",
        organization="corp",
        not_before=NOW - dt.timedelta(days=1),
        not_after=NOW + dt.timedelta(days=3650),
    )
    inter_key = pki.generate_key()
    inter = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "inter")]))
        .issuer_name(root.subject)
        .public_key(inter_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(root_key, pki.hashes.SHA256())  # type: ignore[attr-defined]
    )
    cacerts = tmp_path / "cacerts"
    cacerts.mkdir()
    (cacerts / "ca-cert.pem").write_bytes(pki.cert_to_pem(inter))
    (cacerts / "ca-key.pem").write_bytes(pki.key_to_pem(inter_key))
    (cacerts / "root-cert.pem").write_bytes(pki.cert_to_pem(root))
    (cacerts / "cert-chain.pem").write_bytes(pki.cert_to_pem(inter) + pki.cert_to_pem(root))
    ca = CertificateAuthority.init(tmp_path / "ca", CaConfig(), NOW, plugin_certs=cacerts)
    issued = ca.issue(csr_for(), SLEEP, NOW)
    assert len(issued.chain_pem) == 3
    assert openssl_verify(issued.chain_pem, tmp_path).returncode == 0
    assert ca.identity_of_peer(issued.chain_pem[0].encode(), NOW) == SLEEP
