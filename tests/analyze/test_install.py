"""Installation hardening checks 27–32 (TM-INST-001…012): each check fires on a config that
has the problem and stays silent on a near-identical one that does not."""

from __future__ import annotations

from trustmesh.analyze.checks import capture  # noqa: F401  (registers TM-INST-009…012)
from trustmesh.analyze.findings import Finding, Severity

from .util import findings

IOP = """apiVersion: install.istio.io/v1alpha1
kind: IstioOperator
metadata: {name: control-plane, namespace: istio-system}
spec:
"""
OPERATOR = "IstioOperator/istio-system/control-plane"


def line_of(text: str, needle: str) -> int:
    """1-based line of the first occurrence of ``needle`` (robust to edits of the YAML)."""
    return text[: text.index(needle)].count("\n") + 1


def where(finding: Finding) -> tuple[str, int, str]:
    loc = finding.issue.location
    assert loc is not None
    return loc.file, loc.line, loc.field


def deployment(name: str, ns: str, template: str, container: str = "") -> str:
    return f"""---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: {ns}}}
spec:
  template:
    metadata:
      labels: {{app: {name}}}
{template}    spec:
      containers:
      - name: {name}
        ports: [{{containerPort: 8000}}]
{container}"""


# --- 27: protocol sniffing, undeclared port protocols -------------------------------------


def test_sniffing_on_by_default_when_an_install_is_present() -> None:
    text = IOP + "  tag: 1.30.4\n"
    [found] = findings(text, "TM-INST-001")
    # absent setting: the line where spec's content starts, the field path to add
    assert where(found) == ("config.yaml", line_of(text, "tag:"), "spec.values.pilot")
    assert found.issue.resource == OPERATOR
    assert "by Istio's default for outbound and inbound" in found.issue.message
    assert "enableProtocolSniffingForOutbound: false" in found.issue.fix
    assert findings("", "TM-INST-001") == []  # no install: defaults in force unknown


def test_sniffing_turned_off_or_half_off() -> None:
    off = IOP + (
        "  values:\n    pilot:\n      enableProtocolSniffingForOutbound: false\n"
        "      enableProtocolSniffingForInbound: false\n"
    )
    assert findings(off, "TM-INST-001") == []
    helm = "pilot:\n  enableProtocolSniffingForOutbound: false\n"
    [found] = findings(helm, "TM-INST-001")
    assert "for inbound traffic" in found.issue.message
    assert found.issue.fix.startswith("# in your Helm values")
    env = IOP + "  values:\n    pilot:\n      env:\n        PILOT_ENABLE_PROTOCOL_SNIFFING_FOR_"
    both = env + 'OUTBOUND: "false"\n        PILOT_ENABLE_PROTOCOL_SNIFFING_FOR_INBOUND: "false"\n'
    assert findings(both, "TM-INST-001") == []


SERVICE = """apiVersion: v1
kind: Service
metadata: {name: web, namespace: %s}
spec:
  selector: {app: httpbin}
  ports:
  - {name: %s, port: 80, targetPort: 8000%s}
"""


def test_undeclared_port_protocol_on_sidecar_workloads() -> None:
    text = SERVICE % ("foo", "web", "")
    [found] = findings(text, "TM-INST-002")
    assert where(found) == ("config.yaml", line_of(text, "- {name: web"), "spec.ports[0].name")
    assert found.issue.workloads == ("foo/httpbin",)
    assert found.issue.resource == "Service/foo/web"
    assert "guess its protocol per connection by sniffing" in found.issue.message
    assert found.severity is Severity.INFO  # nothing enforced depends on the guess


PATHS_POLICY = """---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: paths, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules: [{to: [{operation: {%s: ["%s"]}}]}]
"""


def test_undeclared_port_matters_when_http_attributes_are_enforced() -> None:
    text = SERVICE % ("foo", "web", "") + PATHS_POLICY % ("paths", "/admin")
    [found] = findings(text, "TM-INST-002")
    assert found.severity is Severity.WARNING
    assert "AuthorizationPolicy foo/paths match(es) HTTP attributes" in found.issue.message
    tcp_only = SERVICE % ("foo", "web", "") + PATHS_POLICY % ("ports", "8000")
    [found] = findings(tcp_only, "TM-INST-002")
    assert found.severity is Severity.INFO


