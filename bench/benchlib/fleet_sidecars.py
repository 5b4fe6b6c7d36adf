"""The fleet benchmark's sidecars, hosted by the benchmark's own process: per workload an
enrolled agent, its SDS server and a real Envoy fed over ADS; and a Python TLS client
context presenting a workload's mesh identity."""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchlib.fleet_config import NAMESPACE, Json, registration
from benchlib.mesh_rig import RunningAgent, sidecar_bootstrap, start_envoy
from benchlib.procstat import memory_mib
from benchlib.progress import log
from trustmesh.agent.envoy import EnvoyProcess
from trustmesh.agent.sds import WorkloadSecret
from trustmesh.identity.ca import CertificateAuthority
from trustmesh.identity.spiffe import SpiffeId


@dataclass
class Sidecar:
    """One workload's agent (enrolled) with its SDS server and, once started, its Envoy."""

    index: int
    identity: SpiffeId
    workdir: Path
    agent: RunningAgent
    envoy: EnvoyProcess | None = None

    @property
    def secret(self) -> WorkloadSecret:
        return self.agent.secret


@dataclass
class Fleet:
    """Agents, SDS servers and Envoys hosted by this process; closed by PID."""

    workdir: Path
    ca: CertificateAuthority
    plane: Json  # what the control plane process reported: ports and SPIFFE ID
    sidecars: list[Sidecar] = field(default_factory=list)
    envoys: list[EnvoyProcess] = field(default_factory=list)  # every one started

    async def add(self, lo: int, hi: int, batch: int) -> Json:
        """Sidecars ``lo..hi-1``: agents enrolled, then Envoys started ``batch`` at a time
        (each ready once it has its first listeners and clusters)."""
        started = time.monotonic()
        new: list[Sidecar] = []
        for first in range(lo, hi, 25):  # enrollments: a few dozen TLS handshakes at a time
            batch_of = range(first, min(first + 25, hi))
            results = await asyncio.gather(
                *(self._agent(i) for i in batch_of), return_exceptions=True
            )
            started_ok = [r for r in results if isinstance(r, Sidecar)]
            new += started_ok
            self.sidecars += started_ok  # kept even if others failed: close() stops them
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        agents = time.monotonic() - started
        for first in range(0, len(new), batch):
            group = new[first : first + batch]
            await asyncio.gather(*(self._envoy(sidecar) for sidecar in group))
            log(f"envoys ready: {lo + first + len(group)}/{hi}")
        return {
            "agents_s": round(agents, 2),
            "envoys_s": round(time.monotonic() - started - agents, 2),
        }

    async def _agent(self, index: int) -> Sidecar:
        identity = SpiffeId(self.ca.config.trust_domain, NAMESPACE, f"app-{index}")
        workdir = self.workdir / f"app-{index}"
        workdir.mkdir()
        ports = (self.plane["enroll_port"], self.plane["renew_port"])
        agent = await RunningAgent.start(identity, self.ca, ports, workdir, ready_timeout=30)
        return Sidecar(index, identity, workdir, agent)

    async def _envoy(self, sidecar: Sidecar) -> None:
        bootstrap = sidecar_bootstrap(
            registration(sidecar.index).node_id,
            sidecar.identity,
            sidecar.agent.sds,
            self.plane["xds_port"],
            self.plane["spiffe_id"],
        )
        # Listed before start: close() stops it whatever happens.
        sidecar.envoy = await start_envoy(
            bootstrap, sidecar.workdir, self.envoys.append, timeout=60
        )

    def envoy_memory_mib(self) -> float:
        """VmRSS of every running Envoy, summed."""
        pids = [e.pid for e in self.envoys if e.pid is not None and e.returncode is None]
        return round(sum(memory_mib(pid).get("VmRSS", 0.0) for pid in pids), 1)

    async def close(self) -> None:
        """Every Envoy stopped by its PID (SIGTERM, then SIGKILL), then agents and SDS."""
        await asyncio.gather(*(e.stop() for e in self.envoys), return_exceptions=True)
        await asyncio.gather(*(s.agent.close() for s in self.sidecars), return_exceptions=True)


def mesh_client_tls(secret: WorkloadSecret, workdir: Path) -> ssl.SSLContext:
    """A Python TLS client presenting ``secret``, a mesh workload identity."""
    pem = workdir / "probe-client.pem"  # ssl loads a key pair only from a file
    pem.touch(mode=0o600)
    pem.write_bytes(secret.cert_chain_pem + secret.private_key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # mesh certificates carry a SPIFFE URI, no DNS name
    context.load_verify_locations(cadata=secret.trust_bundle_pem.decode())
    context.load_cert_chain(pem)
    return context
