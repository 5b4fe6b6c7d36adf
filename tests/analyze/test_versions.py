"""Version checks 33–34 (TM-INST-013…016): bulletins reported as exploitable only when their
vulnerable configuration is in the inputs, end of life, removed and deprecated APIs."""

from __future__ import annotations

import datetime

from trustmesh.analyze.checks import versions
from trustmesh.analyze.context import build_context
from trustmesh.analyze.findings import Finding, Severity
from trustmesh.api.loader import load_sources
from trustmesh.api.snapshot import build_snapshot
from trustmesh.policy.compose import compile_mesh

from .util import findings


def line_of(text: str, needle: str) -> int:
    return text[: text.index(needle)].count("\n") + 1


def by_bulletin(found: list[Finding]) -> dict[str, Finding]:
    return {str(f.issue.properties.get("bulletin", "summary")): f for f in found}


# --- the shipped data ---------------------------------------------------------------------


def test_bulletin_data_is_well_formed_and_every_condition_evaluates() -> None:
    data = versions.bulletin_data()
    assert data["data_date"] and "istio.io" in data["source"]
    ids = [b["id"] for b in data["bulletins"]]
    assert len(ids) == len(set(ids)) and "ISTIO-SECURITY-2022-001" in ids
    snapshot = build_snapshot(load_sources([]))
    ctx = build_context(snapshot, compile_mesh(snapshot))
    for bulletin in data["bulletins"]:
        for span in bulletin["affected"]:
            if "before" not in span:
                low, high, fixed = (versions._v(span[k]) for k in ("from", "through", "fixed"))
                assert low <= high < fixed and high[:2] == fixed[:2], bulletin["id"]
        holds, _ = versions.evaluate(bulletin["condition"], versions.Facts(ctx, (1, 30, 0)))
        assert holds in (True, False, None)
    minors = [r["minor"] for r in data["releases"]]
    assert minors == sorted(minors, key=lambda v: tuple(map(int, v.split("."))), reverse=True)


def test_version_parsing_and_ranges() -> None:
    assert versions.parse_version("v1.22.3-distroless") == (1, 22, 3)
    assert versions.parse_version("1.22") == (1, 22, None)
    assert versions.parse_version("latest") is None
    assert versions.in_range((1, 12, 9), {"before": "1.13.0"})
    assert not versions.in_range((1, 13, 2), {"from": "1.13.0", "through": "1.13.1"})


# --- 33: bulletins ------------------------------------------------------------------------

SA_POLICY = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-svc, namespace: foo}
spec:
  rules:
  - from:
    - source: {serviceAccounts: [%s]}
"""


def test_exploitable_only_when_the_vulnerable_configuration_is_present() -> None:
    # ISTIO-SECURITY-2026-003 (1.29.0–1.29.1): serviceAccounts with dots
    text = SA_POLICY % '"foo/my.app"'
    found = by_bulletin(findings(text, "TM-INST-013", version="1.29.1"))
    hit = found["ISTIO-SECURITY-2026-003"]
    assert hit.issue.properties["exploitable"] is True
    assert hit.severity is Severity.WARNING  # CVSS 5.4
    assert "AuthorizationPolicy foo/only-svc (config.yaml:3)" in hit.issue.message
    assert hit.issue.properties["fixed"] == "1.29.2" and "1.29.2 or later" in hit.issue.fix
    assert hit.issue.location is None  # from --istio-version
    always = found["ISTIO-SECURITY-2026-004"]  # HTTP/2: every installation
    assert always.severity is Severity.ERROR and "every installation" in always.issue.message


def test_condition_absent_is_only_summarised() -> None:
    found = by_bulletin(findings(SA_POLICY % '"foo/myapp"', "TM-INST-013", version="1.29.1"))
    assert "ISTIO-SECURITY-2026-003" not in found
    summary = found["summary"]
    assert summary.severity is Severity.INFO
    assert "ISTIO-SECURITY-2026-003" in summary.issue.properties["bulletins"]
    assert "serviceAccounts containing a dot" in summary.issue.message


def test_environment_dependent_bulletin_is_a_warning() -> None:
    found = by_bulletin(findings("", "TM-INST-013", version="1.30.3"))
    assert set(found) == {"ISTIO-SECURITY-2026-006"}
    assert found["ISTIO-SECURITY-2026-006"].severity is Severity.WARNING
    assert found["ISTIO-SECURITY-2026-006"].issue.properties["exploitable"] is None
    assert findings("", "TM-INST-013", version="1.30.4") == []  # patched
    assert findings("", "TM-INST-013", version="1.31.0") == []


ISTIOD_LB = """apiVersion: v1
kind: Service
metadata: {name: istiod-external, namespace: istio-system}
spec:
  type: %s
  selector: {app: istiod}
  ports:
  - {name: https-webhook, port: 443, targetPort: 15017}
