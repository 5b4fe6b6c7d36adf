"""Istio's validation of a ServiceEntry's ``endpoints`` (``ValidateServiceEntry``), pure.

* resolution STATIC: every endpoint address is an IP address (``unix://`` sockets are
  not supported: an error too);
* resolution NONE: no endpoints (the original destination is where traffic goes);
* an endpoint's ``ports`` name ports the entry declares.

Each problem is an error on the field, so an endpoint is never silently left out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

from trustmesh.api import models as m
from trustmesh.api.diagnostics import Diagnostic, error
from trustmesh.api.resources import Resource

__all__ = ["service_entry_problems"]


def service_entry_problems(entry: Resource[Any]) -> Iterator[Diagnostic]:
    spec: m.ServiceEntrySpec = entry.spec
    resolution = spec.resolution.upper()
    names = {p.name for p in spec.ports}
    for i, endpoint in enumerate(spec.endpoints):
        if resolution == "NONE":
            yield error(
                "invalid-field",
                entry.location("endpoints", i),
                "no endpoints should be provided for resolution NONE",
            )
            continue
        address = endpoint.address
        if address.startswith("unix://"):
            yield error(
                "unsupported-field",
                entry.location("endpoints", i, "address"),
                "unix socket endpoints are not supported",
            )
        elif not address:
            yield error("invalid-field", entry.location("endpoints", i), "address is empty")
        elif resolution == "STATIC" and not _is_ip(address):
            yield error(
                "invalid-field",
                entry.location("endpoints", i, "address"),
                f"{address!r} is not an IP address (resolution STATIC; DNS resolves names)",
            )
        for name in endpoint.ports:
            if name not in names:
                yield error(
                    "invalid-field",
                    entry.location("endpoints", i, "ports", name),
                    f"port {name!r} is not a port of the ServiceEntry",
                )


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
