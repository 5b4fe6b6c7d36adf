"""Istio's protocol selection for a port: which application protocol it carries, whether
a proxy handles it as TCP (no HTTP connection manager, no Host routing), and whether the
application speaks TLS on it itself.
"""

from __future__ import annotations

# Port protocols a sidecar proxies as TCP (no Host routing): Istio's protocol selection
# by appProtocol, else the port name's prefix (xds.outbound.port_protocol reads it too).
_TCP_PROTOCOLS = frozenset(
    {"tcp", "tls", "https", "mongo", "mysql", "redis", "udp", "kubernetes.io/wss"}
)


_L4_PROTOCOLS = frozenset({"", "TCP", "UDP", "SCTP"})  # Kubernetes `protocol`, not app protocols


def app_protocol(name: str, protocol: str) -> str:
    """Istio's protocol selection: ``appProtocol`` (or a ServiceEntry ``protocol``) first,
    then the port name's prefix before ``-``."""
    return protocol.lower() if protocol not in _L4_PROTOCOLS else name.lower().split("-", 1)[0]


def proxied_as_tcp(name: str, protocol: str) -> bool:
    """Does a proxy handle this port as TCP (no HTTP connection manager, no Host routing)?"""
    return app_protocol(name, protocol) in _TCP_PROTOCOLS


def app_speaks_tls(name: str, protocol: str) -> bool:
    """Does the application speak TLS on this port itself (``TLS`` / ``HTTPS``)?"""
    return app_protocol(name, protocol) in ("tls", "https")
