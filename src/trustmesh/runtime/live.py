"""``trustmesh test --live``: PolicyTest cases sent as real requests through the running mesh.

Each case becomes what its ``from`` workload would really do — an HTTP request through its
sidecar (or straight to the service's endpoint for a pod without one), or a TCP exchange
— and what came back is turned into the same :class:`~trustmesh.policy.testing.Outcome`
the offline evaluator produces:

* HTTP status 401 → ``unauthenticated``, 403 → ``deny``, 400 → ``bad-request``, a 502 the
  client's own sidecar answers (REGISTRY_ONLY) → ``deny``, a connection reset or closed
  before any answer, or the client sidecar's 503 for an upstream reset → ``reset``; any
  other status is the app's answer → ``allow``.
* TCP: the line echoed back (TLS to an external host on 443: the handshake completed)
  → ``allow``; a close without an answer → ``deny`` if the destination sidecar's access
  log shows its network RBAC refused it, else ``reset``.
* Egress this host cannot complete (it has no route to the internet): the client
  sidecar's access log shows whether the request left the mesh through a ServiceEntry's
  (or ALLOW_ANY's) cluster — ``allow``, status not observed — or hit
  ``BlackHoleCluster`` (REGISTRY_ONLY) — ``reset`` / the 502 it answered.
* The deciding rule and the dry-run results come from the destination sidecar's access
  log line for the request (found by its ``x-request-id``): ``rbac_access_denied_matched_
  policy[…]`` for a denial, the RBAC filters' dynamic metadata for an allow and for
  dry-run policies. Headers the app received come from httpbin's echo.

A case fails if the live outcome misses the expectation, and is reported as a mismatch if
it differs from the offline verdict. Cases that cannot be sent for real — a ``from``
principal or source IP no local workload has — are reported as not run, with why.

In a sandboxed mesh (netns isolation) each case is sent the way a cluster would carry it
(:mod:`trustmesh.runtime.livenet`): from a workload, out of that pod's network namespace
as its app's uid, to the address its app dials (a Service's ClusterIP, a pod IP, an
external host's address), through capture, its own Envoy and mesh mTLS; from
``plaintext`` (``ip: X``), out of a source namespace on the mesh bridge holding X (default
10.88.250.10), straight to the destination pod, whose capture sends it through its Envoy.
The offline verdict is then taken for the source address the request really had (a
workload's pod IP), so ``ipBlocks`` and ``remoteIpBlocks`` are compared too. Every port
is captured there, so a port the workload does not declare is sent as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trustmesh.api.policytest import Case
from trustmesh.policy.client_routes import RouteKind, sidecar_client_route
from trustmesh.policy.compose import MeshPolicy
from trustmesh.policy.decision import RequestError as PolicyRequestError
from trustmesh.policy.evaluate import listening_ports
from trustmesh.policy.testing import Outcome, check, run_case
from trustmesh.runtime.client import (
    HttpResult,
    Opener,
    RequestError,
    TcpResult,
    http_request,
    outside_pod,
    tcp_exchange,
)
from trustmesh.runtime.layout import Layout, PodPaths
from trustmesh.runtime.plan import Isolation, MeshPlan, PodPlan, ServiceTarget
from trustmesh.xds.outbound import BLACKHOLE_CLUSTER
from trustmesh.xds.outbound_listeners import WORKLOAD_HEADER

if TYPE_CHECKING:  # the sandbox's modules load pyroute2: only when a mesh is sandboxed
    from trustmesh.runtime.livenet import LiveSources

__all__ = ["LiveCaseResult", "LiveRunner"]

LOG_WAIT = 2.0  # seconds to wait for an access-log line (sidecars flush every 100 ms)
# What a sandboxed app dials for an external host it resolved (there is no DNS in the
# sandbox): a documentation address (RFC 5737) that is nobody's. Its sidecar picks the
# listener by port and the route by Host or SNI, as for the host's real address.
EXTERNAL_ADDRESS = "192.0.2.10"
_DENIED = "rbac_access_denied_matched_policy["
_SHADOW = {
    "istio_dry_run_deny_shadow_engine_result",
    "istio_dry_run_allow_shadow_engine_result",
}


@dataclass(frozen=True, slots=True)
class LiveCaseResult:
    suite: str
    case: str
    location: str
    live: Outcome | None
    offline: Outcome | None
    failures: tuple[str, ...] = ()  # live vs the expectation
    mismatches: tuple[str, ...] = ()  # live vs offline
    not_run: str = ""  # why the case could not be sent for real
    detail: str = ""  # what was sent and seen, for the report

    @property
    def passed(self) -> bool:
        return not self.not_run and not self.failures and not self.mismatches

    def as_dict(self) -> dict[str, object]:
        def outcome(o: Outcome | None) -> dict[str, object] | None:
            if o is None:
                return None
            return {
                "verdict": o.verdict,
                "status": o.status,
                "rule": o.rule if o.rule_known else "(not observed)",
                "dryRun": sorted(o.dry_run) if o.dry_run is not None else None,
            }

        return {
            "suite": self.suite,
            "case": self.case,
            "location": self.location,
            "passed": self.passed,
            "live": outcome(self.live),
            "offline": outcome(self.offline),
            "failures": list(self.failures),
            "mismatches": list(self.mismatches),
            "notRun": self.not_run or None,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class _Route:
    """How one case's request travels from its source."""

    name: str  # the URL's host: a Service name, a pod IP, an egress host or the case's Host
    port: int  # the URL's port; 0 when ``name`` carries it (or means 80)
    destination: PodPlan | None  # whose sidecar log tells the deciding rule
    host: str | None = None  # the Host header (the case's)
    direct: tuple[str, int] | None = None  # connect here from the pod IP, not via a sidecar
    headers: tuple[tuple[str, str], ...] = ()  # for the client sidecar's routing
    target_port: int | None = None  # the destination workload's port
    not_run: str = ""  # why the local mesh cannot send it as a cluster would
    opener: Opener | None = None  # sandboxed: makes the client's socket (``direct`` dialled)

    @classmethod
    def refused(cls, why: str) -> _Route:
        return cls("", 0, None, not_run=why)

    @property
    def authority(self) -> str:
        return f"{self.name}:{self.port}" if self.port else self.name


