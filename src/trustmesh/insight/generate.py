"""Least-privilege AuthorizationPolicies from recorded traffic, proven by replay (pure).

For each destination workload that recorded allowed requests, one ALLOW policy selecting
it (its pod labels) whose rules admit exactly what was seen:

* **who:** the observed mTLS principals, each exactly (no namespace-wide or wildcard
  principals). A plaintext caller has no identity; the only rule that can admit it and
  nothing else is its address: ``ipBlocks: [IP/32]`` (an address is weaker than an
  identity — pods move — so each such rule is commented in the output). A plaintext record
  without a source address cannot be allowed least-privilege and fails generation.
* **what:** per port, the observed methods and their paths generalized segment by segment
  (:mod:`trustmesh.insight.paths`); methods share one operation only when they were seen
  on the same paths, so ``GET /a`` + ``POST /b`` never allows ``POST /a``. A TCP
  connection (no method, no path) allows its port only.
* hosts are not restricted (the same Service is reached by several names).

Plus an allow-nothing (``spec: {}``) per namespace of those workloads, so what was never
seen — other workloads of the namespace included — is denied.

Before anything is returned the result is **proven**: the input configuration with the
generated policies added is compiled, every distinct recorded request is decided and must
be allowed, and for every destination and port an identity that never called it and a
plaintext client from an unused address must be denied. A failed proof is an error
(:class:`ProofFailed` lists each failing request): nothing unproven is ever printed.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from trustmesh.api.loader import load_sources
from trustmesh.api.snapshot import ConfigSnapshot, Workload
from trustmesh.insight.paths import UnwritablePath, generalize_path
from trustmesh.insight.records import Problem, Protocol, TrafficRecord
from trustmesh.insight.replay import Outcome, decide
from trustmesh.insight.traffic import Observed
from trustmesh.policy.compose import MeshPolicy, compile_mesh

__all__ = [
    "UNRECORDED_IP",
    "GeneratedPolicies",
    "ProofFailed",
    "compile_with",
    "generate_policies",
    "prove",
]

# Labels a controller stamps per rollout or per pod (a Pod from a cluster dump has them):
# a selector naming one would stop selecting the workload at its next rollout.
VOLATILE_LABELS = frozenset(
    {
        "pod-template-hash",
        "controller-revision-hash",
        "pod-template-generation",
        "statefulset.kubernetes.io/pod-name",
        "apps.kubernetes.io/pod-index",
        "batch.kubernetes.io/controller-uid",
        "controller-uid",
        "batch.kubernetes.io/job-name",
        "job-name",
    }
)
# TEST-NET-1 (RFC 5737): never a pod's address, so never an observed caller.
UNRECORDED_IP = "192.0.2.1"
UNRECORDED_SA = "trustmesh-unrecorded-caller"


class ProofFailed(Exception):
    """The generated policies do not do what they must; ``failures`` says where."""

    def __init__(self, failures: Sequence[str]) -> None:
        super().__init__("; ".join(failures))
        self.failures = list(failures)


@dataclass(slots=True)
class GeneratedPolicies:
    documents: list[dict[str, Any]] = field(default_factory=list)
    comments: dict[int, list[str]] = field(default_factory=dict)  # document index → lines
    proof: list[str] = field(default_factory=list)
    used: int = 0  # distinct requests the policies were built from
    excluded: dict[str, int] = field(default_factory=dict)  # verdict → records not used
    problems: list[Problem] = field(default_factory=list)
    proven: list[Observed] = field(default_factory=list)  # the recorded requests kept

    def render(self) -> str:
        chunks = []
        for i, document in enumerate(self.documents):
            lines = self.comments.get(i, [])
            header = "".join(f"# {line}\n" for line in lines)
            chunks.append(header + yaml.safe_dump(document, sort_keys=False))
        proof = "".join(f"# {line}\n" for line in self.proof)
        return proof + "---\n".join(chunks)


@dataclass(frozen=True, slots=True)
class _Caller:
    principal: str | None  # None: plaintext, by address
    ip: str | None


def _caller(record: TrafficRecord) -> _Caller:
    if record.mtls and record.source_principal:
        return _Caller(record.source_principal, None)
    return _Caller(None, record.source_ip)


def _operations(
    records: Sequence[TrafficRecord], mesh: MeshPolicy, templates: bool
) -> tuple[tuple[tuple[str, Any], ...], ...]:
    """The caller's operations as hashable tuples (see the module docstring)."""
    tcp_ports: set[int] = set()
    paths: dict[tuple[int, str], set[str]] = defaultdict(set)
    for r in records:
        if r.protocol is Protocol.TCP:
            tcp_ports.add(r.port)
        else:
            paths[(r.port, r.method or "GET")].add(
                generalize_path(r.path or "/", mesh.path_normalization, templates=templates)
            )
    operations: list[tuple[tuple[str, Any], ...]] = [
        (("ports", (str(p),)),) for p in sorted(tcp_ports)
    ]
    by_paths: dict[tuple[int, tuple[str, ...]], list[str]] = defaultdict(list)
    for (port, method), seen in sorted(paths.items()):
        if port not in tcp_ports:
            by_paths[(port, tuple(sorted(seen)))].append(method)
    for (port, values), methods in sorted(by_paths.items()):
        operations.append(
            (("ports", (str(port),)), ("methods", tuple(sorted(methods))), ("paths", values))
        )
    return tuple(operations)


