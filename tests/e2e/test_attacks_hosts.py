"""Attacks from a pod on a multi-host mesh (issue 11, netns mode, root): what a workload —
root in its own network namespace, with raw sockets — can reach and do.

Kubernetes' answer is the yardstick: a pod cannot use etcd (client certificates of
etcd's own CA, held by the API server only), cannot register as a node without a
bootstrap token, cannot send as another pod (the CNI's anti-spoofing), and reaches the
control plane only at its public ports. Every test runs from inside a pod's namespace on
a host of the shared mesh (``hosts_cluster``), except the certificate checks, which need
no LAN: etcd refuses a client without a certificate even on loopback.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from aetcd import rpc

from tests.e2e.hosts_rig import NETNS
from trustmesh.runtime import netns
from trustmesh.runtime.cluster import store_client, store_of
from trustmesh.runtime.hostnet import CONTROL_IP
from trustmesh.runtime.layout import Layout, read_json
from trustmesh.runtime.plan import MeshPlan, PodPlan
from trustmesh.store.etcd_pki import EtcdPki

pytestmark = pytest.mark.skipif(
    not NETNS or shutil.which("nsenter") is None,
    reason="the hosts' network namespaces need root, nft and nsenter",
)

ATTACKER = "legacy/sleep"  # host 2, no sidecar: its traffic leaves its namespace as sent
SAME_HOST = "bar/sleep"  # host 2: a pod next to the attacker
OTHER_HOST = "foo/httpbin"  # host 1


def _record(state: Path) -> dict[str, Any]:
    value: dict[str, Any] = read_json(state / "cluster.json")
    return value


def _pods(state: Path) -> dict[str, tuple[str, PodPlan]]:
    """ref → (host, its pod plan) for every pod of every host."""
    out: dict[str, tuple[str, PodPlan]] = {}
    for host in _record(state)["hosts"]:
        plan = MeshPlan.from_json(read_json(Layout(Path(host["state"])).plan))
        for pod in plan.pods:
            if pod.ref in host["pods"]:
                out[pod.ref] = (host["name"], pod)
    return out


def _pod(state: Path, ref: str) -> PodPlan:
    return _pods(state)[ref][1]


def _open_ports(namespace: str, address: str, ports: range, timeout: float = 2.0) -> set[int]:
    """The TCP ports of ``address`` that accept a connection made from ``namespace``."""
    found: set[int] = set()
    batch = 1000
    for first in range(ports.start, ports.stop, batch):
        pending: dict[socket.socket, int] = {}
        with netns.entered(namespace):
            for port in range(first, min(first + batch, ports.stop)):
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex((address, port))
                pending[sock] = port
        deadline = timeout
        while pending and deadline > 0:
            _, writable, _ = select.select([], list(pending), [], 0.2)
            deadline -= 0.2
            for sock in writable:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    found.add(pending[sock])
                sock.close()
                del pending[sock]
        for sock in pending:  # no answer at all: dropped, not open
            sock.close()
    return found


def _listeners(namespace: str) -> list[str]:
    """Every listening TCP/UDP socket in ``namespace`` (``ss``), as "ADDRESS:PORT"."""
    shown = subprocess.run(
        ["nsenter", f"--net=/run/netns/{namespace}", "ss", "-Hltnu"],
        capture_output=True, text=True, timeout=10, check=True,
    )  # fmt: skip
    return [line.split()[4] for line in shown.stdout.splitlines() if line.strip()]


def test_a_pod_reaches_only_the_replicas_public_ports_on_the_lan(hosts_cluster: Path) -> None:
    record = _record(hosts_cluster)
    attacker = _pod(hosts_cluster, ATTACKER)
    assert attacker.netns is not None and not attacker.sidecar
    public = {
        int(r[k].rpartition(":")[2])
        for r in record["replicas"]
        for k in ("address", "ca", "ca_renewal")
    }
    etcd = {int(m["client"].rpartition(":")[2]) for m in record["etcd"]}
    assert len(public) == 6 and len(etcd) == 3
    # The relay on the LAN: every replica's xDS, CA and renewal port, nothing else — no
    # etcd member (client or peer port), no replica's metrics. Every port is tried.
    assert _open_ports(attacker.netns, CONTROL_IP, range(1, 65536)) == public
    # The hosts themselves (their uplinks, their pods' gateway): nothing listens in a
    # host's namespace (its node agent dials out only), so nothing there for a pod.
    for host in record["hosts"]:
        assert _listeners(host["netns"]) == [], host["name"]


async def _range(channel: grpc.aio.Channel) -> str:
    """What etcd answers a read of the whole key space over ``channel``: "ok" or the
    gRPC status."""
    try:
        await rpc.KVStub(channel).Range(rpc.RangeRequest(key=b"\0", range_end=b"\0"), timeout=3)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    finally:
        await channel.close()
    return "ok"


def test_etcd_refuses_a_client_without_its_certificate_even_on_loopback(
    hosts_cluster: Path, tmp_path: Path
) -> None:
    url, tls = store_of(hosts_cluster)
    assert tls is not None and url.startswith("https://")
    pki = hosts_cluster / "etcd-pki"
    assert (pki.stat().st_mode & 0o777) == 0o700
    keys = sorted(p.name for p in pki.glob("*.key"))
    assert all((pki / k).stat().st_mode & 0o777 == 0o600 for k in keys)
    # Certificates only for the members, the replicas and the operator: none for a host.
    assert keys == sorted(
        ["ca.key", "client-operator.key", "client-replica-r1.key", "client-replica-r2.key"]
        + [f"member-m{i}.key" for i in range(3)]
    )
    host, port = url.removeprefix("https://").split(",")[0].rsplit(":", 1)
    target = f"{host}:{port}"
    ca = tls.ca.read_bytes()
    stranger = EtcdPki.create(tmp_path / "other-ca").client("operator")  # right name, wrong CA

    async def attempts() -> dict[str, str]:
        name = [("grpc.ssl_target_name_override", host)]
        return {
            "plaintext": await _range(grpc.aio.insecure_channel(target)),
            "tls, no certificate": await _range(
                grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(ca), options=name)
            ),
            "a certificate of another CA": await _range(
                grpc.aio.secure_channel(
                    target,
                    grpc.ssl_channel_credentials(
                        ca, stranger.key.read_bytes(), stranger.cert.read_bytes()
                    ),
                    options=name,
                )
            ),
            "the operator's certificate": await _range(
                grpc.aio.secure_channel(target, tls.credentials(), options=name)
            ),
        }

    got = asyncio.run(attempts())
    assert got == {
        "plaintext": "UNAVAILABLE",
        "tls, no certificate": "UNAVAILABLE",
        "a certificate of another CA": "UNAVAILABLE",
        "the operator's certificate": "ok",
    }, got


PROBE = r"""
import asyncio, json, sys
import grpc
from trustmesh.runtime.registration import RegistryClient, Joined

