"""The hosts of ``trustmesh up --hosts N`` as network namespaces on one LAN (netns mode).

What a rack of machines is, made of namespaces this module creates (each written to the
cluster's ledger, ``<state>/network.jsonl``, before it exists, so ``down`` removes it by
name — also after a start that failed half way):

* the LAN: namespace ``tm-<cluster id>-lan`` with a bridge ``lan`` holding
  ``10.87.0.1/24`` — the address at which every host reaches the control plane;
* host K: namespace ``tm-<host id>-node`` (the host's node namespace: its ``trustmesh node
  join`` runs inside it and builds its pod sandbox there — bridge ``br0``, one namespace
  per pod), with ``uplink`` = ``10.87.0.(10+K)/24``, its peer ``hK`` on the LAN bridge,
  and a default route to the LAN;
* routes between the hosts' pods: every pod address of the mesh is known from the plan
  (the same on every host), so host K routes each *other* host's pod address (``/32``) to
  the LAN, and the LAN routes each of host K's to host K. Pods keep the sandbox's one
  subnet (``10.88.0.0/16``) and their gateway ``10.88.0.1``: a host answers ARP for
  another host's pod (proxy ARP on ``br0``, no delay), as a router on a shared subnet.

The control plane (etcd, the replicas) stays on loopback of the namespace ``up`` runs in,
where ``trustmesh status``, ``apply --store`` and the tests reach it. A relay (``python -m
trustmesh.runtime.hostnet relay``) listens *inside the LAN namespace* on ``10.87.0.1`` at
each replica's xDS, CA and renewal port — never an etcd member's (hosts never need etcd:
they join and keep alive through a replica with a node token) nor a replica's metrics —
and splices every connection to ``127.0.0.1`` at the same port: TLS passes through
untouched (mTLS stays end to end between a sidecar and its replica), and nothing listens
on an address outside the namespaces made here. A host's
whole path to the control plane — its node agent's lease and its sidecars' xDS and CA —
crosses its uplink, so one nftables rule inside a host's namespace cuts that host off.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from trustmesh.runtime import netns
from trustmesh.runtime.ledger import Ledger
from trustmesh.runtime.plan import NODE_IP, netns_name

__all__ = [
    "CONTROL_IP",
    "LEDGER_FILE",
    "HostLink",
    "attach_host",
    "build_lan",
    "cut_off",
    "host_address",
    "lan_netns",
    "reconnect",
    "relay_argv",
    "teardown",
]

LEDGER_FILE = "network.jsonl"
LAN_BRIDGE = "lan"
LAN_PREFIX = 24
CONTROL_IP = "10.87.0.1"  # the LAN bridge: where hosts reach the control plane (the relay)
UPLINK = "uplink"
RELAY_TARGET = "127.0.0.1"
MAX_HOSTS = 200


def lan_netns(cluster_id: str) -> str:
    return netns_name(cluster_id, "lan")


def host_address(index: int) -> str:
    """Host ``index`` (1-based)'s address on the LAN."""
    if not 1 <= index <= MAX_HOSTS:
        raise ValueError(f"at most {MAX_HOSTS} hosts")
    return f"10.87.0.{10 + index}"


@dataclass(frozen=True, slots=True)
class HostLink:
    """One host on the LAN: its number, namespace and the pod addresses it runs."""

    index: int
    netns: str
    pod_ips: tuple[str, ...]

    @property
    def address(self) -> str:
        return host_address(self.index)


def _ledger(state: Path) -> Ledger:
    return Ledger(state / LEDGER_FILE)


def build_lan(state: Path, lan: str) -> None:
    """The LAN namespace and its bridge (``10.87.0.1/24``), forwarding between hosts."""
    ledger = _ledger(state)
    netns.create_netns(ledger, lan)
    netns.add_bridge(ledger, lan, LAN_BRIDGE, CONTROL_IP, LAN_PREFIX)
    netns.sysctl_in(lan, {"net/ipv4/ip_forward": "1", "net/ipv4/conf/all/send_redirects": "0"})


