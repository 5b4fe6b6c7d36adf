"""What a running gateway pod shows the user: where its Envoy listens now.

The listeners come from the Gateways selecting the pod and change with them, so they are
read from the gateway Envoy's admin endpoint (``/listeners``) rather than recorded at
start: ``trustmesh status`` always shows where clients outside the mesh connect.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

__all__ = ["envoy_listener_addresses"]

_TIMEOUT = 2.0


def envoy_listener_addresses(admin: str) -> list[str]:
    """``ip:port`` of every listener of the Envoy whose admin is at ``admin`` (host:port);
    empty when it does not answer."""
    url = f"http://{admin}/listeners?format=json"
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT) as response:
            body = json.loads(response.read())
    except (OSError, urllib.error.URLError, ValueError):
        return []
    found = []
    for listener in body.get("listener_statuses", []):
        address = listener.get("local_address", {}).get("socket_address", {})
        if address.get("address") and address.get("port_value"):
            found.append(f"{address['address']}:{address['port_value']}")
    return sorted(found)
