"""The workload agent's identity loop: enroll, serve, renew at half-life, retry.

Like istio-agent: the private key is generated here and lives only in memory (and in the
SDS stream to the local Envoy over a 0600 Unix socket); the CSR carries the public key.
The first certificate is obtained with a bootstrap token; every renewal authenticates
with the current certificate over mTLS. When the CA is unreachable the agent keeps
serving the still-valid certificate and retries with capped exponential backoff.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cryptography import x509

from trustmesh.agent.sds import SecretStore, WorkloadSecret
from trustmesh.identity import pki
from trustmesh.identity.client import CaClient, CaRefused, CaUnavailable, ClientCertificate
from trustmesh.identity.egress import SourceBoundProxy
from trustmesh.identity.spiffe import SpiffeId

log = logging.getLogger("trustmesh.agent")

Clock = Callable[[], dt.datetime]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class AgentConfig:
    identity: SpiffeId
    ca_address: str  # enrollment (token) endpoint
    ca_renewal_address: str  # mTLS endpoint
    ca_roots_pem: bytes  # to verify the CA server
    token: str
    key_type: pki.KeyType = pki.KeyType.EC_P256
    ttl_seconds: int = 0  # 0: the CA's default
    renew_at: float = 0.5  # fraction of lifetime
    jitter: float = 0.01  # ± fraction of lifetime, so a fleet does not renew in lockstep
    bundle_refresh_seconds: float = 60.0
    backoff_initial: float = 0.2
    backoff_max: float = 30.0
    # where connections to the CA leave from (None: the kernel's choice); a joined host's
    # agents use their pod IP, so the host is one set of addresses (and can be cut off)
    source_address: str | None = None


def renewal_time(
    not_before: dt.datetime,
    not_after: dt.datetime,
    renew_at: float,
    jitter: float,
    rng: random.Random,
) -> dt.datetime:
    """When to renew: ``renew_at`` of the lifetime, moved by up to ± ``jitter`` of it."""
    life = (not_after - not_before).total_seconds()
    offset = life * (renew_at + rng.uniform(-jitter, jitter))
    return not_before + dt.timedelta(seconds=offset)


class WorkloadAgent:
    """Keeps ``store`` filled with a valid certificate and the current trust bundle."""

    def __init__(
        self,
        config: AgentConfig,
        store: SecretStore,
        *,
        clock: Clock = utc_now,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.rng = rng or random.SystemRandom()
        self.renewals = 0
        self.failures = 0
        self._key: pki.PrivateKey | None = None
        self._chain: list[str] = []
        self._bundle: list[str] = []
        self._renew_now = asyncio.Event()
        self.ready = asyncio.Event()
        self._egress: SourceBoundProxy | None = None

    # --- control ---------------------------------------------------------------------------

    def renew_now(self) -> None:
        """Renew at the next opportunity instead of at the scheduled time."""
        self._renew_now.set()

    @property
    def certificate(self) -> x509.Certificate | None:
        return pki.load_certs(self._chain[0].encode())[0] if self._chain else None

    async def run(self, stop: asyncio.Event) -> None:
        """Enroll, then renew and refresh the bundle until ``stop`` is set."""
        try:
            await self._run(stop)
        finally:
            if self._egress is not None:
                await self._egress.stop()

    async def _client(
        self, address: str, roots: bytes, client_cert: ClientCertificate | None = None
    ) -> CaClient:
        """A CA client; from ``source_address`` (through this agent's proxy) when set."""
        source = self.config.source_address
        if source is None:
            return CaClient(address, roots, client_cert=client_cert)
        if self._egress is None:
            targets = f"{self.config.ca_address},{self.config.ca_renewal_address}".split(",")
            egress = SourceBoundProxy(source, targets)
            await egress.start()
            self._egress = egress
        return CaClient(
            address, roots, client_cert=client_cert, options=self._egress.channel_options()
        )

    async def _run(self, stop: asyncio.Event) -> None:
        await self._with_retry(self._enroll, stop)
        if stop.is_set():
            return
        refresher = asyncio.create_task(self._refresh_bundle_loop(stop))
        try:
            while not stop.is_set():
                cert = self.certificate
                assert cert is not None
                due = renewal_time(
                    cert.not_valid_before_utc,
                    cert.not_valid_after_utc,
                    self.config.renew_at,
                    self.config.jitter,
                    self.rng,
                )
                delay = max(0.0, (due - self.clock()).total_seconds())
                if await _wait_any(stop, self._renew_now, delay) and stop.is_set():
                    break
                self._renew_now.clear()
                await self._with_retry(self._renew, stop)
        finally:
            refresher.cancel()
            await asyncio.gather(refresher, return_exceptions=True)

    # --- steps -------------------------------------------------------------------------------

    async def _enroll(self) -> None:
        client = await self._client(self.config.ca_address, self.config.ca_roots_pem)
        try:
            key = pki.generate_key(self.config.key_type)
            csr = pki.build_csr(key, [self.config.identity.uri])
            chain = await client.create_certificate(
                csr, token=self.config.token, ttl_seconds=self.config.ttl_seconds
            )
            bundle = await client.trust_bundle()
        finally:
            await client.close()
        self._install(key, chain, bundle)
        log.info("enrolled as %s", self.config.identity)

    async def _renew(self) -> None:
        assert self._key is not None
        current = ClientCertificate(pki.key_to_pem(self._key), "".join(self._chain).encode())
        client = await self._client(
            self.config.ca_renewal_address, self._roots(), client_cert=current
        )
        try:
            key = pki.generate_key(self.config.key_type)
            csr = pki.build_csr(key, [self.config.identity.uri])
            chain = await client.create_certificate(csr, ttl_seconds=self.config.ttl_seconds)
            bundle = await client.trust_bundle()
        finally:
            await client.close()
        self._install(key, chain, bundle)
        self.renewals += 1
        log.info("renewed %s (renewal %d)", self.config.identity, self.renewals)

    async def refresh_bundle(self) -> bool:
        """Fetch the trust bundle; True when it changed (e.g. a root rotation started)."""
        client = await self._client(self.config.ca_address, self._roots())
        try:
            bundle = await client.trust_bundle()
        finally:
            await client.close()
        if bundle == self._bundle or self._key is None:
            return False
        self._install(self._key, self._chain, bundle)
        return True

    def _roots(self) -> bytes:
        # Trust both the configured roots and the latest bundle, so the agent can still
        # reach the CA while its server certificate moves to a new root.
        return self.config.ca_roots_pem + "".join(self._bundle).encode()

    def _install(self, key: pki.PrivateKey, chain: list[str], bundle: list[str]) -> None:
        self._key, self._chain, self._bundle = key, chain, bundle
        # Envoy gets leaf + intermediates; the root travels in the bundle.
        leaf_and_intermediates = chain[:-1] if len(chain) > 1 else chain
        self.store.update(
            WorkloadSecret(
                cert_chain_pem="".join(leaf_and_intermediates).encode(),
                private_key_pem=pki.key_to_pem(key),
                trust_bundle_pem="".join(bundle).encode(),
            )
        )
        self.ready.set()

    async def _refresh_bundle_loop(self, stop: asyncio.Event) -> None:
        while not await _wait_any(stop, None, self.config.bundle_refresh_seconds):
            try:
                await self.refresh_bundle()
            except (CaUnavailable, CaRefused) as exc:
                log.warning("trust bundle refresh failed: %s", exc)

    async def _with_retry(self, step: Callable[[], Awaitable[None]], stop: asyncio.Event) -> None:
        delay = self.config.backoff_initial
        while not stop.is_set():
            try:
                await step()
                return
            except (CaUnavailable, CaRefused) as exc:
                self.failures += 1
                log.warning(
                    "%s failed (%s); retrying in %.1fs, still serving the current certificate",
                    getattr(step, "__name__", "step"),
                    exc,
                    delay,
                )
            await _wait_any(stop, None, delay)
            delay = min(delay * 2, self.config.backoff_max)


async def _wait_any(stop: asyncio.Event, other: asyncio.Event | None, timeout: float) -> bool:
    """Wait for ``stop`` (or ``other``) up to ``timeout`` s; True if an event fired."""
    waits = [asyncio.ensure_future(stop.wait())]
    if other is not None:
        waits.append(asyncio.ensure_future(other.wait()))
    done, pending = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    return bool(done)