def attach_host(state: Path, lan: str, host: HostLink, others: Sequence[str]) -> None:
    """Host ``host``'s namespace on the LAN, routed to ``others`` (the other hosts' pod
    addresses) through it, and reachable at its own pods' addresses from it."""
    ledger = _ledger(state)
    netns.create_netns(ledger, host.netns)
    # The host's sandbox (its br0) answers ARP for other hosts' pods: see setup_node.
    netns.sysctl_in(
        host.netns, {"net/ipv4/ip_forward": "1", "net/ipv4/conf/all/send_redirects": "0"}
    )
    netns.add_uplink(
        ledger, lan, LAN_BRIDGE, f"h{host.index}", host.netns, UPLINK, host.address, LAN_PREFIX
    )
    netns.add_routes(host.netns, ["default", *(ip for ip in others if ip != NODE_IP)], CONTROL_IP)
    netns.add_routes(lan, [ip for ip in host.pod_ips if ip != NODE_IP], host.address)


CUT_TABLE = "trustmesh_cut"


def cut_ruleset() -> str:
    """A host's namespace drops every packet to the control plane: its node agent's
    (output) and its pods' (forward) — a partition, not a refusal."""
    chains = "".join(
        f"  chain {hook} {{\n    type filter hook {hook} priority 0; policy accept;\n"
        f"    ip daddr {CONTROL_IP} drop\n  }}\n"
        for hook in ("output", "forward")
    )
    head = f"table ip {CUT_TABLE} {{}}\ndelete table ip {CUT_TABLE}\n"  # replaced whole
    return f"{head}table ip {CUT_TABLE} {{\n{chains}}}\n"


def cut_off(state: Path, host_netns: str) -> None:
    """Cut the host in ``host_netns`` off from the replicas (and so from the store) until
    :func:`reconnect` (the table is in the cluster's ledger: ``down`` removes it too)."""
    netns.apply_nft(_ledger(state), host_netns, CUT_TABLE, cut_ruleset())


def reconnect(host_netns: str) -> None:
    netns.delete_nft(host_netns, CUT_TABLE)


def teardown(state: Path) -> list[str]:
    """Remove the LAN, the hosts' namespaces and links by the ledger; problems, if any."""
    return _ledger(state).undo(netns.remove_entry)


# ---------------------------------------------------------------------------- the relay


def relay_argv(lan: str, ports: Sequence[int]) -> list[str]:
    return [
        sys.executable, "-m", "trustmesh.runtime.hostnet", "relay", "--netns", lan,
        "--listen", CONTROL_IP, *(x for p in sorted(set(ports)) for x in ("--port", str(p))),
    ]  # fmt: skip


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()  # half-close: the peer sees the end, as without the relay
    except (OSError, RuntimeError):
        writer.close()


async def _splice(port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        upstream_reader, upstream_writer = await asyncio.open_connection(RELAY_TARGET, port)
    except OSError:
        writer.close()  # the replica is down: the client sees its connection end and fails over
        return
    try:
        await asyncio.gather(_copy(reader, upstream_writer), _copy(upstream_reader, writer))
    finally:
        for w in (writer, upstream_writer):
            w.close()


async def relay(lan: str, address: str, ports: Sequence[int]) -> None:
    """Listen in namespace ``lan`` on ``address`` at each port; splice to loopback."""
    servers = []
    for port in ports:
        sock = netns.netns_socket(lan)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(1024)
        sock.setblocking(False)

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter, p: int = port) -> None:
            await _splice(p, r, w)

        servers.append(await asyncio.start_server(handle, sock=sock))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"ready": True, "listen": address, "ports": list(ports)}), flush=True)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trustmesh.runtime.hostnet")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("relay", help="splice a LAN address's ports to loopback")
    run.add_argument("--netns", required=True)
    run.add_argument("--listen", required=True)
    run.add_argument("--port", type=int, action="append", default=[])
    args = parser.parse_args(argv)
    try:
        asyncio.run(relay(args.netns, args.listen, args.port))
    except OSError as exc:
        print(json.dumps({"ready": False, "error": str(exc)}), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
