"""Host registration with the control plane: a host joins with its node token and keeps
its workloads registered under its own lease (Istio's WorkloadEntry auto-registration;
the kubelet's bootstrap token and node lease).

A replica serves, on its CA enrollment port (TLS, the mesh's roots):

* ``/trustmesh.registry.v1.Registry/Join`` — ``authorization: Bearer <node token>`` and
  a JSON body ``{"ttl": seconds, "workloads": [WorkloadRecord…]}``. The replica burns the
  token (single use, in the shared ledger: of replicas racing on one token exactly one
  wins), refuses any workload on another host than the token's, grants the host a lease,
  registers the workloads under it and records ``/trustmesh/nodes/NAME`` (the lease and
  the SHA-256 of a fresh session secret) under the same lease. The answer carries the
  secret, one single-use bootstrap token per workload (for its sidecar's certificate)
  and every live replica's addresses (xDS, CA); a re-join replaces the host's earlier
  lease (its stale records go with it).
* ``/trustmesh.registry.v1.Registry/KeepAlive`` — ``{"node": NAME, "session": SECRET}``
  refreshes that lease once, at any replica. A host that stops calling it loses its
  records when the TTL ends, and every replica's proxies lose its endpoints.

A workload token is refused (``token-not-node``); nothing is registered before every
workload of the request passed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from trustmesh.identity.ca import CertificateAuthority
from trustmesh.identity.client import DEFAULT_SERVER_NAME, channel_target
from trustmesh.identity.store import StoreError
from trustmesh.identity.tokens import TokenRejected
from trustmesh.store.etcd_client import EtcdClient
from trustmesh.store.etcd_store import ROOT, WorkloadRegistry
from trustmesh.store.model import WorkloadRecord, is_object_name

SERVICE = "trustmesh.registry.v1.Registry"
JOIN = f"/{SERVICE}/Join"
KEEP_ALIVE = f"/{SERVICE}/KeepAlive"
NODES = ROOT + b"nodes/"
MIN_TTL, MAX_TTL = 5, 3600
MAX_WORKLOADS = 1000
TOKEN_TTL = dt.timedelta(minutes=10)  # the host starts its sidecars right after joining


class JoinRefused(Exception):
    def __init__(self, status: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Joined:
    """What a host got for joining: its lease and the secret that keeps it alive."""

    node: str
    lease: int
    ttl: int
    session: str
    tokens: Mapping[str, str] = field(default_factory=dict)  # workload ref -> its token
    replicas: tuple[Mapping[str, Any], ...] = ()  # each live replica's record


@dataclass(frozen=True, slots=True)
class HostJoin:
    """How ``trustmesh node join`` runs one host's pods against the replicas."""

    node: str
    control_plane: tuple[str, ...]  # the replicas' CA enrollment addresses
    token: str  # the node token
    roots_pem: bytes  # the mesh's trust bundle: who the replicas are
    pods: frozenset[str] = frozenset()  # refs; empty: the pods whose spec.nodeName is node
    ttl: int = 30
    # reach every replica's advertised ports at this address instead of the advertised
    # host (`up --hosts` in netns mode: a relay on the hosts' LAN in front of the replicas)
    replica_host: str = ""


def _identity(value: bytes) -> bytes:
    return value


def _digest(session: str) -> str:
    return hashlib.sha256(session.encode()).hexdigest()


def parse_join(body: bytes) -> tuple[int, list[WorkloadRecord]]:
    """The TTL and workloads of a Join request (:class:`JoinRefused` on bad input)."""
    try:
        data = json.loads(body)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        ttl = data.get("ttl", 30)
        raw = data.get("workloads", [])
        if not isinstance(ttl, int) or not MIN_TTL <= ttl <= MAX_TTL:
            raise ValueError(f"ttl must be {MIN_TTL}..{MAX_TTL} seconds")
        if not isinstance(raw, list) or len(raw) > MAX_WORKLOADS:
            raise ValueError(f"workloads must be a list of at most {MAX_WORKLOADS}")
        records = [WorkloadRecord.from_json(json.dumps(item)) for item in raw]
    except (ValueError, KeyError, TypeError) as exc:
        raise JoinRefused(grpc.StatusCode.INVALID_ARGUMENT, f"bad join request: {exc}") from None
    for record in records:
        for what, value in (("namespace", record.namespace), ("name", record.name)):
            if not is_object_name(value):
                raise JoinRefused(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"workload {record.ref}: {what} {value!r} is not a DNS-1123 name",
                )
    return ttl, records