async def main(addresses, roots, node):
    client = RegistryClient(addresses, roots, timeout=5)
    out = {}
    for name, token in (("no token", ""), ("a forged token", "eyJhbGciOiJFZERTQSJ9.e30.AAAA")):
        try:
            await client.join(token, [], ttl=30)
            out[name] = "joined"
        except grpc.aio.AioRpcError as exc:
            out[name] = exc.code().name
    try:
        await client.keep_alive(Joined(node, 0, 30, "guessed-secret", {}, ()))
        out["keep-alive, wrong secret"] = "kept"
    except grpc.aio.AioRpcError as exc:
        out["keep-alive, wrong secret"] = exc.code().name
    await client.close()
    print(json.dumps(out))

asyncio.run(main(sys.argv[1].split(","), open(sys.argv[2], "rb").read(), sys.argv[3]))
"""


def _registered(state: Path, host: str) -> list[str]:
    async def read() -> list[str]:
        from trustmesh.store.etcd_store import WorkloadRegistry

        client = store_client(state)
        try:
            records, _ = await WorkloadRegistry(client).workloads(host)
            return sorted(r.ref for r in records)
        finally:
            await client.close()

    return asyncio.run(read())


def test_a_pod_cannot_join_or_keep_a_host_alive_without_its_token_or_secret(
    hosts_cluster: Path,
) -> None:
    attacker = _pod(hosts_cluster, ATTACKER)
    assert attacker.netns is not None
    before = _registered(hosts_cluster, "host-1")
    assert OTHER_HOST in before
    record = _record(hosts_cluster)
    done = subprocess.run(
        ["nsenter", f"--net=/run/netns/{attacker.netns}", sys.executable, "-c", PROBE,
         record["control_plane"], str(hosts_cluster / "ca-roots.pem"), "host-1"],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout)
    assert got == {
        "no token": "UNAUTHENTICATED",
        "a forged token": "UNAUTHENTICATED",
        "keep-alive, wrong secret": "UNAUTHENTICATED",
    }, got
    assert _registered(hosts_cluster, "host-1") == before  # nothing changed


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _udp_packet(source: str, destination: str, port: int, payload: bytes) -> bytes:
    """An IPv4/UDP datagram with any source address (IP_HDRINCL)."""
    udp = struct.pack("!HHHH", 40000, port, 8 + len(payload), 0) + payload
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, socket.IPPROTO_UDP, 0,
        socket.inet_aton(source), socket.inet_aton(destination),
    )  # fmt: skip
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + udp


def _received(sender_ns: str, sources: list[str], receiver_ns: str, destination: str) -> set[str]:
    """The sources among ``sources`` whose UDP datagram, sent from ``sender_ns`` with that
    source address, reached a socket bound in ``receiver_ns`` (each sent three times:
    one loss is not a verdict; the first in ``sources`` must arrive before we stop)."""
    receiver = netns.netns_socket(receiver_ns, socket.AF_INET, socket.SOCK_DGRAM)
    with netns.entered(sender_ns):
        sender = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    got: set[str] = set()
    try:
        receiver.bind((destination, 0))
        port = receiver.getsockname()[1]
        for _ in range(3):
            for source in sources:
                packet = _udp_packet(source, destination, port, source.encode())
                sender.sendto(packet, (destination, 0))
        receiver.settimeout(1.0)  # bounded: after the last datagram, 1 s of silence ends it
        while True:
            try:
                got.add(receiver.recv(2048).decode())
            except TimeoutError:
                return got
    finally:
        receiver.close()
        sender.close()


def test_a_pod_cannot_send_with_another_pods_address(hosts_cluster: Path) -> None:
    pods = _pods(hosts_cluster)
    attacker = pods[ATTACKER][1]
    same, other = pods[SAME_HOST][1], pods[OTHER_HOST][1]
    assert pods[ATTACKER][0] == pods[SAME_HOST][0] != pods[OTHER_HOST][0]
    assert attacker.netns is not None
    for target in (same, other):  # next door, and across the LAN
        assert target.netns is not None
        neighbours = [p.pod_ip for p in (same, other) if p is not target]
        spoofed = [*neighbours, "10.88.0.1", "10.87.0.11", "10.87.0.12", CONTROL_IP]
        got = _received(attacker.netns, [attacker.pod_ip, *spoofed], target.netns, target.pod_ip)
        # Its own address arrives (the path works: a loss below is the rule's doing); a
        # neighbour's, a remote pod's, a host's or the control plane's does not.
        assert got == {attacker.pod_ip}, f"{ATTACKER} → {target.ref}: {sorted(got)}"
