"""Network namespaces, links, addresses and routes (pyroute2), nftables (the ``nft`` binary).

The doing half of the sandbox: :mod:`trustmesh.runtime.plan` decides addresses, this
module makes them exist. Everything happens inside namespaces the runtime created: links
are created in the node namespace and one end is moved into the pod's, so nothing is
configured in the host's own network namespace.

Why two tools: netlink (namespaces, veth pairs, the bridge, addresses, routes, link state)
goes through pyroute2 instead of running ``ip``; nftables rules go through the
distribution's ``nft`` because pyroute2's nftables support cannot build nat/redirect rules,
and ``nft -f`` applies a whole table as one transaction.

Per-thread namespace switches (:func:`entered`) rely on Linux keeping the network
namespace per thread: only the calling thread moves, and it moves back. Namespaces are
created and netlink sockets opened that way, never by pyroute2's own helpers for named
namespaces: those fork a copy of the calling process and SIGTERM it afterwards, and a
forked copy of an asyncio program passes the signal on to the parent's event loop
(through the shared signal wake-up descriptor) — the supervisor would stop itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from trustmesh.runtime.interpreter import sandbox_python
from trustmesh.runtime.ledger import Entry, Ledger

if TYPE_CHECKING:
    from pyroute2 import IPRoute

__all__ = [
    "BRIDGE",
    "NETNS_DIR",
    "NftError",
    "SandboxUnavailable",
    "add_bridge",
    "add_routes",
    "add_uplink",
    "apply_nft",
    "attach_pod",
    "create_netns",
    "current_is",
    "delete_nft",
    "entered",
    "netns_socket",
    "remove_entry",
    "sandbox_support",
    "setup_node",
    "sysctl_in",
]

NETNS_DIR = Path("/run/netns")
BRIDGE = "br0"
BRIDGE_MAC = "02:00:0a:58:00:01"  # locally administered; each mesh has its own L2
CLONE_NEWNET = 0x40000000
_MS_BIND = 4096
_MS_REC = 16384
_MS_SHARED = 1 << 20
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class SandboxUnavailable(RuntimeError):
    """This host cannot run the sandbox; the message says what is missing."""


class NftError(RuntimeError):
    """``nft`` refused a ruleset; the message carries its error output."""


def sandbox_support() -> str | None:
    """Why the sandbox cannot run here (None: it can): root, ``nft``, network namespaces."""
    if os.geteuid() != 0:
        return "not running as root (namespaces, links and nftables need it)"
    if shutil.which("nft") is None:
        return "the nft command is missing (Debian: apt-get install nftables)"
    if not Path("/proc/self/ns/net").exists():
        return "this kernel has no network namespaces"
    python = sandbox_python()
    if isinstance(python, str):
        return python
    return None


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the block with this thread in network namespace ``name``, then return."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(NETNS_DIR / name, os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


def netns_socket(
    name: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
) -> socket.socket:
    """A socket that lives in namespace ``name`` (a socket keeps the namespace it was
    made in, whatever thread uses it later)."""
    with entered(name):
        return socket.socket(family, kind)


def _sysctl(path: str, value: str) -> None:
    """Write ``/proc/sys/<path>`` as seen from the current thread's namespace."""
    Path("/proc/sys", path).write_text(value)


@contextlib.contextmanager
def _rtnl(name: str) -> Iterator[IPRoute]:
    """A netlink socket of namespace ``name`` (opened from inside it, without a fork)."""
    # Imported here: every CLI command imports the runtime, only a sandbox needs netlink
    # (pyroute2 costs ~60 ms of start-up).
    from pyroute2 import IPRoute

    with entered(name):
        ip = IPRoute()
    try:
        yield ip
    finally:
        ip.close()


def _share_run_dir() -> None:
    """/run/netns as ``ip netns`` prepares it: a shared mount, so a namespace bound on a
    file there is seen from every mount namespace."""
    NETNS_DIR.mkdir(mode=0o755, exist_ok=True)
    target = str(NETNS_DIR).encode()
    if _libc.mount(b"", target, b"none", _MS_SHARED | _MS_REC, None) == 0:
        return
    if _libc.mount(target, target, b"none", _MS_BIND | _MS_REC, None) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"bind-mounting {NETNS_DIR}: {os.strerror(code)}")
    if _libc.mount(b"", target, b"none", _MS_SHARED | _MS_REC, None) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"sharing {NETNS_DIR}: {os.strerror(code)}")


def _new_netns(name: str) -> None:
    """``ip netns add name`` in this thread: unshare, bind the new namespace on
    /run/netns/name, and return to the thread's namespace."""
    _share_run_dir()
    path = NETNS_DIR / name
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if _libc.unshare(CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"unshare(network namespace): {os.strerror(code)}")
        try:
            source = b"/proc/thread-self/ns/net"
            if _libc.mount(source, str(path).encode(), b"none", _MS_BIND, None) != 0:
                code = ctypes.get_errno()
                raise OSError(code, f"binding {path}: {os.strerror(code)}")
        finally:
            _setns(home)
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    finally:
        os.close(home)


