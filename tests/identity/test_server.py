"""The CA over real gRPC + TLS: issuing, renewing, and every attack failing."""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from trustmesh.identity import pki
from trustmesh.identity.ca import CaConfig, CertificateAuthority
from trustmesh.identity.client import CaClient, CaRefused, ClientCertificate
from trustmesh.identity.server import CaServer
from trustmesh.identity.spiffe import SpiffeId
from trustmesh.identity.tokens import issue_token

# Every scenario makes real TLS handshakes, and BoringSSL checks certificate validity
# against the real clock: the CA's serving certificate and the leaves must be issued at
# the real now, or the suite starts failing once a fixed instant falls out of their
# validity. The injected clock starts here and only moves forward (expiry scenarios).
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
SLEEP = SpiffeId("cluster.local", "foo", "sleep")


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> dt.datetime:
        return self.now


Scenario = Callable[[CertificateAuthority, CaServer, Clock, bytes], Awaitable[None]]


def run(tmp_path: Path, scenario: Scenario) -> None:
    async def main() -> None:
        clock = Clock()
        ca = CertificateAuthority.init(tmp_path / "ca", CaConfig(), NOW)
        server = CaServer(ca, clock=clock)
        await server.start()
        try:
            await asyncio.wait_for(scenario(ca, server, clock, ca.bundle_pem(NOW)), timeout=30)
        finally:
            await server.stop()

    asyncio.run(main())


def address(server: CaServer) -> str:
    return f"127.0.0.1:{server.port}"


def renewal(server: CaServer) -> str:
    return f"127.0.0.1:{server.renewal_port}"


async def enroll(
    server: CaServer, roots: bytes, token: str, identity: SpiffeId = SLEEP
) -> tuple[pki.PrivateKey, list[str]]:
    key = pki.generate_key()
    client = CaClient(address(server), roots)
    try:
        chain = await client.create_certificate(pki.build_csr(key, [identity.uri]), token=token)
    finally:
        await client.close()
    return key, chain


async def refused(call: Awaitable[Any]) -> CaRefused:
    with pytest.raises(CaRefused) as caught:
        await call
    return caught.value


def test_token_enrollment_then_mtls_renewal_of_the_same_identity(tmp_path: Path) -> None:
    async def scenario(
        ca: CertificateAuthority, server: CaServer, clock: Clock, roots: bytes
    ) -> None:
        key, chain = await enroll(server, roots, ca.token("foo", "sleep", NOW))
        assert pki.uri_sans(pki.load_certs(chain[0].encode())[0]) == [SLEEP.uri]
        renewer = CaClient(
            renewal(server),
            roots,
            client_cert=ClientCertificate(pki.key_to_pem(key), "".join(chain).encode()),
        )
        new_key = pki.generate_key()
        renewed = await renewer.create_certificate(pki.build_csr(new_key, [SLEEP.uri]))
        assert pki.uri_sans(pki.load_certs(renewed[0].encode())[0]) == [SLEEP.uri]
        # renewal may not switch identity
        other = SpiffeId("cluster.local", "foo", "admin")
        error = await refused(renewer.create_certificate(pki.build_csr(new_key, [other.uri])))
        assert error.code is grpc.StatusCode.PERMISSION_DENIED and "san-mismatch" in error.message
        assert await renewer.trust_bundle() == [roots.decode()]
        await renewer.close()
        assert (server.issued, server.rejected) == (2, 1)
        # a token is no substitute for a certificate on the renewal port
        anonymous = CaClient(renewal(server), roots, timeout=3)
        with pytest.raises(Exception):  # noqa: B017 - the TLS handshake itself fails
            await anonymous.create_certificate(
                pki.build_csr(new_key, [SLEEP.uri]), token=ca.token("foo", "sleep", NOW)
            )
        await anonymous.close()

    run(tmp_path, scenario)


@pytest.mark.parametrize(
    "attack",
    [
        "other-sa",
        "reused-token",
        "expired-token",
        "foreign-key-token",
        "ca-true",
        "dns-san",
        "no-credentials",
        "node-token",
    ],
)
def test_attacks_with_tokens_fail(tmp_path: Path, attack: str) -> None:
    async def scenario(
        ca: CertificateAuthority, server: CaServer, clock: Clock, roots: bytes
    ) -> None:
        client = CaClient(address(server), roots)
        key = pki.generate_key()
        csr = pki.build_csr(key, [SLEEP.uri])
        token: str | None = ca.token("foo", "sleep", NOW)
        expected = grpc.StatusCode.UNAUTHENTICATED
        if attack == "other-sa":
            csr = pki.build_csr(key, [SpiffeId("cluster.local", "foo", "admin").uri])
            expected = grpc.StatusCode.PERMISSION_DENIED
        elif attack == "reused-token":
            assert token is not None
            await client.create_certificate(csr, token=token)
        elif attack == "expired-token":
            clock.now = NOW + dt.timedelta(minutes=11)
        elif attack == "foreign-key-token":
            token = issue_token(
                pki.generate_token_key(), namespace="foo", service_account="sleep", now=NOW
            )
        elif attack == "ca-true":
            csr = pki.build_ca_csr(key)
            expected = grpc.StatusCode.PERMISSION_DENIED
        elif attack == "dns-san":
            csr = pki.build_csr(key, [SLEEP.uri], ["httpbin.foo.svc.cluster.local"])
            expected = grpc.StatusCode.PERMISSION_DENIED
        elif attack == "no-credentials":
            token = None
        elif attack == "node-token":  # a host's token enrolls no workload certificate
            token = ca.node_token("host-1", NOW)
        error = await refused(client.create_certificate(csr, token=token))
        assert error.code is expected, error
        await client.close()

    run(tmp_path, scenario)


