"""Two CA replicas (two identity.server instances) sharing one real etcd: a bootstrap
token is accepted by exactly one of them, and a revocation written through one refuses
the next renewal on the other within a second, as soon as its watch delivers it."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from pathlib import Path

import grpc

from trustmesh.identity import pki
from trustmesh.identity.ca import CaConfig, CertificateAuthority
from trustmesh.identity.client import CaClient, CaRefused, ClientCertificate
from trustmesh.identity.server import CaServer
from trustmesh.identity.spiffe import SpiffeId
from trustmesh.store.ca_records import EtcdCaRecords, WatchedRevocations
from trustmesh.store.etcd_server import EtcdCluster

# Real TLS: the CA's certificates are issued at the real now.
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
SLEEP = SpiffeId("cluster.local", "foo", "sleep")
RACES = 1000


class Replica:
    """One CA replica: the shared CA directory's keys, its own etcd client and watch."""

    def __init__(self, ca_dir: Path, etcd: EtcdCluster) -> None:
        self.ca = CertificateAuthority.load(ca_dir)
        self.client = etcd.client()
        self.records = EtcdCaRecords(self.client)
        self.revocations = WatchedRevocations(self.client)
        self.ca.use_shared_records(self.records, self.revocations)
        self.server = CaServer(self.ca)

    async def start(self) -> None:
        await self.revocations.start()
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop()
        await self.revocations.stop()
        await self.client.close()


def test_two_replicas_race_for_each_token_and_share_revocations(
    tmp_path: Path, etcd: EtcdCluster
) -> None:
    # The real now at the test (not at import: a long suite outlives a 10-minute token).
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    CertificateAuthority.init(tmp_path / "ca", CaConfig(), now)

    async def main() -> tuple[float, float]:
        a, b = Replica(tmp_path / "ca", etcd), Replica(tmp_path / "ca", etcd)
        await a.start()
        await b.start()
        roots = a.ca.bundle_pem(now)
        clients = [CaClient(f"127.0.0.1:{r.server.port}", roots) for r in (a, b)]
        try:
            key = pki.generate_key()
            csr = pki.build_csr(key, [SLEEP.uri])
            tokens = [a.ca.token("foo", "sleep", now) for _ in range(RACES)]

            async def attempt(client: CaClient, token: str) -> list[str] | CaRefused:
                try:
                    return await client.create_certificate(csr, token=token)
                except CaRefused as refused:
                    return refused

            started = time.perf_counter()
            limit = asyncio.Semaphore(64)

            async def race(token: str) -> list[list[str] | CaRefused]:
                async with limit:
                    return list(await asyncio.gather(*(attempt(c, token) for c in clients)))

            outcomes = await asyncio.gather(*(race(t) for t in tokens))
            race_seconds = time.perf_counter() - started
            for outcome in outcomes:
                won = [o for o in outcome if isinstance(o, list)]
                lost = [o for o in outcome if isinstance(o, CaRefused)]
                assert len(won) == 1 and len(lost) == 1, outcome
                assert lost[0].code is grpc.StatusCode.UNAUTHENTICATED
                assert "token-reused" in lost[0].message
            winners = {o.index(next(x for x in o if isinstance(x, list))) for o in outcomes}
            assert winners == {0, 1}  # both replicas won some races: it was a real race
            # Every issued certificate's serial is in the shared record.
            issued = await a.records.issued_serials()
            serials = {
                pki.load_certs(next(x for x in o if isinstance(x, list))[0].encode())[
                    0
                ].serial_number
                for o in outcomes
            }
            assert serials <= issued

            # Enroll once more, then renew on B: works; revoke through A; B refuses.
            chain = next(x for x in outcomes[0] if isinstance(x, list))
            serial = pki.load_certs(chain[0].encode())[0].serial_number
            cert = ClientCertificate(pki.key_to_pem(key), "".join(chain).encode())
            renewer = CaClient(f"127.0.0.1:{b.server.renewal_port}", roots, client_cert=cert)
            clients.append(renewer)
            assert await renewer.create_certificate(csr)
            revoked_at = time.perf_counter()
            revision = await a.records.revoke(serial, now)
            await asyncio.wait_for(b.revocations.wait_for_revision(revision), timeout=1.0)
            propagation = time.perf_counter() - revoked_at
            try:
                await renewer.create_certificate(csr)
                raise AssertionError("replica B renewed a certificate revoked through A")
            except CaRefused as refused:
                assert refused.code is grpc.StatusCode.UNAUTHENTICATED
                assert "revoked" in refused.message
            return race_seconds, propagation
        finally:
            for client in clients:
                await client.close()
            await a.stop()
            await b.stop()

    race_seconds, propagation = asyncio.run(main())
    print(
        f"\n{RACES} token races in {race_seconds:.2f}s; revocation reached B in "
        f"{propagation * 1000:.1f} ms"
    )
    assert propagation <= 1.0


def test_a_replica_whose_revocation_watch_is_down_refuses_renewals(
    tmp_path: Path, etcd: EtcdCluster
) -> None:
    CertificateAuthority.init(tmp_path / "ca", CaConfig(), NOW)

    async def main() -> None:
        replica = Replica(tmp_path / "ca", etcd)
        await replica.start()
        try:
            replica.revocations.current()  # loaded
            await replica.revocations.stop()  # as after a broken watch
            leaf = replica.ca.server_certificate(NOW)[1]
            try:
                replica.ca.identity_of_peer(leaf, NOW, verified_by_tls=True)
                raise AssertionError("renewed without knowing the revocations")
            except Exception as exc:
                assert "revocations" in str(exc)
        finally:
            await replica.stop()

    asyncio.run(main())


def test_replicas_on_different_members_of_a_three_member_etcd_burn_each_token_once(
    etcd3: EtcdCluster,
) -> None:
    """Each replica talks to its own etcd member; raft still lets exactly one win."""

    async def main() -> tuple[int, int]:
        ledgers = [EtcdCaRecords(etcd3.client([endpoint])) for endpoint in etcd3.endpoints[:2]]
        try:
            expires = NOW + dt.timedelta(minutes=10)
            limit = asyncio.Semaphore(100)

            async def race(token_id: str) -> list[bool]:
                async with limit:
                    return list(
                        await asyncio.gather(*(x.consume_token(token_id, expires) for x in ledgers))
                    )

            outcomes = await asyncio.gather(*(race(f"member-race-{i}") for i in range(RACES)))
            assert all(sorted(o) == [False, True] for o in outcomes)
            return sum(o[0] for o in outcomes), sum(o[1] for o in outcomes)
        finally:
            for ledger in ledgers:
                await ledger.client.close()

    first, second = asyncio.run(main())
    assert first + second == RACES and first > 0 and second > 0


def test_a_burnt_tokens_record_lives_as_long_as_the_token_and_then_goes(
    etcd: EtcdCluster,
) -> None:
    async def main() -> None:
        client = etcd.client()
        try:
            records = EtcdCaRecords(client, clock=lambda: NOW)
            expires = NOW + dt.timedelta(minutes=10)
            assert await records.consume_token("lease-check", expires)
            assert not await records.consume_token("lease-check", expires)
            stored = await client.get(b"/trustmesh/ca/tokens/lease-check")
            assert stored is not None and stored.lease != 0
            ttl = await client.keep_alive_once(stored.lease)  # how long etcd keeps it
            assert 600 <= ttl <= 600 + 60 + 600
        finally:
            await client.close()

    asyncio.run(main())