def create_netns(ledger: Ledger, name: str) -> None:
    ledger.record("netns", name)
    if (NETNS_DIR / name).exists():
        return  # recorded by an earlier start that crashed right after creating it
    _new_netns(name)
    with entered(name):
        _sysctl("net/ipv6/conf/all/disable_ipv6", "1")
        _sysctl("net/ipv6/conf/default/disable_ipv6", "1")
    with _rtnl(name) as ip:
        ip.link("set", index=ip.link_lookup(ifname="lo")[0], state="up")


def setup_node(
    ledger: Ledger, name: str, address: str, prefix: int, *, adopt: bool = False
) -> None:
    """The node namespace: a bridge holding ``address`` (the pods' gateway), forwarding on
    (for extra source addresses), no ICMP redirects (pods must not learn to skip it).

    ``adopt``: the namespace exists already and is not this ledger's (a host of
    ``up --hosts`` is a namespace its cluster made; the host's teardown leaves it)."""
    if not adopt:
        create_netns(ledger, name)
    ledger.record("link", BRIDGE, name)
    with _rtnl(name) as ip:
        if not ip.link_lookup(ifname=BRIDGE):
            # A fixed address: a bridge whose MAC is not set takes its lowest port's, which
            # changes when a port joins (a source namespace added later) and leaves every
            # pod's ARP entry for the gateway stale — their replies then go nowhere.
            ip.link("add", ifname=BRIDGE, kind="bridge", address=BRIDGE_MAC)
        bridge = ip.link_lookup(ifname=BRIDGE)[0]
        with contextlib.suppress(Exception):  # already there after a crashed start
            ip.addr("add", index=bridge, address=address, prefixlen=prefix)
        ip.link("set", index=bridge, state="up")
    with entered(name):
        _sysctl("net/ipv4/ip_forward", "1")
        _sysctl("net/ipv4/conf/all/send_redirects", "0")
        _sysctl(f"net/ipv4/conf/{BRIDGE}/send_redirects", "0")
        if adopt:  # a host on a LAN: it answers its pods' ARP for other hosts' pods (its
            # routes say which), at once (proxy_delay: up to 0.8 s by default)
            _sysctl(f"net/ipv4/conf/{BRIDGE}/proxy_arp", "1")
            _sysctl(f"net/ipv4/neigh/{BRIDGE}/proxy_delay", "0")


def attach_pod(
    ledger: Ledger,
    node: str,
    pod: str,
    peer: str,
    addresses: tuple[str, ...],
    prefix: int,
    gateway: str,
) -> None:
    """Namespace ``pod`` with ``eth0`` holding ``addresses``, its peer ``peer`` on the
    node's bridge, and a default route via ``gateway``."""
    create_netns(ledger, pod)
    ledger.record("link", peer, node)
    with _rtnl(node) as ip:
        if not ip.link_lookup(ifname=peer):
            target = os.open(NETNS_DIR / pod, os.O_RDONLY)
            try:
                eth0 = {"ifname": "eth0", "net_ns_fd": target}
                ip.link("add", ifname=peer, kind="veth", peer=eth0)
            finally:
                os.close(target)
        index = ip.link_lookup(ifname=peer)[0]
        ip.link("set", index=index, master=ip.link_lookup(ifname=BRIDGE)[0], state="up")
    with entered(pod):
        _sysctl("net/ipv4/conf/all/accept_redirects", "0")
    with _rtnl(pod) as ip:
        eth0 = ip.link_lookup(ifname="eth0")[0]
        for i, address in enumerate(addresses):
            # the first address is the pod's own (on the bridge's subnet); others are
            # extra source addresses a test asked for, reachable through the node's route
            length = prefix if i == 0 else 32
            with contextlib.suppress(Exception):
                ip.addr("add", index=eth0, address=address, prefixlen=length)
        ip.link("set", index=eth0, state="up")
        with contextlib.suppress(Exception):
            ip.route("add", dst="default", gateway=gateway)


def route_to(node: str, address: str) -> None:
    """In the node namespace: ``address`` (``/32`` unless a CIDR) is reached over the
    bridge — an extra source address outside the pod subnet, held by one namespace, or
    the ClusterIP range, which hostNetwork pods' connections must be routable to before
    the node's kube-proxy rules DNAT them (the kernel picks a route at ``connect``)."""
    destination = address if "/" in address else f"{address}/32"
    with _rtnl(node) as ip:
        bridge = ip.link_lookup(ifname=BRIDGE)[0]
        with contextlib.suppress(Exception):
            ip.route("add", dst=destination, oif=bridge)