def _bare_host_port(plan: MeshPlan, name: str) -> int:
    """The port the local HTTP proxy reads a Service name without a port as (80 if the
    Service has it, else its lowest port)."""
    ports = sorted(int(k.rpartition(":")[2]) for k in plan.services if k.rpartition(":")[0] == name)
    return 80 if 80 in ports or not ports else ports[0]


@dataclass
class LiveRunner:
    """Runs cases against the mesh whose state is in ``layout``, planned as ``plan``."""

    plan: MeshPlan
    layout: Layout
    outside_address: str = "127.0.0.1"
    timeout: float = 10.0
    _sources: LiveSources | None = field(default=None, init=False, repr=False)

    @property
    def sandboxed(self) -> bool:
        return self.plan.isolation is Isolation.NETNS

    async def run(
        self, mesh: MeshPolicy, suites: Sequence[tuple[str, Sequence[tuple[str, Case]]]]
    ) -> list[LiveCaseResult]:
        """Every case of ``suites``: (suite name, [(where the case is written, case)])."""
        results = []
        for suite, cases in suites:
            for location, case in cases:
                results.append(await self.run_case(mesh, suite, location, case))
        return results

    async def run_case(
        self, mesh: MeshPolicy, suite: str, location: str, case: Case
    ) -> LiveCaseResult:
        if self.sandboxed:
            source, opener, why = await self._sandbox_source(case)
            if source is not None and case.from_.ip is None:
                # the address it really has: ipBlocks decide on it, offline too
                origin = case.from_.model_copy(update={"ip": source.pod_ip})
                case = case.model_copy(update={"from_": origin})
        else:
            (source, why), opener = self._source(case), None
        # Live requests meet the real clock; the offline verdict is taken at the same time.
        offline_result = run_case(mesh, suite, location, case, time.time())
        decision = offline_result.decision
        offline = Outcome.of(decision) if decision is not None else None
        if source is None:
            return LiveCaseResult(suite, case.name, location, None, offline, not_run=why)
        try:
            if opener is not None:
                route = self._sandbox_route(mesh, case, source, opener)
            else:
                route = self._route(mesh, case, source, offline)
            if route.not_run:
                return LiveCaseResult(
                    suite, case.name, location, None, offline, not_run=route.not_run
                )
            if case.tcp:
                live, detail = await self._tcp(source, route)
            else:
                live, detail = await self._http(source, case, route)
        except (LookupError, RequestError, PolicyRequestError) as exc:  # does not fit
            failure = (f"cannot be sent in this mesh: {exc}",)
            return LiveCaseResult(suite, case.name, location, None, offline, failure)
        failures = tuple(check(live, case.expect))
        mismatches = tuple(_differences(live, offline)) if offline is not None else ()
        return LiveCaseResult(
            suite, case.name, location, live, offline, failures, mismatches, detail=detail
        )

    # -- who sends, and to where

    def _source(self, case: Case) -> tuple[PodPlan | None, str]:
        origin = case.from_
        if origin.principal is not None:
            return None, (
                f"no workload of this mesh holds the identity {origin.principal}: only the "
                "mesh CA could issue it, and it issues only to enrolled workloads"
            )
        if origin.ip is not None:
            return None, f"source IP {origin.ip}: local pods have their own addresses"
        if origin.plaintext:
            return outside_pod(self.outside_address), ""
        assert origin.workload is not None
        pod = self.plan.pod(origin.workload)
        if pod is None:
            return None, f"{origin.workload} is not a pod of the running mesh"
        return pod, ""

    async def _sandbox_source(self, case: Case) -> tuple[PodPlan | None, Opener | None, str]:
        """The client of a case in a sandboxed mesh and how to make its socket."""
        from trustmesh.runtime import livenet

        origin = case.from_
        if origin.principal is not None:
            return None, None, self._source(case)[1]
        if os.geteuid() != 0:
            return (
                None,
                None,
                (
                    "the mesh runs in the pod sandbox: sending a case from a pod's or a source"
                    " address's network namespace needs root"
                ),
            )
        if origin.plaintext:
            address = origin.ip or livenet.OUTSIDE_ADDRESS
            problem = livenet.source_problem(self.plan, address)
            if problem is not None:
                return None, None, problem
            if self._sources is None:
                self._sources = livenet.LiveSources(self.plan, self.layout.root)
            try:
                # pyroute2 runs an event loop of its own: not on this one
                namespace = await asyncio.to_thread(self._sources.namespace, address)
            except livenet.SourceError as exc:
                return None, None, str(exc)
            return outside_pod(address), partial(livenet.app_socket, namespace, None, None), ""
        assert origin.workload is not None
        pod = self.plan.pod(origin.workload)
        if pod is None or pod.netns is None:
            return None, None, f"{origin.workload} is not a pod of the running mesh"
        if origin.ip is not None and origin.ip != pod.pod_ip:
            return (
                None,
                None,
                (
                    f"source IP {origin.ip}: {pod.ref} has the address {pod.pod_ip} in this"
                    " mesh and its sidecar's connections leave from it (send from that"
                    f" address, or from plaintext at {origin.ip})"
                ),
            )
        return pod, partial(livenet.app_socket, pod.netns, pod.uid, pod.gid), ""

    def _destination(
        self, case: Case
    ) -> tuple[PodPlan, int, list[tuple[str, int, tuple[ServiceTarget, ...]]]]:
        """The case's destination pod, its target port, and every (Service name, Service
        port, endpoints) forwarding to that port. ``to.port`` is the workload's (target)
        port; a client addresses the Service port that forwards to it (httpbin: Service
        8000 → container 8080), by its short name."""
        assert case.to.workload is not None
        pod = self.plan.pod(case.to.workload)
        if pod is None:
            raise LookupError(f"{case.to.workload} is not a pod of the running mesh")
        target_port = case.to.port
        if target_port is None:
            if len(set(pod.ports)) != 1:
                raise LookupError(f"{pod.ref} has ports {sorted(set(pod.ports))}: give to.port")
            target_port = pod.ports[0]
        served = [
            (key.rpartition(":")[0], int(key.rpartition(":")[2]), targets)
            for key, targets in self.plan.services.items()
            if any(t.pod == pod.ref and t.port == target_port for t in targets)
        ]
        return pod, target_port, served

    def _sandbox_route(
        self, mesh: MeshPolicy, case: Case, source: PodPlan, opener: Opener
    ) -> _Route:
        """Where the case's client dials in a sandboxed mesh, and whose log tells the rule:
        a sidecar client dials the Service's ClusterIP (or the pod IP when no Service
        covers the port); a client without a sidecar — a pod without one, or a plaintext
        source — reaches the named workload's endpoint, as kube-proxy would pick it."""
        from trustmesh.runtime.livenet import resolve

        host = case.request.host if case.request is not None else None
        in_pod = source if source.netns is not None else None
        if case.to.host is not None:  # egress: the address the app resolved the host to
            port = case.to.port or 80
            address = resolve(self.plan, in_pod, case.to.host) or _entry_address(mesh, case.to.host)
            direct = (address or EXTERNAL_ADDRESS, port)
            return _Route(case.to.host, port, None, host, direct=direct, opener=opener)
        pod, target_port, served = self._destination(case)
        endpoint = (pod.pod_ip, target_port)
        if not served:  # no Service: the client dials the pod IP (captured if it has a sidecar)
            return _Route(
                pod.pod_ip, target_port, pod, host, endpoint, target_port=target_port, opener=opener
            )
        name, service_port, targets = min(served, key=lambda s: (s[1], len(s[0])))
        if not source.sidecar:  # kube-proxy's choice: this workload's endpoint
            return _Route(
                name, service_port, pod, host, endpoint, target_port=target_port, opener=opener
            )
        several = len(targets) > 1
        if case.tcp and several:
            return _Route.refused(
                f"{name}:{service_port} has {len(targets)} workloads and TCP carries no "
                "Host or header to pick one: the client sidecar balances over them (send "
                "the case from a pod without a sidecar, which reaches one endpoint)"
            )
        address = resolve(self.plan, source, name)
        if address is None:
            raise LookupError(f"{name} has no ClusterIP in this mesh")
        headers = ((WORKLOAD_HEADER, pod.ref),) if several and not case.tcp else ()
        destination: PodPlan | None = pod
        if host is not None and not case.tcp:
            source_workload = mesh.snapshot.workload(source.ref)
            policy = mesh.for_workload(pod.ref)
            assert policy is not None and source_workload is not None
            decided = sidecar_client_route(mesh, source_workload, policy, target_port, host)
            if decided.kind is RouteKind.BLOCKED:
                destination = None  # its own sidecar answers 502
        return _Route(
            name,
            service_port,
            destination,
            host,
            direct=(address, service_port),
            headers=headers,
            target_port=target_port,
            opener=opener,
        )

    def _route(
        self, mesh: MeshPolicy, case: Case, source: PodPlan, offline: Outcome | None
    ) -> _Route:
        """How the case's request travels, as its ``from`` workload would send it."""
        host = case.request.host if case.request is not None else None
        if case.to.host is not None:  # egress
            return _Route(case.to.host, case.to.port or 80, None, host)
        pod, target_port, served = self._destination(case)
        endpoint = (pod.pod_ip, target_port)
        policy = mesh.for_workload(pod.ref)
        declared = listening_ports(policy) if policy is not None else frozenset()
        if (
            declared
            and target_port not in declared
            and (offline is None or offline.verdict != "reset")
        ):
            return _Route.refused(
                f"port {target_port} is not a port {pod.ref} declares: the local sidecar "
                "listens on declared ports only, where a cluster's sidecar captures every "
                f"port and enforces policy first (offline: {offline.verdict if offline else '?'})"
            )
        if not served:  # no Service: the client addresses the pod itself
            direct = None if source.sidecar else endpoint
            return _Route(
                pod.pod_ip, target_port, pod, host, direct=direct, target_port=target_port
            )
        name, service_port, targets = min(served, key=lambda s: (s[1], len(s[0])))
        several = len(targets) > 1
        if not source.sidecar:  # kube-proxy: this workload's endpoint, Host as given
            return _Route(name, service_port, pod, host, direct=endpoint, target_port=target_port)
        headers = ((WORKLOAD_HEADER, pod.ref),) if several else ()
        if case.tcp:
            if several:
                return _Route.refused(
                    f"{name}:{service_port} has {len(targets)} workloads and TCP carries no "
                    "Host or header to pick one: the client sidecar balances over them (send "
                    "the case from a pod without a sidecar, which reaches one endpoint)"
                )
            return _Route(name, service_port, pod, target_port=target_port)
        if host is None:
            return _Route(name, service_port, pod, None, headers=headers, target_port=target_port)
        source_workload = mesh.snapshot.workload(source.ref)
        assert policy is not None and source_workload is not None
        decided = sidecar_client_route(mesh, source_workload, policy, target_port, host)
        if decided.kind is RouteKind.PASSTHROUGH:
            # What the client sidecar's PassthroughCluster sends to the original
            # destination; a local sidecar has no original destination (no capture).
            return _Route(name, service_port, pod, host, direct=endpoint, target_port=target_port)
        if decided.kind is RouteKind.BLOCKED:
            return _Route(host, 0, None, host)  # its sidecar answers 502
        bare_port = _bare_host_port(self.plan, name)
        if ":" not in host and bare_port != service_port:
            return _Route.refused(
                f"Host {host} has no port: an app's HTTP proxy request then means port "
                f"{bare_port}, and the local sidecar cannot send it to port {service_port}"
            )
        return _Route(host, 0, pod, host, headers=headers, target_port=target_port)

    # -- HTTP

    async def _http(self, source: PodPlan, case: Case, route: _Route) -> tuple[Outcome, str]:
        assert case.request is not None
        destination = route.destination
        request_id = str(uuid.uuid4())
        headers: list[tuple[str, str]] = [("x-request-id", request_id), *route.headers]
        if route.host is not None:
            headers.append(("Host", route.host))
        for name, value in case.request.headers.items():
            for item in value if isinstance(value, list) else [value]:
                headers.append((name, item))
        if case.request.jwt is not None:
            headers.append(("Authorization", f"Bearer {case.request.jwt}"))
        url = f"http://{route.authority}{case.request.path}"
        log = self._log_of(destination)
        offset = _size(log)
        egress_log = self._log_of(source) if destination is None else None
        egress_offset = _size(egress_log)
        result = await http_request(
            self.plan,
            source,
            url,
            method=case.request.method,
            headers=headers,
            timeout=self.timeout,
            direct=route.direct,
            opener=route.opener,
        )
        via = f" via {route.direct[0]}:{route.direct[1]}" if route.direct else ""
        host = f" Host: {route.host}" if route.host else ""
        detail = f"{case.request.method} {url}{host} as {source.ref}{via} → {_describe(result)}"
        outcome = _http_outcome(result)
        if log is not None and outcome.verdict in ("allow", "deny") and result.status != 502:
            line = await _wait_log_line(log, offset, lambda e: e.get("request_id") == request_id)
            if line is not None:
                outcome = _with_log(outcome, line)
        if egress_log is not None and result.status == 503:
            line = await _wait_log_line(
                egress_log, egress_offset, lambda e: e.get("request_id") == request_id
            )
            outcome = _egress(outcome, line)
        return outcome, detail

    # -- TCP

    async def _tcp(self, source: PodPlan, route: _Route) -> tuple[Outcome, str]:
        destination, port = route.destination, route.port
        log = self._log_of(destination)
        offset = _size(log)
        egress_log = self._log_of(source) if destination is None else None
        egress_offset = _size(egress_log)
        host = route.name
        result = await tcp_exchange(
            self.plan,
            source,
            host,
            port,
            timeout=self.timeout / 2,
            direct=route.direct,
            opener=route.opener,
        )
        via = f" via {route.direct[0]}:{route.direct[1]}" if route.direct else ""
        detail = f"tcp {host}:{port} as {source.ref}{via} → {_describe_tcp(result)}"
        if result.connected:
            outcome = Outcome("allow", None, None, None, None, "connected", rule_known=False)
        else:
            outcome = Outcome("reset", None, None, None, None, result.why, rule_known=False)
        if log is not None:
            logged_port = str(route.target_port)
            line = await _wait_log_line(log, offset, lambda e: e.get("port") == logged_port)
            if line is not None:
                outcome = _tcp_with_log(outcome, line)
        if egress_log is not None and not result.connected:

            def ours(entry: dict[str, Any]) -> bool:
                local = str(entry.get("downstream_local_address", ""))
                return entry.get("workload") == source.ref and local.endswith(f":{port}")

            outcome = _egress(outcome, await _wait_log_line(egress_log, egress_offset, ours))
        return outcome, detail

    def _log_of(self, pod: PodPlan | None) -> Path | None:
        if pod is None or not pod.sidecar:
            return None
        paths = PodPaths.of(self.plan.mesh_id, pod.index) if self.sandboxed else None
        return self.layout.envoy_log_of(pod.key, paths)


