"""What makes issuance fast must not change what is issued or what is durable:
the pre-encoded leaf equals the builder's byte for byte, a serial is on disk before its
certificate is handed out (many per fsync), and worker processes sharing the CA's ports
burn each single-use token once and honour revocations made by another process."""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import json
import multiprocessing
import os
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from trustmesh.identity import pki
from trustmesh.identity.ca import CaConfig, CertificateAuthority
from trustmesh.identity.client import CaClient, CaRefused, ClientCertificate
from trustmesh.identity.server import CaServer
from trustmesh.identity.spiffe import SpiffeId
from trustmesh.identity.store import CaStore, StoreError

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
SLEEP = SpiffeId("cluster.local", "foo", "sleep")


@pytest.mark.parametrize("ca_key_kind", ["ec-p256", "ec-p384", "rsa-2048"])
def test_pre_encoded_leaf_is_the_builders_certificate_byte_for_byte(ca_key_kind: str) -> None:
    ca_key = (
        ec.generate_private_key(ec.SECP384R1())
        if ca_key_kind == "ec-p384"
        else pki.generate_key(pki.KeyType(ca_key_kind))
    )
    root = pki.self_signed_root(
        ca_key, trust_domain="cluster.local", organization="o", not_before=NOW, not_after=NOW
    )
    signer = pki.LeafSigner(ca_key, root)
    for leaf_kind in (pki.KeyType.EC_P256, pki.KeyType.RSA_2048):
        info = pki.inspect_csr(pki.build_csr(pki.generate_key(leaf_kind), [SLEEP.uri]))
        # DER edge cases: one-byte serials either side of the sign bit, a 159-bit one,
        # UTCTime before 2050 and GeneralizedTime after.
        for serial in (1, 127, 128, 255, 256, 2**158 + 1, x509.random_serial_number()):
            # calendar: ok: 2051 only picks GeneralizedTime; nothing validates these bytes
            after_2050 = dt.datetime(2051, 2, 3, tzinfo=dt.UTC)  # calendar: ok
            for not_after in (NOW + dt.timedelta(hours=1), after_2050):
                builder = pki.sign_leaf(
                    ca_key=ca_key,
                    ca_cert=root,
                    public_key=info.public_key,
                    uri=SLEEP.uri,
                    not_before=NOW,
                    not_after=not_after,
                    serial=serial,
                )
                ours = signer.tbs(serial, info.public_key_der, SLEEP.uri, NOW, not_after)
                assert ours == builder.tbs_certificate_bytes, (leaf_kind, serial, not_after)
        serial, pem = signer.sign_leaf_pem(
            info.public_key_der, uri=SLEEP.uri, not_before=NOW, not_after=NOW
        )
        leaf = x509.load_pem_x509_certificate(pem.encode())
        leaf.verify_directly_issued_by(root)  # the signature is the CA's, over those bytes
        assert leaf.serial_number == serial and pki.cert_to_pem(leaf).decode() == pem
        assert pki.uri_sans(leaf) == [SLEEP.uri]


def _serials_on_disk(directory: Path) -> set[int]:
    lines = (directory / "issued.jsonl").read_text().splitlines()
    return {int(json.loads(line)["serial"], 16) for line in lines}


def test_each_serial_is_durable_before_its_certificate_and_fsyncs_are_shared(
    tmp_path: Path,
) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", CaConfig(), NOW)
    csr = pki.build_csr(pki.generate_key(), [SLEEP.uri])
    synced: list[set[int]] = []  # the serials on disk when each sync finished
    real_fdatasync = os.fdatasync

    def counting_fdatasync(fd: int) -> None:
        real_fdatasync(fd)
        synced.append(_serials_on_disk(ca.store.root))

    async def one() -> None:
        issued = await ca.issue_recorded(csr, SLEEP, NOW)
        # handed out only once the line is written and a sync covering it has finished
        assert any(issued.serial in on_disk for on_disk in synced)

    async def main() -> None:
        await asyncio.gather(*(one() for _ in range(64)))

    os.fdatasync = counting_fdatasync  # type: ignore[assignment]
    try:
        asyncio.run(main())
    finally:
        os.fdatasync = real_fdatasync
    assert len(_serials_on_disk(ca.store.root)) == 64 == ca.issued_log.lines
    assert ca.issued_log.syncs == len(synced) < 64  # group commit: batches, not one each
    ca.issue(csr, SLEEP, NOW)  # the synchronous path syncs its one line too
    assert ca.issued_log.syncs == len(synced) + 1 and len(_serials_on_disk(ca.store.root)) == 65