def _in_netns(netns: str, *argv: str) -> list[str]:
    # nsenter (util-linux) enters the namespace between fork and exec: no Python runs in a
    # forked child of this process, which may hold threads (gRPC's) a fork leaves broken.
    return ["nsenter", f"--net={NETNS_DIR / netns}", *argv]


def apply_nft(ledger: Ledger, netns: str, table: str, ruleset: str) -> None:
    """Apply ``ruleset`` (``nft -f`` text) inside ``netns``, as one transaction."""
    ledger.record("nft", table, netns)
    done = subprocess.run(
        _in_netns(netns, "nft", "-f", "-"), input=ruleset.encode(), capture_output=True
    )
    if done.returncode != 0:
        raise NftError(f"nft in {netns}: {done.stderr.decode(errors='replace').strip()}")


def remove_entry(entry: Entry) -> None:
    """Remove one ledger entry's object; an object already gone is not an error."""
    if entry.kind == "netns":
        path = NETNS_DIR / entry.name
        if path.exists():
            from pyroute2 import netns as pyroute2_netns

            pyroute2_netns.remove(entry.name)
    elif entry.kind == "dir":
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(entry.name)
    elif entry.kind in ("link", "nft"):
        assert entry.netns is not None
        if not (NETNS_DIR / entry.netns).exists():
            return  # gone with its namespace
        if entry.kind == "link":
            with _rtnl(entry.netns) as ip:
                for index in ip.link_lookup(ifname=entry.name):
                    with contextlib.suppress(Exception):
                        ip.link("del", index=index)
        else:
            with contextlib.suppress(NftError):
                _nft_delete(entry.netns, entry.name)


def delete_nft(netns: str, table: str) -> None:
    """Delete table ``ip table`` (or ``FAMILY table`` when named so) in ``netns``; one
    already gone is not an error."""
    _nft_delete(netns, table)


def _nft_delete(netns: str, table: str) -> None:
    family, _, name = table.rpartition(" ")
    done = subprocess.run(
        _in_netns(netns, "nft", "delete", "table", family or "ip", name), capture_output=True
    )
    stderr = done.stderr.decode(errors="replace")
    if done.returncode != 0 and "No such file" not in stderr:
        raise NftError(stderr.strip())


def exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def current_is(name: str) -> bool:
    """Is the calling thread in network namespace ``name`` (``/run/netns/name``)?"""
    try:
        here = os.stat("/proc/thread-self/ns/net")
        there = os.stat(NETNS_DIR / name)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def sysctl_in(name: str, settings: dict[str, str]) -> None:
    """Write ``/proc/sys`` entries as seen from namespace ``name``."""
    with entered(name):
        for path, value in settings.items():
            _sysctl(path, value)


def add_bridge(ledger: Ledger, netns: str, bridge: str, address: str, prefix: int) -> None:
    """A bridge in ``netns`` holding ``address/prefix``, up (a LAN's switch)."""
    ledger.record("link", bridge, netns)
    with _rtnl(netns) as ip:
        if not ip.link_lookup(ifname=bridge):
            ip.link("add", ifname=bridge, kind="bridge")
        index = ip.link_lookup(ifname=bridge)[0]
        with contextlib.suppress(Exception):  # already there after a crashed start
            ip.addr("add", index=index, address=address, prefixlen=prefix)
        ip.link("set", index=index, state="up")


def add_uplink(
    ledger: Ledger,
    lan: str,
    bridge: str,
    port: str,
    netns: str,
    device: str,
    address: str,
    prefix: int,
) -> None:
    """A veth pair: ``port`` on ``bridge`` in namespace ``lan``, its peer ``device`` in
    ``netns`` holding ``address/prefix`` — a host's cable to a LAN switch."""
    ledger.record("link", port, lan)
    with _rtnl(lan) as ip:
        if not ip.link_lookup(ifname=port):
            target = os.open(NETNS_DIR / netns, os.O_RDONLY)
            try:
                peer = {"ifname": device, "net_ns_fd": target}
                ip.link("add", ifname=port, kind="veth", peer=peer)
            finally:
                os.close(target)
        index = ip.link_lookup(ifname=port)[0]
        ip.link("set", index=index, master=ip.link_lookup(ifname=bridge)[0], state="up")
    with _rtnl(netns) as ip:
        index = ip.link_lookup(ifname=device)[0]
        with contextlib.suppress(Exception):
            ip.addr("add", index=index, address=address, prefixlen=prefix)
        ip.link("set", index=index, state="up")


def add_routes(netns: str, destinations: list[str], gateway: str) -> None:
    """In ``netns``: each destination (``/32`` unless a CIDR, or ``default``) via
    ``gateway``; a route already there is replaced."""
    with _rtnl(netns) as ip:
        for destination in destinations:
            if destination != "default" and "/" not in destination:
                destination = f"{destination}/32"
            ip.route("replace", dst=destination, gateway=gateway)