def _entry_address(mesh: MeshPolicy, host: str) -> str | None:
    """The first IPv4 address of a ServiceEntry for ``host`` (what its clients dial)."""
    wanted = host.lower()
    for entry in mesh.snapshot.of_kind("ServiceEntry"):
        if wanted not in (h.lower() for h in entry.spec.hosts):
            continue
        for address in entry.spec.addresses:
            with contextlib.suppress(ValueError):
                return str(ipaddress.IPv4Network(address, strict=False).network_address)
    return None


# ---------------------------------------------------------------------------- outcomes


def _http_outcome(result: HttpResult) -> Outcome:
    if result.reset:
        return Outcome("reset", None, None, None, None, result.why, rule_known=False)
    status = result.status
    body = result.body[:200].decode(errors="replace")
    if status == 503 and ("reset" in body or "connection termination" in body):
        return Outcome("reset", None, None, None, None, f"503 {body}", rule_known=False)
    verdict = {401: "unauthenticated", 403: "deny", 400: "bad-request", 502: "deny"}.get(
        status, "allow"
    )
    headers = _echoed_headers(result) if verdict == "allow" else None
    known = verdict in ("unauthenticated", "bad-request")  # no RBAC rule decides these
    return Outcome(verdict, status, None, None, headers, f"{status} {body}", rule_known=known)


