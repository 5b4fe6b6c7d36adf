"""``trustmesh up DIR --hosts N --replicas R``: a mesh over several hosts and replicas.

Started in this order, each recorded in ``cluster.json`` (PIDs) as soon as it runs, so
``trustmesh down`` stops all of it — also after a start that failed half way:

1. an etcd cluster of three members (the store), TLS for clients and peers with client
   certificates of its own CA in ``S/etcd-pki/`` (members, replicas and the operator only:
   hosts and pods have none, and the relay does not forward etcd's ports to the LAN);
2. the mesh CA (``ca/``) and DIR's configuration applied to the store (as
   ``trustmesh apply``);
3. R control-plane replicas (``trustmesh control-plane``), each its own process;
4. N hosts (``trustmesh node join`` with a fresh node token each): a pod with
   ``spec.nodeName: host-K`` runs on host K, the others are spread in turn.

Two modes. ``netns`` (as root with ``nft``; the default there): each host is its own
network namespace on a LAN namespace, its pods sandboxed under it, and the replicas and
etcd reached through a relay on the LAN (see :mod:`trustmesh.runtime.hostnet`; every
namespace and link is in ``network.jsonl``, removed by ``down``). ``process`` (non-root):
every host's pods are processes on its own loopback block.

Every child has ``TRUSTMESH_MESH=<state dir>`` in its environment: a recorded PID is
signalled only while it still names this mesh (never a reused PID).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trustmesh.config import load_config
from trustmesh.identity.ca import CaConfig, CertificateAuthority
from trustmesh.identity.store import StoreError
from trustmesh.runtime import hostnet, netns
from trustmesh.runtime.addresses import MESH_ENV, AddressConflict, claim_block
from trustmesh.runtime.layout import Layout, cluster_file, read_json, write_json
from trustmesh.runtime.ledger import Ledger
from trustmesh.runtime.plan import Isolation, netns_name, plan_mesh
from trustmesh.runtime.podexec import podexec_argv
from trustmesh.runtime.recorded import belongs_to, stop_recorded
from trustmesh.runtime.replica import read_replicas
from trustmesh.runtime.sandbox import LEDGER_FILE as SANDBOX_LEDGER
from trustmesh.runtime.sandbox import mesh_id
from trustmesh.runtime.supervisor import StartError
from trustmesh.store.apply import apply_resources
from trustmesh.store.etcd_client import EtcdClient, EtcdTls, connect
from trustmesh.store.etcd_server import EtcdCluster, free_port
from trustmesh.store.etcd_store import EtcdResourceStore

ETCD_PKI = "etcd-pki"
ETCD_MEMBERS = 3
REPLICA_TIMEOUT = 60.0
HOST_TIMEOUT = 180.0
STOP_TIMEOUT = 30.0
DEFAULT_LEASE_TTL = 30  # seconds a dead host's endpoints stay (HostJoin's default)
RELAYED = ("address", "ca", "ca_renewal")  # a replica's ports hosts reach over the LAN

Progress = Callable[[str], None]


def store_of(state: Path) -> tuple[str, EtcdTls | None]:
    """The store of the mesh in ``state`` and the operator's etcd client certificate
    (StoreError saying why not)."""
    try:
        record = read_json(cluster_file(state))
    except (OSError, ValueError) as exc:
        raise StoreError(f"--state {state}: no multi-host mesh here ({exc})") from None
    url = record.get("store")
    if not isinstance(url, str):
        raise StoreError(f"--state {state}: its etcd has not started")
    tls = record.get("etcd_tls")
    if isinstance(tls, dict):
        return url, EtcdTls(Path(tls["ca"]), Path(tls["cert"]), Path(tls["key"]))
    return url, None


def store_client(state: Path) -> EtcdClient:
    """A client of the mesh's store with the operator's certificate."""
    return connect(*store_of(state))


def host_names(count: int) -> list[str]:
    return [f"host-{i}" for i in range(1, count + 1)]


def assign_pods(config: list[str], hosts: list[str], base: str) -> dict[str, list[str]]:
    """host → the refs of the pods it runs: ``spec.nodeName`` where set, else in turn."""
    loaded = load_config(config, compile_policy=False)
    if loaded.errors:
        raise StartError("the configuration has errors", loaded.errors)
    plan, problems = plan_mesh(loaded.snapshot, base=base, isolation=Isolation.PROCESS)
    if plan is None:
        raise StartError("the workloads cannot run locally", problems)
    pinned: dict[str, str] = {}
    for workload in loaded.snapshot.workloads:
        spec = workload.resource.spec
        pod = getattr(spec, "spec", None) or getattr(getattr(spec, "template", None), "spec", None)
        node = str(getattr(pod, "node_name", "") or "")
        if node:
            if node not in hosts:
                where = workload.resource.location()
                raise StartError(
                    f"{where}: {workload.ref} has spec.nodeName {node!r}, "
                    f"but the hosts are {', '.join(hosts)}"
                )
            pinned[workload.ref] = node
    out: dict[str, list[str]] = {h: [] for h in hosts}
    turn = 0
    for pod in plan.pods:
        if pod.ref in pinned:
            out[pinned[pod.ref]].append(pod.ref)
        else:
            out[hosts[turn % len(hosts)]].append(pod.ref)
            turn += 1
    return out


def pod_addresses(config: list[str]) -> dict[str, str]:
    """Every pod's address in the pod sandbox (the same plan on every host): ref → IP."""
    loaded = load_config(config, compile_policy=False)
    plan, problems = plan_mesh(loaded.snapshot, isolation=Isolation.NETNS, mesh_id="hosts")
    if plan is None:
        raise StartError("the workloads cannot run in the pod sandbox", problems)
    return {pod.ref: pod.pod_ip for pod in plan.pods}


