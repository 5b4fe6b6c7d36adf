"""Generated policy sets through real Envoy and through the evaluator, compared.

Two checks, both on seeded sets from :mod:`tests.fuzz.policygen`:

- ``validate_batch``: every set ``trustmesh validate`` accepts is translated (the HTTP or
  network filters a sidecar would run for it) and the whole batch, one listener per set,
  is handed to ``envoy --mode validate``: Envoy must accept all of it.
- ``differential_batch``: the same sets as listeners of one running Envoy (the rig of
  tests/xds/test_rbac_differential.py), every generated request sent raw; Envoy's status,
  deciding rule and dry-run results must equal ``evaluate()``'s — for TCP connections
  too (the rig reads them from a per-connection access log).
"""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tests.fuzz.policygen import FuzzSet, generate
from tests.unit.meshutil import BASE
from tests.xds.rbac_cases import Case
from tests.xds.rbac_rig import (
    bootstrap,
    http_listener,
    jwt_filter,
    run_envoy,
    static_cluster,
    tcp_listener,
)
from trustmesh.agent.envoy import EnvoyConfigError, validate_bootstrap
from trustmesh.api.loader import SourceCache
from trustmesh.pipeline import compile_sources
from trustmesh.policy.compose import MeshPolicy
from trustmesh.xds.guards import request_guard_filters
from trustmesh.xds.rbac import http_custom_filters, http_rbac_filters, network_rbac_filters


@dataclass(slots=True)
class Compiled:
    fuzz: FuzzSet
    mesh: MeshPolicy

    @property
    def destination(self) -> str:
        return "foo/tcp-echo" if self.fuzz.tcp else "foo/httpbin"


@dataclass(slots=True)
class Tally:
    """What a run did and found; printed as JSON by ``make fuzz``."""

    sets: int = 0
    refused_by_validate: int = 0
    rejected_by_envoy: list[str] = field(default_factory=list)  # accepted by validate
    requests: int = 0
    disagreements: list[str] = field(default_factory=list)  # verdict or deciding rule
    # Envoy's answers by kind, to show the runs are not vacuous: status, and for HTTP
    # whether a rule decided, TLS or plaintext.
    answers: Counter[str] = field(default_factory=Counter)

    def add(self, other: Tally) -> None:
        self.answers.update(other.answers)
        self.sets += other.sets
        self.refused_by_validate += other.refused_by_validate
        self.rejected_by_envoy += other.rejected_by_envoy
        self.requests += other.requests
        self.disagreements += other.disagreements


def compile_sets(seeds: Iterable[int], tally: Tally, *, probes: int = 20) -> list[Compiled]:
    """The generated sets ``validate`` accepts, compiled over the example workloads."""
    out: list[Compiled] = []
    cache = SourceCache()  # the example workloads are parsed once per batch
    for seed in seeds:
        fuzz = generate(seed, probes=probes)
        tally.sets += 1
        sources = [("workloads.yaml", BASE), (f"{fuzz.name}.yaml", fuzz.text.encode())]
        mesh_config = [("mesh.yaml", fuzz.mesh.encode())] if fuzz.mesh else []
        compiled = compile_sources(sources, mesh_config=mesh_config, cache=cache)
        if compiled.mesh is None:
            tally.refused_by_validate += 1
            continue
        out.append(Compiled(fuzz, compiled.mesh))
    return out


def _filters(compiled: Compiled) -> list[dict[str, object]]:
    mesh = compiled.mesh
    wp = mesh.for_workload(compiled.destination)
    assert wp is not None
    if compiled.fuzz.tcp:
        return network_rbac_filters(wp, mesh, compiled.fuzz.port)
    return [
        *request_guard_filters(wp, mesh),
        *http_custom_filters(wp, mesh),
        *jwt_filter(wp, mesh),
        *http_rbac_filters(wp, mesh),
    ]