def _echoed_headers(result: HttpResult) -> dict[str, str] | None:
    """The request headers the app saw, when it is httpbin echoing them."""
    try:
        echoed = json.loads(result.body)
    except ValueError:
        return None
    headers = echoed.get("headers") if isinstance(echoed, dict) else None
    if not isinstance(headers, dict):
        return None
    return {str(k).lower(): str(v) for k, v in headers.items()}


def _rbac(entry: dict[str, Any]) -> dict[str, Any]:
    value = entry.get("rbac")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


def _denied_rule(details: str) -> str | None:
    """The policy in ``rbac_access_denied_matched_policy[…]``; None for Envoy's "none"
    (no ALLOW policy matched)."""
    rule = details.removeprefix(_DENIED).removesuffix("]")
    return None if rule == "none" else rule


def _with_log(outcome: Outcome, entry: dict[str, Any]) -> Outcome:
    rbac = _rbac(entry)
    details = str(entry.get("response_code_details") or "")
    if details.startswith(_DENIED):
        rule = _denied_rule(details)
    else:
        rule = rbac.get("enforced_effective_policy_id")
    shadow = frozenset(str(rbac[k]) for k in _SHADOW if k in rbac)
    return Outcome(
        outcome.verdict,
        outcome.status,
        rule,
        shadow,
        outcome.upstream_headers,
        outcome.reason,
        rule_known=True,
    )


