"""The client address a gateway's policy sees: Envoy's X-Forwarded-For rule (pure).

An Istio gateway's connection manager has ``use_remote_address: true`` and
``xff_num_trusted_hops = gatewayTopology.numTrustedProxies`` (N). Envoy then takes as the
client (what ``remoteIpBlocks`` and ``remote.ip`` match) the connection's peer when N is
0, else the N-th address from the right of the X-Forwarded-For the request arrived with —
the one the outermost trusted proxy appended. With fewer entries than N, or an entry that
is no IP, it falls back to the peer. Entries a client writes itself are on the left, so
they never decide while the trusted proxies append theirs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from trustmesh.policy.request import IpAddress

__all__ = ["trusted_client_address"]


def trusted_client_address(
    forwarded_for: Sequence[str], peer: IpAddress | None, trusted_hops: int
) -> IpAddress | None:
    """``forwarded_for``: the X-Forwarded-For header lines as received, in order."""
    if trusted_hops <= 0:
        return peer
    entries = [e.strip() for line in forwarded_for for e in line.split(",") if e.strip()]
    if len(entries) < trusted_hops:
        return peer
    try:
        return ipaddress.ip_address(entries[-trusted_hops])
    except ValueError:
        return peer
