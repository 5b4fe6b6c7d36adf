"""Envoy access-log lines → :class:`TrafficRecord` (pure: lines in, records out).

Two inputs:

* **trustmesh sidecars** (``trustmesh up`` with ``meshConfig.accessLogFile`` set): every
  inbound request and connection is one JSON line in the pod's ``envoy.log`` (written by
  xds/inbound.py: ``workload``, ``port``, ``peer_principal``, ``rbac`` dynamic metadata
  …). Envoy's own log lines and the outbound (client-side) lines are not records: the
  destination's inbound line is the one that decided.
* **Istio sidecars** with ``accessLogEncoding: JSON`` and Istio's default JSON format
  (``upstream_cluster``, ``downstream_local_address``, ``downstream_remote_address``,
  ``requested_server_name``, ``method``, ``path``, ``authority``, ``response_code``,
  ``response_code_details`` …). Only inbound lines (``upstream_cluster`` ``inbound|…``)
  are records. The default format names neither the pod that logged (given per file:
  ``NS/NAME=FILE``) nor the peer's identity: an mTLS line (``requested_server_name`` set)
  needs ``%DOWNSTREAM_PEER_URI_SAN%`` or the ``x-forwarded-client-cert`` header added to
  the format under one of :data:`PRINCIPAL_KEYS` / :data:`XFCC_KEYS`, or it is reported
  as a problem — a replay must not guess who the caller was.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from trustmesh.insight.records import Problem, Protocol, TrafficRecord

__all__ = [
    "PRINCIPAL_KEYS",
    "XFCC_KEYS",
    "from_istio_entry",
    "from_trustmesh_entry",
    "verdict_of",
]

PRINCIPAL_KEYS = (
    "downstream_peer_uri_san",
    "downstream_peer_principal",
    "source_principal",
    "peer_principal",
)
XFCC_KEYS = ("x_forwarded_client_cert", "forwarded_client_cert", "xfcc")

_DENIED = re.compile(r"rbac_access_denied_matched_policy\[(.*)\]")
_ENVOY_UNSET = ("", "-", None)


def _unset(value: Any) -> bool:
    return value in _ENVOY_UNSET


def verdict_of(entry: Mapping[str, Any]) -> tuple[str, str | None]:
    """(verdict, deciding rule) from what Envoy logged.

    ``response_code_details`` (HTTP) / ``connection_termination_details`` (TCP) name the
    refusing RBAC policy (``rbac_access_denied_matched_policy[ID]``, ``[none]`` when an
    ALLOW matched nothing); the ``rbac`` dynamic metadata names the effective policy of an
    allowed request when one matched.
    """
    details = str(entry.get("response_code_details") or "")
    details += " " + str(entry.get("connection_termination_details") or "")
    denied = _DENIED.search(details)
    if denied:
        rule = denied.group(1)
        return "deny", None if rule in ("none", "") else rule
    if "jwt" in details and "denied" in details:
        return "unauthenticated", None
    flags = str(entry.get("response_flags") or "")
    rbac = entry.get("rbac")
    rule = None
    if isinstance(rbac, dict):
        found = rbac.get("enforced_effective_policy_id")
        rule = found if isinstance(found, str) and found else None
        if rbac.get("enforced_engine_result") == "denied":
            return "deny", rule
    if "NR" in flags.split(","):
        return "reset", None  # no filter chain / route: refused before any policy
    return "allow", rule


def _address(value: Any) -> tuple[str | None, int | None]:
    """``ip:port`` / ``[v6]:port`` → (ip, port)."""
    if _unset(value) or not isinstance(value, str):
        return None, None
    host, sep, port = value.rpartition(":")
    if not sep:
        return value, None
    host = host.strip("[]")
    return host or None, int(port) if port.isdigit() else None


def _code(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value or None  # Envoy logs 0 when no response was sent
    if isinstance(value, str) and value.isdigit():
        return int(value) or None
    return None


def _principal(value: Any) -> str | None:
    if _unset(value) or not isinstance(value, str):
        return None
    return value.removeprefix("spiffe://") or None


def _http_fields(entry: Mapping[str, Any], origin: str) -> tuple[str, str, str | None] | Problem:
    method, path = entry.get("method"), entry.get("path")
    if _unset(method) or not isinstance(method, str):
        return Problem(origin, "method", "missing in an HTTP line")
    if _unset(path) or not isinstance(path, str):
        return Problem(origin, "path", "missing in an HTTP line")
    host = entry.get("authority")
    return method, path, host if isinstance(host, str) and not _unset(host) else None


def from_trustmesh_entry(
    entry: Mapping[str, Any], origin: str, workload_of_ip: Mapping[str, str]
) -> TrafficRecord | Problem | None:
    """A record from a trustmesh sidecar's JSON line; None for lines that are not records
    (outbound, listener-level). ``workload_of_ip``: pod addresses → ``NS/NAME``."""
    direction = entry.get("direction")
    if direction == "outbound":
        return None  # the client's view; the destination's inbound line decided
    if direction != "inbound":
        return Problem(origin, "direction", f"must be inbound or outbound, got {direction!r}")
    destination = entry.get("workload")
    if not isinstance(destination, str) or destination.count("/") != 1:
        return Problem(origin, "workload", "missing: which workload logged this line")
    _, local_port = _address(entry.get("downstream_local_address"))
    port_text = entry.get("port")
    port = int(port_text) if isinstance(port_text, str) and port_text.isdigit() else local_port
    if isinstance(port_text, int):
        port = port_text
    if port is None:
        return Problem(origin, "port", "missing")
    source_ip, _ = _address(entry.get("downstream_remote_address"))
    principal = _principal(entry.get("peer_principal"))
    verdict, rule = verdict_of(entry)
    if entry.get("message") == "no filter chain matched":
        # The connection matched no filter chain (plaintext to a STRICT port): no TLS
        # was terminated, so no identity; recorded as the refused TCP connection it was.
        principal, verdict = None, "reset"
    common: dict[str, Any] = {
        "destination": destination,
        "port": port,
        "mtls": principal is not None,
        "source_principal": principal,
        "source_workload": workload_of_ip.get(source_ip or ""),
        "source_ip": source_ip,
        "verdict": verdict,
        "rule": rule,
        "time": entry.get("start_time") if isinstance(entry.get("start_time"), str) else None,
        "origin": origin,
    }
    if "method" not in entry:
        return TrafficRecord(protocol=Protocol.TCP, **common)
    http = _http_fields(entry, origin)
    if isinstance(http, Problem):
        return http
    method, path, host = http
    issuer = entry.get("request_principal_iss")
    subject = entry.get("request_principal_sub")
    request_principal = f"{issuer}/{subject or ''}" if isinstance(issuer, str) and issuer else None
    return TrafficRecord(
        protocol=Protocol.HTTP,
        method=method,
        path=path,
        host=host,
        response_code=_code(entry.get("response_code")),
        request_principal=request_principal,
        **common,
    )


def _xfcc_peer(value: Any) -> str | None:
    """The peer's URI from an ``x-forwarded-client-cert`` value: the last element is the
    hop the logging sidecar appended for its own downstream peer."""
    if _unset(value) or not isinstance(value, str):
        return None
    last = value.split(",")[-1]
    for part in last.split(";"):
        key, _, raw = part.partition("=")
        if key.strip().lower() == "uri":
            return _principal(raw.strip().strip('"'))
    return None


def from_istio_entry(
    entry: Mapping[str, Any], origin: str, destination: str
) -> TrafficRecord | Problem | None:
    """A record from an Istio sidecar's JSON access-log line (default JSON format), logged
    by ``destination`` (``NS/NAME``); None for outbound lines."""
    cluster = entry.get("upstream_cluster")
    verdict, rule = verdict_of(entry)
    port: int | None = None
    if isinstance(cluster, str) and cluster.startswith("inbound|"):
        parts = cluster.split("|")
        port = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    elif isinstance(cluster, str) and cluster.startswith("InboundPassthroughCluster"):
        pass  # an undeclared port: the address the connection was for says which
    elif not _unset(cluster):
        return None  # outbound (a client's view, or PassthroughCluster / BlackHoleCluster)
    elif verdict != "deny":
        # Refused before a cluster was picked; only an RBAC refusal is surely inbound
        # (sidecars enforce AuthorizationPolicy on inbound traffic only).
        return Problem(origin, "upstream_cluster", "missing: inbound or outbound is unknown")
    if port is None:
        port = _address(entry.get("downstream_local_address"))[1]
    if port is None:
        return Problem(origin, "downstream_local_address", "missing: the destination port")
    source_ip, _ = _address(entry.get("downstream_remote_address"))
    tls = not _unset(entry.get("requested_server_name"))
    principal = next((_principal(entry.get(k)) for k in PRINCIPAL_KEYS if k in entry), None)
    if principal is None and tls:
        # Only over mTLS is the last XFCC element the sidecar's own, for its peer: on a
        # plaintext connection it is whatever the client sent, a forgeable claim.
        principal = next((_xfcc_peer(entry.get(k)) for k in XFCC_KEYS if k in entry), None)
    mtls = tls or principal is not None
    if mtls and principal is None:
        return Problem(
            origin,
            "downstream_peer_uri_san",
            "an mTLS request (requested_server_name set) without the peer's identity: add"
            " %DOWNSTREAM_PEER_URI_SAN% (or %REQ(X-FORWARDED-CLIENT-CERT)%) to the access"
            " log format",
        )
    common: dict[str, Any] = {
        "destination": destination,
        "port": port,
        "mtls": mtls,
        "source_principal": principal,
        "source_ip": source_ip,
        "verdict": verdict,
        "rule": rule,
        "time": entry.get("start_time") if isinstance(entry.get("start_time"), str) else None,
        "origin": origin,
    }
    if _unset(entry.get("method")) and _unset(entry.get("path")):
        return TrafficRecord(protocol=Protocol.TCP, **common)
    http = _http_fields(entry, origin)
    if isinstance(http, Problem):
        return http
    method, path, host = http
    return TrafficRecord(
        protocol=Protocol.HTTP,
        method=method,
        path=path,
        host=host,
        response_code=_code(entry.get("response_code")),
        **common,
    )