def _validation_listener(i: int, compiled: Compiled, log: Path) -> dict[str, object]:
    # Addresses need not be free for --mode validate: it binds nothing.
    address = f"127.202.{i // 250}.{i % 250 + 1}"
    if compiled.fuzz.tcp:
        return tcp_listener(f"tcp{i}", address, compiled.fuzz.port, _filters(compiled), "echo")
    mode = compiled.mesh.path_normalization.value
    return http_listener(f"http{i}", address, 8000, _filters(compiled), mode, log)


async def rejected_by_envoy(sets: list[Compiled], workdir: Path) -> list[str]:
    """The sets whose translation ``envoy --mode validate`` refuses (one run for the
    batch; bisected only when it fails)."""
    log = workdir / "validate.log"
    listeners = [_validation_listener(i, c, log) for i, c in enumerate(sets)]
    clusters = [static_cluster("echo", "127.0.0.1", 9)]
    try:
        await validate_bootstrap(bootstrap(listeners, clusters), workdir=workdir, timeout=120)
        return []
    except EnvoyConfigError as refused:
        if len(sets) == 1:
            return [f"{sets[0].fuzz.name}: {refused}"]
    half = len(sets) // 2
    return await rejected_by_envoy(sets[:half], workdir) + await rejected_by_envoy(
        sets[half:], workdir
    )


def _addresses(count: int, ports: tuple[int, ...], start: int, network: int) -> list[str]:
    """Loopback addresses (127.NETWORK.x.y) where every one of ``ports`` can be bound.
    Runs at the same time use different networks: between this check and Envoy's bind,
    another run could take the same address (and with SO_REUSEPORT share it)."""
    found: list[str] = []
    if count == 0:
        return found
    for n in range(start, start + 16_000):
        address = f"127.{network}.{n // 250}.{n % 250 + 1}"
        try:
            for port in ports:
                with socket.socket() as taken:
                    taken.bind((address, port))
        except OSError:
            continue
        found.append(address)
        if len(found) == count:
            return found
    raise RuntimeError(f"not {count} loopback addresses with ports {ports} free")


def _cases(sets: list[Compiled], network: int) -> tuple[list[Case], list[Case]]:
    def case(c: Compiled) -> Case:
        probes = list(c.fuzz.probes)
        return Case(c.fuzz.name, c.mesh, c.destination, c.fuzz.port, probes, tls=c.fuzz.tls)

    http = [case(c) for c in sets if not c.fuzz.tcp]
    tcp = [case(c) for c in sets if c.fuzz.tcp]
    for case, address in zip(http, _addresses(len(http), (8000,), 0, network), strict=True):
        case.address = address
    for case, address in zip(
        tcp, _addresses(len(tcp), (9000, 9001, 9002), 5000, network), strict=True
    ):
        case.address = address
    return http, tcp


async def differential_batch(
    seeds: Iterable[int], workdir: Path, *, network: int, probes: int = 20
) -> Tally:
    """Generate, validate with Envoy, then run every request through Envoy and the
    evaluator; what differs is in ``Tally.disagreements``."""
    tally = Tally()
    sets = compile_sets(seeds, tally, probes=probes)
    tally.rejected_by_envoy += await rejected_by_envoy(sets, workdir)
    if tally.rejected_by_envoy:
        return tally
    http, tcp = _cases(sets, network)
    outcome = await run_envoy(http, tcp, workdir)
    tally.requests += len(outcome.results)
    tally.disagreements += outcome.disagreements()
    for _case, probe, got, _ in outcome.results:
        kind = "tcp" if probe.method is None else "http"
        peer = "mtls" if probe.peer else "plain"
        decided = "rule" if got.rule not in ("-", "none") else "no-rule"
        tally.answers[f"{kind}/{peer}/{got.status}/{decided}"] += 1
    return tally


async def validate_batch(seeds: Iterable[int], workdir: Path) -> Tally:
    """Only the Envoy acceptance check, for many more sets than requests can cover."""
    tally = Tally()
    sets = compile_sets(seeds, tally, probes=0)
    tally.rejected_by_envoy += await rejected_by_envoy(sets, workdir)
    return tally
