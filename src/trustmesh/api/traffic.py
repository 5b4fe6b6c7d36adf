"""Models of the traffic controls: DestinationRule ``connectionPool`` / ``outlierDetection``
and EnvoyFilter (``networking.istio.io/v1alpha3``).

Strict like Istio's CRD schemas: an unknown or mistyped field is an error with its location,
never silently ignored (a misspelled ``maxConnections`` would leave a service without the
circuit breaker its owner wrote). Durations are written as Kubernetes users write them
(``30s``, ``1m30s``, ``500ms``) and kept as seconds.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterator
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from trustmesh.api.diagnostics import Diagnostic, Location, warning

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def duration_seconds(text: str) -> float:
    """A Go / protobuf duration (``1h2m3.5s``, ``10ms``) in seconds; ValueError if not one."""
    if not isinstance(text, str) or not text:
        raise ValueError("expected a duration such as 10s, 500ms or 1m")
    position, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if position != len(text):
        raise ValueError(f"expected a duration such as 10s, 500ms or 1m, got {text!r}")
    return total


def _at_least_1ms(text: str) -> str:
    if duration_seconds(text) < 0.001:
        raise ValueError(f"duration must be at least 1ms, got {text!r}")
    return text


# A duration Istio's validation accepts (at least 1 ms).
Duration = Annotated[str, AfterValidator(_at_least_1ms)]
Percent = Annotated[int, Field(ge=0, le=100)]
UInt32 = Annotated[int, Field(ge=0, le=2**32 - 1)]
Int32 = Annotated[int, Field(ge=0, le=2**31 - 1)]


class _Strict(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True
    )


# --- DestinationRule trafficPolicy --------------------------------------------------


class TcpKeepalive(_Strict):
    probes: UInt32 = 0
    time: Duration | None = None
    interval: Duration | None = None


class TcpSettings(_Strict):
    max_connections: Int32 = 0
    connect_timeout: Duration | None = None
    tcp_keepalive: TcpKeepalive | None = None
    max_connection_duration: Duration | None = None
    idle_timeout: Duration | None = None


class H2UpgradePolicy(enum.Enum):
    DEFAULT = "DEFAULT"
    DO_NOT_UPGRADE = "DO_NOT_UPGRADE"
    UPGRADE = "UPGRADE"


class HttpSettings(_Strict):
    http1_max_pending_requests: Int32 = Field(default=0, alias="http1MaxPendingRequests")
    http2_max_requests: Int32 = Field(default=0, alias="http2MaxRequests")
    max_requests_per_connection: Int32 = 0
    max_retries: Int32 = 0
    idle_timeout: Duration | None = None
    h2_upgrade_policy: H2UpgradePolicy = Field(
        default=H2UpgradePolicy.DEFAULT, alias="h2UpgradePolicy"
    )
    use_client_protocol: bool = False
    max_concurrent_streams: Int32 = 0


class ConnectionPoolSettings(_Strict):
    tcp: TcpSettings | None = None
    http: HttpSettings | None = None


class OutlierDetection(_Strict):
    consecutive_errors: Int32 | None = None  # deprecated, ignored by Istio since 1.5
    consecutive_5xx_errors: UInt32 | None = Field(default=None, alias="consecutive5xxErrors")
    consecutive_gateway_errors: UInt32 | None = None
    split_external_local_origin_errors: bool = False
    consecutive_local_origin_failures: UInt32 | None = None
    interval: Duration | None = None
    base_ejection_time: Duration | None = None
    max_ejection_percent: Percent = 0
    min_health_percent: Percent = 0


# --- EnvoyFilter --------------------------------------------------------------------


class ApplyTo(enum.Enum):
    INVALID = "INVALID"
    LISTENER = "LISTENER"
    FILTER_CHAIN = "FILTER_CHAIN"
    NETWORK_FILTER = "NETWORK_FILTER"
    HTTP_FILTER = "HTTP_FILTER"
    ROUTE_CONFIGURATION = "ROUTE_CONFIGURATION"
    VIRTUAL_HOST = "VIRTUAL_HOST"
    HTTP_ROUTE = "HTTP_ROUTE"
    CLUSTER = "CLUSTER"
    EXTENSION_CONFIG = "EXTENSION_CONFIG"
    BOOTSTRAP = "BOOTSTRAP"
    LISTENER_FILTER = "LISTENER_FILTER"


class PatchContext(enum.Enum):
    ANY = "ANY"
    SIDECAR_INBOUND = "SIDECAR_INBOUND"
    SIDECAR_OUTBOUND = "SIDECAR_OUTBOUND"
    GATEWAY = "GATEWAY"
    WAYPOINT = "WAYPOINT"


class Operation(enum.Enum):
    INVALID = "INVALID"
    MERGE = "MERGE"
    ADD = "ADD"
    REMOVE = "REMOVE"
    INSERT_BEFORE = "INSERT_BEFORE"
    INSERT_AFTER = "INSERT_AFTER"
    INSERT_FIRST = "INSERT_FIRST"
    REPLACE = "REPLACE"


class FilterClass(enum.Enum):
    UNSPECIFIED = "UNSPECIFIED"
    AUTHN = "AUTHN"
    AUTHZ = "AUTHZ"
    STATS = "STATS"


class SubFilterMatch(_Strict):
    name: str = ""


class FilterMatch(_Strict):
    name: str = ""
    sub_filter: SubFilterMatch | None = None


class FilterChainMatch(_Strict):
    name: str = ""
    sni: str = ""
    transport_protocol: str = ""
    application_protocols: str = ""
    filter: FilterMatch | None = None
    destination_port: UInt32 = 0


class ListenerMatch(_Strict):
    port_number: UInt32 = 0
    port_name: str = ""
    filter_chain: FilterChainMatch | None = None
    listener_filter: str = ""
    name: str = ""


class RouteMatch(_Strict):
    name: str = ""
    action: str = "ANY"


class VirtualHostMatch(_Strict):
    name: str = ""
    domain_name: str = ""
    route: RouteMatch | None = None


class RouteConfigurationMatch(_Strict):
    port_number: UInt32 = 0
    port_name: str = ""
    gateway: str = ""
    vhost: VirtualHostMatch | None = None
    name: str = ""


class ClusterMatch(_Strict):
    port_number: UInt32 = 0
    service: str = ""
    subset: str = ""
    name: str = ""


class ProxyMatch(_Strict):
    proxy_version: str = ""
    metadata: dict[str, str] = Field(default_factory=dict)


class PatchMatch(_Strict):
    context: PatchContext = PatchContext.ANY
    proxy: ProxyMatch | None = None
    listener: ListenerMatch | None = None
    route_configuration: RouteConfigurationMatch | None = None
    cluster: ClusterMatch | None = None


class Patch(_Strict):
    operation: Operation = Operation.INVALID
    value: dict[str, Any] = Field(default_factory=dict)
    filter_class: FilterClass = FilterClass.UNSPECIFIED


class ConfigPatch(_Strict):
    apply_to: ApplyTo = ApplyTo.INVALID
    match: PatchMatch | None = None
    patch: Patch | None = None


class EnvoyFilterSelector(_Strict):
    labels: dict[str, str] = Field(default_factory=dict)


class EnvoyFilterSpec(_Strict):
    workload_selector: EnvoyFilterSelector | None = None
    target_refs: tuple[dict[str, Any], ...] = ()
    config_patches: tuple[ConfigPatch, ...] = ()
    priority: int = Field(default=0, ge=-(2**31), le=2**31 - 1)


def outlier_detection_warnings(
    rule: BaseModel, at: Callable[..., Location]
) -> Iterator[Diagnostic]:
    """Istio's warning for ``consecutiveErrors``: deprecated, and ignored by istiod — the
    rule ejects nothing on it (``consecutive5xxErrors`` / ``consecutiveGatewayErrors`` do).

    ``rule`` is a DestinationRuleSpec; ``at`` locates a field path under its spec.
    """
    policies: list[tuple[tuple[str | int, ...], Any]] = []
    top = getattr(rule, "traffic_policy", None)
    if top is not None:
        policies.append((("trafficPolicy",), top))
    for index, subset in enumerate(getattr(rule, "subsets", ())):
        if subset.traffic_policy is not None:
            policies.append((("subsets", index, "trafficPolicy"), subset.traffic_policy))
    for path, policy in policies:
        levels = [(path, policy)] + [
            ((*path, "portLevelSettings", i), level)
            for i, level in enumerate(policy.port_level_settings)
        ]
        for where, level in levels:
            outlier = level.outlier_detection
            if outlier is not None and outlier.consecutive_errors is not None:
                yield warning(
                    "deprecated-field",
                    at(*where, "outlierDetection", "consecutiveErrors"),
                    "deprecated and ignored by Istio: nothing is ejected on it; use "
                    "consecutive5xxErrors or consecutiveGatewayErrors",
                )