def test_a_serial_that_cannot_be_recorded_is_never_handed_out(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", CaConfig(), NOW)
    (ca.store.root / "issued.jsonl").mkdir()  # writes fail with EISDIR
    csr = pki.build_csr(pki.generate_key(), [SLEEP.uri])
    with pytest.raises(StoreError, match=r"issued\.jsonl"):
        asyncio.run(ca.issue_recorded(csr, SLEEP, NOW))
    with pytest.raises(StoreError, match=r"issued\.jsonl"):
        ca.issue(csr, SLEEP, NOW)


def test_a_serial_whose_sync_fails_is_never_handed_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", CaConfig(), NOW)
    csr = pki.build_csr(pki.generate_key(), [SLEEP.uri])
    real_fdatasync = os.fdatasync

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    async def main() -> None:
        monkeypatch.setattr(os, "fdatasync", failing)
        results = await asyncio.gather(
            *(ca.issue_recorded(csr, SLEEP, NOW) for _ in range(3)), return_exceptions=True
        )
        # the whole batch shared the failed sync: none of its certificates is handed out
        assert [type(r) for r in results] == [StoreError] * 3
        assert "Input/output error" in str(results[0])
        monkeypatch.setattr(os, "fdatasync", real_fdatasync)
        assert (await ca.issue_recorded(csr, SLEEP, NOW)).serial in _serials_on_disk(ca.store.root)

    asyncio.run(main())
    assert ca.issued_log.syncs == 1


def _burn_all(directory: str, count: int, start: multiprocessing.synchronize.Event) -> list[int]:
    store = CaStore(Path(directory))
    start.wait(30)
    return [i for i in range(count) if store.burn_once("used-tokens.jsonl", "jti", {"jti": i})]


def test_two_processes_racing_on_each_token_burn_it_exactly_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        start = manager.Event()
        with ctx.Pool(2) as pool:
            racing = [pool.apply_async(_burn_all, (str(tmp_path), 400, start)) for _ in range(2)]
            start.set()
            wins = [r.get(60) for r in racing]
    assert sorted(wins[0] + wins[1]) == list(range(400))  # each once, none twice
    lines = (tmp_path / "used-tokens.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["jti"] for line in lines) == list(range(400))


def test_worker_processes_share_the_ports_tokens_and_revocations(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", CaConfig(), NOW)
    roots = ca.bundle_pem(NOW)

    async def main() -> None:
        server = CaServer(ca, workers=2)
        await server.start()
        try:
            [pid] = server.worker_pids
            os.kill(pid, 0)  # alive
            # 16 channels: the kernel spreads their connections over both processes
            channels = [CaClient(f"127.0.0.1:{server.port}", roots) for _ in range(16)]
            key = pki.generate_key()
            csr = pki.build_csr(key, [SLEEP.uri])
            chains: list[list[str]] = []
            for round_ in range(12):
                token = ca.token("foo", "sleep", NOW)
                a, b = channels[round_ % 16], channels[(round_ * 7 + 3) % 16]
                outcomes = await asyncio.gather(
                    a.create_certificate(csr, token=token),
                    b.create_certificate(csr, token=token),
                    return_exceptions=True,
                )
                won = [o for o in outcomes if isinstance(o, list)]
                lost = [o for o in outcomes if isinstance(o, CaRefused)]
                assert len(won) == 1 and len(lost) == 1, outcomes
                assert "token-reused" in lost[0].message
                chains.append(won[0])
            serials = {pki.load_certs(c[0].encode())[0].serial_number for c in chains}
            assert serials <= _serials_on_disk(ca.store.root)
            # renewal from 8 connections, then a revocation written by this process is
            # refused by whichever process each connection reached
            cert = ClientCertificate(pki.key_to_pem(key), "".join(chains[0]).encode())
            renewers = [
                CaClient(f"127.0.0.1:{server.renewal_port}", roots, client_cert=cert)
                for _ in range(8)
            ]
            renewed = await asyncio.gather(*(r.create_certificate(csr) for r in renewers))
            assert all(
                pki.uri_sans(pki.load_certs(c[0].encode())[0]) == [SLEEP.uri] for c in renewed
            )
            ca.revoke(pki.load_certs(chains[0][0].encode())[0].serial_number)
            refusals = await asyncio.gather(
                *(r.create_certificate(csr) for r in renewers), return_exceptions=True
            )
            assert all(
                isinstance(e, CaRefused)
                and e.code is grpc.StatusCode.UNAUTHENTICATED
                and "revoked" in e.message
                for e in refusals
            ), refusals
            for client in (*channels, *renewers):
                await client.close()
        finally:
            await server.stop()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

    asyncio.run(main())


def test_a_port_in_use_is_still_an_error_without_workers(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", CaConfig(), NOW)

    async def main() -> None:
        first = CaServer(ca)
        await first.start()
        try:
            second = CaServer(
                ca,
                address=f"127.0.0.1:{first.port}",
                renewal_address=f"127.0.0.1:{first.renewal_port}",
            )
            with pytest.raises((OSError, RuntimeError)):
                await second.start()
            await second.stop()
        finally:
            await first.stop()

    asyncio.run(main())
