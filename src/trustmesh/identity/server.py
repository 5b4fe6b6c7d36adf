"""The CA's network API: gRPC over TLS, the server certificate issued by the CA itself.

A caller proves who it is in one of two ways, and nothing else is accepted:
- ``authorization: Bearer <bootstrap token>`` metadata on the enrollment port (server-only
  TLS): the token's namespace and service account (a workload's first certificate);
- its current certificate on the renewal port, where TLS requires and verifies a client
  certificate against the trust bundle: it may renew only that identity.

Two ports because gRPC Python cannot ask for an *optional* client certificate (Go's
``VerifyClientCertIfGiven``, which Istio uses on one port).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import grpc

from trustmesh.identity import pki, protocol
from trustmesh.identity.ca import CertificateAuthority, IssueRejected
from trustmesh.identity.spiffe import SpiffeId
from trustmesh.identity.store import StoreError
from trustmesh.identity.tokens import TokenRejected

log = logging.getLogger("trustmesh.ca.server")
audit = logging.getLogger("trustmesh.ca.audit")

Clock = Callable[[], dt.datetime]


class CaObserver(Protocol):
    """Told each certificate request's outcome, for metrics (:mod:`trustmesh.metrics`)."""

    def csr_received(self) -> None:
        """A CreateCertificate call arrived."""

    def issued(self, identity: SpiffeId, not_after: dt.datetime) -> None:
        """A certificate for ``identity`` valid until ``not_after`` was issued."""

    def refused(self, reason: str) -> None:
        """The request was refused; ``reason`` is the stable code (``token-reused`` …)."""

    def ca_serving_certificate(self, not_after: dt.datetime) -> None:
        """The CA server's own TLS certificate was (re)issued (maybe on a gRPC thread)."""


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class CaServer:
    """Serves CreateCertificate and GetTrustBundle for one CertificateAuthority."""

    def __init__(
        self,
        ca: CertificateAuthority,
        *,
        address: str = "127.0.0.1:0",
        renewal_address: str = "127.0.0.1:0",
        clock: Clock = utc_now,
        hostnames: tuple[str, ...] = ("trustmesh-ca",),
        observer: CaObserver | None = None,
        extra_handlers: Sequence[grpc.GenericRpcHandler] = (),
    ) -> None:
        self.ca = ca
        self.extra_handlers = tuple(extra_handlers)  # more services on the enrollment port
        self.observer = observer
        self.clock = clock
        self.address = address
        self.renewal_address = renewal_address
        self.hostnames = hostnames
        self.port = 0
        self.renewal_port = 0
        self.issued = 0
        self.rejected = 0
        self._server: grpc.aio.Server | None = None
        self._tls_state: tuple[bytes, dt.datetime] | None = None

    # --- TLS -------------------------------------------------------------------------------

    def _certificate_configuration(self) -> grpc.ServerCertificateConfiguration:
        now = self.clock()
        key, chain = self.ca.server_certificate(
            now, self.hostnames, (self.address.rsplit(":", 1)[0],)
        )
        bundle = self.ca.bundle_pem(now)
        self._tls_state = (bundle, now)
        if self.observer is not None:
            self.observer.ca_serving_certificate(pki.load_certs(chain)[0].not_valid_after_utc)
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=bundle)

    def _fetch_configuration(self) -> grpc.ServerCertificateConfiguration:
        # Called by gRPC on new handshakes: refresh when the bundle changed (root
        # rotation) or the server certificate is half way through its life.
        assert self._tls_state is not None
        bundle, issued_at = self._tls_state
        now = self.clock()
        if bundle != self.ca.bundle_pem(now) or now - issued_at > self.ca.config.default_ttl / 2:
            return self._certificate_configuration()
        return None  # type: ignore[return-value]  # gRPC: None keeps the current one

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> int:
        """Listen on both ports; returns the enrollment port."""
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "istio.v1.auth.IstioCertificateService",
                    {
                        "CreateCertificate": grpc.unary_unary_rpc_method_handler(
                            self._create_certificate,
                            request_deserializer=protocol.CertificateRequest.FromString,
                            response_serializer=protocol.CertificateResponse.SerializeToString,
                        )
                    },
                ),
                grpc.method_handlers_generic_handler(
                    "trustmesh.ca.v1.TrustBundleService",
                    {
                        "GetTrustBundle": grpc.unary_unary_rpc_method_handler(
                            self._trust_bundle,
                            request_deserializer=protocol.TrustBundleRequest.FromString,
                            response_serializer=protocol.TrustBundleResponse.SerializeToString,
                        )
                    },
                ),
                *self.extra_handlers,
            )
        )
        for require_client_cert in (False, True):
            credentials = grpc.dynamic_ssl_server_credentials(
                self._certificate_configuration(),
                self._fetch_configuration,
                require_client_authentication=require_client_cert,
            )
            where = self.renewal_address if require_client_cert else self.address
            port = server.add_secure_port(where, credentials)
            if not port:
                raise OSError(f"cannot listen on {where}")
            if require_client_cert:
                self.renewal_port = port
            else:
                self.port = port
        await server.start()
        self._server = server
        log.info("CA enrollment port %d, renewal port %d", self.port, self.renewal_port)
        return self.port

    async def stop(self, grace: float = 0.5) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    async def run_rotation(self, stop: asyncio.Event, interval: float = 60.0) -> None:
        """Timer loop that acts on the rotation decisions; ends when ``stop`` is set."""
        while not stop.is_set():
            self.ca.reload_if_changed()
            self.ca.tick(self.clock())
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval)
            except TimeoutError:
                continue

    # --- handlers ----------------------------------------------------------------------------

    async def _create_certificate(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        now = self.clock()
        peer = context.peer()
        observer = self.observer
        if observer is not None:
            observer.csr_received()
        self._pick_up_disk_changes()
        try:
            identity, how = await self._authenticate(context, now)
            seconds = int(request.validity_duration)
            ttl = dt.timedelta(seconds=seconds) if seconds > 0 else None
            issued = await self.ca.issue_recorded(str(request.csr).encode(), identity, now, ttl)
        except TokenRejected as exc:
            self.rejected += 1
            if observer is not None:
                observer.refused(exc.code)
            audit.warning("rejected peer=%s code=%s reason=%s", peer, exc.code, exc)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{exc.code}: {exc}")
            raise AssertionError("unreachable") from None
        except StoreError as exc:  # the shared store is unreachable: fail closed
            self.rejected += 1
            audit.warning("rejected peer=%s code=store-unavailable reason=%s", peer, exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"store-unavailable: {exc}")
            raise AssertionError("unreachable") from None
        except IssueRejected as exc:
            self.rejected += 1
            if observer is not None:
                observer.refused(exc.code)
            status = (
                grpc.StatusCode.UNAUTHENTICATED
                if exc.code.startswith("renewal") or exc.code == "unauthenticated"
                else grpc.StatusCode.PERMISSION_DENIED
            )
            audit.warning("rejected peer=%s code=%s reason=%s", peer, exc.code, exc.message)
            await context.abort(status, f"{exc.code}: {exc.message}")
            raise AssertionError("unreachable") from None
        self.issued += 1
        if observer is not None:
            observer.issued(identity, issued.not_after)
        log.debug("issued %s to %s via %s", identity, peer, how)
        return protocol.CertificateResponse(cert_chain=list(issued.chain_pem))

    async def _authenticate(
        self, context: grpc.aio.ServicerContext[Any, Any], now: dt.datetime
    ) -> tuple[SpiffeId, str]:
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                token = str(value).removeprefix("Bearer ").strip()
                grant = await self.ca.redeem_token_shared(token, now)
                return grant.identity(self.ca.config.trust_domain), "token"
        auth = context.auth_context()
        pem = list(auth.get("x509_pem_cert", ()))
        if pem:
            # Only the renewal port asks for client certificates, and it requires and
            # verifies them against the bundle during the handshake.
            return self.ca.identity_of_peer(pem[0], now, verified_by_tls=True), "renewal"
        raise IssueRejected("unauthenticated", "no bootstrap token and no client certificate")

    def _pick_up_disk_changes(self) -> None:
        # Another process (`ca rotate-root`) may have changed the slots: one stat tells.
        # Revocations need no call here: the CA re-reads their record on every renewal.
        try:
            self.ca.reload_if_changed()
        except (StoreError, ValueError, KeyError) as exc:
            log.error("CA state on disk is unreadable, serving the last good one: %s", exc)

    async def _trust_bundle(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        self._pick_up_disk_changes()
        roots = [c.decode() for c in _split_pem(self.ca.bundle_pem(self.clock()))]
        return protocol.TrustBundleResponse(roots=roots)


def _split_pem(bundle: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    return [part + marker + b"\n" for part in bundle.split(marker) if part.strip()]
