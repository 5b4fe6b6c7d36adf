"""A small typed asyncio client for etcd v3 over gRPC.

The messages and stubs are aetcd's, generated from etcd's own ``rpc.proto`` and
``kv.proto`` (aetcd 1.0.0 pins ``grpcio<2`` and ``protobuf<8``, the versions the project
already uses). The client itself is ours, for two things aetcd's does not do: one
channel over several members (``etcd://H1:P1,H2:P2``: gRPC fails over between the
addresses) and watches that report a broken stream instead of ending quietly — the CA
fails closed on that.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import ssl
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from aetcd import rpc  # generated from etcd's protos
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustmesh.store.model import StoreError

__all__ = [
    "TLS_ENV",
    "EtcdClient",
    "EtcdTls",
    "KeyValue",
    "WatchedChange",
    "parse_store_endpoints",
    "prefix_end",
]

# kube-apiserver's flags for its etcd client certificate, and their environment variables.
TLS_FLAGS = ("--etcd-cafile", "--etcd-certfile", "--etcd-keyfile")
TLS_ENV = ("TRUSTMESH_ETCD_CAFILE", "TRUSTMESH_ETCD_CERTFILE", "TRUSTMESH_ETCD_KEYFILE")


@dataclass(frozen=True, slots=True)
class EtcdTls:
    """The CA that signed etcd's members and this client's certificate and key."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def from_options(
        cls, ca: Path | str | None, cert: Path | str | None, key: Path | str | None
    ) -> EtcdTls | None:
        """All three or none (StoreError naming the missing flags)."""
        given = [ca, cert, key]
        if not any(given):
            return None
        missing = [flag for flag, value in zip(TLS_FLAGS, given, strict=True) if not value]
        if missing:
            raise StoreError(f"{', '.join(missing)} missing: give {' '.join(TLS_FLAGS)} together")
        return cls(Path(str(ca)), Path(str(cert)), Path(str(key)))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> EtcdTls | None:
        env = os.environ if environ is None else environ
        return cls.from_options(*(env.get(name) or None for name in TLS_ENV))

    def as_args(self) -> list[str]:
        return [x for f, p in zip(TLS_FLAGS, (self.ca, self.cert, self.key), strict=True)
                for x in (f, str(p))]  # fmt: skip

    def as_json(self) -> dict[str, str]:
        return {"ca": str(self.ca), "cert": str(self.cert), "key": str(self.key)}

    def load(self) -> tuple[bytes, bytes, bytes]:
        """(ca, cert, key) PEM, checked: StoreError naming the flag of a missing, unreadable
        or wrong file (a key that is not the certificate's), never a later handshake error."""
        pems: list[bytes] = []
        for flag, path in zip(TLS_FLAGS, (self.ca, self.cert, self.key), strict=True):
            try:
                pems.append(path.read_bytes())
            except OSError as exc:
                raise StoreError(f"{flag} {path}: {exc.strerror or exc}") from None
        ca, cert, key = pems
        certs: list[x509.Certificate] = []
        for flag, path, pem in ((TLS_FLAGS[0], self.ca, ca), (TLS_FLAGS[1], self.cert, cert)):
            try:
                certs.append(x509.load_pem_x509_certificate(pem))
            except ValueError:
                raise StoreError(f"{flag} {path}: not a PEM certificate") from None
        try:
            private = serialization.load_pem_private_key(key, password=None)
        except (ValueError, TypeError):
            raise StoreError(f"{TLS_FLAGS[2]} {self.key}: not an unencrypted PEM key") from None
        if private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != certs[1].public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise StoreError(
                f"{TLS_FLAGS[2]} {self.key}: not the key of {TLS_FLAGS[1]} {self.cert}"
            )
        return ca, cert, key

    def credentials(self) -> grpc.ChannelCredentials:
        ca, cert, key = self.load()
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )

    def ssl_context(self) -> ssl.SSLContext:
        """For etcd's HTTPS endpoints (``/health``)."""
        self.load()
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.cert), str(self.key))
        return context


def parse_store_endpoints(url: str) -> tuple[list[tuple[str, int]], bool]:
    """``etcd://H:P[,H:P...]`` (plaintext) or ``https://H:P[,https://H:P...]`` (TLS, the
    scheme may be left off after the first, as kube-apiserver's ``--etcd-servers``):
    the (host, port) pairs and whether TLS is used."""
    if url.startswith("etcd://"):
        secure, rest = False, url.removeprefix("etcd://")
    elif url.startswith("https://"):
        secure, rest = True, url
    else:
        raise StoreError(f"--store {url}: expected https://HOST:PORT[,...] or etcd://HOST:PORT")
    endpoints: list[tuple[str, int]] = []
    for raw in rest.split(","):
        part = raw.strip()
        if secure:
            part = part.removeprefix("https://")
        if "://" in part:
            raise StoreError(f"--store {url}: {raw!r}: every member must use the same scheme")
        host, _, port = part.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise StoreError(f"--store {url}: {raw!r} is not HOST:PORT")
        endpoints.append((host.strip("[]"), int(port)))
    return endpoints, secure