def _tcp_with_log(outcome: Outcome, entry: dict[str, Any]) -> Outcome:
    details = str(entry.get("connection_termination_details") or "")
    rbac = _rbac(entry)
    if details.startswith(_DENIED):
        return Outcome("deny", None, _denied_rule(details), None, None, details, rule_known=True)
    if outcome.verdict == "allow" and "enforced_effective_policy_id" in rbac:
        # Envoy's network RBAC names the ALLOW policy only in some versions; 1.40 does not.
        rule = rbac["enforced_effective_policy_id"]
        return Outcome("allow", None, rule, None, None, outcome.reason, rule_known=True)
    return outcome


# Envoy response flags of an upstream that could not be reached (connect failure, no
# healthy host, DNS resolution failed, retries exhausted).
_UNREACHABLE = {"UF", "UH", "DF", "URX", "UC", "UO"}


def _egress(outcome: Outcome, entry: dict[str, Any] | None) -> Outcome:
    """Egress whose upstream could not be reached: the client sidecar's access log tells
    whether the mesh let it out (a ServiceEntry's or the passthrough cluster) — this host
    has no route to the internet, so that is all there is to observe — or blocked it."""
    if entry is None:
        return outcome
    cluster = str(entry.get("upstream_cluster") or "-")
    flags = set(str(entry.get("response_flags") or "-").split(","))
    if cluster in ("-", BLACKHOLE_CLUSTER) or not flags & _UNREACHABLE:
        return outcome
    why = f"left the mesh via {cluster}; unreachable from this host ({','.join(sorted(flags))})"
    return Outcome("allow", None, None, None, None, why, rule_known=False, status_known=False)


