"""``trustmesh up DIR --hosts N --replicas R``: a mesh over several hosts and replicas.

Started in this order, each recorded in ``cluster.json`` (PIDs) as soon as it runs, so
``trustmesh down`` stops all of it — also after a start that failed half way:

1. an etcd cluster of three members (the store);
2. the mesh CA (``ca/``) and DIR's configuration applied to the store (as
   ``trustmesh apply``);
3. R control-plane replicas (``trustmesh control-plane``), each its own process;
4. N hosts (``trustmesh node join`` with a fresh node token each, process mode): a pod
   with ``spec.nodeName: host-K`` runs on host K, the others are spread in turn.

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
from trustmesh.runtime.addresses import MESH_ENV, AddressConflict, claim_block
from trustmesh.runtime.layout import Layout, read_json, write_json
from trustmesh.runtime.plan import Isolation, plan_mesh
from trustmesh.runtime.replica import read_replicas
from trustmesh.runtime.supervisor import StartError, belongs_to, stop_recorded
from trustmesh.store import parse_etcd_endpoints
from trustmesh.store.apply import apply_resources
from trustmesh.store.etcd_client import EtcdClient
from trustmesh.store.etcd_server import EtcdCluster
from trustmesh.store.etcd_store import EtcdResourceStore

CLUSTER_FILE = "cluster.json"
ETCD_MEMBERS = 3
REPLICA_TIMEOUT = 60.0
HOST_TIMEOUT = 180.0
STOP_TIMEOUT = 30.0

Progress = Callable[[str], None]


def cluster_file(state: Path) -> Path:
    return state / CLUSTER_FILE


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


class Cluster:
    """One multi-host mesh in ``state``."""

    def __init__(self, state: Path, progress: Progress = lambda message: None) -> None:
        self.state = state
        self.layout = Layout(state)
        self.progress = progress
        self.record: dict[str, Any] = {"state": "starting", "etcd": [], "replicas": [], "hosts": []}

    def _save(self) -> None:
        self.record["updated"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        write_json(cluster_file(self.state), self.record)

    def _env(self) -> dict[str, str]:
        return {**os.environ, MESH_ENV: str(self.state)}

    def start(self, config: list[str], hosts: int, replicas: int, base: str) -> None:
        """Start everything (:class:`StartError` after stopping what started)."""
        try:
            self._start(config, hosts, replicas, base)
        except BaseException:
            stop_cluster(self.state, self.progress)
            raise

    def _start(self, config: list[str], hosts: int, replicas: int, base: str) -> None:
        config = [str(Path(p).resolve()) for p in config]
        names = host_names(hosts)
        assignment = assign_pods(config, names, base)
        try:  # the hosts' pods use this block: a second mesh there would break this one
            claim_block(base, self.state).release()
        except AddressConflict as exc:
            raise StartError(str(exc)) from None
        self.layout.create()
        self.record |= {"config": config, "base": base, "supervisor_pid": os.getpid()}
        self._save()

        self.progress(f"starting etcd ({ETCD_MEMBERS} members)")
        etcd = EtcdCluster(self.state / "etcd", size=ETCD_MEMBERS)
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
        self._save()

        now = dt.datetime.now(dt.UTC)
        ca = CertificateAuthority.init(self.state / "ca", CaConfig(), now)
        roots = self.state / "ca-roots.pem"
        roots.write_bytes(ca.bundle_pem(now))
        self.progress("applying the configuration to the store")
        asyncio.run(_apply(etcd, config))

        for i in range(1, replicas + 1):
            self.progress(f"starting control-plane replica r{i}")
            self.record["replicas"].append(self._start_replica(f"r{i}", etcd.url))
            self._save()
        addresses = ",".join(r["ca"] for r in self.record["replicas"])

        for name in names:
            token = self.state / "hosts" / f"{name}.token"
            token.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(os.open(token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
                out.write(ca.node_token(name, dt.datetime.now(dt.UTC)))
            self.progress(f"starting {name}: {', '.join(assignment[name]) or 'no pods'}")
            self.record["hosts"].append(
                self._start_host(name, config, addresses, token, roots, base, assignment[name])
            )
            self._save()
        for host in self.record["hosts"]:
            self._wait_host(host)
        self.record["state"] = "ready"
        self._save()

    def _start_replica(self, name: str, store: str) -> dict[str, Any]:
        home = self.state / "replicas" / name
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "trustmesh", "control-plane", "--store", store,
            "--listen", "127.0.0.1:0", "--name", name, "--ca", str(self.state / "ca"),
            "--state", str(home),
        ]  # fmt: skip
        with open(home / "stderr.log", "wb") as err:
            process = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                text=True,
                start_new_session=True,
                env=self._env(),
            )
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

    def _start_host(
        self,
        name: str,
        config: list[str],
        addresses: str,
        token: Path,
        roots: Path,
        base: str,
        pods: list[str],
    ) -> dict[str, Any]:
        home = self.state / "hosts" / name
        command = [
            sys.executable, "-m", "trustmesh", "node", "join", *config,
            "--control-plane", addresses, "--token", str(token), "--roots", str(roots),
            "--name", name, "--base", base, "--state", str(home),
            *(x for ref in pods for x in ("--pod", ref)),
        ]  # fmt: skip
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
        return {"name": name, "pid": process.pid, "state": str(home), "pods": pods}

    def _wait_host(self, host: dict[str, Any]) -> None:
        mesh = Path(host["state"]) / "mesh.json"
        deadline = time.monotonic() + HOST_TIMEOUT
        while time.monotonic() < deadline:
            try:
                if read_json(mesh).get("state") == "ready":
                    return
            except (OSError, ValueError):
                pass
            if not _alive(host["pid"]):
                break
            time.sleep(0.1)  # another process's progress: no event crosses over
        log = (self.state / "hosts" / f"{host['name']}.log").read_text(errors="replace")
        raise StartError(f"{host['name']} did not start:\n{log[-3000:]}")


async def _apply(etcd: EtcdCluster, config: list[str]) -> None:
    loaded = load_config(config, compile_policy=False)
    client = EtcdClient(etcd.endpoints)
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
    for host in record.get("hosts", []):
        progress(f"stopping {host['name']}")
        _stop(host.get("pid"), layout, STOP_TIMEOUT)
        stopped += 1
        try:  # a host killed hard leaves its pods: stop them by the host's record
            host_layout = Layout(Path(host["state"]))
            stop_recorded(read_json(host_layout.mesh), host_layout)
        except (OSError, ValueError, KeyError):
            pass
    for replica in record.get("replicas", []):
        _stop(replica.get("pid"), layout, STOP_TIMEOUT)
        stopped += 1
    for member in record.get("etcd", []):
        _stop(member.get("pid"), layout, 5)
        stopped += 1
    record["state"] = "stopped"
    write_json(cluster_file(state), record)
    return stopped


def cluster_status(state: Path) -> dict[str, Any]:
    """Hosts (their pods), replicas (the proxies each serves), pods, and liveness."""
    record = read_json(cluster_file(state))
    live: dict[str, dict[str, Any]] = {}
    if record.get("state") != "stopped" and record.get("store"):
        live = asyncio.run(_read_replicas(record["store"]))
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
        "store": record.get("store"),
        "etcd": record.get("etcd", []),
        "hosts": hosts,
        "replicas": replicas,
        "pods": pods,
    }


async def _read_replicas(store: str) -> dict[str, dict[str, Any]]:
    client = EtcdClient(parse_etcd_endpoints(store.removeprefix("etcd://")))
    try:
        return await asyncio.wait_for(read_replicas(client), 5)
    except (StoreError, TimeoutError):
        return {}
    finally:
        await client.close()