def connect(url: str, tls: EtcdTls | None) -> EtcdClient:
    """A client for ``url``: https:// needs ``tls``; etcd:// (plaintext, a trial etcd of
    your own on loopback) refuses it — never a silent fallback either way."""
    endpoints, secure = parse_store_endpoints(url)
    if secure and tls is None:
        raise StoreError(
            f"--store {url}: https needs {' '.join(TLS_FLAGS)} (or {', '.join(TLS_ENV)})"
        )
    if not secure and tls is not None:
        raise StoreError(f"--store {url} is plaintext but {TLS_FLAGS[1]} is given: use https://")
    return EtcdClient(endpoints, tls)


REQUEST_TIMEOUT = 5.0
# A member that vanished without a reset (a host gone, a cut link) must not leave a watch
# silent and "healthy": ping an open stream every 10 s, give up 5 s after an unanswered
# ping (etcd accepts pings every 5 s or slower; none without a call, its default).
KEEPALIVE = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
]


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


@dataclass(frozen=True, slots=True)
class WatchedChange:
    deleted: bool
    kv: KeyValue
    revision: int  # the store revision of this change


def prefix_end(prefix: bytes) -> bytes:
    """The end of the key range holding every key that starts with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def _kv(raw: Any) -> KeyValue:
    return KeyValue(
        bytes(raw.key), bytes(raw.value), raw.create_revision, raw.mod_revision, raw.lease
    )


def _target(endpoints: Sequence[tuple[str, int]]) -> str:
    if len(endpoints) == 1:
        host, port = endpoints[0]
        return f"{host}:{port}"
    try:
        for host, _ in endpoints:
            ipaddress.IPv4Address(host)
    except ValueError:
        raise StoreError("several etcd members must be given as IPv4 addresses") from None
    return "ipv4:" + ",".join(f"{h}:{p}" for h, p in endpoints)


class EtcdClient:
    """KV, transactions, watches and leases against one etcd cluster."""

    def __init__(self, endpoints: Sequence[tuple[str, int]], tls: EtcdTls | None = None) -> None:
        if not endpoints:
            raise StoreError("no etcd endpoint given")
        self.endpoints = tuple(endpoints)
        self.tls = tls
        target = _target(self.endpoints)
        if tls is None:
            self._channel = grpc.aio.insecure_channel(target, options=KEEPALIVE)
        else:
            # One channel checks one name against every member's certificate: the first
            # member's host (an IP SAN of every member's certificate: on loopback all are
            # 127.0.0.1; on several hosts each member's certificate must name it), so the
            # channel keeps verifying as it fails over between members.
            name = [("grpc.ssl_target_name_override", self.endpoints[0][0])]
            self._channel = grpc.aio.secure_channel(
                target, tls.credentials(), options=[*KEEPALIVE, *name]
            )
        self._kv = rpc.KVStub(self._channel)
        self._watch = rpc.WatchStub(self._channel)
        self._lease = rpc.LeaseStub(self._channel)

    def describe(self) -> str:
        if self.tls is not None:
            return ",".join(f"https://{h}:{p}" for h, p in self.endpoints)
        return "etcd://" + ",".join(f"{h}:{p}" for h, p in self.endpoints)

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: Any, request: Any, *, read: bool = False) -> Any:
        """One call; a read is tried again while etcd answers UNAVAILABLE (a member that
        just lost its leader: "etcdserver: leader changed", a member killed under the
        stream), within the same deadline — as etcd's own clientv3 retries reads. Writes
        are not: one may have been applied although its answer was lost."""
        deadline = time.monotonic() + REQUEST_TIMEOUT
        pause = 0.05
        while True:
            try:
                left = max(0.01, deadline - time.monotonic())
                return await method(request, timeout=left, wait_for_ready=True)
            except grpc.aio.AioRpcError as exc:
                retry = read and exc.code() is grpc.StatusCode.UNAVAILABLE
                if not retry or time.monotonic() + pause >= deadline:
                    raise StoreError(
                        f"{self.describe()}: {exc.code().name}: {exc.details()}"
                    ) from None
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)

    # --- KV ---------------------------------------------------------------------------------

    async def get(self, key: bytes) -> KeyValue | None:
        response = await self._call(self._kv.Range, rpc.RangeRequest(key=key), read=True)
        return _kv(response.kvs[0]) if response.kvs else None

    async def get_prefix(self, prefix: bytes) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix`` (sorted) and the store revision they were read at."""
        response = await self._call(
            self._kv.Range, rpc.RangeRequest(key=prefix, range_end=prefix_end(prefix)), read=True
        )
        return [_kv(kv) for kv in response.kvs], response.header.revision

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        response = await self._call(self._kv.Put, rpc.PutRequest(key=key, value=value, lease=lease))
        return int(response.header.revision)

    async def txn(
        self, compare: Sequence[Any], success: Sequence[Any], failure: Sequence[Any] = ()
    ) -> tuple[bool, Any]:
        """One etcd transaction: (succeeded, response)."""
        request = rpc.TxnRequest(
            compare=list(compare), success=list(success), failure=list(failure)
        )
        response = await self._call(self._kv.Txn, request)
        return bool(response.succeeded), response

    # --- builders for transactions --------------------------------------------------------

    @staticmethod
    def mod_revision_is(key: bytes, revision: int) -> Any:
        """Compare: the key's mod_revision equals ``revision`` (0: the key is absent)."""
        return rpc.Compare(
            key=key,
            result=rpc.Compare.CompareResult.EQUAL,
            target=rpc.Compare.CompareTarget.MOD,
            mod_revision=revision,
        )

    @staticmethod
    def absent(key: bytes) -> Any:
        return rpc.Compare(
            key=key,
            result=rpc.Compare.CompareResult.EQUAL,
            target=rpc.Compare.CompareTarget.CREATE,
            create_revision=0,
        )

    @staticmethod
    def put_op(key: bytes, value: bytes, lease: int = 0) -> Any:
        return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease))

    @staticmethod
    def delete_op(key: bytes) -> Any:
        return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))

    @staticmethod
    def get_op(key: bytes) -> Any:
        return rpc.RequestOp(request_range=rpc.RangeRequest(key=key))

    # --- watches ------------------------------------------------------------------------------

    async def watch_prefix(
        self, prefix: bytes, start_revision: int
    ) -> AsyncIterator[list[WatchedChange]]:
        """Changes under ``prefix`` from ``start_revision`` on, one list per etcd response.

        Raises :class:`StoreError` when the stream breaks or etcd cancels the watch
        (compacted past ``start_revision``): callers must not take silence for "no change".
        """
        create = rpc.WatchRequest(
            create_request=rpc.WatchCreateRequest(
                key=prefix, range_end=prefix_end(prefix), start_revision=start_revision
            )
        )

        async def requests() -> AsyncIterator[Any]:
            yield create

        # "hasleader": etcd ends the watch when this member loses its leader (partitioned
        # from the quorum) instead of keeping a silent stream open: silence would look
        # like "nothing was revoked".
        call = self._watch.Watch(requests(), wait_for_ready=True, metadata=(("hasleader", "true"),))
        try:
            async for response in call:
                if response.canceled:
                    reason = response.cancel_reason or "compacted"
                    raise StoreError(f"{self.describe()}: watch cancelled: {reason}")
                changes = [
                    WatchedChange(
                        event.type == rpc.Event.EventType.DELETE,
                        _kv(event.kv),
                        int(event.kv.mod_revision),
                    )
                    for event in response.events
                ]
                if changes:
                    yield changes
        except grpc.aio.AioRpcError as exc:
            raise StoreError(f"{self.describe()}: watch broke: {exc.code().name}") from None
        finally:
            call.cancel()
        raise StoreError(f"{self.describe()}: watch ended")

    # --- leases -------------------------------------------------------------------------------

    async def grant_lease(self, ttl_seconds: int) -> int:
        response = await self._call(self._lease.LeaseGrant, rpc.LeaseGrantRequest(TTL=ttl_seconds))
        return int(response.ID)

    async def revoke_lease(self, lease_id: int) -> None:
        await self._call(self._lease.LeaseRevoke, rpc.LeaseRevokeRequest(ID=lease_id))

    async def keep_alive_once(self, lease_id: int) -> int:
        """Refresh the lease once; returns the TTL left (0: the lease is gone)."""

        async def requests() -> AsyncIterator[Any]:
            yield rpc.LeaseKeepAliveRequest(ID=lease_id)

        call = self._lease.LeaseKeepAlive(requests(), timeout=REQUEST_TIMEOUT)
        try:
            async for response in call:
                return int(response.TTL)
        except grpc.aio.AioRpcError as exc:
            raise StoreError(f"{self.describe()}: lease keep-alive: {exc.code().name}") from None
        return 0