def test_declared_or_uncaptured_ports_are_fine() -> None:
    assert findings(SERVICE % ("foo", "http-web", ""), "TM-INST-002") == []
    assert findings(SERVICE % ("foo", "web", ", appProtocol: grpc"), "TM-INST-002") == []
    assert findings(SERVICE % ("foo", "grpc-web", ""), "TM-INST-002") == []
    assert findings(SERVICE % ("foo", "web", ", protocol: UDP"), "TM-INST-002") == []
    # legacy has no sidecar: nothing sniffs there
    assert findings(SERVICE % ("legacy", "web", ""), "TM-INST-002") == []


def test_undeclared_port_with_sniffing_off_is_opaque_tcp() -> None:
    off = "pilot:\n  enableProtocolSniffingForOutbound: false\n"
    off += "  enableProtocolSniffingForInbound: false\n---\n"
    [found] = findings(off + SERVICE % ("foo", "web", ""), "TM-INST-002")
    assert "treat it as opaque TCP" in found.issue.message


# --- 28: CNI, NET_ADMIN / NET_RAW ---------------------------------------------------------


def test_cni_disabled_points_at_where_to_enable_it() -> None:
    text = IOP + "  profile: default\n"
    [found] = findings(text, "TM-INST-003")
    assert where(found) == ("config.yaml", line_of(text, "profile:"), "spec.components.cni.enabled")
    assert "components:\n    cni:\n      enabled: true" in found.issue.fix
    explicit = IOP + "  components:\n    cni:\n      enabled: false\n"
    [found] = findings(explicit, "TM-INST-003")
    assert where(found)[1:] == (line_of(explicit, "enabled: false"), "spec.components.cni.enabled")


def test_cni_enabled_any_way() -> None:
    assert findings(IOP + "  components:\n    cni:\n      enabled: true\n", "TM-INST-003") == []
    assert findings(IOP + "  profile: ambient\n", "TM-INST-003") == []
    assert findings("pilot:\n  cni:\n    enabled: true\n", "TM-INST-003") == []
    assert findings("cni:\n  cniBinDir: /opt/cni/bin\n", "TM-INST-003") == []
    assert findings("", "TM-INST-003") == []


def test_cni_disabled_seen_from_an_injected_pod_dump() -> None:
    init = "      initContainers:\n      - name: istio-init\n        image: istio/proxyv2:1.30.4\n"
    text = deployment("web", "foo", "", init)
    [found] = findings(text, "TM-INST-003")
    assert where(found)[1:] == (
        line_of(text, "- name: istio-init"),
        "spec.template.spec.initContainers[0].name",
    )
    assert found.issue.workloads == ("foo/web",)


CAPS = """        securityContext:
          capabilities: {%s: [%s]}
"""


def test_net_admin_in_a_meshed_app_container_bypasses_the_sidecar() -> None:
    text = deployment("web", "foo", "", CAPS % ("add", "NET_ADMIN"))
    [found] = findings(text, "TM-INST-004")
    assert found.severity is Severity.ERROR
    assert where(found)[1:] == (
        line_of(text, "capabilities:"),
        "spec.template.spec.containers[0].securityContext.capabilities.add",
    )
    assert found.issue.workloads == ("foo/web",)
    assert "bypass the sidecar" in found.issue.message
    [outside] = findings(deployment("web", "legacy", "", CAPS % ("add", "NET_RAW")), "TM-INST-004")
    assert outside.severity is Severity.WARNING  # no sidecar to bypass


def test_dropped_caps_istio_init_and_node_agents_are_fine() -> None:
    assert findings(deployment("web", "foo", "", CAPS % ("drop", "NET_RAW")), "TM-INST-004") == []
    init = deployment("web", "foo", "", CAPS % ("add", "NET_ADMIN")).replace(
        "- name: web\n", "- name: istio-init\n"
    )
    assert findings(init, "TM-INST-004") == []
    agent = deployment("istio-cni-node", "kube-system", "", CAPS % ("add", "NET_ADMIN"))
    agent = agent.replace("kind: Deployment", "kind: DaemonSet")
    assert findings(agent, "TM-INST-004") == []


