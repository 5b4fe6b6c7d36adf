"""Recorded traffic: one normalized record per request (HTTP) or connection (TCP).

The JSON-lines schema ``trustmesh.dev/traffic/v1`` (one object per line; every key is
always present, ``null`` when unknown):

``schema``               ``"trustmesh.dev/traffic/v1"``
``time``                 request / connection start as the sidecar logged it (RFC 3339)
``mtls``                 the connection was mutual TLS (false: plaintext, no peer identity)
``source_principal``     the peer certificate's SPIFFE ID without ``spiffe://`` (mTLS only)
``source_workload``      ``NS/NAME`` when the source address is a known pod, else null
``source_ip``            the source address the destination saw
``destination``          ``NS/NAME`` of the workload whose sidecar recorded it
``port``                 the destination workload's (target) port
``protocol``             ``"http"`` or ``"tcp"``
``method``, ``path``, ``host``   HTTP only: method, path as sent (query included), :authority
``response_code``        HTTP status (null for TCP)
``verdict``              what the sidecar decided: allow, deny, unauthenticated, reset, unknown
``request_principal``    ``ISS/SUB`` of a validated JWT, when the request carried one
``rule``                 the deciding policy rule id (``ns[N]-policy[P]-rule[I]``) when known
``origin``               ``FILE:LINE`` of the access-log line it came from

Readers accept extra keys (a later minor version may add some) and refuse a different
``schema``. Everything here is pure: callers read files and pass lines in.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = [
    "SCHEMA",
    "Problem",
    "Protocol",
    "TrafficRecord",
    "parse_record_line",
    "record_line",
]

SCHEMA = "trustmesh.dev/traffic/v1"


class Protocol(enum.Enum):
    HTTP = "http"
    TCP = "tcp"


VERDICTS = frozenset({"allow", "deny", "unauthenticated", "reset", "unknown"})


@dataclass(frozen=True, slots=True)
class Problem:
    """A line that is not a usable record: where, which field, why."""

    origin: str  # FILE:LINE
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.origin} {self.field}" if self.field else self.origin
        return f"{where}: {self.message}"


@dataclass(frozen=True, slots=True)
class TrafficRecord:
    """One recorded request or connection (see the module docstring for the fields)."""

    destination: str
    port: int
    protocol: Protocol
    mtls: bool
    source_principal: str | None = None
    source_workload: str | None = None
    source_ip: str | None = None
    method: str | None = None
    path: str | None = None
    host: str | None = None
    response_code: int | None = None
    request_principal: str | None = None
    verdict: str = "unknown"
    rule: str | None = None
    time: str | None = None
    origin: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "time": self.time,
            "mtls": self.mtls,
            "source_principal": self.source_principal,
            "source_workload": self.source_workload,
            "source_ip": self.source_ip,
            "destination": self.destination,
            "port": self.port,
            "protocol": self.protocol.value,
            "method": self.method,
            "path": self.path,
            "host": self.host,
            "response_code": self.response_code,
            "request_principal": self.request_principal,
            "verdict": self.verdict,
            "rule": self.rule,
            "origin": self.origin,
        }

    def describe_source(self) -> str:
        if self.source_principal:
            return self.source_principal
        ip = f" {self.source_ip}" if self.source_ip else ""
        return f"plaintext{ip}"


def record_line(record: TrafficRecord) -> bytes:
    """The record as one JSON line (with the newline)."""
    return orjson.dumps(record.as_dict()) + b"\n"


_TEXT_FIELDS = (
    "destination",
    "source_principal",
    "source_workload",
    "source_ip",
    "method",
    "path",
    "host",
    "rule",
    "time",
    "request_principal",
)


def parse_record_line(line: bytes, origin: str) -> TrafficRecord | Problem:
    """A normalized record from one line of a ``traffic export`` file."""
    try:
        entry = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return Problem(origin, "", f"not JSON: {exc.msg}")
    if not isinstance(entry, dict):
        return Problem(origin, "", "a record must be a JSON object")
    return record_from_dict(entry, origin)


def record_from_dict(entry: dict[str, Any], origin: str) -> TrafficRecord | Problem:
    schema = entry.get("schema")
    if schema != SCHEMA:
        return Problem(origin, "schema", f"expected {SCHEMA!r}, got {schema!r}")
    texts: dict[str, str | None] = {}
    for key in _TEXT_FIELDS:
        value = entry.get(key)
        if value is None or value == "":
            texts[key] = None
        elif isinstance(value, str):
            texts[key] = value
        else:
            return Problem(origin, key, f"must be a string, got {type(value).__name__}")
    if texts["destination"] is None:
        return Problem(origin, "destination", "missing")
    if texts["source_ip"] is not None:
        try:
            ipaddress.ip_address(texts["source_ip"])
        except ValueError:
            return Problem(origin, "source_ip", f"not an IP address: {texts['source_ip']!r}")
    destination = texts["destination"]
    assert destination is not None
    if destination.count("/") != 1 or not all(destination.split("/")):
        return Problem(origin, "destination", f"must be NAMESPACE/NAME, got {destination!r}")
    port = entry.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        return Problem(origin, "port", f"must be a port number 1-65535, got {port!r}")
    try:
        protocol = Protocol(entry.get("protocol"))
    except ValueError:
        return Problem(origin, "protocol", f"must be http or tcp, got {entry.get('protocol')!r}")
    mtls = entry.get("mtls")
    if not isinstance(mtls, bool):
        return Problem(origin, "mtls", f"must be true or false, got {mtls!r}")
    if mtls and not texts["source_principal"]:
        return Problem(origin, "source_principal", "missing for an mTLS record")
    if not mtls and texts["source_principal"]:
        return Problem(origin, "source_principal", "a plaintext record has no peer principal")
    if protocol is Protocol.HTTP:
        for key in ("method", "path"):
            if not texts[key]:
                return Problem(origin, key, "missing for an HTTP record")
        path = texts["path"] or ""
        if not path.startswith("/"):
            return Problem(origin, "path", f"must start with '/', got {path!r}")
    code = entry.get("response_code")
    if code is not None and (isinstance(code, bool) or not isinstance(code, int)):
        return Problem(origin, "response_code", f"must be a number or null, got {code!r}")
    verdict = entry.get("verdict", "unknown")
    if verdict not in VERDICTS:
        return Problem(origin, "verdict", f"must be one of {', '.join(sorted(VERDICTS))}")
    return TrafficRecord(
        destination=destination,
        port=port,
        protocol=protocol,
        mtls=mtls,
        source_principal=(texts["source_principal"] or "").removeprefix("spiffe://") or None,
        source_workload=texts["source_workload"],
        source_ip=texts["source_ip"],
        method=texts["method"] if protocol is Protocol.HTTP else None,
        path=texts["path"] if protocol is Protocol.HTTP else None,
        host=texts["host"] if protocol is Protocol.HTTP else None,
        response_code=code,
        request_principal=texts["request_principal"] if protocol is Protocol.HTTP else None,
        verdict=verdict,
        rule=texts["rule"],
        time=texts["time"],
        origin=str(entry.get("origin") or origin),
    )
