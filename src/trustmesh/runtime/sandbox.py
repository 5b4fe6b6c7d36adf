"""A mesh's sandbox on this host: the node namespace, one namespace per pod, their rules
and files — built from a :class:`~trustmesh.runtime.plan.MeshPlan`, torn down by ledger.

``build()`` creates, in this order (each object written to the ledger first):

1. ``/run/trustmesh/<mesh id>/`` (0711): per pod ``<k>/hosts`` and ``<k>/resolv.conf``
   (0644), ``<k>/app/`` (0700, the app's uid: its working directory) and, with a sidecar,
   ``<k>/sds/`` (0700, uid 1337: the SDS socket, which the agent answers for its own
   Envoy only) and ``<k>/proxy/`` (0070, the pod's own group: sidecar spec, bootstrap
   token, Envoy's files) — see :class:`~trustmesh.runtime.layout.PodPaths`;
2. the node namespace ``tm-<id>-node`` with the bridge holding ``10.88.0.1/16``;
3. per pod its namespace, veth pair (``eth0`` ↔ ``v<k>`` on the bridge), address, route;
4. per pod its nftables table: capture (sidecar pods) and Service DNAT (every pod).

Processes are not this module's business: the supervisor starts them inside (see
:mod:`trustmesh.runtime.podexec`) and stops them before ``teardown()``.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from trustmesh.runtime import netns
from trustmesh.runtime.capture import PROXY_UID, TABLE, ServiceDnat, pod_ruleset
from trustmesh.runtime.layout import RUN_ROOT, PodPaths
from trustmesh.runtime.ledger import Ledger
from trustmesh.runtime.names import hosts_file, resolv_conf
from trustmesh.runtime.plan import (
    NODE_IP,
    POD_CIDR,
    SERVICE_CIDR,
    MeshPlan,
    PodPlan,
    netns_name,
)

__all__ = ["Sandbox", "mesh_id", "service_dnat"]

LEDGER_FILE = "ledger.jsonl"
_PREFIX = int(POD_CIDR.rsplit("/", 1)[1])
# Extra source namespaces (a PolicyTest's `from.ip`) take addresses from here when the
# address asked for is outside the pod subnet, so they never collide with a pod.
SOURCE_BASE = 250


def mesh_id(state: Path) -> str:
    """Six hex digits naming a mesh's namespaces, derived from its state directory."""
    return hashlib.sha256(str(state.resolve()).encode()).hexdigest()[:6]


def service_dnat(plan: MeshPlan) -> list[ServiceDnat]:
    """Every Service port with a ClusterIP → its endpoints, as kube-proxy programs it."""
    out = []
    for key, targets in sorted(plan.services.items()):
        host, _, port = key.rpartition(":")
        address = plan.cluster_ips.get(host)
        if address is None:
            continue  # an alias (name.ns, name.ns.svc) of a hostname already listed
        endpoints = tuple((t.address, t.port) for t in targets)
        out.append(ServiceDnat(address, int(port), endpoints))
    return out


ANTISPOOF_TABLE = "netdev trustmesh_antispoof"


def antispoof_ruleset(ports: list[tuple[str, str]]) -> str:
    """Every frame a pod sends enters its bridge port (``v<k>``, in the node namespace)
    and is dropped unless its IPv4 source (or ARP sender) is the pod's own address, as a
    CNI's anti-spoofing does: a pod — root in its namespace, with a raw socket — cannot
    speak as another pod or host (whose address a policy may trust). IPv6 (the mesh has
    none) is dropped whole. Hooked at ingress of the port: before the bridge, so pods
    on one host are covered as well as traffic routed off the host."""
    family, _, table = ANTISPOOF_TABLE.partition(" ")
    chains = "".join(
        f"  chain {port} {{\n"
        f'    type filter hook ingress device "{port}" priority -500; policy accept;\n'
        f"    ether type ip ip saddr != {address} drop\n"
        f"    ether type arp arp saddr ip != {address} drop\n"
        f"    ether type ip6 drop\n"
        f"  }}\n"
        for port, address in ports
    )
    head = f"table {family} {table} {{}}\ndelete table {family} {table}\n"  # replaced whole
    return f"{head}table {family} {table} {{\n{chains}}}\n"


