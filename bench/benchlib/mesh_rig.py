"""Mesh wiring both benchmarks share: a WorkloadAgent enrolled with a bootstrap token and
the SdsServer its Envoy reads certificates from; a sidecar's ADS bootstrap; Envoys with
one worker thread, handed over for stopping before they start."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trustmesh.agent.envoy import EnvoyProcess
from trustmesh.agent.sds import SdsServer, SecretStore, WorkloadSecret
from trustmesh.agent.workload import AgentConfig, WorkloadAgent
from trustmesh.agent.xds_bootstrap import ads_bootstrap
from trustmesh.identity.ca import CertificateAuthority
from trustmesh.identity.spiffe import SpiffeId


@dataclass
class RunningAgent:
    """A workload agent (enrolled, running) and the SDS server serving its certificates."""

    agent: WorkloadAgent
    sds: SdsServer
    stop: asyncio.Event
    task: asyncio.Task[None]

    @classmethod
    async def start(
        cls,
        identity: SpiffeId,
        ca: CertificateAuthority,
        ports: tuple[int, int],
        workdir: Path,
        ready_timeout: float,
    ) -> RunningAgent:
        """Enroll ``identity`` with a bootstrap token at the CA server's (enrollment,
        renewal) ``ports`` on 127.0.0.1; SDS on ``workdir/sds.sock`` (``workdir`` exists)."""
        now = dt.datetime.now(dt.UTC)
        config = AgentConfig(
            identity=identity,
            ca_address=f"127.0.0.1:{ports[0]}",
            ca_renewal_address=f"127.0.0.1:{ports[1]}",
            ca_roots_pem=ca.bundle_pem(now),
            token=ca.token(identity.namespace, identity.service_account, now),
            bundle_refresh_seconds=3600,
        )
        agent = WorkloadAgent(config, SecretStore())
        sds = SdsServer(agent.store, str(workdir / "sds.sock"))
        await sds.start()
        stop = asyncio.Event()
        running = cls(agent, sds, stop, asyncio.create_task(agent.run(stop)))
        try:
            await asyncio.wait_for(agent.ready.wait(), ready_timeout)
        except BaseException:
            await running.close()
            raise
        return running

    @property
    def secret(self) -> WorkloadSecret:
        """The certificate the agent holds now."""
        current = self.agent.store.current()
        assert current is not None
        return current[1]

    async def close(self) -> None:
        self.stop.set()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.sds.stop()


def sidecar_bootstrap(
    node_id: str, identity: SpiffeId, sds: SdsServer, xds_port: int, control_plane_id: str
) -> dict[str, Any]:
    """A sidecar's bootstrap: everything else comes from the control plane over ADS."""
    return ads_bootstrap(
        node_id=node_id,
        cluster=f"{identity.service_account}.{identity.namespace}",
        sds_socket=sds.socket_path,
        xds_address="127.0.0.1",
        xds_port=xds_port,
        control_plane_id=control_plane_id,
    )


async def start_envoy(
    bootstrap: dict[str, Any],
    workdir: Path,
    track: Callable[[EnvoyProcess], object],
    timeout: float,
) -> EnvoyProcess:
    """An Envoy with one worker thread. ``track`` gets it before it starts, so that
    whoever stops it (by its PID) stops a failed start too."""
    envoy = EnvoyProcess(bootstrap, workdir=workdir, concurrency=1)
    track(envoy)
    await envoy.start(timeout=timeout)
    return envoy
