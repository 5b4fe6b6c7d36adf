"""Client side of the CA API, used by the agent (and by tests and benchmarks)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from trustmesh.identity import protocol

DEFAULT_SERVER_NAME = "trustmesh-ca"


class CaUnavailable(Exception):
    """The CA could not be reached (retry later)."""


class CaRefused(Exception):
    """The CA answered and refused (do not retry the same request)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    key_pem: bytes
    chain_pem: bytes


class CaClient:
    """One TLS channel to the CA; with ``client_cert`` the channel is mTLS (renewal)."""

    def __init__(
        self,
        address: str,
        ca_roots_pem: bytes,
        *,
        client_cert: ClientCertificate | None = None,
        server_name: str = DEFAULT_SERVER_NAME,
        timeout: float = 10.0,
        options: Sequence[tuple[str, str]] = (),
    ) -> None:
        """``options``: more gRPC channel options (a :class:`~trustmesh.identity.egress.
        SourceBoundProxy`'s, to connect from a chosen address)."""
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca_roots_pem,
            private_key=client_cert.key_pem if client_cert else None,
            certificate_chain=client_cert.chain_pem if client_cert else None,
        )
        self._channel = grpc.aio.secure_channel(
            channel_target(address),
            credentials,
            options=[("grpc.ssl_target_name_override", server_name), *options],
        )
        self._timeout = timeout
        self._create = self._channel.unary_unary(
            protocol.CREATE_CERTIFICATE,
            request_serializer=protocol.CertificateRequest.SerializeToString,
            response_deserializer=protocol.CertificateResponse.FromString,
        )
        self._bundle = self._channel.unary_unary(
            protocol.GET_TRUST_BUNDLE,
            request_serializer=protocol.TrustBundleRequest.SerializeToString,
            response_deserializer=protocol.TrustBundleResponse.FromString,
        )

    async def create_certificate(
        self, csr_pem: bytes, *, token: str | None = None, ttl_seconds: int = 0
    ) -> list[str]:
        """The issued chain (leaf first, root last)."""
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        request = protocol.CertificateRequest(csr=csr_pem.decode(), validity_duration=ttl_seconds)
        try:
            response = await self._create(request, metadata=metadata, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None
        return list(response.cert_chain)

    async def trust_bundle(self) -> list[str]:
        try:
            response = await self._bundle(protocol.TrustBundleRequest(), timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None
        return list(response.roots)

    async def close(self) -> None:
        await self._channel.close()


def channel_target(address: str) -> str:
    """gRPC's target for ``HOST:PORT`` or, for CA replicas, ``IP:PORT,IP:PORT,...``: one
    channel over every address (``ipv4:``/``ipv6:`` list; gRPC's pick_first connects to
    the first that answers and moves on when it dies). ValueError if malformed."""
    if "," not in address:
        return address
    parts = [part.strip() for part in address.split(",")]
    hosts = []
    for part in parts:
        host, sep, port = part.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"CA address {part!r} in {address!r} is not IP:PORT")
        try:
            hosts.append(ipaddress.ip_address(host.strip("[]")))
        except ValueError:
            raise ValueError(f"several CA addresses must be IPs, got {host!r}") from None
    if all(h.version == 4 for h in hosts):
        return "ipv4:" + ",".join(parts)
    if all(h.version == 6 for h in hosts):
        return "ipv6:" + ",".join(parts)
    raise ValueError(f"CA addresses {address!r} mix IPv4 and IPv6")


def _error(exc: grpc.aio.AioRpcError) -> Exception:
    code = exc.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return CaUnavailable(exc.details() or code.name)
    return CaRefused(code, exc.details() or "")
