"""The CA's network API: gRPC over TLS, the server certificate issued by the CA itself.

A caller proves who it is in one of two ways, and nothing else is accepted:
- ``authorization: Bearer <bootstrap token>`` metadata on the enrollment port (server-only
  TLS): the token's namespace and service account (a workload's first certificate);
- its current certificate on the renewal port, where TLS requires and verifies a client
  certificate against the trust bundle: it may renew only that identity.

Two ports because gRPC Python cannot ask for an *optional* client certificate (Go's
``VerifyClientCertIfGiven``, which Istio uses on one port).

``workers=N`` serves both ports from N processes (this one and N-1 spawned ones), each
with its own listening socket on the same ports (``SO_REUSEPORT``: the kernel spreads
connections over them), so issuance uses every core instead of one GIL. They share the
CA directory: tokens are burnt under a file lock, serials appended with group commit,
revocations and rotated roots re-read from disk by each; only this process rotates roots.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
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
        workers: int = 1,
        share_ports: bool = False,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if workers > 1 and (ca.ledger is not None or extra_handlers):
            # A replica's records live in etcd behind this process's client; run more
            # replicas instead of workers.
            raise ValueError("worker processes serve a CA directory only (no shared store)")
        if workers > 1 and observer is not None:
            raise ValueError("an observer would see only the first of the worker processes")
        self.ca = ca
        self.workers = workers
        # share_ports: this is a worker, binding the first process's ports alongside it
        self._share_ports = share_ports or workers > 1
        self._children: list[tuple[subprocess.Popen[bytes], socket.socket]] = []
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
        # Without workers a port in use is an error (SO_REUSEPORT would share it silently).
        server = grpc.aio.server(options=[("grpc.so_reuseport", int(self._share_ports))])
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
        try:
            for _ in range(self.workers - 1):
                await self._start_worker()
        except BaseException:
            await self.stop()
            raise
        log.info(
            "CA enrollment port %d, renewal port %d, %d process(es)",
            self.port,
            self.renewal_port,
            self.workers,
        )
        return self.port

    async def _start_worker(self) -> None:
        # A fresh interpreter (not fork: gRPC's threads; not multiprocessing's spawn: it
        # re-imports the caller's __main__). One end of a socket pair is its lifeline: it
        # reads "ready"/an error from the worker, and the worker stops when it closes,
        # also when this process is killed.
        ours, theirs = socket.socketpair()
        host = self.address.rsplit(":", 1)[0]
        renewal_host = self.renewal_address.rsplit(":", 1)[0]
        spec = {
            "directory": str(self.ca.store.root),
            "address": f"{host}:{self.port}",
            "renewal_address": f"{renewal_host}:{self.renewal_port}",
            "hostnames": list(self.hostnames),
            "fd": theirs.fileno(),
        }
        with theirs:
            process = subprocess.Popen(
                [sys.executable, "-m", "trustmesh.identity.server", json.dumps(spec)],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        self._children.append((process, ours))
        ours.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            answer = await asyncio.wait_for(loop.sock_recv(ours, 4096), timeout=30)
        except TimeoutError:
            raise OSError("a CA worker process did not start within 30 s") from None
        if answer != b"ready":
            why = answer.decode(errors="replace") or f"exited with code {process.wait(5)}"
            raise OSError(f"a CA worker process failed: {why}")

    @property
    def worker_pids(self) -> list[int]:
        """The spawned worker processes (not this one)."""
        return [process.pid for process, _ in self._children]

    async def stop(self, grace: float = 0.5) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        children, self._children = self._children, []
        for _, lifeline in children:
            lifeline.close()  # the worker stops gracefully on EOF
        for process, _ in children:
            try:
                await asyncio.to_thread(process.wait, grace + 5)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait, 5)

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
            audit.warning("rejected peer=%s code=%s reason=%s", context.peer(), exc.code, exc)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{exc.code}: {exc}")
            raise AssertionError("unreachable") from None
        except StoreError as exc:  # the shared store is unreachable: fail closed
            self.rejected += 1
            audit.warning("rejected peer=%s code=store-unavailable reason=%s", context.peer(), exc)
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
            audit.warning(
                "rejected peer=%s code=%s reason=%s", context.peer(), exc.code, exc.message
            )
            await context.abort(status, f"{exc.code}: {exc.message}")
            raise AssertionError("unreachable") from None
        self.issued += 1
        if observer is not None:
            observer.issued(identity, issued.not_after)
        if log.isEnabledFor(logging.DEBUG):  # the peer's address costs a call into gRPC
            log.debug("issued %s to %s via %s", identity, context.peer(), how)
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


def _worker_main(spec: dict[str, Any]) -> None:
    """A worker process: serve the CA directory on the parent's ports until the parent
    closes its end of the lifeline (it stops us, or it died)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    lifeline = socket.socket(fileno=spec["fd"])

    async def main() -> None:
        try:
            server = CaServer(
                CertificateAuthority.load(Path(spec["directory"])),
                address=spec["address"],
                renewal_address=spec["renewal_address"],
                hostnames=tuple(spec["hostnames"]),
                share_ports=True,
            )
            await server.start()
        except (OSError, RuntimeError, StoreError, ValueError) as exc:
            lifeline.sendall(f"{type(exc).__name__}: {exc}".encode())
            return
        lifeline.sendall(b"ready")
        lifeline.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_recv(lifeline, 1)  # b"" once closed
        finally:
            await server.stop()
            server.ca.issued_log.close()

    asyncio.run(main())


if __name__ == "__main__":
    _worker_main(json.loads(sys.argv[1]))