def test_renewal_with_revoked_or_expired_certificate_fails(tmp_path: Path) -> None:
    async def scenario(
        ca: CertificateAuthority, server: CaServer, clock: Clock, roots: bytes
    ) -> None:
        key, chain = await enroll(server, roots, ca.token("foo", "sleep", NOW))
        cert = ClientCertificate(pki.key_to_pem(key), "".join(chain).encode())
        csr = pki.build_csr(pki.generate_key(), [SLEEP.uri])
        ca.revoke(pki.load_certs(chain[0].encode())[0].serial_number)
        revoked = CaClient(renewal(server), roots, client_cert=cert)
        error = await refused(revoked.create_certificate(csr))
        assert error.code is grpc.StatusCode.UNAUTHENTICATED and "revoked" in error.message
        await revoked.close()
        key2, chain2 = await enroll(server, roots, ca.token("foo", "sleep", NOW))
        clock.now = NOW + dt.timedelta(hours=25)  # past the 24 h leaf
        expired = CaClient(
            renewal(server),
            roots,
            client_cert=ClientCertificate(pki.key_to_pem(key2), "".join(chain2).encode()),
        )
        with pytest.raises(Exception) as caught:  # handshake refusal or UNAUTHENTICATED
            await expired.create_certificate(csr)
        assert "issued" not in str(caught.value)
        assert server.issued == 2
        await expired.close()

    run(tmp_path, scenario)


def test_client_must_verify_the_ca_server(tmp_path: Path) -> None:
    async def scenario(
        ca: CertificateAuthority, server: CaServer, clock: Clock, roots: bytes
    ) -> None:
        stranger = CertificateAuthority.init(tmp_path / "stranger", CaConfig(), NOW)
        client = CaClient(address(server), stranger.bundle_pem(NOW), timeout=3)
        with pytest.raises(Exception):  # noqa: B017 - TLS failure surfaces as UNAVAILABLE
            await client.create_certificate(
                pki.build_csr(pki.generate_key(), [SLEEP.uri]), token=ca.token("foo", "sleep", NOW)
            )
        await client.close()
        assert server.issued == 0

    run(tmp_path, scenario)


def test_revocation_by_another_process_refuses_the_very_next_renewal(tmp_path: Path) -> None:
    """`trustmesh ca revoke` (its own process) against a serving CA: no window at all.

    The renewal connections stay open across the revoke, and the server's timer loop is
    not running: only the per-request check of the revocation record can refuse.
    """

    async def revoke_in_another_process(serial: int) -> None:
        cli = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "trustmesh", "ca", "revoke", f"{serial:x}"),
            *("--dir", str(tmp_path / "ca")),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await cli.communicate()
        assert cli.returncode == 0, err.decode()
        assert out.decode().strip() == f"revoked {serial:x}"

    async def scenario(
        ca: CertificateAuthority, server: CaServer, clock: Clock, roots: bytes
    ) -> None:
        renewers: list[tuple[int, CaClient]] = []
        for _ in range(2):
            key, chain = await enroll(server, roots, ca.token("foo", "sleep", NOW))
            cert = ClientCertificate(pki.key_to_pem(key), "".join(chain).encode())
            serial = pki.load_certs(chain[0].encode())[0].serial_number
            renewers.append((serial, CaClient(renewal(server), roots, client_cert=cert)))
        csr = pki.build_csr(pki.generate_key(), [SLEEP.uri])
        for _, client in renewers:  # both renew, and their connections stay open
            await client.create_certificate(csr)
        (first_serial, first), (second_serial, second) = renewers
        await revoke_in_another_process(first_serial)
        error = await refused(first.create_certificate(csr))
        assert error.code is grpc.StatusCode.UNAUTHENTICATED
        assert f"renewal-revoked: certificate {first_serial:x} is revoked" in error.message
        await second.create_certificate(csr)  # not revoked: still renews
        await revoke_in_another_process(second_serial)  # a second append is seen too
        error = await refused(second.create_certificate(csr))
        assert f"certificate {second_serial:x} is revoked" in error.message
        await refused(first.create_certificate(csr))
        for _, client in renewers:
            await client.close()

    run(tmp_path, scenario)
