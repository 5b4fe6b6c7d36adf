"""Fixtures for tests that run the real Envoy: a throwaway CA, loopback addresses, sidecars.

pytest-asyncio is not installed: each test is a plain function that calls :func:`run` on
its own coroutine. A sidecar (SDS server + Envoy) therefore lives inside that coroutine,
started by ``async with sidecars.run(...)``; the ``sidecars`` fixture still kills any Envoy
left behind and attaches every Envoy's log tail to a failed test's report.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import os
import shutil
import signal
import socket
import ssl
import tempfile
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Iterator,
)
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trustmesh.agent.envoy import EnvoyProcess
from trustmesh.agent.sds import SdsServer, SecretStore, WorkloadSecret
from trustmesh.envoy_bootstrap import InboundListener, OutboundListener, sidecar_bootstrap

T = TypeVar("T")
TRUST_DOMAIN = "cluster.local"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "envoy: runs the real Envoy binary (loopback only)")


def run(coro: Coroutine[Any, Any, T], timeout: float = 20) -> T:
    """Run one test body in a fresh event loop, bounded in time."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


def spiffe_id(namespace: str, service_account: str, trust_domain: str = TRUST_DOMAIN) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


# ---------------------------------------------------------------------------- test CA


class MiniCA:
    """A throwaway ECDSA P-256 root issuing leaves shaped like Istio workload certificates:
    empty subject, one critical URI SAN, serverAuth + clientAuth. Test fixture only."""

    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "trustmesh tests"),
                x509.NameAttribute(NameOID.COMMON_NAME, "trustmesh test root"),
            ]
        )
        now = datetime.datetime.now(datetime.UTC)
        public_key = self._key.public_key()
        self.root = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
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
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.root_pem = self.root.public_bytes(serialization.Encoding.PEM)

    def issue(
        self, namespace: str, service_account: str, trust_domain: str = TRUST_DOMAIN
    ) -> WorkloadSecret:
        """A fresh key and leaf for ``spiffe://<trust domain>/ns/<ns>/sa/<sa>``."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.root.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(
                # Critical because the subject is empty (RFC 5280 §4.2.1.6).
                x509.SubjectAlternativeName(
                    [
                        x509.UniformResourceIdentifier(
                            spiffe_id(namespace, service_account, trust_domain)
                        )
                    ]
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
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
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return WorkloadSecret(
            cert_chain_pem=leaf.public_bytes(serialization.Encoding.PEM),
            private_key_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            trust_bundle_pem=self.root_pem,
        )


def leaf_of(secret: WorkloadSecret) -> x509.Certificate:
    return x509.load_pem_x509_certificate(secret.cert_chain_pem)


@pytest.fixture(scope="session")
def ca() -> MiniCA:
    return MiniCA()


# ---------------------------------------------------------------------------- loopback


class Loopback:
    """Distinct 127.0.0.x addresses (Linux routes all of 127/8 to lo) and free ports."""

    def __init__(self) -> None:
        self._hosts = itertools.cycle(range(20, 250))

    def address(self) -> str:
        return f"127.0.0.{next(self._hosts)}"

    @staticmethod
    def port(address: str) -> int:
        # The port may in theory be taken again before Envoy binds it; on a loopback
        # address of its own that is vanishingly rare.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))
            port: int = probe.getsockname()[1]
            return port

    def endpoint(self) -> tuple[str, int]:
        address = self.address()
        return address, self.port(address)


@pytest.fixture(scope="session")
def loopback() -> Loopback:
    return Loopback()


# ---------------------------------------------------------------------------- sidecars


@dataclass(frozen=True, slots=True)
class Sidecar:
    name: str
    workdir: Path
    store: SecretStore
    sds: SdsServer
    envoy: EnvoyProcess


class Sidecars:
    """Starts sidecars (SDS server + Envoy, like the agent) inside a test's event loop."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[EnvoyProcess] = []

    @contextlib.asynccontextmanager
    async def run(
        self,
        name: str,
        secret: WorkloadSecret,
        *,
        inbound: InboundListener | None = None,
        outbound: tuple[OutboundListener, ...] = (),
        patch: Callable[[dict[str, Any]], None] | None = None,
    ) -> AsyncIterator[Sidecar]:
        workdir = self.root / name
        workdir.mkdir()
        store = SecretStore()
        store.update(secret)
        sds = SdsServer(store, str(workdir / "sds.sock"))
        bootstrap = sidecar_bootstrap(
            node_id=f"sidecar~127.0.0.1~{name}.test~test.svc.cluster.local",
            cluster=f"{name}.test",
            sds_socket=sds.socket_path,
            admin_address="127.0.0.1",
            admin_port=0,  # Envoy picks it and EnvoyProcess reads it back: no port race
            inbound=inbound,
            outbound=outbound,
        )
        if patch is not None:
            patch(bootstrap)
        envoy = EnvoyProcess(bootstrap, workdir=workdir, concurrency=1)
        self.started.append(envoy)
        await sds.start()
        try:
            await envoy.start(timeout=10)
            yield Sidecar(name, workdir, store, sds, envoy)
        finally:
            try:
                await envoy.stop()
            finally:
                await sds.stop()

    def reap(self) -> None:
        """Kill (by PID) any Envoy a broken test left running."""
        for envoy in self.started:
            if envoy.pid is not None and envoy.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(envoy.pid, signal.SIGKILL)


