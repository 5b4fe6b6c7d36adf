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
* ``/trustmesh.registry.v1.Registry/Health`` — ``{"node", "session", "workload": NS/NAME,
  "healthy": bool, "message"}``: what the workload's probe found (Istio's agent sends it on
  each transition). The replica sets the record's health (an unhealthy workload is no
  ready endpoint at any replica) and, for an auto-registered entry, its ``Healthy``
  condition.

A workload token is refused (``token-not-node``); nothing is registered before every
workload of the request passed.

WorkloadGroup auto-registration (Istio's ``ISTIO_META_AUTO_REGISTER_GROUP``). A workload
of the request that names a ``group`` is a VM's proxy registering with the WorkloadGroup
of that name in its namespace. The replica refuses it unless the group exists
(``workloadgroup-not-found``, FAILED_PRECONDITION as istiod), its identity is the
group's (``identity-not-group``: the template's serviceAccount, ``default`` when it names
none; PERMISSION_DENIED), its name is Istio's ``<group>-<ip>[-<network>]`` and no other
WorkloadEntry of that name exists (``entry-exists``). Then, in one etcd transaction with
its registry record, it writes the WorkloadEntry istiod would create
(:func:`trustmesh.api.workloadgroup.entry_from_group`) into the store's resources under
the host's lease: it reaches every replica's configuration and endpoints as an applied
WorkloadEntry does, and leaves with the lease (Istio deletes a disconnected entry after
``PILOT_WORKLOAD_ENTRY_GRACE_PERIOD``, 10 s; here the host's lease TTL is that grace:
the entry outlives the host's last keep-alive by at most the TTL, and a host that comes
back within it keeps its entry).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from trustmesh.api.workloadgroup import (
    HEALTH_CHECK_ANNOTATION,
    GroupRefused,
    check_identity,
    entry_from_group,
    owned_by,
    parse_group,
    with_health,
)
from trustmesh.identity.ca import CertificateAuthority
from trustmesh.identity.client import DEFAULT_SERVER_NAME, channel_target
from trustmesh.identity.store import StoreError
from trustmesh.identity.tokens import TokenRejected
from trustmesh.store.etcd_client import EtcdClient
from trustmesh.store.etcd_store import (
    ROOT,
    EtcdResourceStore,
    WorkloadRegistry,
    resource_key_bytes,
    workload_key,
)
from trustmesh.store.model import ResourceKey, WorkloadHealth, WorkloadRecord, is_object_name

_T = TypeVar("_T")

SERVICE = "trustmesh.registry.v1.Registry"
JOIN = f"/{SERVICE}/Join"
KEEP_ALIVE = f"/{SERVICE}/KeepAlive"
HEALTH = f"/{SERVICE}/Health"
NODES = ROOT + b"nodes/"
NETWORKING = "networking.istio.io"
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
    # `--group`: the pods that are a WorkloadGroup's workloads (ref -> the group's name in
    # the pod's namespace); they register with their group (Istio's auto-registration)
    groups: tuple[tuple[str, str], ...] = ()
    # their groups' probes (ref -> runtime.node_probe.Probe JSON), reported to a replica
    probes: tuple[tuple[str, str], ...] = ()


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
        if record.group and not is_object_name(record.group):
            raise JoinRefused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"workload {record.ref}: group {record.group!r} is not a DNS-1123 name",
            )
        if record.group:
            try:
                ipaddress.ip_address(record.address)
            except ValueError:
                raise JoinRefused(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"workload {record.ref}: address {record.address!r} is not an IP address",
                ) from None
    return ttl, records


@dataclass(frozen=True, slots=True)
class GroupEntry:
    """An auto-registered WorkloadEntry about to be written, and the version it replaces."""

    record: WorkloadRecord
    key: ResourceKey
    manifest: str
    expected_version: int  # 0: new