def host_namespace(state: Path, host: str) -> str | None:
    """The network namespace of ``host`` (netns mode), None in process mode — where an
    nftables rule cuts the host off (its node agent and its sidecars alike)."""
    try:
        record = read_json(cluster_file(state))
    except (OSError, ValueError):
        return None
    for entry in record.get("hosts", []):
        if entry.get("name") == host:
            value = entry.get("netns")
            return value if isinstance(value, str) else None
    return None


class Cluster:
    """One multi-host mesh in ``state``."""

    def __init__(self, state: Path, progress: Progress = lambda message: None) -> None:
        self.state = state
        self.layout = Layout(state)
        self.progress = progress
        self.record: dict[str, Any] = {"state": "starting", "etcd": [], "replicas": [], "hosts": []}
        self._hosts: dict[str, subprocess.Popen[bytes]] = {}

    def _save(self) -> None:
        self.record["updated"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        write_json(cluster_file(self.state), self.record)

    def _env(self) -> dict[str, str]:
        return {**os.environ, MESH_ENV: str(self.state)}

    def start(
        self,
        config: list[str],
        hosts: int,
        replicas: int,
        base: str,
        isolation: Isolation = Isolation.PROCESS,
        lease_ttl: int = DEFAULT_LEASE_TTL,
    ) -> None:
        """Start everything (:class:`StartError` after stopping what started)."""
        self.record["lease_ttl"] = lease_ttl
        try:
            self._start(config, hosts, replicas, base, isolation)
        except BaseException:
            stop_cluster(self.state, self.progress)
            raise

    def _start(
        self, config: list[str], hosts: int, replicas: int, base: str, isolation: Isolation
    ) -> None:
        config = [str(Path(p).resolve()) for p in config]
        names = host_names(hosts)
        assignment = assign_pods(config, names, base)
        sandboxed = isolation is Isolation.NETNS
        addresses_of = pod_addresses(config) if sandboxed else {}
        if not sandboxed:
            try:  # the hosts' pods use this block: a second mesh there would break this one
                claim_block(base, self.state).release()
            except AddressConflict as exc:
                raise StartError(str(exc)) from None
        self.layout.create()
        self.record |= {
            "config": config,
            "base": base,
            "isolation": isolation.value,
            "supervisor_pid": os.getpid(),
        }
        self._save()

        self.progress(f"starting etcd ({ETCD_MEMBERS} members)")
        etcd = EtcdCluster(self.state / "etcd", size=ETCD_MEMBERS, pki_dir=self.state / ETCD_PKI)
        assert etcd.tls is not None
        old_environ = dict(os.environ)
        os.environ[MESH_ENV] = str(self.state)  # etcd's children inherit the marker
        try:
            etcd.start()
        except StoreError as exc:
            raise StartError(f"etcd did not start: {exc}") from None
        finally:
            os.environ.clear()
            os.environ.update(old_environ)
        self.record["etcd"] = [
            {"name": m.name, "pid": etcd.processes[m.name].pid, "client": m.client_url}
            for m in etcd.members
        ]
        self.record["store"] = etcd.url
        self.record["etcd_tls"] = etcd.tls.as_json()  # the operator's client certificate
        self._save()

        now = dt.datetime.now(dt.UTC)
        ca = CertificateAuthority.init(self.state / "ca", CaConfig(), now)
        roots = self.state / "ca-roots.pem"
        roots.write_bytes(ca.bundle_pem(now))
        self.progress("applying the configuration to the store")
        asyncio.run(_apply(etcd, config))

        for i in range(1, replicas + 1):
            self.progress(f"starting control-plane replica r{i}")
            tls = etcd.client_tls(f"replica-r{i}")  # each replica its own certificate
            self.record["replicas"].append(self._start_replica(f"r{i}", etcd.url, tls))
            self._save()
        addresses = ",".join(r["ca"] for r in self.record["replicas"])
        if sandboxed:
            addresses = self._build_network(names, assignment, addresses_of)

        self.record["control_plane"] = addresses
        self._save()
        for name in names:
            token = self._write_token(name, ca.node_token(name, dt.datetime.now(dt.UTC)))
            self.progress(f"starting {name}: {', '.join(assignment[name]) or 'no pods'}")
            self.record["hosts"].append(self._start_host(name, token, assignment[name]))
            self._save()
        for host in self.record["hosts"]:
            self._wait_host(host)
        self.record["state"] = "ready"
        self._save()

    def _write_token(self, name: str, value: str) -> Path:
        token = self.state / "hosts" / f"{name}.token"
        token.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(os.open(token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
            out.write(value)
        return token

    def rejoin(self, name: str, token: str | None = None) -> dict[str, Any]:
        """Start host ``name`` again — after its process died and its lease ended — with
        a new node token (``token``, else one minted from the mesh's CA): it registers
        its pods again (its old pods, if still running, are replaced). Its record."""
        self.record = read_json(cluster_file(self.state))
        if self.record.get("state") != "ready":
            raise StartError(f"the mesh in {self.state} is {self.record.get('state')}, not ready")
        hosts = {h["name"]: i for i, h in enumerate(self.record.get("hosts", []))}
        if name not in hosts:
            raise StartError(f"no host {name!r}: the hosts are {', '.join(hosts)}")
        old = self.record["hosts"][hosts[name]]
        if _alive(old.get("pid")) and belongs_to(old["pid"], self.layout):
            raise StartError(f"{name} runs (pid {old['pid']}): stop it first")
        if token is None:
            ca = CertificateAuthority.load(self.state / "ca")
            token = ca.node_token(name, dt.datetime.now(dt.UTC))
        self.progress(f"starting {name} again: {', '.join(old['pods']) or 'no pods'}")
        host = self._start_host(name, self._write_token(name, token), old["pods"])
        self.record["hosts"][hosts[name]] = host  # recorded before it is waited for
        self._save()
        self._wait_host(host)
        return host

    def _build_network(
        self, names: list[str], assignment: dict[str, list[str]], addresses_of: dict[str, str]
    ) -> str:
        """The LAN, the relay to the control plane, every host's namespace and routes;
        the replicas' CA addresses as the hosts reach them."""
        lan = hostnet.lan_netns(mesh_id(self.state))
        self.record["network"] = {"lan": lan, "control_ip": hostnet.CONTROL_IP}
        self._save()
        self.progress(f"building the hosts' LAN ({lan}, control plane at {hostnet.CONTROL_IP})")
        try:
            hostnet.build_lan(self.state, lan)
        except (OSError, RuntimeError) as exc:
            raise StartError(f"the hosts' network cannot be built: {exc}") from None
        # Only what hosts need: each replica's xDS, CA and renewal ports. Never etcd's (a
        # host joins and keeps alive through a replica, with its node token), never a
        # replica's metrics.
        ports: list[int] = []
        for replica in self.record["replicas"]:
            ports += [int(replica[k].rpartition(":")[2]) for k in RELAYED]
        self._start_relay(lan, ports)
        for index, name in enumerate(names, start=1):
            link = hostnet.HostLink(
                index,
                netns_name_of(self.state / "hosts" / name),
                tuple(addresses_of[ref] for ref in assignment[name]),
            )
            others = [ip for ref, ip in addresses_of.items() if ref not in assignment[name]]
            self.record["network"].setdefault("hosts", {})[name] = {
                "netns": link.netns,
                "address": link.address,
            }
            self._save()
            try:
                hostnet.attach_host(self.state, lan, link, others)
            except (OSError, RuntimeError) as exc:
                raise StartError(f"{name}'s network cannot be built: {exc}") from None
        return ",".join(
            f"{hostnet.CONTROL_IP}:{r['ca'].rpartition(':')[2]}" for r in self.record["replicas"]
        )

    def _spawn_reporting(self, command: list[str], log: Path) -> subprocess.Popen[str]:
        """A child in its own session that prints its ready line (JSON) on stdout and
        writes its stderr to ``log``."""
        with open(log, "wb") as err:
            return subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                text=True,
                start_new_session=True,
                env=self._env(),
            )

    def _start_relay(self, lan: str, ports: list[int]) -> None:
        log = self.state / "relay.log"
        process = self._spawn_reporting(hostnet.relay_argv(lan, ports), log)
        entry: dict[str, Any] = {"pid": process.pid, "ports": sorted(set(ports))}
        self.record["network"]["relay"] = entry  # recorded before it is waited for
        self._save()
        assert process.stdout is not None
        line = process.stdout.readline()  # its ready line, or EOF when it exits
        process.stdout.close()
        info = json.loads(line) if line.strip().startswith("{") else {}
        if not info.get("ready"):
            tail = log.read_text(errors="replace")[-2000:]
            raise StartError(f"the control-plane relay did not start: {info.get('error', tail)}")

    def _start_replica(self, name: str, store: str, tls: EtcdTls) -> dict[str, Any]:
        home = self.state / "replicas" / name
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Fixed ports outside the ephemeral range: restarted, it listens where every
        # host knows it (port 0 could meanwhile be some connection's source port).
        ports = [str(free_port("127.0.0.1")) for _ in range(4)]
        command = [
            sys.executable, "-m", "trustmesh", "control-plane", "--store", store, *tls.as_args(),
            "--listen", f"127.0.0.1:{ports[0]}", "--name", name, "--ca", str(self.state / "ca"),
            "--ca-port", ports[1], "--ca-renewal-port", ports[2], "--metrics-port", ports[3],
            "--state", str(home),
        ]  # fmt: skip
        process = self._spawn_reporting(command, home / "stderr.log")
        entry: dict[str, Any] = {"name": name, "pid": process.pid, "state": str(home)}
        self.record["replicas"].append(entry)  # recorded before it is waited for
        self._save()
        self.record["replicas"].pop()
        assert process.stdout is not None
        deadline = time.monotonic() + REPLICA_TIMEOUT
        line = ""
        while time.monotonic() < deadline:  # the replica prints its ready line or exits
            line = process.stdout.readline()
            if line.strip().startswith("{") or process.poll() is not None:
                break
        info = json.loads(line) if line.strip().startswith("{") else {}
        if not info.get("ready"):
            tail = (home / "stderr.log").read_text(errors="replace")[-2000:]
            raise StartError(f"replica {name} did not start: {info.get('error', tail)}")
        process.stdout.close()
        return entry | {k: info[k] for k in ("address", "ca", "ca_renewal", "spiffe_id")}

    def _start_host(self, name: str, token: Path, pods: list[str]) -> dict[str, Any]:
        home = self.state / "hosts" / name
        command = [
            sys.executable, "-m", "trustmesh", "node", "join", *self.record["config"],
            "--control-plane", self.record["control_plane"], "--token", str(token),
            "--roots", str(self.state / "ca-roots.pem"), "--name", name,
            "--base", self.record["base"], "--state", str(home),
            "--lease-ttl", str(self.record.get("lease_ttl", DEFAULT_LEASE_TTL)),
            *(x for ref in pods for x in ("--pod", ref)),
        ]  # fmt: skip
        entry: dict[str, Any] = {"name": name, "state": str(home), "pods": pods}
        network = self.record.get("network", {}).get("hosts", {}).get(name)
        if network is not None:  # netns: the node agent runs inside its host's namespace
            command += ["--isolation", "netns", "--replica-host", hostnet.CONTROL_IP]
            command = podexec_argv(sys.executable, network["netns"], command)
            entry |= network
        log = self.state / "hosts" / f"{name}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                command,
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=self._env(),
            )
        self._hosts[name] = process
        return entry | {"pid": process.pid}

    def _wait_host(self, host: dict[str, Any]) -> None:
        mesh = Path(host["state"]) / "mesh.json"
        deadline = time.monotonic() + HOST_TIMEOUT
        while time.monotonic() < deadline:
            try:
                now = read_json(mesh)  # this process's record (not one a dead run left)
                if now.get("state") == "ready" and now.get("supervisor_pid") == host["pid"]:
                    return
            except (OSError, ValueError):
                pass
            # Our child: poll() reaps it (an exited child not reaped stays "alive" to kill 0).
            started = self._hosts.get(host["name"])
            if started is not None and started.poll() is not None:
                break
            if not _alive(host["pid"]):
                break
            time.sleep(0.1)  # another process's progress: no event crosses over
        log = (self.state / "hosts" / f"{host['name']}.log").read_text(errors="replace")
        raise StartError(f"{host['name']} did not start:\n{log[-3000:]}")


def netns_name_of(host_state: Path) -> str:
    """A host's namespace: its sandbox's node namespace (named by its state directory)."""
    return netns_name(mesh_id(host_state), "node")


async def _apply(etcd: EtcdCluster, config: list[str]) -> None:
    loaded = load_config(config, compile_policy=False)
    client = etcd.client()
    try:
        await apply_resources(EtcdResourceStore(client), loaded.snapshot.resources)
    finally:
        await client.close()


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _stop(pid: Any, layout: Layout, timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout``: only while ``pid`` is still this mesh's."""
    if not isinstance(pid, int) or not belongs_to(pid, layout):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid) and belongs_to(pid, layout):
        time.sleep(0.05)  # another process's exit: no event for a non-child
    if _alive(pid) and belongs_to(pid, layout):
        os.kill(pid, signal.SIGKILL)


def stop_cluster(state: Path, progress: Progress = lambda message: None) -> int:
    """Stop hosts (their pods), replicas, then etcd, by PID; the processes stopped."""
    layout = Layout(state)
    try:
        record = read_json(cluster_file(state))
    except (OSError, ValueError):
        return 0
    stopped = 0
    problems: list[str] = []
    for host in record.get("hosts", []):
        progress(f"stopping {host['name']}")
        _stop(host.get("pid"), layout, STOP_TIMEOUT)
        stopped += 1
        try:  # a host killed hard leaves its pods: stop them by the host's record
            host_layout = Layout(Path(host["state"]))
            stop_recorded(read_json(host_layout.mesh), host_layout)
        except (OSError, ValueError, KeyError):
            pass
        # ... and its pod sandbox (namespaces, links, rules): by the host's own ledger
        problems += Ledger(Path(host["state"]) / SANDBOX_LEDGER).undo(netns.remove_entry)
    relay = record.get("network", {}).get("relay", {})
    _stop(relay.get("pid"), layout, 5)
    for replica in record.get("replicas", []):
        _stop(replica.get("pid"), layout, STOP_TIMEOUT)
        stopped += 1
    for member in record.get("etcd", []):
        _stop(member.get("pid"), layout, 5)
        stopped += 1
    problems += hostnet.teardown(state)  # the hosts' namespaces and the LAN, by name
    for problem in problems:
        progress(f"could not remove {problem}")
    record["state"] = "stopped"
    write_json(cluster_file(state), record)
    return stopped


def cluster_status(state: Path) -> dict[str, Any]:
    """Hosts (their pods), replicas (the proxies each serves), pods, and liveness."""
    record = read_json(cluster_file(state))
    live: dict[str, dict[str, Any]] = {}
    if record.get("state") != "stopped" and record.get("store"):
        live = asyncio.run(_read_replicas(state))
    replicas = []
    for replica in record.get("replicas", []):
        now = live.get(replica["name"], {})
        replicas.append(
            replica
            | {
                "alive": _alive(replica.get("pid")),
                "proxies": now.get("proxies", []),
                "leader": now.get("leader", False),
            }
        )
    hosts, pods = [], {}
    for host in record.get("hosts", []):
        try:
            mesh = read_json(Layout(Path(host["state"])).mesh)
        except (OSError, ValueError):
            mesh = {}
        for ref, pod in mesh.get("pods", {}).items():
            pods[ref] = {**pod, "host": host["name"]}
        hosts.append(host | {"alive": _alive(host.get("pid")), "state": mesh.get("state")})
    return {
        "state": record.get("state"),
        "isolation": record.get("isolation", "process"),
        "network": record.get("network", {}),
        "store": record.get("store"),
        "etcd": record.get("etcd", []),
        "hosts": hosts,
        "replicas": replicas,
        "pods": pods,
    }


async def _read_replicas(state: Path) -> dict[str, dict[str, Any]]:
    try:
        client = store_client(state)
    except StoreError:
        return {}
    try:
        return await asyncio.wait_for(read_replicas(client), 5)
    except (StoreError, TimeoutError):
        return {}
    finally:
        await client.close()