def _write(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(path, mode)


def _mkdir(path: Path, mode: int, owner: int | None = None) -> None:
    path.mkdir(mode=mode, exist_ok=True)
    os.chmod(path, mode)
    if owner is not None:
        os.chown(path, owner, owner)


@dataclass
class Sandbox:
    """The namespaces and files of one mesh (``plan.isolation`` is netns)."""

    plan: MeshPlan
    state: Path
    # the node namespace exists and is not this mesh's to remove: a host of
    # ``up --hosts`` runs inside the namespace its cluster made (and wired to the LAN)
    adopt_node: bool = False
    ledger: Ledger = field(init=False)
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ledger = Ledger(self.state / LEDGER_FILE)

    @property
    def run_dir(self) -> Path:
        return RUN_ROOT / self.plan.mesh_id

    def paths(self, pod: PodPlan) -> PodPaths:
        return PodPaths.of(self.plan.mesh_id, pod.index)

    def hosts(self, pod: PodPlan) -> Path:
        return self.paths(pod).hosts

    def resolv(self, pod: PodPlan) -> Path:
        return self.paths(pod).resolv

    # -- build

    def build(self) -> None:
        started = time.monotonic()
        RUN_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.ledger.record("dir", str(self.run_dir))
        _mkdir(self.run_dir, 0o711)
        for pod in self.plan.pods:
            self._files(pod)
        node = self.plan.node_netns
        netns.setup_node(self.ledger, node, NODE_IP, _PREFIX, adopt=self.adopt_node)
        self.timings["node"] = time.monotonic() - started
        services = service_dnat(self.plan)
        host_network = False
        ports: list[tuple[str, str]] = []  # (bridge port, the pod's address)
        for pod in self.plan.pods:
            assert pod.netns is not None
            if pod.netns == node:
                host_network = True
                continue
            peer = f"v{pod.index}"
            netns.attach_pod(self.ledger, node, pod.netns, peer, (pod.pod_ip,), _PREFIX, NODE_IP)
            ports.append((peer, pod.pod_ip))
            netns.apply_nft(self.ledger, pod.netns, TABLE, pod_ruleset(pod.capture, services))
            if pod.gateway:  # Istio's gateway pods bind 80/443 as non-root: this sysctl
                with netns.entered(pod.netns):
                    Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").write_text("0")
        if ports:  # a pod sends only from its own address (ARP too): no spoofing
            netns.apply_nft(self.ledger, node, ANTISPOOF_TABLE, antispoof_ruleset(ports))
        if host_network and services:  # hostNetwork pods reach Services from the node
            netns.apply_nft(self.ledger, node, TABLE, pod_ruleset(None, services))
            netns.route_to(node, SERVICE_CIDR)  # the node has no default route
        self.timings["total"] = time.monotonic() - started

    def _files(self, pod: PodPlan) -> None:
        paths = self.paths(pod)
        _mkdir(paths.root, 0o711)
        _write(paths.hosts, hosts_file(self.plan, pod), 0o644)
        _write(paths.resolv, resolv_conf(pod), 0o644)
        _mkdir(paths.app, 0o700, pod.uid)
        if pod.sidecar:
            _mkdir(paths.sds_dir, 0o700, PROXY_UID)
            _mkdir(paths.proxy, 0o070)
            os.chown(paths.proxy, 0, paths.group)

    def add_source(self, address: str, number: int) -> str:
        """A namespace outside every pod holding ``address`` on the bridge (a client at a
        given source IP); its name. Torn down with the mesh."""
        name = netns_name(self.plan.mesh_id, f"s{number}")
        node = self.plan.node_netns
        in_subnet = address.startswith("10.88.")
        if in_subnet:
            addresses: tuple[str, ...] = (address,)
        else:  # its own subnet address, then the asked-for one, routed by the node
            addresses = (f"10.88.{SOURCE_BASE}.{10 + number}", address)
        netns.attach_pod(self.ledger, node, name, f"s{number}", addresses, _PREFIX, NODE_IP)
        if not in_subnet:
            netns.route_to(node, address)
        return name

    # -- teardown

    def teardown(self) -> list[str]:
        """Remove everything the ledger lists (also after a crash); problems, if any."""
        return self.ledger.undo(netns.remove_entry)