class NodeRegistrar:
    """The replica side: Join and KeepAlive over the shared store."""

    def __init__(
        self,
        ca: CertificateAuthority,
        client: EtcdClient,
        replicas: Callable[[], Awaitable[Mapping[str, Mapping[str, Any]]]],
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        controller: str = "",
    ) -> None:
        """``controller``: this replica's name (``istio.io/workloadController`` of the
        entries it registers)."""
        self.ca = ca
        self.client = client
        self.replicas = replicas
        self.registry = WorkloadRegistry(client)
        self.resources = EtcdResourceStore(client)
        self.clock = clock
        self.controller = controller or "trustmesh"

    def handler(self) -> grpc.GenericRpcHandler:
        def method(call: Callable[..., Any]) -> grpc.RpcMethodHandler[bytes, bytes]:
            return grpc.unary_unary_rpc_method_handler(
                call, request_deserializer=_identity, response_serializer=_identity
            )

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Join": method(self._join_rpc),
                "KeepAlive": method(self._keep_alive_rpc),
                "Health": method(self._health_rpc),
            },
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
        entries = [await self._group_entry(r) for r in records if r.group]
        key = NODES + grant.node.encode()
        earlier = await self.client.get(key)
        lease = await self.registry.host_lease(ttl)
        if entries:
            await self._write_entries(entries, lease)
        for record in records:
            if not record.group:
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

    async def _group_entry(self, record: WorkloadRecord) -> GroupEntry:
        """The WorkloadEntry of an auto-registering workload, or :class:`JoinRefused`."""
        group = f"{record.namespace}/{record.group}"
        stored = await self.resources.get(
            ResourceKey(NETWORKING, "WorkloadGroup", record.namespace, record.group)
        )
        if stored is None:
            raise JoinRefused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"workloadgroup-not-found: auto-registration of {record.ref} failed: "
                f"cannot find WorkloadGroup {group}",
            )
        try:
            check_identity(group, parse_group(stored.manifest), record.service_account)
        except GroupRefused as exc:
            status = (
                grpc.StatusCode.PERMISSION_DENIED
                if exc.code == "identity-not-group"
                else grpc.StatusCode.FAILED_PRECONDITION
            )
            raise JoinRefused(status, f"{exc} (workload {record.ref})") from None
        manifest = entry_from_group(
            stored.manifest,
            address=record.address,
            proxy_labels=dict(record.labels),
            network=record.network,
            controller=self.controller,
            connected_at=self.clock(),
        )
        name = manifest["metadata"]["name"]
        if record.name != name:
            raise JoinRefused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"workload {record.ref}: the entry group {group} registers at "
                f"{record.address} is named {name!r}",
            )
        key = ResourceKey(NETWORKING, "WorkloadEntry", record.namespace, name)
        existing = await self.resources.get(key)
        if existing is not None and not owned_by(existing.manifest, record.group):
            raise JoinRefused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"entry-exists: WorkloadEntry {record.ref} exists and is not WorkloadGroup "
                f"{group}'s",
            )
        if HEALTH_CHECK_ANNOTATION in manifest["metadata"]["annotations"]:
            # Istio: a health-checked entry without a Healthy condition is not ready yet
            record = dataclasses.replace(record, health=WorkloadHealth.UNHEALTHY)
        text = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
        return GroupEntry(record, key, text, 0 if existing is None else existing.resource_version)

    async def _write_entries(self, entries: Sequence[GroupEntry], lease: int) -> None:
        """Every entry and its registry record, under ``lease``, in one transaction."""
        compares = [
            self.client.mod_revision_is(resource_key_bytes(e.key), e.expected_version)
            for e in entries
        ]
        ops = []
        for entry in entries:
            ops.append(
                self.client.put_op(resource_key_bytes(entry.key), entry.manifest.encode(), lease)
            )
            ops.append(
                self.client.put_op(
                    workload_key(entry.record), entry.record.to_json().encode(), lease
                )
            )
        succeeded, _ = await self.client.txn(compares, ops, [])
        if not succeeded:
            raise JoinRefused(
                grpc.StatusCode.ABORTED,
                "entry-changed: an auto-registered WorkloadEntry changed meanwhile; join again",
            )

    async def keep_alive(self, body: bytes) -> int:
        try:
            data = json.loads(body)
            node, session = data["node"], data["session"]
            if not isinstance(node, str) or not isinstance(session, str):
                raise TypeError("node and session are strings")
        except (ValueError, KeyError, TypeError) as exc:
            raise JoinRefused(grpc.StatusCode.INVALID_ARGUMENT, f"bad keep-alive: {exc}") from None
        record = await self._session(node, session)
        ttl = await self.client.keep_alive_once(int(record["lease"]))
        if ttl <= 0:
            raise JoinRefused(grpc.StatusCode.NOT_FOUND, f"node {node!r}'s lease ended: join again")
        return ttl

    async def _session(self, node: str, session: str) -> dict[str, Any]:
        """The node's record, if ``session`` is its secret (:class:`JoinRefused` if not)."""
        found = await self.client.get(NODES + node.encode()) if is_object_name(node) else None
        if found is None:
            raise JoinRefused(
                grpc.StatusCode.NOT_FOUND, f"node {node!r} holds no lease: join again"
            )
        record: dict[str, Any] = json.loads(found.value)
        if not hmac.compare_digest(record.get("session_sha256", ""), _digest(session)):
            raise JoinRefused(grpc.StatusCode.UNAUTHENTICATED, f"wrong session for node {node!r}")
        return record

    async def health(self, body: bytes) -> None:
        """A workload's probe result: its record's health, its entry's condition."""
        try:
            data = json.loads(body)
            node, session, ref = data["node"], data["session"], data["workload"]
            healthy, message = data["healthy"], data.get("message", "")
            if not all(isinstance(v, str) for v in (node, session, ref, message)):
                raise TypeError("node, session, workload and message are strings")
            if not isinstance(healthy, bool):
                raise TypeError("healthy is a boolean")
        except (ValueError, KeyError, TypeError) as exc:
            raise JoinRefused(
                grpc.StatusCode.INVALID_ARGUMENT, f"bad health report: {exc}"
            ) from None
        node_record = await self._session(node, session)
        lease = int(node_record["lease"])
        namespace, _, name = ref.partition("/")
        if not is_object_name(namespace, label_only=True) or not is_object_name(name):
            raise JoinRefused(grpc.StatusCode.INVALID_ARGUMENT, f"{ref!r} is not NAMESPACE/NAME")
        key = workload_key(WorkloadRecord(namespace, name, node, "", ""))
        found = await self.client.get(key)
        if found is None:
            raise JoinRefused(
                grpc.StatusCode.NOT_FOUND, f"node {node!r} registered no workload {ref}"
            )
        record = WorkloadRecord.from_json(found.value)
        health = WorkloadHealth.HEALTHY if healthy else WorkloadHealth.UNHEALTHY
        updated = dataclasses.replace(record, health=health)
        compares = [self.client.mod_revision_is(key, found.mod_revision)]
        ops = [self.client.put_op(key, updated.to_json().encode(), lease)]
        if record.group:
            entry_key = ResourceKey(NETWORKING, "WorkloadEntry", namespace, name)
            entry = await self.resources.get(entry_key)
            if entry is not None and owned_by(entry.manifest, record.group):
                manifest = with_health(entry.manifest, healthy, message, self.clock())
                text = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
                raw = resource_key_bytes(entry_key)
                compares.append(self.client.mod_revision_is(raw, entry.resource_version))
                ops.append(self.client.put_op(raw, text.encode(), lease))
        succeeded, _ = await self.client.txn(compares, ops, [])
        if not succeeded:
            raise JoinRefused(grpc.StatusCode.ABORTED, f"{ref} changed meanwhile: report again")

    async def _health_rpc(self, body: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        await _answered(context, self.health(body))
        return b"{}"

    async def _join_rpc(self, body: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        token = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                token = str(value).removeprefix("Bearer ").strip()
        if not token:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no node token")
        joined = await _answered(context, self.join(token, body))
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
        ttl = await _answered(context, self.keep_alive(body))
        return json.dumps({"ttl": ttl}).encode()


async def _answered(context: grpc.aio.ServicerContext[Any, Any], call: Awaitable[_T]) -> _T:
    """``call``'s result, or the RPC aborted with the status its refusal names; a store
    that cannot be reached is UNAVAILABLE (fail closed: nothing registered without it)."""
    try:
        return await call
    except JoinRefused as exc:
        await context.abort(exc.status, str(exc))
    except StoreError as exc:
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"store-unavailable: {exc}")
    raise AssertionError("unreachable")  # abort() raises


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
        self._health = self._channel.unary_unary(
            HEALTH, request_serializer=_identity, response_deserializer=_identity
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

    async def health(self, joined: Joined, workload: str, healthy: bool, message: str = "") -> None:
        """Report what ``workload``'s probe found (at any replica)."""
        body: dict[str, Any] = {"node": joined.node, "session": joined.session}
        body |= {"workload": workload, "healthy": healthy, "message": message}
        await self._health(json.dumps(body).encode(), timeout=self._timeout)
