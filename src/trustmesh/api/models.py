"""Pydantic models of the resource specs trustmesh reads.

A key set to null never reaches them: the YAML reader drops it, as the API server does.

Istio's security kinds (PeerAuthentication, RequestAuthentication, AuthorizationPolicy)
and the TLS settings of DestinationRule are strict: an unknown field is an error, as the
Kubernetes API server's structural schema makes it. Kinds trustmesh reads only a few
fields of (Pods, Deployments, Gateways, …) keep their other fields and ignore them.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from trustmesh.api import traffic

Strings = tuple[str, ...]


class Strict(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True
    )


class Loose(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="ignore", alias_generator=to_camel, populate_by_name=True
    )


# --- shared -------------------------------------------------------------------------


class ObjectMeta(Loose):
    name: str = Field(default="", max_length=253)  # required except where the loader says
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    creation_timestamp: str | None = None


class TemplateMeta(Loose):
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class WorkloadSelector(Strict):
    """``istio.type.v1beta1.WorkloadSelector`` (security kinds, DestinationRule)."""

    match_labels: dict[str, str] = Field(default_factory=dict)


class NetworkingWorkloadSelector(Strict):
    """``networking.v1alpha3.WorkloadSelector`` of Sidecar and ServiceEntry: ``labels``."""

    labels: dict[str, str] = Field(default_factory=dict)


class PolicyTargetReference(Strict):
    group: str = ""
    kind: str = ""
    name: str = ""
    namespace: str = ""


# --- security.istio.io ----------------------------------------------------------------


class MtlsMode(enum.Enum):
    UNSET = "UNSET"
    DISABLE = "DISABLE"
    PERMISSIVE = "PERMISSIVE"
    STRICT = "STRICT"


class MutualTls(Strict):
    mode: MtlsMode = MtlsMode.UNSET


class PeerAuthenticationSpec(Strict):
    selector: WorkloadSelector | None = None
    mtls: MutualTls | None = None
    port_level_mtls: dict[int, MutualTls] = Field(default_factory=dict)


class JwtHeader(Strict):
    name: str
    prefix: str = ""


class ClaimToHeader(Strict):
    header: str
    claim: str


class JwtRule(Strict):
    issuer: str = ""
    audiences: Strings = ()
    jwks_uri: str = ""
    jwks: str = ""
    from_headers: tuple[JwtHeader, ...] = ()
    from_params: Strings = ()
    from_cookies: Strings = ()
    output_payload_to_header: str = ""
    forward_original_token: bool = False
    output_claim_to_headers: tuple[ClaimToHeader, ...] = ()
    timeout: str = ""


class RequestAuthenticationSpec(Strict):
    selector: WorkloadSelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: tuple[PolicyTargetReference, ...] = ()
    jwt_rules: tuple[JwtRule, ...] = ()


class Action(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"
    CUSTOM = "CUSTOM"


class Source(Strict):
    principals: Strings = ()
    not_principals: Strings = ()
    request_principals: Strings = ()
    not_request_principals: Strings = ()
    namespaces: Strings = ()
    not_namespaces: Strings = ()
    service_accounts: Strings = ()
    not_service_accounts: Strings = ()
    ip_blocks: Strings = ()
    not_ip_blocks: Strings = ()
    remote_ip_blocks: Strings = ()
    not_remote_ip_blocks: Strings = ()
    # The peer certificate's SPIFFE trust domain (istio/api, 2026): exact, x*, *x or *.
    trust_domains: Strings = ()
    not_trust_domains: Strings = ()


class Operation(Strict):
    hosts: Strings = ()
    not_hosts: Strings = ()
    ports: Strings = ()
    not_ports: Strings = ()
    methods: Strings = ()
    not_methods: Strings = ()
    paths: Strings = ()
    not_paths: Strings = ()


class RuleFrom(Strict):
    source: Source = Field(default_factory=Source)


class RuleTo(Strict):
    operation: Operation = Field(default_factory=Operation)


class Condition(Strict):
    key: str
    values: Strings = ()
    not_values: Strings = ()


class Rule(Strict):
    from_: tuple[RuleFrom, ...] = Field(default=(), alias="from")
    to: tuple[RuleTo, ...] = ()
    when: tuple[Condition, ...] = ()


class ExtensionProviderRef(Strict):
    name: str = ""


class AuthorizationPolicySpec(Strict):
    selector: WorkloadSelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: tuple[PolicyTargetReference, ...] = ()
    action: Action = Action.ALLOW
    provider: ExtensionProviderRef | None = None
    rules: tuple[Rule, ...] | None = None


# --- networking.istio.io --------------------------------------------------------------


class TlsMode(enum.Enum):
    DISABLE = "DISABLE"
    SIMPLE = "SIMPLE"
    MUTUAL = "MUTUAL"
    ISTIO_MUTUAL = "ISTIO_MUTUAL"


class ClientTlsSettings(Strict):
    mode: TlsMode = TlsMode.DISABLE
    client_certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    ca_crl: str = ""
    credential_name: str = ""
    subject_alt_names: Strings = ()
    sni: str = ""
    insecure_skip_verify: bool | None = None


class PortSelector(Strict):
    number: int = Field(ge=0, le=65535)


class PortTrafficPolicy(Loose):
    port: PortSelector | None = None
    tls: ClientTlsSettings | None = None
    connection_pool: traffic.ConnectionPoolSettings | None = None
    outlier_detection: traffic.OutlierDetection | None = None


class TrafficPolicy(Loose):
    tls: ClientTlsSettings | None = None
    connection_pool: traffic.ConnectionPoolSettings | None = None
    outlier_detection: traffic.OutlierDetection | None = None
    port_level_settings: tuple[PortTrafficPolicy, ...] = ()


class Subset(Loose):
    name: str
    labels: dict[str, str] = Field(default_factory=dict)
    traffic_policy: TrafficPolicy | None = None


class DestinationRuleSpec(Loose):
    host: str
    traffic_policy: TrafficPolicy | None = None
    subsets: tuple[Subset, ...] = ()
    export_to: Strings = ()
    workload_selector: WorkloadSelector | None = None


class ServicePort(Loose):
    number: int = Field(ge=1, le=65535)
    protocol: str = ""
    name: str = ""
    target_port: int | None = Field(default=None, ge=1, le=65535)


class WorkloadEntrySpec(Loose):
    address: str = ""
    ports: dict[str, int] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    service_account: str = ""
    network: str = ""
    locality: str = ""
    weight: int = Field(default=0, ge=0)


class WorkloadGroupObjectMeta(Loose):
    """What a WorkloadGroup gives the entries it registers (labels, annotations)."""

    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class WorkloadGroupSpec(Loose):
    """Istio's ``networking.istio.io`` WorkloadGroup: the template every auto-registered
    WorkloadEntry is made from (Istio's validation: a template is required and holds no
    address — each entry gets the address of the proxy that registers)."""

    metadata: WorkloadGroupObjectMeta = Field(default_factory=WorkloadGroupObjectMeta)
    template: WorkloadEntrySpec
    probe: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _no_address_in_template(self) -> WorkloadGroupSpec:
        if self.template.address:
            raise ValueError("template.address: a WorkloadGroup's template cannot set an address")
        return self


class ServiceEntrySpec(Loose):
    hosts: Strings = Field(min_length=1)
    addresses: Strings = ()
    ports: tuple[ServicePort, ...] = ()
    location: str = "MESH_EXTERNAL"
    resolution: str = "NONE"
    # Istio's WorkloadEntry shape: address, ports by port name, labels (the endpoints a
    # STATIC or DNS entry sends to instead of resolving its hosts).
    endpoints: tuple[WorkloadEntrySpec, ...] = ()
    export_to: Strings = ()
    workload_selector: NetworkingWorkloadSelector | None = None


class OutboundTrafficPolicyMode(enum.Enum):
    REGISTRY_ONLY = "REGISTRY_ONLY"
    ALLOW_ANY = "ALLOW_ANY"


class OutboundTrafficPolicy(Loose):
    mode: OutboundTrafficPolicyMode = OutboundTrafficPolicyMode.ALLOW_ANY


class SidecarSpec(Loose):
    workload_selector: NetworkingWorkloadSelector | None = None
    outbound_traffic_policy: OutboundTrafficPolicy | None = None


class HostsSpec(Loose):
    """Gateway servers and VirtualService hosts: kept for the analyzer and routing."""

    hosts: Strings = ()
    gateways: Strings = ()


# --- Kubernetes -----------------------------------------------------------------------


class ContainerPort(Loose):
    container_port: int = Field(ge=1, le=65535)
    name: str = ""
    protocol: str = "TCP"


class EnvVar(Loose):
    name: str = Field(min_length=1)
    value: str = ""


class SecurityContext(Loose):
    """The user a pod's or container's processes run as (the local runtime's netns mode)."""

    run_as_user: int | None = Field(default=None, ge=0)
    run_as_group: int | None = Field(default=None, ge=0)


class Container(Loose):
    name: str = ""
    image: str = ""
    command: Strings = ()
    args: Strings = ()
    env: tuple[EnvVar, ...] = ()
    ports: tuple[ContainerPort, ...] = ()
    restart_policy: str = ""  # "Always" on an init container: a native sidecar
    security_context: SecurityContext = Field(default_factory=SecurityContext)


class PodSpec(Loose):
    service_account_name: str = ""
    service_account: str = ""
    containers: tuple[Container, ...] = ()
    init_containers: tuple[Container, ...] = ()
    host_network: bool = False
    node_name: str = ""  # the host it must run on (`trustmesh up --hosts`, `node join`)
    restart_policy: str = ""  # Always (Kubernetes' default), OnFailure or Never
    security_context: SecurityContext = Field(default_factory=SecurityContext)


class PodStatus(Loose):
    pod_ip: str = Field(default="", alias="podIP")
    phase: str = ""
    host_ip: str = Field(default="", alias="hostIP")


class LiveObjectMeta(Loose):
    """The metadata only the API server writes: set on objects read back from a cluster."""

    uid: str = ""
    resource_version: str = ""


class PodTemplate(Loose):
    metadata: TemplateMeta = Field(default_factory=TemplateMeta)
    spec: PodSpec = Field(default_factory=PodSpec)


class WorkloadControllerSpec(Loose):
    """Deployment / StatefulSet / DaemonSet: only the pod template matters here."""

    template: PodTemplate = Field(default_factory=PodTemplate)


class K8sServicePort(Loose):
    port: int = Field(ge=1, le=65535)
    name: str = ""
    protocol: str = "TCP"
    app_protocol: str = ""
    target_port: Annotated[int, Field(ge=1, le=65535)] | str | None = None


class ServiceSpec(Loose):
    selector: dict[str, str] = Field(default_factory=dict)
    ports: tuple[K8sServicePort, ...] = ()


# --- mesh config ----------------------------------------------------------------------


class PathNormalizationSetting(Loose):
    normalization: str = "DEFAULT"


class ExtAuthzRequestBody(Strict):
    """``includeRequestBodyInCheck``: buffer the body and send it to the authorizer."""

    max_request_bytes: int = Field(default=0, ge=0, le=4294967295)
    allow_partial_message: bool = False
    pack_as_bytes: bool = False


class EnvoyExtAuthzHttp(Strict):
    """``envoyExtAuthzHttp``: an authorizer asked with an HTTP request (istio/api
    ``EnvoyExternalAuthorizationHttpProvider``). Values are checked with their locations
    by :mod:`trustmesh.api.extension_providers`, as istiod checks them."""

    service: str = ""
    port: int = 0
    timeout: str = ""
    path_prefix: str = ""
    fail_open: bool = False
    clear_route_cache: bool = False
    status_on_error: str = ""
    include_headers_in_check: Strings = ()  # deprecated: used when the next one is unset
    include_request_headers_in_check: Strings = ()
    include_additional_headers_in_check: dict[str, str] = Field(default_factory=dict)
    include_request_body_in_check: ExtAuthzRequestBody | None = None
    headers_to_upstream_on_allow: Strings = ()
    headers_to_downstream_on_deny: Strings = ()
    headers_to_downstream_on_allow: Strings = ()


class EnvoyExtAuthzGrpc(Strict):
    """``envoyExtAuthzGrpc``: an authorizer speaking Envoy's ``Authorization/Check`` gRPC
    service (istio/api ``EnvoyExternalAuthorizationGrpcProvider``)."""

    service: str = ""
    port: int = 0
    timeout: str = ""
    fail_open: bool = False
    clear_route_cache: bool = False
    status_on_error: str = ""
    include_request_body_in_check: ExtAuthzRequestBody | None = None


class ExtensionProvider(Loose):
    """One ``meshConfig.extensionProviders`` entry. Only the ext_authz kinds are read;
    tracing, logging and other kinds are kept out (``extra="ignore"``)."""

    name: str = ""
    envoy_ext_authz_http: EnvoyExtAuthzHttp | None = None
    envoy_ext_authz_grpc: EnvoyExtAuthzGrpc | None = None


class RepeatedPolicyHeaders(enum.Enum):
    """``meshConfig.repeatedPolicyHeaders`` (trustmesh's own; istiod ignores the field).

    What a sidecar does with a request that carries a header more than once when an
    AuthorizationPolicy ``request.headers[...]`` condition applying to it names that header.
    """

    REJECT = "REJECT"  # 400 before any policy filter (the default: fails closed)
    FORWARD = "FORWARD"  # Istio's behaviour: a condition matches if any one line matches


class MeshConfigModel(Loose):
    root_namespace: str = "istio-system"
    trust_domain: str = "cluster.local"
    trust_domain_aliases: Strings = ()
    enable_auto_mtls: bool = True
    outbound_traffic_policy: OutboundTrafficPolicy = Field(default_factory=OutboundTrafficPolicy)
    path_normalization: PathNormalizationSetting = Field(default_factory=PathNormalizationSetting)
    extension_providers: tuple[ExtensionProvider, ...] = ()
    access_log_file: str = ""  # set (Istio: /dev/stdout): every request is logged
    repeated_policy_headers: RepeatedPolicyHeaders = RepeatedPolicyHeaders.REJECT


# --- whole-object payloads for kinds whose interesting part is not just ``spec`` ------


class Empty(Loose):
    pass


class PodObject(Loose):
    metadata: LiveObjectMeta = Field(default_factory=LiveObjectMeta)
    spec: PodSpec = Field(default_factory=PodSpec)
    status: PodStatus = Field(default_factory=PodStatus)

    @property
    def is_live(self) -> bool:
        """Read back from a running cluster (``kubectl get pods -o yaml``), not a manifest:
        what the admission webhooks did to it is already in its spec."""
        meta, status = self.metadata, self.status
        return bool(
            meta.uid or meta.resource_version or status.phase or status.pod_ip or status.host_ip
        )


class ConfigMapObject(Loose):
    data: dict[str, str] = Field(default_factory=dict)


class IstioOperatorSpec(Loose):
    mesh_config: dict[str, object] | None = None
    values: dict[str, object] = Field(default_factory=dict)
    components: dict[str, object] = Field(default_factory=dict)
    tag: str | int | float | None = None  # istioctl takes any scalar (`tag: 1.22`)
    hub: str | None = None
    revision: str | None = None