# --- 29, 30: images, tokens ---------------------------------------------------------------


def test_non_distroless_tag() -> None:
    text = IOP + "  tag: 1.30.4\n"
    [found] = findings(text, "TM-INST-005")
    assert where(found)[1:] == (line_of(text, "tag:"), "spec.tag")
    assert found.severity is Severity.INFO and "variant: distroless" in found.issue.fix
    assert findings(IOP + "  tag: 1.30.4-distroless\n", "TM-INST-005") == []
    variant = IOP + "  values:\n    global:\n      variant: distroless\n"
    assert findings(variant, "TM-INST-005") == []
    assert findings("global:\n  variant: distroless\n", "TM-INST-005") == []


def test_non_distroless_image_in_a_pod_dump() -> None:
    text = deployment("istiod", "istio-system", "").replace(
        "- name: istiod\n", "- name: discovery\n        image: docker.io/istio/pilot:1.30.4\n"
    )
    [found] = findings(text, "TM-INST-005")
    assert where(found)[1:] == (line_of(text, "image:"), "spec.template.spec.containers[0].image")
    assert findings(text.replace(":1.30.4", ":1.30.4-distroless"), "TM-INST-005") == []


def test_first_party_jwt() -> None:
    text = IOP + "  values:\n    global:\n      jwtPolicy: first-party-jwt\n"
    [found] = findings(text, "TM-INST-006")
    assert where(found)[1:] == (line_of(text, "jwtPolicy"), "spec.values.global.jwtPolicy")
    assert "foo/httpbin" in found.issue.workloads and "legacy/httpbin" not in found.issue.workloads
    assert "jwtPolicy: third-party-jwt" in found.issue.fix
    assert findings(text.replace("first-party", "third-party"), "TM-INST-006") == []


# --- 31: istiod debug / plaintext xDS, connection limit -----------------------------------

ISTIOD = """apiVersion: v1
kind: Service
metadata: {name: istiod, namespace: istio-system}
spec:
  type: %s
  selector: {app: %s}
  ports:
  - {name: grpc-xds, port: 15012}
  - {name: %s, port: %s}
"""


def test_istiod_debug_ports_by_reach() -> None:
    text = ISTIOD % ("ClusterIP", "istiod", "grpc-plain", 15010)
    [found] = findings(text, "TM-INST-007")
    assert found.severity is Severity.INFO and "plaintext xDS" in found.issue.message
    assert where(found)[1:] == (line_of(text, "grpc-plain"), "spec.ports[1]")
    [debug] = findings(ISTIOD % ("ClusterIP", "istiod", "http-debug", 8080), "TM-INST-007")
    assert debug.severity is Severity.WARNING and "debug HTTP API" in debug.issue.message
    [lb] = findings(ISTIOD % ("LoadBalancer", "istiod", "grpc-plain", 15010), "TM-INST-007")
    assert lb.severity is Severity.ERROR and "outside the cluster" in lb.issue.message


def test_istiod_secure_ports_and_other_apps_are_fine() -> None:
    assert findings(ISTIOD % ("ClusterIP", "istiod", "https-webhook", 443), "TM-INST-007") == []
    assert findings(ISTIOD % ("ClusterIP", "shop", "http-debug", 8080), "TM-INST-007") == []


