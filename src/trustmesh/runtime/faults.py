"""Faults for a running multi-host mesh (``trustmesh up --hosts N --replicas R``).

What the fault tests (and an operator rehearsing an outage) do to a mesh from outside:

* :func:`kill_replica` / :func:`restart_replica`: SIGKILL one control-plane replica, then
  start it again as the same replica — its name, state directory and the addresses every
  host's proxies and agents already know (xDS, CA, renewal, metrics ports);
* :func:`kill_etcd_member` / :func:`restart_etcd_member`: the same for one etcd member
  (its name, data directory and URLs: it rejoins the cluster from its own WAL);
* :func:`cut` / :func:`cut_off`: one host cut off from the control plane and the store —
  nothing from the host's addresses reaches any replica's or etcd member's port, nothing
  comes back — while its pod-to-pod traffic still flows. An nftables table in this
  network namespace (root), dropped at the ``input`` hook as a lost link would (no reset,
  no error: connections stall), removed on the way out even when the caller fails.

Every restarted process gets ``TRUSTMESH_MESH=<state>`` and its new PID in
``cluster.json``, so ``trustmesh down`` stops it as any other.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trustmesh.runtime import hostnet
from trustmesh.runtime.addresses import MESH_ENV
from trustmesh.runtime.cluster import host_namespace, store_of
from trustmesh.runtime.layout import Layout, cluster_file, read_json, write_json
from trustmesh.runtime.plan import MeshPlan
from trustmesh.store.etcd_server import healthy

__all__ = [
    "FaultError",
    "Killed",
    "control_endpoints",
    "cut",
    "cut_off",
    "host_addresses",
    "kill_etcd_member",
    "kill_replica",
    "restart_etcd_member",
    "restart_replica",
]

GONE_TIMEOUT = 10.0
REPLICA_TIMEOUT = 60.0
ETCD_TIMEOUT = 30.0
_PORT_OPTIONS = ("--ca-port", "--ca-renewal-port", "--metrics-port")


class FaultError(RuntimeError):
    """The fault cannot be made or undone (no such member, a restart that failed)."""


@dataclass(frozen=True, slots=True)
class Killed:
    """A process :func:`kill_replica` / :func:`kill_etcd_member` killed: how to start it
    again as itself."""

    part: str  # "replicas" or "etcd": its list in cluster.json
    name: str
    argv: tuple[str, ...]
    pid: int  # the PID it had


def _record(state: Path) -> dict[str, Any]:
    try:
        record: dict[str, Any] = read_json(cluster_file(state))
    except (OSError, ValueError) as exc:
        raise FaultError(f"no multi-host mesh runs from {state}: {exc}") from None
    return record


def _entry(record: dict[str, Any], part: str, name: str) -> dict[str, Any]:
    for entry in record.get(part, []):
        if entry.get("name") == name:
            return dict(entry)
    names = ", ".join(e.get("name", "?") for e in record.get(part, []))
    raise FaultError(f"no {part} member {name!r} in this mesh (there are: {names})")


def _set_pid(state: Path, part: str, name: str, pid: int) -> None:
    record = _record(state)
    for entry in record.get(part, []):
        if entry.get("name") == name:
            entry["pid"] = pid
    write_json(cluster_file(state), record)


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"  # a zombie has exited


def _kill(state: Path, part: str, name: str) -> Killed:
    entry = _entry(_record(state), part, name)
    pid = entry.get("pid")
    if not isinstance(pid, int) or not _running(pid):
        raise FaultError(f"{name} is not running")
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError as exc:
        raise FaultError(f"cannot read {name}'s command line: {exc}") from None
    if f"{MESH_ENV}={state}".encode() not in environ:  # a reused PID: not ours
        raise FaultError(f"pid {pid} is no longer {name} of this mesh")
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + GONE_TIMEOUT
    while _running(pid):  # not our child: no event for its exit
        if time.monotonic() > deadline:
            raise FaultError(f"{name} (pid {pid}) still runs after SIGKILL")
        time.sleep(0.01)
    return Killed(part, name, tuple(a.decode() for a in argv), pid)


def _spawn(state: Path, argv: list[str], log: Path, *, ready_line: bool) -> subprocess.Popen[str]:
    with open(log, "ab") as err:
        return subprocess.Popen(
            argv,
            stdout=subprocess.PIPE if ready_line else err,
            stderr=err,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
            env={**os.environ, MESH_ENV: str(state)},
        )


def kill_replica(state: Path, name: str) -> Killed:
    """SIGKILL replica ``name`` (as recorded in ``state/cluster.json``)."""
    return _kill(state, "replicas", name)


def _option(argv: list[str], option: str, value: str) -> list[str]:
    """``argv`` with ``option VALUE`` set (replaced where given, else appended)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return [*out, option, value]


def restart_replica(state: Path, killed: Killed, timeout: float = REPLICA_TIMEOUT) -> float:
    """Start ``killed`` again on the ports it had (the ones every host knows); seconds
    until it printed its ready line."""
    entry = _entry(_record(state), "replicas", killed.name)
    home = Path(entry["state"])
    try:
        earlier = read_json(home / "replica.json")
    except (OSError, ValueError) as exc:
        raise FaultError(f"{killed.name} left no replica.json: {exc}") from None
    argv = _option(list(killed.argv), "--listen", entry["address"])
    for option, key in zip(_PORT_OPTIONS, ("ca", "ca_renewal", "metrics"), strict=True):
        argv = _option(argv, option, str(earlier[key]).rpartition(":")[2])
    started = time.monotonic()
    process = _spawn(state, argv, home / "stderr.log", ready_line=True)
    _set_pid(state, "replicas", killed.name, process.pid)  # `down` stops it from now on
    assert process.stdout is not None
    line = ""
    deadline = started + timeout
    while time.monotonic() < deadline:  # the replica prints its ready line or exits
        line = process.stdout.readline()
        if line.strip().startswith("{") or process.poll() is not None:
            break
    process.stdout.close()
    info = json.loads(line) if line.strip().startswith("{") else {}
    if not info.get("ready"):
        raise FaultError(f"{killed.name} did not start again: {info.get('error', line)}")
    if info.get("address") != entry["address"]:
        where = info.get("address")
        raise FaultError(f"{killed.name} came back at {where}, not {entry['address']}")
    return time.monotonic() - started


