"""A pod's nftables rules: istio-init's traffic capture and kube-proxy's Service DNAT (pure).

In a cluster, istio-init (or the Istio CNI node agent) writes iptables ``nat`` chains into
each injected pod's network namespace before any container starts, and kube-proxy turns a
Service's virtual address into one of its endpoints. The local runtime plays both roles
with one nftables table per pod namespace, ``ip trustmesh``, whose text this module makes:

* ``prerouting`` → ``istio_inbound``: inbound TCP is redirected to Envoy's 15006, except
  the tunnel port 15008 and the excluded inbound ports (Envoy's own 15090, 15021, 15020 by
  default, plus ``traffic.sidecar.istio.io/excludeInboundPorts``); with
  ``includeInboundPorts`` set to a list only those ports are redirected, with ``""`` none.
* ``output`` → ``istio_output``: everything the app sends is redirected to 15001, except
  what istio-init lets through — traffic of Envoy's uid/gid 1337 (but Envoy's connections
  back to its own pod IP over ``lo`` go to the inbound port, ``ISTIO_IN_REDIRECT``), the
  inbound passthrough's ``127.0.0.6`` source, the app talking to itself over ``lo``,
  ``127.0.0.1``, ``excludeOutboundPorts`` and ``excludeOutboundIPRanges``; with
  ``includeOutboundIPRanges`` set to CIDRs only those are redirected, with ``""`` none
  (``includeOutboundPorts`` are redirected whatever the ranges say).
* ``services`` (a lower priority on the same hook): a connection to a ClusterIP:port that
  the capture let through — every connection of a pod without a sidecar, Envoy's own —
  is DNATed to one endpoint (pod IP : target port), chosen at random as kube-proxy does.
  NAT chains of one hook are consulted in priority order until one sets a mapping, so a
  connection the capture redirected is not DNATed again.

The rule order is istio-init's (``tools/istio-iptables/pkg/capture/run.go``), translated
rule for rule; :func:`capture_spec` reads Istio's annotations into a :class:`CaptureSpec`
with an error naming the annotation for a bad value.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trustmesh.api.diagnostics import Diagnostic, Location, error

__all__ = [
    "INBOUND_CAPTURE_PORT",
    "OUTBOUND_CAPTURE_PORT",
    "PROXY_UID",
    "TABLE",
    "CaptureSpec",
    "ServiceDnat",
    "capture_spec",
    "pod_ruleset",
]

PROXY_UID = 1337  # Envoy and the agent (istio-proxy's uid and gid)
OUTBOUND_CAPTURE_PORT = 15001
INBOUND_CAPTURE_PORT = 15006
TUNNEL_PORT = 15008
INBOUND_PASSTHROUGH_SOURCE = "127.0.0.6"
# The injector passes these to istio-iptables -d: Envoy's Prometheus, health and agent ports.
DEFAULT_EXCLUDED_INBOUND = (15090, 15021, 15020)
TABLE = "trustmesh"

_A = "traffic.sidecar.istio.io/"
INCLUDE_INBOUND_PORTS = _A + "includeInboundPorts"
EXCLUDE_INBOUND_PORTS = _A + "excludeInboundPorts"
INCLUDE_OUTBOUND_PORTS = _A + "includeOutboundPorts"
EXCLUDE_OUTBOUND_PORTS = _A + "excludeOutboundPorts"
INCLUDE_OUTBOUND_IP_RANGES = _A + "includeOutboundIPRanges"
EXCLUDE_OUTBOUND_IP_RANGES = _A + "excludeOutboundIPRanges"


@dataclass(frozen=True, slots=True)
class CaptureSpec:
    """What istio-iptables is told for one pod. ``None`` for an include list is Istio's
    ``*`` (everything); an empty tuple is ``""`` (nothing)."""

    inbound_ports: tuple[int, ...] | None = None
    excluded_inbound_ports: tuple[int, ...] = DEFAULT_EXCLUDED_INBOUND
    outbound_ip_ranges: tuple[str, ...] | None = None
    excluded_outbound_ip_ranges: tuple[str, ...] = ()
    outbound_ports: tuple[int, ...] = ()
    excluded_outbound_ports: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "inbound_ports": None if self.inbound_ports is None else list(self.inbound_ports),
            "excluded_inbound_ports": list(self.excluded_inbound_ports),
            "outbound_ip_ranges": (
                None if self.outbound_ip_ranges is None else list(self.outbound_ip_ranges)
            ),
            "excluded_outbound_ip_ranges": list(self.excluded_outbound_ip_ranges),
            "outbound_ports": list(self.outbound_ports),
            "excluded_outbound_ports": list(self.excluded_outbound_ports),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CaptureSpec:
        def optional(value: Any) -> tuple[Any, ...] | None:
            return None if value is None else tuple(value)

        return cls(
            inbound_ports=optional(data["inbound_ports"]),
            excluded_inbound_ports=tuple(data["excluded_inbound_ports"]),
            outbound_ip_ranges=optional(data["outbound_ip_ranges"]),
            excluded_outbound_ip_ranges=tuple(data["excluded_outbound_ip_ranges"]),
            outbound_ports=tuple(data["outbound_ports"]),
            excluded_outbound_ports=tuple(data["excluded_outbound_ports"]),
        )


@dataclass(frozen=True, slots=True)
class ServiceDnat:
    """One Service port as kube-proxy serves it: ``cluster_ip:port`` → endpoints."""

    cluster_ip: str
    port: int
    endpoints: tuple[tuple[str, int], ...] = field(default=())  # (pod IP, target port)


# ---------------------------------------------------------------------------- annotations


def _ports(value: str) -> tuple[int, ...] | str:
    """``"8080, 9090"`` → ports; a message when an entry is not a port."""
    out: list[int] = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        if not item.isdigit() or not 1 <= int(item) <= 65535:
            return f"{item!r} is not a port (1-65535)"
        out.append(int(item))
    return tuple(dict.fromkeys(out))


def _ranges(value: str) -> tuple[str, ...] | str:
    out: list[str] = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError:
            return f"{item!r} is not an IP range (CIDR)"
        if network.version != 4:
            continue  # pods here are IPv4 only; istio-iptables splits v6 into ip6tables
        out.append(str(network))
    return tuple(dict.fromkeys(out))


def capture_spec(
    annotations: Mapping[str, str], where: Callable[[str], Location]
) -> tuple[CaptureSpec | None, list[Diagnostic]]:
    """The capture Istio's injector would configure for a pod with ``annotations``;
    ``where(annotation)`` locates an annotation for an error."""
    problems: list[Diagnostic] = []

    def bad(name: str, why: str) -> None:
        problems.append(error("invalid-annotation", where(name), f"{name}: {why}"))

    inbound: tuple[int, ...] | None = None
    value = annotations.get(INCLUDE_INBOUND_PORTS, "*").strip()
    if value != "*":
        parsed = _ports(value)
        if isinstance(parsed, str):
            bad(INCLUDE_INBOUND_PORTS, parsed)
        else:
            inbound = parsed
    excluded_inbound: tuple[int, ...] = DEFAULT_EXCLUDED_INBOUND
    if EXCLUDE_INBOUND_PORTS in annotations:
        parsed = _ports(annotations[EXCLUDE_INBOUND_PORTS])
        if isinstance(parsed, str):
            bad(EXCLUDE_INBOUND_PORTS, parsed)
        else:
            excluded_inbound = tuple(dict.fromkeys((*DEFAULT_EXCLUDED_INBOUND, *parsed)))
    port_lists: dict[str, tuple[int, ...]] = {}
    for name in (INCLUDE_OUTBOUND_PORTS, EXCLUDE_OUTBOUND_PORTS):
        parsed = _ports(annotations.get(name, ""))
        if isinstance(parsed, str):
            bad(name, parsed)
            parsed = ()
        port_lists[name] = parsed
    ranges: tuple[str, ...] | None = None
    value = annotations.get(INCLUDE_OUTBOUND_IP_RANGES, "*").strip()
    if value != "*":
        parsed_ranges = _ranges(value)
        if isinstance(parsed_ranges, str):
            bad(INCLUDE_OUTBOUND_IP_RANGES, parsed_ranges)
        else:
            ranges = parsed_ranges
    excluded_ranges: tuple[str, ...] = ()
    value = annotations.get(EXCLUDE_OUTBOUND_IP_RANGES, "").strip()
    if value == "*":
        bad(EXCLUDE_OUTBOUND_IP_RANGES, "'*' is not allowed here (istio-iptables refuses it)")
    elif value:
        parsed_ranges = _ranges(value)
        if isinstance(parsed_ranges, str):
            bad(EXCLUDE_OUTBOUND_IP_RANGES, parsed_ranges)
        else:
            excluded_ranges = parsed_ranges
    if problems:
        return None, problems
    spec = CaptureSpec(
        inbound_ports=inbound,
        excluded_inbound_ports=excluded_inbound,
        outbound_ip_ranges=ranges,
        excluded_outbound_ip_ranges=excluded_ranges,
        outbound_ports=port_lists[INCLUDE_OUTBOUND_PORTS],
        excluded_outbound_ports=port_lists[EXCLUDE_OUTBOUND_PORTS],
    )
    return spec, []


# ---------------------------------------------------------------------------- rules


def _capture_chains(spec: CaptureSpec, uid: int, gid: int) -> list[str]:
    inbound = [f"tcp dport {TUNNEL_PORT} return"]
    if spec.inbound_ports is None:
        inbound += [f"tcp dport {p} return" for p in spec.excluded_inbound_ports]
        inbound.append("meta l4proto tcp jump istio_in_redirect")
    else:
        inbound += [f"tcp dport {p} jump istio_in_redirect" for p in spec.inbound_ports]

    output: list[str] = []
    for port in spec.excluded_outbound_ports:
        output += [f"tcp dport {port} return", f"udp dport {port} return"]
    output.append(f'oifname "lo" ip saddr {INBOUND_PASSTHROUGH_SOURCE} return')
    loopback_included = any(
        ipaddress.ip_network(r).overlaps(ipaddress.ip_network("127.0.0.0/8"))
        for r in spec.outbound_ip_ranges or ()
    )
    for key, owner in (("skuid", uid), ("skgid", gid)):
        output.append(
            f'oifname "lo" ip daddr != 127.0.0.1 tcp dport != {TUNNEL_PORT} '
            f"meta {key} {owner} jump istio_in_redirect"
        )
        if not loopback_included:
            output.append(f'oifname "lo" meta {key} != {owner} return')
        output.append(f"meta {key} {owner} return")
    output.append("ip daddr 127.0.0.1 return")
    output += [f"ip daddr {cidr} return" for cidr in spec.excluded_outbound_ip_ranges]
    output += [f"tcp dport {port} jump istio_redirect" for port in spec.outbound_ports]
    if spec.outbound_ip_ranges is None:
        output.append("jump istio_redirect")
    else:
        output += [f"ip daddr {cidr} jump istio_redirect" for cidr in spec.outbound_ip_ranges]

    chains = []
    if spec.inbound_ports is None or spec.inbound_ports:
        chains.append(
            _base_chain(
                "prerouting", "prerouting", "dstnat", ["meta l4proto tcp jump istio_inbound"]
            )
        )
    chains += [
        _base_chain("output", "output", "-100", ["jump istio_output"]),
        _chain("istio_inbound", inbound),
        _chain("istio_in_redirect", [f"meta l4proto tcp redirect to :{INBOUND_CAPTURE_PORT}"]),
        _chain("istio_redirect", [f"meta l4proto tcp redirect to :{OUTBOUND_CAPTURE_PORT}"]),
        _chain("istio_output", output),
    ]
    return chains


def _service_chain(services: Sequence[ServiceDnat]) -> str:
    rules = []
    for service in sorted(services, key=lambda s: (ipaddress.ip_address(s.cluster_ip), s.port)):
        match = f"ip daddr {service.cluster_ip} tcp dport {service.port}"
        endpoints = sorted(set(service.endpoints))
        if not endpoints:
            # kube-proxy rejects a connection to a Service without ready endpoints
            rules.append(f"{match} reject with tcp reset")
        elif len(endpoints) == 1:
            address, port = endpoints[0]
            rules.append(f"{match} dnat to {address}:{port}")
        else:
            choices = ", ".join(f"{i} : {a} . {p}" for i, (a, p) in enumerate(endpoints))
            rules.append(f"{match} dnat to numgen random mod {len(endpoints)} map {{ {choices} }}")
    # After the capture (-100): a connection it redirected already has its NAT mapping.
    return _base_chain("services", "output", "-90", rules)


def pod_ruleset(
    capture: CaptureSpec | None,
    services: Sequence[ServiceDnat] = (),
    *,
    uid: int = PROXY_UID,
    gid: int = PROXY_UID,
) -> str:
    """The ``nft -f`` text of a pod's table: capture (with a sidecar) and Service DNAT.

    It replaces the table whole and atomically (``nft -f`` applies a file as one
    transaction): declaring the table first makes the ``delete`` valid on a first run.
    """
    chains = _capture_chains(capture, uid, gid) if capture is not None else []
    if services:
        chains.append(_service_chain(services))
    body = "\n".join(chains)
    return f"table ip {TABLE} {{}}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n{body}}}\n"


def _base_chain(name: str, hook: str, priority: str, rules: Sequence[str]) -> str:
    head = [f"type nat hook {hook} priority {priority}; policy accept;"]
    return _chain(name, [*head, *rules])


def _chain(name: str, rules: Sequence[str]) -> str:
    lines = "".join(f"    {rule}\n" for rule in rules)
    return f"  chain {name} {{\n{lines}  }}\n"