def _to(operations: tuple[tuple[tuple[str, Any], ...], ...]) -> list[dict[str, Any]]:
    return [{"operation": {k: list(v) for k, v in op}} for op in operations]


def _policy_name(workload: Workload, taken: set[str]) -> str:
    base = f"{workload.name}-observed"
    name, n = base, 2
    while f"AuthorizationPolicy/{workload.namespace}/{name}" in taken:
        name, n = f"{base}-{n}", n + 1
    taken.add(f"AuthorizationPolicy/{workload.namespace}/{name}")
    return name


def _selects(selector: dict[str, str], workload: Workload) -> bool:
    return all(workload.labels.get(k) == v for k, v in selector.items())


def generate_policies(
    snapshot: ConfigSnapshot,
    mesh: MeshPolicy,
    observed: Sequence[Observed],
    *,
    now: float,
    templates: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> GeneratedPolicies:
    """Policies for ``observed`` on top of ``snapshot`` (compiled as ``mesh``), proven.

    Raises :class:`ProofFailed` when a recorded request cannot be allowed least-privilege
    or the replay does not come out as it must.
    """
    result = GeneratedPolicies()
    used: list[Observed] = []
    failures: list[str] = []
    by_destination: dict[str, dict[_Caller, list[TrafficRecord]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for item in observed:
        record = item.record
        allowed = item.verdicts.get("allow", 0)
        for verdict, count in item.verdicts.items():
            if verdict != "allow":
                result.excluded[verdict] = result.excluded.get(verdict, 0) + count
        if not allowed:
            continue
        workload = snapshot.workload(record.destination)
        if workload is None:
            failures.append(
                f"{record.origin}: destination {record.destination} is not a"
                " workload of the input configuration"
            )
            continue
        caller = _caller(record)
        wild = [v for v in (caller.principal, record.method) if v and "*" in v]
        if wild:
            # Istio reads '*' at either end of a principal or method as a wildcard: written
            # as recorded it would allow every principal / method sharing the rest.
            failures.append(
                f"{record.origin}: {wild[0]!r} holds '*', which a policy reads as a wildcard"
            )
            continue
        if caller.principal is None and not caller.ip:
            failures.append(
                f"{record.origin}: a plaintext request without a source address"
                " can only be allowed by allowing every source"
            )
            continue
        by_destination[record.destination][caller].append(record)
        used.append(item)
    if failures:
        raise ProofFailed(failures)
    result.used = len(used)
    taken = {r.key for r in snapshot.resources}
    namespaces: set[str] = set()
    for ref in sorted(by_destination):
        workload = snapshot.workload(ref)
        assert workload is not None
        namespaces.add(workload.namespace)
        by_operations: dict[tuple[Any, ...], list[_Caller]] = defaultdict(list)
        for caller, records in sorted(
            by_destination[ref].items(), key=lambda kv: (kv[0].principal or "", kv[0].ip or "")
        ):
            try:
                by_operations[_operations(records, mesh, templates)].append(caller)
            except UnwritablePath as exc:
                failures.append(f"{records[0].origin}: {exc}")
        rules = []
        comments = []
        for operations, callers in by_operations.items():
            sources: list[dict[str, Any]] = []
            principals = sorted({c.principal for c in callers if c.principal})
            ips = sorted({c.ip for c in callers if c.principal is None and c.ip})
            if principals:
                sources.append({"source": {"principals": principals}})
            if ips:
                sources.append({"source": {"ipBlocks": [_block(ip) for ip in ips]}})
                comments.append(
                    f"plaintext caller(s) {', '.join(ips)} have no identity: allowed by"
                    " address only (give them a sidecar to allow them by principal)"
                )
            rules.append({"from": sources, "to": _to(operations)})
        selector = {k: v for k, v in sorted(workload.labels.items()) if k not in VOLATILE_LABELS}
        if not selector:
            failures.append(f"{ref} has no stable labels: no selector can pick it alone")
            continue
        also = [
            w.ref
            for w in snapshot.workloads
            if w.namespace == workload.namespace and w.ref != ref and _selects(selector, w)
        ]
        if also:
            comments.append(f"the selector also picks {', '.join(also)}: they get these rules")
        result.comments[len(result.documents)] = [
            f"least privilege for {ref}: what its"
            f" {sum(len(v) for v in by_destination[ref].values())} distinct recorded"
            " request(s) did",
            *comments,
        ]
        result.documents.append(
            {
                "apiVersion": "security.istio.io/v1",
                "kind": "AuthorizationPolicy",
                "metadata": {
                    "name": _policy_name(workload, taken),
                    "namespace": workload.namespace,
                },
                "spec": {"selector": {"matchLabels": selector}, "action": "ALLOW", "rules": rules},
            }
        )
    if failures:
        raise ProofFailed(failures)
    selectors = [
        (d["metadata"]["namespace"], d["spec"]["selector"]["matchLabels"]) for d in result.documents
    ]
    for namespace in sorted(namespaces):
        name, n = "allow-nothing", 2
        while f"AuthorizationPolicy/{namespace}/{name}" in taken:
            name, n = f"allow-nothing-{n}", n + 1
        closed = sorted(
            w.ref
            for w in snapshot.workloads
            if w.namespace == namespace
            and w.has_sidecar
            and not any(ns == namespace and _selects(sel, w) for ns, sel in selectors)
        )
        result.comments[len(result.documents)] = [
            f"default-deny for {namespace}: only what the policies above allow gets through",
            *(
                [f"no request to these was recorded, so nothing reaches them: {', '.join(closed)}"]
                if closed
                else []
            ),
        ]
        result.documents.append(
            {
                "apiVersion": "security.istio.io/v1",
                "kind": "AuthorizationPolicy",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {},
            }
        )
    result.proof = prove(snapshot, result.documents, used, now, progress)
    result.proven = used
    return result


def _block(ip: str) -> str:
    return f"{ip}/128" if ":" in ip else f"{ip}/32"


def compile_with(snapshot: ConfigSnapshot, documents: Sequence[dict[str, Any]]) -> MeshPolicy:
    """The compiled mesh with ``documents`` applied after the input's own resources."""
    text = "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in documents)
    loaded = load_sources([("generated.yaml", text.encode())])
    if loaded.errors:
        raise ProofFailed([f"generated policy invalid: {d}" for d in loaded.errors])
    after = max((r.order for r in snapshot.resources), default=-1) + 1
    added = tuple(dataclasses.replace(r, order=after + r.order) for r in loaded.resources)
    keys = {r.key for r in added}
    kept = tuple(r for r in snapshot.resources if r.key not in keys)
    return compile_mesh(dataclasses.replace(snapshot, resources=(*kept, *added)))


def prove(
    snapshot: ConfigSnapshot,
    documents: Sequence[dict[str, Any]],
    used: Sequence[Observed],
    now: float,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Replay ``used`` with ``documents`` added to ``snapshot``: each must be allowed, and
    an unrecorded identity and a plaintext client must be denied on every destination
    port; the proof's summary lines, or :class:`ProofFailed`."""
    mesh = compile_with(snapshot, documents)
    failures: list[str] = []
    for item in used:
        outcome = decide(mesh, item.record, now)
        if not outcome.allowed:
            failures.append(f"recorded request NOT allowed: {_describe(item.record, outcome)}")
    records = sum(item.count for item in used)
    probes = 0
    # Every recorded request is sent again from strangers: a rule of another policy that
    # admits anyone on one path only is found too.
    for done, item in enumerate(used, 1):
        if progress is not None and done % 256 == 0:
            progress(done, len(used))
        record = item.record
        namespace = record.destination.split("/")[0]
        stranger = f"{snapshot.mesh.trust_domain}/ns/{namespace}/sa/{UNRECORDED_SA}"
        for probe in (
            dataclasses.replace(
                record, mtls=True, source_principal=stranger, source_ip=UNRECORDED_IP
            ),
            dataclasses.replace(record, mtls=False, source_principal=None, source_ip=UNRECORDED_IP),
        ):
            probes += 1
            outcome = decide(mesh, probe, now)
            if outcome.allowed:
                failures.append(f"unrecorded source ALLOWED: {_describe(probe, outcome)}")
    if failures:
        raise ProofFailed(failures)
    return [
        f"proof (replayed with these policies added to the input): all {len(used)} distinct"
        f" recorded request(s) ({records} record(s)) allowed; the same {probes} request(s)"
        f" from unrecorded sources ({UNRECORDED_SA}, plaintext from {UNRECORDED_IP}) denied",
    ]


def _describe(record: TrafficRecord, outcome: Outcome) -> str:
    what = f"{record.method} {record.path}" if record.protocol is Protocol.HTTP else "tcp"
    rule = f" by {outcome.rule}" if outcome.rule else ""
    return (
        f"{record.describe_source()} → {record.destination}:{record.port} {what}"
        f" ({outcome.verdict}{rule}: {outcome.reason}) [{record.origin}]"
    )
