"""Where a live case's client sits in a sandboxed mesh (netns isolation).

``trustmesh test --live`` sends each PolicyTest case as the client it names would:

* from a workload: a socket made inside that pod's network namespace with the file
  credentials of its app's uid/gid (:func:`app_socket`) — what the pod's capture rules
  match (``meta skuid``), so the connection goes through the pod's own Envoy and leaves
  over mesh mTLS with its identity, from its pod IP, as in a cluster;
* from ``plaintext`` (optionally at ``ip: X``): a socket of a *source namespace* on the
  mesh bridge holding X — no sidecar, no identity, the address Envoy sees as the peer
  (``source.ip`` / ``ipBlocks``). Source namespaces are made by the sandbox
  (:meth:`~trustmesh.runtime.sandbox.Sandbox.add_source`, recorded in the mesh's ledger
  before they exist, removed by ``down``) and reused by later runs: ``live-sources.json``
  in the state directory remembers which number holds which address.

Names resolve as in the pod: a Service's names (``SVC`` in the pod's own namespace,
``SVC.NS``, ``SVC.NS.svc``, ``SVC.NS.svc.cluster.local``) to its ClusterIP.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import ipaddress
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import NetlinkError

from trustmesh.runtime import netns
from trustmesh.runtime.names import service_names
from trustmesh.runtime.plan import (
    NODE_IP,
    POD_CIDR,
    SERVICE_CIDR,
    MeshPlan,
    PodPlan,
    netns_name,
)
from trustmesh.runtime.sandbox import SOURCE_BASE, Sandbox

__all__ = [
    "OUTSIDE_ADDRESS",
    "LiveSources",
    "SourceError",
    "app_socket",
    "resolve",
    "source_problem",
]

# The default plaintext client ("from: {plaintext: true}" without an ip): a source
# namespace of its own, number 0 (whose own address this is).
OUTSIDE_ADDRESS = f"10.88.{SOURCE_BASE}.10"
_SOURCES_FILE = "live-sources.json"
_RESERVED = ipaddress.IPv4Network(f"10.88.{SOURCE_BASE}.0/24")  # the sources' own addresses
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def app_socket(namespace: str, uid: int | None, gid: int | None) -> socket.socket:
    """A TCP socket of network namespace ``namespace`` owned by ``uid``/``gid``.

    The kernel stamps a socket with the creating thread's file-system ids, and nftables'
    ``meta skuid`` / ``skgid`` match those: setting them for this thread only (setfsuid,
    setfsgid are per thread) around ``socket()`` makes the socket the app's, so the pod's
    capture treats it as the app's traffic — not as Envoy's uid 1337, nor as root."""
    with netns.entered(namespace):
        if gid is None and uid is None:
            return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        old_gid = _libc.setfsgid(gid) if gid is not None else None
        old_uid = _libc.setfsuid(uid) if uid is not None else None
        try:
            return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            if old_uid is not None:
                _libc.setfsuid(old_uid)
            if old_gid is not None:
                _libc.setfsgid(old_gid)


def resolve(plan: MeshPlan, pod: PodPlan | None, name: str) -> str | None:
    """The address ``name`` resolves to in ``pod`` (None: outside every pod, where only
    full names resolve): an IP as itself, a Service's names to its ClusterIP."""
    try:
        return str(ipaddress.IPv4Address(name))
    except ValueError:
        pass
    wanted = name.lower().rstrip(".")
    for hostname, address in plan.cluster_ips.items():
        names = service_names(hostname, pod.namespace if pod is not None else "")
        if wanted in names:
            return address
    return None


def source_problem(plan: MeshPlan, address: str) -> str | None:
    """Why ``address`` cannot be a plaintext client's own address in this mesh (None: it
    can): it must be an IPv4 unicast address no pod, Service or the node holds."""
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        return f"source IP {address}: the sandbox's network is IPv4 only"
    if ip.is_loopback or ip.is_multicast or ip.is_unspecified or ip.is_link_local:
        return f"source IP {address} cannot be a peer's address on the mesh bridge"
    if ip == ipaddress.IPv4Address("255.255.255.255"):
        return f"source IP {address} is the broadcast address"
    network = ipaddress.IPv4Network(POD_CIDR)
    if ip in (network.network_address, network.broadcast_address):
        return f"source IP {address} is not a host address of the pod network {POD_CIDR}"
    if ip in ipaddress.IPv4Network(SERVICE_CIDR):
        return f"source IP {address} is in the ClusterIP range {SERVICE_CIDR}"
    if address == NODE_IP:
        return f"source IP {address} is the node's (the bridge, where the control plane runs)"
    owner = next((p.ref for p in plan.pods if p.pod_ip == address), None)
    if owner is not None:
        return (
            f"source IP {address} is the pod IP of {owner}: send the case from that workload"
            " (plaintext from its address would need a second host with the same IP)"
        )
    if ip in _RESERVED and address != OUTSIDE_ADDRESS:
        return f"source IP {address} is in {_RESERVED}, kept for the runtime's source namespaces"
    return None


class SourceError(RuntimeError):
    """A source namespace could not be made; the message says for which address and why."""


@dataclass
class LiveSources:
    """The source namespaces of one running sandboxed mesh, made on first use."""

    plan: MeshPlan
    state: Path

    def namespace(self, address: str) -> str:
        """The namespace holding ``address`` on the mesh bridge, created if need be
        (check :func:`source_problem` first)."""
        registry = self.state / _SOURCES_FILE
        lock_path = self.state / (_SOURCES_FILE + ".lock")
        with lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two `test --live` runs share the registry
            known: dict[str, int] = json.loads(registry.read_text()) if registry.exists() else {}
            number = known.get(address)
            if number is None:
                number = 0 if address == OUTSIDE_ADDRESS else max([0, *known.values()]) + 1
                known[address] = number
                partial = registry.with_name(registry.name + ".partial")
                partial.write_text(json.dumps(known, indent=2, sort_keys=True))
                os.replace(partial, registry)
            name = netns_name(self.plan.mesh_id, f"s{number}")
            if not netns.exists(name):
                try:
                    name = Sandbox(self.plan, self.state).add_source(address, number)
                except (OSError, NetlinkError, netns.NftError) as exc:
                    raise SourceError(f"no source namespace for {address}: {exc}") from exc
        return name
