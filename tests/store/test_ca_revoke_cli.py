"""``trustmesh ca revoke SERIAL --store etcd://…``: the CLI writes the revocation into the
replicas' shared store, and a CA replica refuses the very next renewal with it."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import subprocess
import sys
from pathlib import Path

import grpc

from tests.store.test_ca_replicas import SLEEP, Replica
from trustmesh.identity import pki
from trustmesh.identity.ca import CaConfig, CertificateAuthority
from trustmesh.identity.client import CaClient, CaRefused, ClientCertificate
from trustmesh.store.etcd_server import EtcdCluster


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trustmesh", *args], capture_output=True, text=True, timeout=60
    )


def test_ca_revoke_through_the_store_refuses_the_next_renewal_at_a_replica(
    tmp_path: Path, etcd: EtcdCluster
) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    CertificateAuthority.init(tmp_path / "ca", CaConfig(), now)

    async def main() -> None:
        replica = Replica(tmp_path / "ca", etcd)
        await replica.start()
        roots = replica.ca.bundle_pem(now)
        enroll = CaClient(f"127.0.0.1:{replica.server.port}", roots)
        renewer: CaClient | None = None
        try:
            key = pki.generate_key()
            csr = pki.build_csr(key, [SLEEP.uri])
            chain = await enroll.create_certificate(
                csr, token=replica.ca.token("foo", "sleep", now)
            )
            serial = pki.load_certs(chain[0].encode())[0].serial_number
            cert = ClientCertificate(pki.key_to_pem(key), "".join(chain).encode())
            renewer = CaClient(f"127.0.0.1:{replica.server.renewal_port}", roots, client_cert=cert)
            assert await renewer.create_certificate(csr)  # renews before the revocation

            # Not a store revocations are shared through: refused, nothing written.
            wrong = await asyncio.to_thread(
                _cli, "ca", "revoke", f"{serial:x}", "--store", "file:x"
            )
            assert wrong.returncode == 2 and "etcd://" in wrong.stderr
            assert await renewer.create_certificate(csr)

            done = await asyncio.to_thread(_cli, "ca", "revoke", f"{serial:x}", *etcd.store_args())
            assert done.returncode == 0, done.stderr
            found = re.fullmatch(rf"revoked {serial:x} \(store revision (\d+)\)\n", done.stdout)
            assert found is not None, done.stdout
            await asyncio.wait_for(
                replica.revocations.wait_for_revision(int(found[1])), timeout=1.0
            )
            try:
                await renewer.create_certificate(csr)
                raise AssertionError("the replica renewed a certificate revoked by the CLI")
            except CaRefused as refused:
                assert refused.code is grpc.StatusCode.UNAUTHENTICATED
                assert "revoked" in refused.message
        finally:
            await enroll.close()
            if renewer is not None:
                await renewer.close()
            await replica.stop()

    asyncio.run(main())
