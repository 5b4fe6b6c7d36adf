"""What a sandboxed pod resolves names with: its own /etc/hosts and resolv.conf (pure).

Kubernetes' DNS answers ``SVC.NS.svc.cluster.local`` with a Service's ClusterIP, and a
pod's resolv.conf searches ``NS.svc.cluster.local svc.cluster.local cluster.local`` so
``SVC`` (same namespace), ``SVC.NS`` and ``SVC.NS.svc`` work too. There is no DNS server
in the local mesh: the runtime writes every one of those names into the pod's hosts file
(short names only for Services of the pod's own namespace, as the search path would find
them), and the pod's processes see that file as /etc/hosts through a private mount
namespace. resolv.conf keeps Kubernetes' search path and options and names no server, so a
name that is not in the mesh fails at once instead of leaking a query to the host's DNS.
"""

from __future__ import annotations

from trustmesh.runtime.plan import MeshPlan, PodPlan

__all__ = ["hosts_file", "resolv_conf", "service_names"]

_CLUSTER_DOMAIN = "svc.cluster.local"


def service_names(hostname: str, namespace: str) -> list[str]:
    """The names a pod of ``namespace`` reaches the Service ``hostname`` by."""
    name, _, rest = hostname.partition(".")
    service_namespace = rest.partition(".")[0]
    names = [hostname, f"{name}.{service_namespace}.svc", f"{name}.{service_namespace}"]
    if service_namespace == namespace:
        names.append(name)
    return names


def hosts_file(plan: MeshPlan, pod: PodPlan) -> str:
    """``/etc/hosts`` as ``pod`` sees it: itself, loopback, every Service by ClusterIP."""
    lines = [
        "# written by trustmesh for this pod (Services by ClusterIP, as cluster DNS answers)",
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        f"{pod.pod_ip}\t{pod.name}",
    ]
    for hostname, address in sorted(plan.cluster_ips.items()):
        lines.append(f"{address}\t" + " ".join(service_names(hostname, pod.namespace)))
    return "\n".join(lines) + "\n"


def resolv_conf(pod: PodPlan) -> str:
    search = f"{pod.namespace}.{_CLUSTER_DOMAIN} {_CLUSTER_DOMAIN} cluster.local"
    return (
        "# written by trustmesh: names resolve through /etc/hosts; there is no DNS server\n"
        f"search {search}\n"
        "options ndots:5 attempts:1 timeout:1\n"
    )