def test_istiod_debug_environment() -> None:
    env = IOP + "  values:\n    pilot:\n      env:\n"
    [found] = findings(env + "        OTHER: x\n", "TM-INST-007")
    assert "ENABLE_DEBUG_ON_HTTP is unset" in found.issue.message
    assert findings(env + '        ENABLE_DEBUG_ON_HTTP: "false"\n', "TM-INST-007") == []
    text = (
        env + '        ENABLE_DEBUG_ON_HTTP: "false"\n        ENABLE_DEBUG_ENDPOINT_AUTH: "false"\n'
    )
    [auth] = findings(text, "TM-INST-007")
    assert auth.severity is Severity.WARNING
    assert where(auth)[1:] == (
        line_of(text, "ENABLE_DEBUG_ENDPOINT_AUTH"),
        "spec.values.pilot.env.ENABLE_DEBUG_ENDPOINT_AUTH",
    )
    listed = IOP + (
        "  components:\n    pilot:\n      k8s:\n        env:\n"
        '        - {name: ENABLE_DEBUG_ON_HTTP, value: "false"}\n'
    )
    assert findings(listed, "TM-INST-007") == []


def test_downstream_connection_limit() -> None:
    [found] = findings(IOP + "  tag: 1.30.4\n", "TM-INST-008")
    assert "Istio's default is 2147483647" in found.issue.message
    assert "ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS" in found.issue.fix
    mesh = IOP + "  meshConfig:\n    defaultConfig:\n"
    limited = (
        mesh + "      proxyMetadata: {ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS: '50000'}\n"
    )
    assert findings(limited, "TM-INST-008") == []
    runtime = mesh + "      runtimeValues: {overload.global_downstream_max_connections: '40000'}\n"
    assert findings(runtime, "TM-INST-008") == []
    unlimited = runtime.replace("'40000'", "'2147483647'")
    [found] = findings(unlimited, "TM-INST-008")
    assert "(set to unlimited)" in found.issue.message
    assert where(found)[2] == (
        "spec.meshConfig.defaultConfig.runtimeValues.overload.global_downstream_max_connections"
    )
    assert findings("", "TM-INST-008") == []


# --- 32: capture bypass, injection opt-out, UID 1337, sidecar overrides -------------------

STRICT_FOO = """apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: foo}
spec: {mtls: {mode: STRICT}}
"""


def annotated(ns: str, notes: str, name: str = "web") -> str:
    return deployment(name, ns, f"      annotations: {{{notes}}}\n")


def test_inbound_exclusion_defeats_strict_mtls() -> None:
    text = annotated("foo", '"traffic.sidecar.istio.io/excludeInboundPorts": "8000"')
    [found] = findings(STRICT_FOO + text, "TM-INST-009")
    assert found.severity is Severity.ERROR
    assert "STRICT mTLS (foo/default) not enforced" in found.issue.message
    assert found.issue.workloads == ("foo/web",) and found.issue.resource == "Deployment/foo/web"
    loc = found.issue.location
    assert loc is not None and loc.line == line_of(STRICT_FOO + text, "excludeInboundPorts")
    assert loc.field == "spec.template.metadata.annotations.traffic.sidecar.istio.io/" + (
        "excludeInboundPorts"
    )
    [plain] = findings(text, "TM-INST-009")  # nothing enforced there: still a bypass
    assert plain.severity is Severity.WARNING
    deny_other_port = """---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-9000, namespace: foo}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules: [{to: [{operation: {ports: ["9000"]}}]}]
"""
    [other] = findings(text + deny_other_port, "TM-INST-009")
    assert other.severity is Severity.WARNING  # that DENY never applied to port 8000
    [deny] = findings(text + deny_other_port.replace('"9000"', '"8000"'), "TM-INST-009")
    assert deny.severity is Severity.ERROR and "foo/deny-9000" in deny.issue.message


def test_inbound_exclusion_not_served_or_without_sidecar_is_fine() -> None:
    other = annotated("foo", '"traffic.sidecar.istio.io/excludeInboundPorts": "9999"')
    assert findings(STRICT_FOO + other, "TM-INST-009") == []
    legacy = annotated("legacy", '"traffic.sidecar.istio.io/excludeInboundPorts": "8000"')
    assert findings(legacy, "TM-INST-009") == []


def test_include_inbound_ports_leaves_others_uncaptured() -> None:
    text = annotated("foo", '"traffic.sidecar.istio.io/includeInboundPorts": ""')
    [found] = findings(text, "TM-INST-009")
    assert "port(s) 8000 of foo/web" in found.issue.message
    star = annotated("foo", '"traffic.sidecar.istio.io/includeInboundPorts": "*"')
    assert findings(star, "TM-INST-009") == []