def kill_etcd_member(state: Path, name: str) -> Killed:
    """SIGKILL etcd member ``name`` (``m0``, ``m1``, …)."""
    return _kill(state, "etcd", name)


def restart_etcd_member(state: Path, killed: Killed, timeout: float = ETCD_TIMEOUT) -> float:
    """Start ``killed`` again with its data directory; seconds until it is healthy (it
    has caught up with a leader)."""
    entry = _entry(_record(state), "etcd", killed.name)
    tls = store_of(state)[1]
    context = tls.ssl_context() if tls is not None else None  # /health needs a client cert
    started = time.monotonic()
    process = _spawn(
        state, list(killed.argv), state / "etcd" / f"{killed.name}.log", ready_line=False
    )
    _set_pid(state, "etcd", killed.name, process.pid)
    deadline = started + timeout
    while True:
        if process.poll() is not None:
            raise FaultError(f"etcd {killed.name} exited again (see etcd/{killed.name}.log)")
        if healthy(entry["client"], context):
            return time.monotonic() - started
        if time.monotonic() > deadline:
            raise FaultError(f"etcd {killed.name} not healthy {timeout:.0f}s after its restart")
        time.sleep(0.02)  # readiness poll of a starting process


# ----------------------------------------------------------------------- the host cut


def host_addresses(state: Path, host: str) -> list[str]:
    """Every address ``host``'s processes use: its pods' IPs (where their Envoys and
    agents connect from), their apps' and outbound addresses."""
    entry = _entry(_record(state), "hosts", host)
    try:
        plan = MeshPlan.from_json(read_json(Layout(Path(entry["state"])).plan))
    except (OSError, ValueError, KeyError) as exc:
        raise FaultError(f"{host} has no plan yet: {exc}") from None
    found = {a for p in plan.pods for a in (p.pod_ip, p.app_ip, p.outbound_ip) if a}
    return sorted(found)


def control_endpoints(state: Path) -> list[tuple[str, int]]:
    """Every replica's ports (xDS, CA, renewal, metrics) and every etcd member's client
    port: what a cut host cannot reach."""
    record = _record(state)
    found: set[tuple[str, int]] = set()
    for replica in record.get("replicas", []):
        addresses = [replica.get(k) for k in ("address", "ca", "ca_renewal")]
        with contextlib.suppress(OSError, ValueError):
            addresses.append(read_json(Path(replica["state"]) / "replica.json").get("metrics"))
        for address in addresses:
            if isinstance(address, str) and ":" in address:
                ip, _, port = address.rpartition(":")
                found.add((ip, int(port)))
    for member in record.get("etcd", []):
        ip, _, port = str(member["client"]).partition("://")[2].rpartition(":")
        found.add((ip, int(port)))
    return sorted(found)


def _table(host: str) -> str:
    return "trustmesh_cut_" + "".join(c if c.isalnum() else "_" for c in host)


def cut_ruleset(table: str, addresses: list[str], control: list[tuple[str, int]]) -> str:
    """The nftables table that cuts ``addresses`` off from ``control`` (both ways)."""
    hosts = ", ".join(addresses)
    ends = ", ".join(f"{ip} . {port}" for ip, port in control)
    return f"""\
table inet {table}
delete table inet {table}
table inet {table} {{
    set host {{ type ipv4_addr; elements = {{ {hosts} }} }}
    set control {{ type ipv4_addr . inet_service; elements = {{ {ends} }} }}
    chain input {{
        type filter hook input priority -10; policy accept;
        ip saddr @host ip daddr . tcp dport @control drop
        ip daddr @host ip saddr . tcp sport @control drop
    }}
}}
"""


def _nft(ruleset: str) -> None:
    done = subprocess.run(["nft", "-f", "-"], input=ruleset.encode(), capture_output=True)
    if done.returncode != 0:
        raise FaultError(f"nft: {done.stderr.decode(errors='replace').strip()}")


@contextlib.contextmanager
def cut(state: Path, host: str) -> Iterator[list[str]]:
    """``host`` cut off from every replica and etcd member while the block runs (root;
    yields the host's addresses); the rules go when it ends, however it ends.

    A host in its own network namespace is cut inside it (every packet to the LAN's
    control-plane relay dropped); a host in process mode by its addresses in the root
    namespace."""
    addresses = host_addresses(state, host)
    namespace = host_namespace(state, host)
    if namespace is not None:
        hostnet.cut_off(state, namespace)
        try:
            yield addresses
        finally:
            hostnet.reconnect(namespace)
        return
    control = control_endpoints(state)
    if not addresses or not control:
        raise FaultError(f"nothing to cut: {host} has no address or the mesh no control plane")
    table = _table(host)
    _nft(cut_ruleset(table, addresses, control))
    try:
        yield addresses
    finally:
        _nft(f"table inet {table}\ndelete table inet {table}\n")


def cut_off(state: Path, host: str, seconds: float) -> None:
    """Cut ``host`` off from the control plane and the store for ``seconds``."""
    with cut(state, host):
        time.sleep(seconds)  # the length of the outage itself