def _differences(live: Outcome, offline: Outcome) -> list[str]:
    out = []
    if live.verdict != offline.verdict:
        out.append(f"live {live.verdict}, offline {offline.verdict}")
    elif (
        live.verdict != "allow"  # an allowed request's status is the app's, not the mesh's
        and live.status_known
        and live.status is not None
        and offline.status is not None
        and live.status != offline.status
    ):
        out.append(f"live status {live.status}, offline {offline.status}")
    if live.rule_known and live.rule != offline.rule and live.verdict == offline.verdict:
        out.append(f"live rule {live.rule}, offline {offline.rule}")
    if live.dry_run is not None and live.dry_run != offline.dry_run:
        out.append(f"live dry-run {sorted(live.dry_run)}, offline {sorted(offline.dry_run or ())}")
    return out


def _describe(result: HttpResult) -> str:
    if result.reset:
        return f"reset ({result.why})"
    return f"{result.status} {result.body[:60].decode(errors='replace').strip()!r}"


def _describe_tcp(result: TcpResult) -> str:
    if result.tls_peer:
        return f"TLS handshake with {result.tls_peer} completed"
    if result.echoed:
        return f"echoed {result.received.strip()!r}"
    return f"reset ({result.why})" if result.reset else f"no echo ({result.why})"


# ---------------------------------------------------------------------------- access logs


def _size(path: Path | None) -> int:
    if path is None:
        return 0
    try:
        return path.stat().st_size
    except OSError:
        return 0


async def _wait_log_line(path: Path, offset: int, wanted: Any) -> dict[str, Any] | None:
    """The first JSON access-log line after ``offset`` that ``wanted`` accepts."""
    deadline = time.monotonic() + LOG_WAIT
    while True:
        try:
            with path.open("rb") as log:
                log.seek(offset)
                text = log.read().decode(errors="replace")
        except OSError:
            text = ""
        for line in text.splitlines():
            if not line.startswith("{"):
                continue  # Envoy's own log lines share the file
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and wanted(entry):
                return entry
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.02)  # the sidecar flushes its access log every 100 ms