def test_outbound_bypass_annotations_and_install_defaults() -> None:
    ranges = annotated("foo", '"traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.0.0.0/8"')
    [found] = findings(ranges, "TM-INST-009")
    assert "outbound connections to 10.0.0.0/8 of foo/web skip the sidecar" in found.issue.message
    everything = annotated("foo", '"traffic.sidecar.istio.io/includeOutboundIPRanges": ""')
    [found] = findings(everything, "TM-INST-009")
    assert "all outbound traffic" in found.issue.message
    star = annotated("foo", '"traffic.sidecar.istio.io/includeOutboundIPRanges": "*"')
    assert findings(star, "TM-INST-009") == []
    install = IOP + "  values:\n    global:\n      proxy:\n        includeIPRanges: 10.0.0.0/8\n"
    [found] = findings(install, "TM-INST-009")
    assert found.issue.resource == OPERATOR
    assert {"foo/httpbin", "bar/sleep"} <= set(found.issue.workloads)
    assert "legacy/httpbin" not in found.issue.workloads
    assert findings(install.replace("10.0.0.0/8", '"*"'), "TM-INST-009") == []


def test_injection_opt_out_in_an_injected_namespace() -> None:
    text = deployment("web", "foo", '      labels: {app: web, sidecar.istio.io/inject: "false"}\n')
    text = text.replace("      labels: {app: web}\n", "", 1)
    [found] = findings(STRICT_FOO + text, "TM-INST-010")
    assert found.severity is Severity.ERROR and "STRICT mTLS" in found.issue.message
    loc = found.issue.location
    assert loc is not None and loc.field == "spec.template.metadata.labels.sidecar.istio.io/inject"
    [plain] = findings(text, "TM-INST-010")
    assert plain.severity is Severity.WARNING
    assert findings(text.replace("foo}", "legacy}"), "TM-INST-010") == []  # not meshed
    assert findings(text.replace('"false"', '"true"'), "TM-INST-010") == []
    ambient = text.replace("app: web,", "app: web, istio.io/dataplane-mode: ambient,")
    assert findings(ambient, "TM-INST-010") == []  # ztunnel captures it


RUN_AS = "        securityContext: {runAsUser: %d}\n"


def test_app_container_as_proxy_uid() -> None:
    text = deployment("web", "foo", "", RUN_AS % 1337)
    [found] = findings(text, "TM-INST-011")
    assert where(found)[1:] == (
        line_of(text, "runAsUser"),
        "spec.template.spec.containers[0].securityContext.runAsUser",
    )
    assert found.issue.workloads == ("foo/web",)
    assert findings(deployment("web", "foo", "", RUN_AS % 1000), "TM-INST-011") == []
    assert findings(deployment("web", "legacy", "", RUN_AS % 1337), "TM-INST-011") == []
    proxy = deployment("web", "foo", "", RUN_AS % 1337).replace(
        "- name: web", "- name: istio-proxy"
    )
    assert findings(proxy, "TM-INST-011") == []


def test_pod_level_group_1337_applies_to_app_containers() -> None:
    text = deployment("web", "foo", "").replace(
        "    spec:\n      containers:",
        "    spec:\n      securityContext: {runAsGroup: 1337}\n      containers:",
    )
    [found] = findings(text, "TM-INST-011")
    assert where(found)[2] == "spec.template.spec.securityContext.runAsGroup"


def test_sidecar_overrides() -> None:
    text = annotated("foo", '"sidecar.istio.io/proxyImage": "example.com/envoy:patched"')
    [found] = findings(text, "TM-INST-012")
    assert "replaces the proxy image" in found.issue.message
    assert where(found)[1] == line_of(text, "proxyImage")
    legacy = annotated("legacy", '"sidecar.istio.io/proxyImage": "example.com/envoy:patched"')
    assert findings(legacy, "TM-INST-012") == []
    assert findings(annotated("foo", '"sidecar.istio.io/proxyCPU": "100m"'), "TM-INST-012") == []