class NodeRegistrar:
    """The replica side: Join and KeepAlive over the shared store."""

    def __init__(
        self,
        ca: CertificateAuthority,
        client: EtcdClient,
        replicas: Callable[[], Awaitable[Mapping[str, Mapping[str, Any]]]],
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.ca = ca
        self.client = client
        self.replicas = replicas
        self.registry = WorkloadRegistry(client)
        self.clock = clock

    def handler(self) -> grpc.GenericRpcHandler:
        def method(call: Callable[..., Any]) -> grpc.RpcMethodHandler[bytes, bytes]:
            return grpc.unary_unary_rpc_method_handler(
                call, request_deserializer=_identity, response_serializer=_identity
            )

        return grpc.method_handlers_generic_handler(
            SERVICE, {"Join": method(self._join_rpc), "KeepAlive": method(self._keep_alive_rpc)}
        )

    async def join(self, token: str, body: bytes) -> Joined:
        ttl, records = parse_join(body)
        try:
            grant = await self.ca.redeem_node_token_shared(token, self.clock())
        except TokenRejected as exc:
            raise JoinRefused(grpc.StatusCode.UNAUTHENTICATED, f"{exc.code}: {exc}") from None
        for record in records:
            try:
                grant.check_host(record.host, record.ref)
            except TokenRejected as exc:
                raise JoinRefused(grpc.StatusCode.PERMISSION_DENIED, f"{exc.code}: {exc}") from None
        key = NODES + grant.node.encode()
        earlier = await self.client.get(key)
        lease = await self.registry.host_lease(ttl)
        for record in records:
            await self.registry.register(record, lease)
        session = secrets.token_urlsafe(32)
        value = {"lease": lease, "session_sha256": _digest(session), "ttl": ttl}
        await self.client.put(key, json.dumps(value).encode(), lease=lease)
        if earlier is not None:  # the host started again: its old records go now
            old = json.loads(earlier.value).get("lease")
            if isinstance(old, int) and old != lease:
                await self.client.revoke_lease(old)
        now = self.clock()
        tokens = {
            r.ref: self.ca.token(r.namespace, r.service_account, now, TOKEN_TTL) for r in records
        }
        live = await self.replicas()
        return Joined(grant.node, lease, ttl, session, tokens, tuple(live[n] for n in sorted(live)))

    async def keep_alive(self, body: bytes) -> int:
        try:
            data = json.loads(body)
            node, session = data["node"], data["session"]
            if not isinstance(node, str) or not isinstance(session, str):
                raise TypeError("node and session are strings")
        except (ValueError, KeyError, TypeError) as exc:
            raise JoinRefused(grpc.StatusCode.INVALID_ARGUMENT, f"bad keep-alive: {exc}") from None
        found = await self.client.get(NODES + node.encode()) if is_object_name(node) else None
        if found is None:
            raise JoinRefused(
                grpc.StatusCode.NOT_FOUND, f"node {node!r} holds no lease: join again"
            )
        record = json.loads(found.value)
        if not hmac.compare_digest(record.get("session_sha256", ""), _digest(session)):
            raise JoinRefused(grpc.StatusCode.UNAUTHENTICATED, f"wrong session for node {node!r}")
        ttl = await self.client.keep_alive_once(int(record["lease"]))
        if ttl <= 0:
            raise JoinRefused(grpc.StatusCode.NOT_FOUND, f"node {node!r}'s lease ended: join again")
        return ttl

    async def _join_rpc(self, body: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        token = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                token = str(value).removeprefix("Bearer ").strip()
        try:
            if not token:
                raise JoinRefused(grpc.StatusCode.UNAUTHENTICATED, "no node token")
            joined = await self.join(token, body)
        except JoinRefused as exc:
            await context.abort(exc.status, str(exc))
            raise AssertionError("unreachable") from None
        except StoreError as exc:  # fail closed: nothing is registered without the store
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"store-unavailable: {exc}")
            raise AssertionError("unreachable") from None
        return json.dumps(
            {
                "node": joined.node,
                "lease": joined.lease,
                "ttl": joined.ttl,
                "session": joined.session,
                "tokens": dict(joined.tokens),
                "replicas": list(joined.replicas),
            }
        ).encode()

    async def _keep_alive_rpc(
        self, body: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        try:
            ttl = await self.keep_alive(body)
        except JoinRefused as exc:
            await context.abort(exc.status, str(exc))
            raise AssertionError("unreachable") from None
        except StoreError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"store-unavailable: {exc}")
            raise AssertionError("unreachable") from None
        return json.dumps({"ttl": ttl}).encode()


class RegistryClient:
    """The host side: one TLS channel over every replica's enrollment address."""

    def __init__(
        self,
        addresses: Sequence[str],
        roots_pem: bytes,
        timeout: float = 10.0,
        options: Sequence[tuple[str, str]] = (),
    ) -> None:
        """``options``: more gRPC channel options (a :class:`~trustmesh.identity.egress.
        SourceBoundProxy`'s: connect from the host's address)."""
        self._channel = grpc.aio.secure_channel(
            channel_target(",".join(addresses)),
            grpc.ssl_channel_credentials(root_certificates=roots_pem),
            options=[("grpc.ssl_target_name_override", DEFAULT_SERVER_NAME), *options],
        )
        self._timeout = timeout
        self._join = self._channel.unary_unary(
            JOIN, request_serializer=_identity, response_deserializer=_identity
        )
        self._keep = self._channel.unary_unary(
            KEEP_ALIVE, request_serializer=_identity, response_deserializer=_identity
        )

    async def close(self) -> None:
        await self._channel.close()

    async def join(self, token: str, workloads: Sequence[WorkloadRecord], ttl: int = 30) -> Joined:
        body = json.dumps(
            {"ttl": ttl, "workloads": [json.loads(w.to_json()) for w in workloads]}
        ).encode()
        answer = json.loads(
            await self._join(
                body, metadata=(("authorization", f"Bearer {token}"),), timeout=self._timeout
            )
        )
        return Joined(
            answer["node"],
            int(answer["lease"]),
            int(answer["ttl"]),
            answer["session"],
            dict(answer.get("tokens", {})),
            tuple(answer.get("replicas", ())),
        )

    async def keep_alive(self, joined: Joined, timeout: float | None = None) -> int:
        body = json.dumps({"node": joined.node, "session": joined.session}).encode()
        answer = await self._keep(body, timeout=timeout or self._timeout)
        return int(json.loads(answer)["ttl"])
