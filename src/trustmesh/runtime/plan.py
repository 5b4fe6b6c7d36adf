"""Which local processes a mesh directory becomes, and where each one listens (pure).

``trustmesh up DIR`` runs every Deployment / StatefulSet / DaemonSet / Pod of DIR as one
"pod": its first container as a local process (its ``command`` + ``args``, or for a
container with only an ``image``, a ``--image`` mapping or trustmesh's stand-in for a
known image: :mod:`trustmesh.runtime.commands`) and, when the namespace or pod asks for
injection, a sidecar (agent + Envoy). Kubernetes gives each pod
an IP; here each pod gets addresses on loopback, from ``base`` (default 127.10.0.0), pod
number ``k`` using ``127.10.<k>.1-3``:

* ``pod_ip`` (``.1``): what other workloads connect to. With a sidecar Envoy's inbound
  listener binds it on the workload's ports (the iptables redirect of a real pod); without
  one, the app itself listens there. Sidecar connections to other services leave from it,
  so ``source.ip`` rules see the pod IP as in Istio.
* ``app_ip`` (``.2``): where the app listens behind its sidecar (``HOST``).
* ``outbound_ip`` (``.3``): the sidecar's outbound listeners for the app — an HTTP proxy
  on 15001 (``HTTP_PROXY``) and one TCP listener per TCP service port of the mesh: the
  app reaches ``tcp-echo.foo:9000`` at ``$OUTBOUND_IP:9000``. A separate address because
  a service port may equal one of the pod's own ports.

The app is told ``HOST`` / ``PORT`` (its first container port), ``POD_IP``,
``OUTBOUND_IP``, ``POD_NAME``, ``HOSTNAME`` (the pod's name, as in a pod),
``POD_NAMESPACE``, ``SERVICE_ACCOUNT`` and, with a sidecar, ``HTTP_PROXY``; a container's
own ``env`` entries override those, which override the image's own ``ENV``. ``command[0] ==
"trustmesh"`` runs this installation's trustmesh (``trustmesh sample httpbin``).

With ``isolation=NETNS`` (the pod sandbox) every pod is a network namespace instead: pod
*k* gets ``10.88.<1 + k // 200>.<10 + k % 200>`` on the mesh bridge (``10.88.0.1``, the
node namespace, where the control plane listens), the app listens on ``0.0.0.0:PORT``
(``HOST=0.0.0.0``) and reaches Services by name at their ClusterIP (``10.96.0.10`` on, one
per Service in namespace/name order) — capture rules take its traffic to the sidecar, no
proxy variable. The app runs as ``securityContext.runAsUser`` (container, else pod) or
uid ``20000 + k``; never as root or as the proxy's 1337. Namespace names are
``tm-<mesh id>-<k>`` and ``tm-<mesh id>-node``. The addresses exist only inside the mesh's
own namespaces, so two meshes never collide.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trustmesh.api import models as m
from trustmesh.api.dataplane import MeshMode
from trustmesh.api.diagnostics import Diagnostic, Location, error
from trustmesh.api.snapshot import ConfigSnapshot, Service, Workload
from trustmesh.runtime.capture import PROXY_UID, CaptureSpec, capture_spec
from trustmesh.runtime.commands import ImageCommand, container_run, restart_policy
from trustmesh.runtime.layout import PodPaths

__all__ = [
    "APP_UID_BASE",
    "DEFAULT_BASE",
    "HTTP_PROXY_PORT",
    "MAX_PODS",
    "NODE_IP",
    "POD_CIDR",
    "SERVICE_CIDR",
    "Isolation",
    "MeshPlan",
    "PodPlan",
    "ServiceTarget",
    "plan_mesh",
]

DEFAULT_BASE = "127.10.0.0"
HTTP_PROXY_PORT = 15001
MAX_PODS = 250  # one /24 step of the third octet per pod
_RUNNABLE = ("Deployment", "StatefulSet", "DaemonSet", "Pod")

# The sandbox's addresses: they exist only inside the mesh's own network namespaces.
POD_CIDR = "10.88.0.0/16"
NODE_IP = "10.88.0.1"  # the bridge, in the node namespace: control plane, pods' gateway
SERVICE_CIDR = "10.96.0.0/16"
APP_UID_BASE = 20000  # pod k's app runs as 20000 + k unless its securityContext says


class Isolation(enum.Enum):
    """How pods are kept apart: ``process`` (loopback addresses, one user) or ``netns``
    (a network namespace per pod, capture rules, users)."""

    PROCESS = "process"
    NETNS = "netns"


def netns_name(mesh_id: str, suffix: str) -> str:
    """``tm-<mesh id>-<suffix>``: short, as ``ip netns`` shows it."""
    return f"tm-{mesh_id}-{suffix}"


def sandbox_pod_ip(index: int) -> str:
    return f"10.88.{1 + index // 200}.{10 + index % 200}"


@dataclass(frozen=True, slots=True)
class PodPlan:
    """One workload run as local processes."""

    namespace: str
    name: str
    service_account: str
    sidecar: bool
    pod_ip: str
    app_ip: str  # == pod_ip without a sidecar
    outbound_ip: str | None  # None without a sidecar
    ports: tuple[int, ...]
    command: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    restart_policy: str = "Always"  # Always, OnFailure or Never (bare Pods only)
    # netns isolation only: the pod's namespace, its app's uid/gid, its capture rules
    netns: str | None = None
    uid: int | None = None
    gid: int | None = None
    capture: CaptureSpec | None = None
    index: int = 0  # the pod's number in the plan (its namespace and uid derive from it)
    # an ingress gateway: Envoy in router mode (no app, no capture) listening on pod_ip
    gateway: bool = False

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def key(self) -> str:
        """A file-name-safe name (namespaces and names are DNS labels: no dots, no '_')."""
        return f"{self.namespace}_{self.name}"

    def to_json(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "name": self.name,
            "service_account": self.service_account,
            "sidecar": self.sidecar,
            "pod_ip": self.pod_ip,
            "app_ip": self.app_ip,
            "outbound_ip": self.outbound_ip,
            "ports": list(self.ports),
            "command": list(self.command),
            "env": dict(self.env),
            "restart_policy": self.restart_policy,
            "netns": self.netns,
            "uid": self.uid,
            "gid": self.gid,
            "capture": None if self.capture is None else self.capture.to_json(),
            "index": self.index,
            "gateway": self.gateway,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PodPlan:
        return cls(
            namespace=data["namespace"],
            name=data["name"],
            service_account=data["service_account"],
            sidecar=bool(data["sidecar"]),
            pod_ip=data["pod_ip"],
            app_ip=data["app_ip"],
            outbound_ip=data["outbound_ip"],
            ports=tuple(data["ports"]),
            command=tuple(data["command"]),
            env=dict(data["env"]),
            restart_policy=str(data.get("restart_policy", "Always")),
            netns=data.get("netns"),
            uid=data.get("uid"),
            gid=data.get("gid"),
            capture=CaptureSpec.from_json(data["capture"]) if data.get("capture") else None,
            index=int(data.get("index", 0)),
            gateway=bool(data.get("gateway", False)),
        )


@dataclass(frozen=True, slots=True)
class ServiceTarget:
    """One endpoint of a service port: a pod, its address and the target port (where
    kube-proxy sends a client without a sidecar)."""

    pod: str  # namespace/name
    address: str
    port: int


@dataclass(frozen=True, slots=True)
class MeshPlan:
    pods: tuple[PodPlan, ...]
    trust_domain: str
    # "<host>:<port>" for every name a service port answers to → its endpoints, one per
    # selected pod (a Service over reviews v1, v2, v3 has three)
    services: Mapping[str, tuple[ServiceTarget, ...]] = field(default_factory=dict)
    isolation: Isolation = Isolation.PROCESS
    mesh_id: str = ""  # netns: names the mesh's namespaces
    # netns: Service hostname (name.ns.svc.cluster.local) → its ClusterIP
    cluster_ips: Mapping[str, str] = field(default_factory=dict)

    def pod(self, ref: str) -> PodPlan | None:
        return next((p for p in self.pods if p.ref == ref), None)

    @property
    def node_netns(self) -> str:
        return netns_name(self.mesh_id, "node")

    @property
    def sandboxed(self) -> bool:
        return self.isolation is Isolation.NETNS

    def paths(self, pod: PodPlan) -> PodPaths | None:
        """Where a sandboxed pod's runtime files are (None in process mode)."""
        return PodPaths.of(self.mesh_id, pod.index) if self.sandboxed else None

    def to_json(self) -> dict[str, Any]:
        return {
            "trust_domain": self.trust_domain,
            "pods": [p.to_json() for p in self.pods],
            "services": {
                k: [{"pod": t.pod, "address": t.address, "port": t.port} for t in targets]
                for k, targets in sorted(self.services.items())
            },
            "isolation": self.isolation.value,
            "mesh_id": self.mesh_id,
            "cluster_ips": dict(sorted(self.cluster_ips.items())),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MeshPlan:
        return cls(
            pods=tuple(PodPlan.from_json(p) for p in data["pods"]),
            trust_domain=data["trust_domain"],
            services={k: tuple(ServiceTarget(**t) for t in v) for k, v in data["services"].items()},
            isolation=Isolation(data.get("isolation", "process")),
            mesh_id=data.get("mesh_id", ""),
            cluster_ips=dict(data.get("cluster_ips", {})),
        )


def plan_mesh(
    snapshot: ConfigSnapshot,
    *,
    base: str = DEFAULT_BASE,
    images: Sequence[ImageCommand] = (),
    isolation: Isolation = Isolation.PROCESS,
    mesh_id: str = "",
) -> tuple[MeshPlan | None, list[Diagnostic]]:
    """The processes and addresses of every runnable workload; errors name file and field.

    ``images``: ``--image IMAGE=COMMAND`` mappings, tried in order before the built-in
    stand-ins. ``mesh_id`` (netns isolation) names the mesh's namespaces: the runtime
    derives it from the state directory."""
    if isolation is Isolation.NETNS:
        return _plan_sandbox(snapshot, mesh_id, images)
    try:
        first = ipaddress.IPv4Address(base)
    except ValueError:
        return None, [error("bad-address-base", _nowhere(), f"base {base!r} is not an IPv4")]
    if not first.is_loopback or int(first) & 0xFFFF:
        return None, [
            error("bad-address-base", _nowhere(), f"base {base} must be a 127.x.0.0 address")
        ]
    workloads = [w for w in snapshot.workloads if w.kind in _RUNNABLE]
    problems: list[Diagnostic] = []
    if len(workloads) > MAX_PODS:
        where = workloads[MAX_PODS].resource.location()
        return None, [error("too-many-pods", where, f"at most {MAX_PODS} pods run on one host")]
    pods: list[PodPlan] = []
    seen: set[str] = set()
    for index, workload in enumerate(workloads):
        if workload.ref in seen:  # a Pod and the Deployment that owns it: run it once
            continue
        seen.add(workload.ref)
        pod, problem = _pod(workload, first + (index << 8), images)
        if problem is not None:
            problems.append(problem)
        elif pod is not None:
            pods.append(pod)
    if problems:
        return None, problems
    plan = MeshPlan(tuple(pods), snapshot.mesh.trust_domain, _service_targets(snapshot, pods))
    return plan, []


def _pod(
    workload: Workload, block: ipaddress.IPv4Address, images: Sequence[ImageCommand] = ()
) -> tuple[PodPlan | None, Diagnostic | None]:
    resource = workload.resource
    spec: m.PodSpec
    # A Pod's model is the whole object; a controller's is its spec.
    prefix: tuple[str, ...] = ("spec",) if workload.kind == "Pod" else ("template", "spec")
    spec = resource.spec.spec if workload.kind == "Pod" else resource.spec.template.spec
    where = resource.location(*prefix, "containers")
    if workload.dataplane.mode is MeshMode.AMBIENT:
        # Run without enforcement it would answer differently from `authz check`.
        return None, error(
            "ambient-not-run",
            resource.meta_location("name"),
            f"{workload.ref} is in ambient mode ({workload.dataplane.reason}); the local"
            " runtime runs sidecars, not ztunnel: label it istio.io/dataplane-mode=none or"
            " inject a sidecar",
        )
    if workload.dataplane.mode is MeshMode.GATEWAY:
        return _gateway_pod(workload, block), None
    if not spec.containers:
        return None, error("no-container", where, f"{workload.ref} has no container to run")
    container = spec.containers[0]
    run = container_run(resource, prefix, workload.ref, container, images)
    if isinstance(run, Diagnostic):
        return None, run
    restarts = restart_policy(resource, prefix, workload.kind, spec)
    if isinstance(restarts, Diagnostic):
        return None, restarts
    pod_ip = str(block + 1)
    app_ip = str(block + 2) if workload.has_sidecar else pod_ip
    outbound_ip = str(block + 3) if workload.has_sidecar else None
    ports = workload.ports
    env = {
        **run.image_env,
        "HOST": app_ip,
        "POD_IP": pod_ip,
        "POD_NAME": workload.name,
        "HOSTNAME": workload.name,
        "POD_NAMESPACE": workload.namespace,
        "SERVICE_ACCOUNT": workload.service_account,
    }
    if ports:
        env["PORT"] = str(ports[0])
    if outbound_ip is not None:
        proxy = f"http://{outbound_ip}:{HTTP_PROXY_PORT}"
        env |= {"OUTBOUND_IP": outbound_ip, "HTTP_PROXY": proxy, "http_proxy": proxy}
    env |= {var.name: var.value for var in container.env}
    plan = PodPlan(
        namespace=workload.namespace,
        name=workload.name,
        service_account=workload.service_account,
        sidecar=workload.has_sidecar,
        pod_ip=pod_ip,
        app_ip=app_ip,
        outbound_ip=outbound_ip,
        ports=ports,
        command=run.argv,
        env=env,
        restart_policy=restarts,
    )
    return plan, None


def _gateway_pod(workload: Workload, block: ipaddress.IPv4Address) -> PodPlan:
    """A gateway pod runs only its proxy: its container is Istio's istio-proxy (image
    ``auto``), here the agent + Envoy that every sidecar pod runs, configured as a router
    from Gateway + VirtualService; it listens on its pod IP, where clients outside the
    mesh connect (:mod:`trustmesh.xds.gateway`)."""
    pod_ip = str(block + 1)
    return PodPlan(
        namespace=workload.namespace,
        name=workload.name,
        service_account=workload.service_account,
        sidecar=True,
        pod_ip=pod_ip,
        app_ip=pod_ip,
        outbound_ip=None,
        ports=(),
        command=(),
        gateway=True,
    )


def _service_targets(
    snapshot: ConfigSnapshot, pods: list[PodPlan]
) -> dict[str, tuple[ServiceTarget, ...]]:
    by_ref = {p.ref: p for p in pods}
    targets: dict[str, tuple[ServiceTarget, ...]] = {}
    for service in snapshot.services:
        selected = [
            w for w in snapshot.workloads if w.ref in by_ref and service.namespace == w.namespace
        ]
        selected = list({w.ref: w for w in selected if service.selects(w)}.values())
        if not selected:
            continue
        names = (
            service.hostname,
            f"{service.name}.{service.namespace}.svc",
            f"{service.name}.{service.namespace}",
        )
        for port in service.ports:
            endpoints = []
            for workload in selected:
                target = (
                    port.target_port
                    if isinstance(port.target_port, int)
                    else _named_port(workload, port.target_port)  # a named container port
                )
                if target is None:
                    continue  # Kubernetes drops an endpoint without the named port
                pod = by_ref[workload.ref]
                endpoints.append(ServiceTarget(pod.ref, pod.pod_ip, target))
            for name in names:
                if endpoints:
                    targets[f"{name}:{port.port}"] = tuple(endpoints)
    return targets


def _plan_sandbox(
    snapshot: ConfigSnapshot, mesh_id: str, images: Sequence[ImageCommand]
) -> tuple[MeshPlan | None, list[Diagnostic]]:
    if not mesh_id or not mesh_id.isalnum() or len(mesh_id) > 8:
        return None, [error("bad-mesh-id", _nowhere(), f"mesh id {mesh_id!r}: 1-8 letters/digits")]
    workloads = [w for w in snapshot.workloads if w.kind in _RUNNABLE]
    if len(workloads) > MAX_PODS:
        where = workloads[MAX_PODS].resource.location()
        return None, [error("too-many-pods", where, f"at most {MAX_PODS} pods run on one host")]
    pods: list[PodPlan] = []
    problems: list[Diagnostic] = []
    seen: set[str] = set()
    for workload in workloads:
        if workload.ref in seen:
            continue
        seen.add(workload.ref)
        pod, found = _sandbox_pod(workload, len(pods), mesh_id, images)
        problems += found
        if pod is not None:
            pods.append(pod)
    if problems:
        return None, problems
    cluster_ips = _cluster_ips(snapshot.services)
    plan = MeshPlan(
        tuple(pods),
        snapshot.mesh.trust_domain,
        _service_targets(snapshot, pods),
        isolation=Isolation.NETNS,
        mesh_id=mesh_id,
        cluster_ips=cluster_ips,
    )
    return plan, []


def _cluster_ips(services: tuple[Service, ...]) -> dict[str, str]:
    """One virtual address per Service, in namespace/name order (deterministic)."""
    network = ipaddress.IPv4Network(SERVICE_CIDR)
    ordered = sorted(
        {(s.namespace, s.name): s for s in services}.values(), key=lambda s: (s.namespace, s.name)
    )
    return {s.hostname: str(network[10 + i]) for i, s in enumerate(ordered)}


def _sandbox_pod(
    workload: Workload, index: int, mesh_id: str, images: Sequence[ImageCommand]
) -> tuple[PodPlan | None, list[Diagnostic]]:
    if workload.dataplane.mode is MeshMode.GATEWAY:
        # Only its proxy runs, in its own namespace without capture rules (a gateway
        # has none in Istio); the runtime publishes its Service's ports on the host.
        gateway = _gateway_pod(workload, ipaddress.IPv4Address("127.0.0.0"))
        owner = APP_UID_BASE + index  # owns the pod's (unused) app directory only
        ip = sandbox_pod_ip(index)
        sandboxed = dataclasses.replace(
            gateway,
            pod_ip=ip,
            app_ip=ip,
            netns=netns_name(mesh_id, str(index)),
            uid=owner,
            gid=owner,
            index=index,
        )
        return sandboxed, []
    base, problem = _pod(workload, ipaddress.IPv4Address("127.0.0.0"), images)
    if base is None:
        return None, [problem] if problem is not None else []
    resource = workload.resource
    is_pod = workload.kind == "Pod"
    prefix: tuple[str, ...] = ("spec",) if is_pod else ("template", "spec")
    spec: m.PodSpec = resource.spec.spec if is_pod else resource.spec.template.spec
    container = spec.containers[0]
    problems: list[Diagnostic] = []
    uid = container.security_context.run_as_user
    gid = container.security_context.run_as_group
    user_at: tuple[str | int, ...] = (*prefix, "containers", 0, "securityContext")
    if uid is None:
        uid, user_at = spec.security_context.run_as_user, (*prefix, "securityContext")
    if gid is None:
        gid = spec.security_context.run_as_group
    if uid is None:
        uid = APP_UID_BASE + index
    for what, value in (("runAsUser", uid), ("runAsGroup", gid)):
        if value == 0:
            problems.append(
                error(
                    "runs-as-root",
                    resource.location(*user_at, what),
                    f"{workload.ref}: {what} 0: the local runtime never runs an app as root "
                    "(it would own the host's files); remove it or choose another id",
                )
            )
        elif value == PROXY_UID:
            problems.append(
                error(
                    "runs-as-proxy",
                    resource.location(*user_at, what),
                    f"{workload.ref}: {what} {PROXY_UID} is the sidecar's: its traffic would "
                    "bypass the capture rules (Istio refuses this id for apps too)",
                )
            )
    annotations = resource.annotations if is_pod else resource.spec.template.metadata.annotations

    def where(name: str) -> Location:
        if is_pod:
            return resource.meta_location("annotations", name)
        return resource.location("template", "metadata", "annotations", name)

    capture = None
    if workload.has_sidecar:
        capture, found = capture_spec(annotations, where)
        problems += found
    if problems:
        return None, problems
    host_network = spec.host_network and not workload.has_sidecar
    pod_ip = NODE_IP if host_network else sandbox_pod_ip(index)
    env = {
        k: v for k, v in base.env.items() if k not in ("OUTBOUND_IP", "HTTP_PROXY", "http_proxy")
    }
    own = {var.name for var in container.env}
    env |= {k: v for k, v in (("HOST", "0.0.0.0"), ("POD_IP", pod_ip)) if k not in own}
    plan = PodPlan(
        namespace=base.namespace,
        name=base.name,
        service_account=base.service_account,
        sidecar=base.sidecar,
        pod_ip=pod_ip,
        app_ip=pod_ip,
        outbound_ip=None,
        ports=base.ports,
        command=base.command,
        env=env,
        restart_policy=base.restart_policy,
        netns=netns_name(mesh_id, "node" if host_network else str(index)),
        uid=uid,
        gid=uid if gid is None else gid,
        capture=capture,
        index=index,
    )
    return plan, []


def _named_port(workload: Workload, name: str) -> int | None:
    spec = workload.resource.spec
    pod_spec: m.PodSpec = spec.spec if workload.kind == "Pod" else spec.template.spec
    for container in pod_spec.containers:
        for port in container.ports:
            if port.name == name:
                return port.container_port
    return None


def _nowhere() -> Location:
    return Location("<trustmesh up>")