_ENVOYS = pytest.StashKey[list[EnvoyProcess]]()
_REPORT = pytest.StashKey[pytest.TestReport]()


@pytest.fixture
def workroot(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A short scratch directory (Unix socket paths must stay under 108 bytes)."""
    root = Path(tempfile.mkdtemp(prefix="tm-envoy-", dir="/tmp"))
    yield root
    report = request.node.stash.get(_REPORT, None)
    if report is not None and report.failed:
        print(f"envoy work directory kept: {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def sidecars(request: pytest.FixtureRequest, workroot: Path) -> Iterator[Sidecars]:
    started = Sidecars(workroot)
    request.node.stash[_ENVOYS] = started.started
    try:
        yield started
    finally:
        started.reap()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach every Envoy's log tail to a failed test's report."""
    report = yield
    if report.when == "call":
        item.stash[_REPORT] = report
        if report.failed:
            for envoy in item.stash.get(_ENVOYS, []):
                report.sections.append((f"envoy log {envoy.log_path}", envoy.log_tail(60)))
    return report


# ---------------------------------------------------------------------------- clients


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


async def http_get(
    host: str,
    port: int,
    path: str = "/",
    *,
    tls: ssl.SSLContext | None = None,
    timeout: float = 5,
) -> Response:
    """One raw HTTP/1.1 GET, optionally over TLS; raises if no response comes back."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port, ssl=tls)
        try:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
            )
            head = (await reader.readuntil(b"\r\n\r\n")).removesuffix(b"\r\n\r\n")
            status_line, *lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in lines:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
            # Envoy's replies here all carry a content-length; reading to EOF instead would
            # wait out Envoy's delayed close (1 s) after "Connection: close".
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        except asyncio.IncompleteReadError as error:
            raise ConnectionError(f"no HTTP response from {host}:{port}: {error}") from None
        finally:
            # Abort, not close: a TLS close waits for Envoy's close_notify while Envoy
            # waits (delayed_close_timeout, 1 s) for us to close first.
            writer.transport.abort()
    return Response(int(status_line.split()[1]), headers, body)


def mesh_client_tls(secret: WorkloadSecret, workdir: Path) -> ssl.SSLContext:
    """A Python TLS client that presents ``secret`` like a sidecar would."""
    serial = leaf_of(secret).serial_number
    pem = workdir / f"client-{serial:x}.pem"  # ssl loads a key pair only from a file
    pem.touch(mode=0o600)
    pem.write_bytes(secret.cert_chain_pem + secret.private_key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # mesh certificates carry a SPIFFE URI, no DNS name
    context.load_verify_locations(cadata=secret.trust_bundle_pem.decode())
    context.load_cert_chain(pem)
    return context


async def server_leaf(host: str, port: int, tls: ssl.SSLContext) -> x509.Certificate:
    """The leaf certificate a fresh TLS handshake with ``host:port`` is served."""
    _, writer = await asyncio.open_connection(host, port, ssl=tls)
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
    finally:
        writer.transport.abort()
    return x509.load_der_x509_certificate(der)


async def stat(envoy: EnvoyProcess, name: str) -> int:
    """One counter from Envoy's admin ``/stats`` (0 if it does not exist yet)."""
    response = await envoy.admin_get(f"/stats?filter=^{name}$")
    for line in response.body.decode().splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return 0


async def eventually(probe: Callable[[], Awaitable[bool]], *, what: str, timeout: float) -> float:
    """Poll ``probe`` until it holds; the seconds it took. For changes inside another
    process (Envoy), which offers no event to wait on: short sleeps, bounded."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not await probe():
        if loop.time() - started > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.002)
    return loop.time() - started


def _inbound_http_managers(bootstrap: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for listener in bootstrap["static_resources"]["listeners"]:
        if listener["name"].startswith("inbound_"):
            for chain in listener["filter_chains"]:
                for network_filter in chain["filters"]:
                    yield network_filter["typed_config"]


def add_peer_headers(bootstrap: dict[str, Any]) -> None:
    """Test instrumentation: the inbound route reports the caller's verified identity and
    serial, proving the server Envoy saw the client's certificate."""
    for manager in _inbound_http_managers(bootstrap):
        route = manager["route_config"]["virtual_hosts"][0]["routes"][0]
        route["response_headers_to_add"] = [
            {"header": {"key": "x-peer-uri", "value": "%DOWNSTREAM_PEER_URI_SAN%"}},
            {"header": {"key": "x-peer-serial", "value": "%DOWNSTREAM_PEER_SERIAL%"}},
        ]


def close_after_each_request(bootstrap: dict[str, Any]) -> None:
    """Test instrumentation: the inbound side closes every connection after one request,
    so each request through a client sidecar is a fresh handshake (a rotated certificate
    is not used by connections that already exist)."""
    for manager in _inbound_http_managers(bootstrap):
        manager["common_http_protocol_options"] = {"max_requests_per_connection": 1}
