"""One pod's sidecar as a process: identity agent + SDS server + Envoy fed over ADS.

``python -m trustmesh.runtime.sidecar <pods/ns_pod/sidecar.json>`` — started by the local
runtime, like istio-agent in a pod. It enrolls with its bootstrap token (the private key
is generated here and never leaves this process and its 0600 SDS socket), serves the
certificate to Envoy, starts Envoy from an ADS-only bootstrap and keeps it running. Once
Envoy is ready (its first listeners came from the control plane) it prints one JSON
line, ``{"ready": true, "envoy_pid": …, "admin": "127.0.0.1:…"}``; on failure
``{"ready": false, "error": …}`` and exit status 1. SIGTERM stops Envoy, then the agent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trustmesh.agent.envoy import EnvoyProcess, EnvoyStartError
from trustmesh.agent.peer_gate import PeerCredentials
from trustmesh.agent.sds import SdsServer, SecretStore
from trustmesh.agent.workload import AgentConfig, WorkloadAgent
from trustmesh.agent.xds_bootstrap import ads_bootstrap
from trustmesh.identity.spiffe import SpiffeId
from trustmesh.runtime.process import run_until_signalled

__all__ = ["SidecarSpec", "main", "run_sidecar"]

ENROLL_TIMEOUT = 30.0
ENVOY_READY_TIMEOUT = 30.0


@dataclasses.dataclass(frozen=True, slots=True)
class SidecarSpec:
    """Everything one sidecar needs, written by the runtime as ``sidecar.json``."""

    namespace: str
    service_account: str
    trust_domain: str
    node_id: str
    cluster: str
    ca_address: str
    ca_renewal_address: str
    roots_file: str
    token_file: str
    sds_socket: str
    xds_port: int
    control_plane_id: str
    workdir: str
    # the pod IP: where its connections to other workloads come from (None: the kernel's
    # choice, which in a pod's own namespace is the pod IP)
    source_address: str | None
    xds_address: str = "127.0.0.1"
    admin_port: int = 0  # 0: Envoy picks one (process mode); 15000 in a pod's namespace
    # the sandbox: SDS answers only this sidecar's Envoy (by pid), gRPC listens in
    # private_dir (only this pod's proxy processes can open it)
    peer_check: bool = False
    private_dir: str | None = None
    # more control-plane replicas (host, port) after xds_address:xds_port (`node join`)
    more_xds: Sequence[tuple[str, int]] = ()
    # where the agent's connections to the CA leave from (`node join`: the pod IP, as
    # its Envoy's; None: the kernel's choice)
    agent_source_address: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SidecarSpec:
        fields = dataclasses.fields(cls)
        values = {f.name: data[f.name] for f in fields if f.name in data}
        values["more_xds"] = tuple((str(h), int(p)) for h, p in values.get("more_xds", ()))
        return cls(**values)


def _announce(value: dict[str, Any]) -> None:
    print(json.dumps(value), flush=True)


async def run_sidecar(spec: SidecarSpec, stop: asyncio.Event) -> int:
    """Run until ``stop``; 0 after a clean stop, 1 if the sidecar never became ready."""
    identity = SpiffeId(spec.trust_domain, spec.namespace, spec.service_account)
    config = AgentConfig(
        identity,
        spec.ca_address,
        spec.ca_renewal_address,
        Path(spec.roots_file).read_bytes(),
        Path(spec.token_file).read_text().strip(),
        source_address=spec.agent_source_address,
    )
    store = SecretStore()
    envoy: EnvoyProcess | None = None

    def own_envoy(peer: PeerCredentials) -> bool:
        # Envoy connects to SDS from its own process: the pid the kernel reports is the
        # one this agent started (and restarts, under the same object).
        return envoy is not None and envoy.pid == peer.pid

    sds = SdsServer(
        store,
        spec.sds_socket,
        allow_peer=own_envoy if spec.peer_check else None,
        private_dir=spec.private_dir,
    )
    await sds.start()
    agent = WorkloadAgent(config, store)
    tasks = [asyncio.create_task(agent.run(stop))]
    try:
        try:
            await asyncio.wait_for(agent.ready.wait(), ENROLL_TIMEOUT)
        except TimeoutError:
            _announce({"ready": False, "error": f"no certificate after {ENROLL_TIMEOUT:.0f}s"})
            return 1
        bootstrap = ads_bootstrap(
            node_id=spec.node_id,
            cluster=spec.cluster,
            sds_socket=spec.sds_socket,
            xds_address=spec.xds_address,
            xds_port=spec.xds_port,
            admin_port=spec.admin_port,
            control_plane_id=spec.control_plane_id,
            source_address=spec.source_address,
            more_xds=spec.more_xds,
        )
        # One worker thread: a host runs many sidecars (Istio's default is 2 per proxy).
        # Access logs flushed every 100 ms: `trustmesh logs --proxy` and `test --live`
        # read them while traffic flows (Envoy's default is every 10 s).
        envoy = EnvoyProcess(bootstrap, workdir=Path(spec.workdir), concurrency=1, log_flush_ms=100)
        try:
            await envoy.start(timeout=ENVOY_READY_TIMEOUT)
        except EnvoyStartError as exc:
            _announce({"ready": False, "error": str(exc)})
            return 1
        admin = envoy.admin_url.removeprefix("http://")
        _announce({"ready": True, "envoy_pid": envoy.pid, "admin": admin})
        tasks.append(asyncio.create_task(envoy.supervise(stop)))
        await stop.wait()
        return 0
    finally:
        stop.set()
        if envoy is not None:
            await envoy.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        await sds.stop()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m trustmesh.runtime.sidecar SIDECAR_JSON", file=sys.stderr)
        return 2
    spec = SidecarSpec.from_json(json.loads(Path(args[0]).read_text()))
    return run_until_signalled(lambda stop: run_sidecar(spec, stop))


if __name__ == "__main__":
    sys.exit(main())