"""


def test_istiod_exposure_makes_control_plane_bulletins_exploitable() -> None:
    exposed = by_bulletin(findings(ISTIOD_LB % "LoadBalancer", "TM-INST-013", version="1.13.1"))
    assert exposed["ISTIO-SECURITY-2022-004"].severity is Severity.ERROR
    assert "LoadBalancer Service istio-system/istiod-external" in (
        exposed["ISTIO-SECURITY-2022-004"].issue.message
    )
    internal = by_bulletin(findings(ISTIOD_LB % "ClusterIP", "TM-INST-013", version="1.13.1"))
    assert "ISTIO-SECURITY-2022-004" not in internal
    assert "ISTIO-SECURITY-2022-004" in internal["summary"].issue.properties["bulletins"]


IOP = """apiVersion: install.istio.io/v1alpha1
kind: IstioOperator
metadata: {name: control-plane, namespace: istio-system}
spec:
  profile: minimal
  tag: %s
"""


def test_version_from_the_install_tag_locates_the_finding() -> None:
    text = IOP % "1.28.0-distroless"
    found = by_bulletin(findings(text, "TM-INST-013"))
    hit = found["ISTIO-SECURITY-2026-001"]
    loc = hit.issue.location
    assert loc is not None and (loc.line, loc.field) == (line_of(text, "tag:"), "spec.tag")
    assert hit.issue.resource == "IstioOperator/istio-system/control-plane"


def test_version_from_a_deployed_istiod_image() -> None:
    text = """apiVersion: apps/v1
kind: Deployment
metadata: {name: istiod, namespace: istio-system}
spec:
  template:
    metadata: {labels: {app: istiod}}
    spec:
      containers:
      - {name: discovery, image: docker.io/istio/pilot:1.28.0}
"""
    found = by_bulletin(findings(text, "TM-INST-013"))
    loc = found["ISTIO-SECURITY-2026-001"].issue.location
    assert loc is not None and loc.field == "spec.template.spec.containers[0].image"


def test_version_without_patch_lists_bulletins_of_that_minor() -> None:
    [found] = findings("", "TM-INST-013", version="1.29")
    assert found.severity is Severity.INFO and "ISTIO-SECURITY-2026-003" in found.issue.message


ENVOY_FILTER = """apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {name: dfp, namespace: istio-system}
spec:
  configPatches:
  - applyTo: HTTP_FILTER
    patch:
      operation: INSERT_BEFORE
      value:
        name: envoy.filters.http.%s
"""


def test_envoy_filter_condition_reads_unknown_resources() -> None:
    text = ENVOY_FILTER % "dynamic_forward_proxy"
    found = by_bulletin(findings(text, "TM-INST-013", version="1.27.0"))
    assert found["ISTIO-SECURITY-2025-001"].issue.properties["exploitable"] is True
    assert "EnvoyFilter istio-system/dfp" in found["ISTIO-SECURITY-2025-001"].issue.message
    other = by_bulletin(findings(ENVOY_FILTER % "cors", "TM-INST-013", version="1.27.0"))
    assert "ISTIO-SECURITY-2025-001" not in other


MESH = """apiVersion: install.istio.io/v1alpha1
kind: IstioOperator
metadata: {name: control-plane, namespace: istio-system}
spec:
  profile: %s
%s"""


def test_any_condition_is_three_valued() -> None:
    # ISTIO-SECURITY-2024-004: JSON access logs (config) or WebSocket traffic (environment)
    json_logs = MESH % ("minimal", "  meshConfig: {accessLogEncoding: JSON}\n")
    hit = by_bulletin(findings(json_logs, "TM-INST-013", version="1.22.0"))[
        "ISTIO-SECURITY-2024-004"
    ]
    assert hit.issue.properties["exploitable"] is True and hit.severity is Severity.ERROR
    assert "meshConfig.accessLogEncoding (config.yaml:6)" in hit.issue.message
    text = MESH % ("minimal", "  meshConfig: {accessLogEncoding: TEXT}\n")
    maybe = by_bulletin(findings(text, "TM-INST-013", version="1.22.0"))["ISTIO-SECURITY-2024-004"]
    assert maybe.issue.properties["exploitable"] is None and maybe.severity is Severity.WARNING
    assert "WebSocket" in maybe.issue.message
    provider = MESH % (
        "minimal",
        "  meshConfig:\n    extensionProviders:\n    - name: json-log\n"
        "      envoyFileAccessLog: {path: /dev/stdout, logFormat: {labels: {a: '%REQ(:PATH)%'}}}\n"
        "    - {name: dd, zipkin: {service: z.istio-system.svc, port: 9411}}\n",
    )
    found = by_bulletin(findings(provider, "TM-INST-013", version="1.22.0"))
    assert "extension provider json-log" in found["ISTIO-SECURITY-2024-004"].issue.message
    assert "ISTIO-SECURITY-2024-005" in found["summary"].issue.properties["bulletins"]  # no Datadog


def test_gateway_condition_follows_the_install_profile() -> None:
    # ISTIO-SECURITY-2022-005: exposed ingress gateway; the default profile installs one
    default = by_bulletin(findings(MESH % ("default", ""), "TM-INST-013", version="1.14.0"))
    assert "IstioOperator profile default" in default["ISTIO-SECURITY-2022-005"].issue.message
    off = MESH % (
        "default",
        "  components:\n    ingressGateways: [{name: ingress, enabled: false}]\n",
    )
    assert "ISTIO-SECURITY-2022-005" not in by_bulletin(
        findings(off, "TM-INST-013", version="1.14.0")
    )
    minimal = by_bulletin(findings(MESH % ("minimal", ""), "TM-INST-013", version="1.14.0"))
    assert "ISTIO-SECURITY-2022-005" in minimal["summary"].issue.properties["bulletins"]


def test_gateway_api_and_cni_conditions() -> None:
    gateway = """apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: public, namespace: foo}
spec: {gatewayClassName: istio, listeners: []}
"""
    found = by_bulletin(findings(gateway, "TM-INST-013", version="1.12.1"))
    assert "Gateway (Gateway API) foo/public" in found["ISTIO-SECURITY-2022-002"].issue.message
    cni = MESH % ("minimal", "  components:\n    cni: {enabled: true}\n")
    hit = by_bulletin(findings(cni, "TM-INST-013", version="1.20.0"))["ISTIO-SECURITY-2023-005"]
    assert hit.severity is Severity.ERROR  # no CVSS given: not downgraded
    assert "Istio CNI is installed" in hit.issue.message


# --- 33: end of life ----------------------------------------------------------------------


def test_end_of_life() -> None:
    [found] = findings("", "TM-INST-014", version="1.20.0")
    assert "reached end of life on 2024-06-25" in found.issue.message
    assert found.severity is Severity.WARNING
    assert findings("", "TM-INST-014", version="1.31.0") == []
    [old] = findings("", "TM-INST-014", version="1.5.2")
    assert "older than 1.7" in old.issue.message
    last_day = datetime.date(2026, 10, 12)
    assert findings("", "TM-INST-014", version="1.29.3", today=last_day) == []
    day_after = datetime.date(2026, 10, 13)
    assert len(findings("", "TM-INST-014", version="1.29.3", today=day_after)) == 1


# --- 34: removed and deprecated APIs ------------------------------------------------------

SERVICE_ROLE = """apiVersion: rbac.istio.io/v1alpha1
kind: ServiceRole
metadata: {name: viewer, namespace: foo}
spec:
  rules: [{services: ["*"], methods: ["GET"]}]
"""


def test_removed_rbac_api_is_an_error() -> None:
    text = "# leading comment\n" + SERVICE_ROLE
    [found] = findings(text, "TM-INST-015")
    assert found.severity is Severity.ERROR
    assert found.issue.resource == "ServiceRole/foo/viewer"
    assert found.issue.location is not None
    assert found.issue.location.line == line_of(text, "apiVersion")
    assert "Istio ignores it" in found.issue.message
    assert "`to.operation`" in found.issue.fix
    policy = SERVICE_ROLE.replace("rbac.istio.io/v1alpha1", "security.istio.io/v1").replace(
        "ServiceRole", "AuthorizationPolicy"
    )
    policy = policy.replace('rules: [{services: ["*"], methods: ["GET"]}]', "{}")
    assert findings(policy, "TM-INST-015") == []


DESTINATION_RULE = """apiVersion: networking.istio.io/%s
kind: DestinationRule
metadata: {name: httpbin, namespace: foo}
spec: {host: httpbin.foo.svc.cluster.local}
"""


def test_deprecated_networking_version() -> None:
    text = DESTINATION_RULE % "v1alpha3"
    [found] = findings(text, "TM-INST-016")
    assert (
        found.severity is Severity.INFO
        and found.issue.fix == "apiVersion: networking.istio.io/v1\n"
    )
    assert found.issue.location is not None and found.issue.location.field == "apiVersion"
    assert findings(DESTINATION_RULE % "v1", "TM-INST-016") == []
    assert findings(ENVOY_FILTER % "lua", "TM-INST-016") == []  # EnvoyFilter has no v1
