"""mTLS and identity checks (TM-MTLS-001 … 007): each trigger next to its false-positive guard.

Base layout (tests/analyze/util.py): foo and bar have sidecars (httpbin:8000, sleep; tcp-echo
9000-9002 in foo), legacy has none, istio-system is the root namespace.
"""

from __future__ import annotations

import yaml

from trustmesh.analyze.findings import Finding, Severity

from .util import findings


def pa(
    name: str,
    namespace: str,
    mode: str | None = "STRICT",
    selector: str = "",
    ports: str = "",
) -> str:
    """A PeerAuthentication document; ``selector`` / ``ports`` are inline YAML maps."""
    lines = [
        "apiVersion: security.istio.io/v1",
        "kind: PeerAuthentication",
        f"metadata: {{name: {name}, namespace: {namespace}}}",
        "spec:",
    ]
    if selector:
        lines.append(f"  selector: {{matchLabels: {selector}}}")
    if mode:
        lines.append(f"  mtls: {{mode: {mode}}}")
    if ports:
        lines.append("  portLevelMtls:")
        lines += [f"    {p}" for p in ports.split(";")]
    if len(lines) == 4:
        lines[-1] = "spec: {}"
    return "\n".join(lines) + "\n---\n"


def dr(name: str, namespace: str, host: str, tls: str, *, extra: str = "") -> str:
    """A DestinationRule with ``tls`` (inline YAML) as its top-level TLS setting."""
    return (
        f"apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\n"
        f"spec:\n  host: {host}\n{extra}  trafficPolicy:\n    tls: {tls}\n---\n"
    )


def line_of(text: str, needle: str) -> int:
    """1-based line of ``needle`` in ``text`` (the config is the file config.yaml)."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def one(text: str, rule: str, **kwargs: object) -> Finding:
    found = findings(text, rule, **kwargs)
    assert len(found) == 1, [f.issue.message for f in found]
    return found[0]


SIDECARS = ("bar/httpbin", "bar/sleep", "foo/httpbin", "foo/sleep", "foo/tcp-echo")


# --- TM-MTLS-001: no mesh-wide STRICT ----------------------------------------------------------


def test_001_no_mesh_policy_names_sidecar_ports_not_legacy() -> None:
    f = one("", "TM-MTLS-001")
    assert f.issue.workloads == SIDECARS  # legacy has no sidecar: nothing enforced there
    assert f.issue.location is None and f.issue.resource == ""
    assert "foo/httpbin:8000" in f.issue.message and "foo/tcp-echo:9000" in f.issue.message
    assert "legacy/" not in f.issue.message
    (fix,) = [d for d in yaml.safe_load_all(f.issue.fix) if d]
    assert fix["metadata"] == {"name": "default", "namespace": "istio-system"}
    assert fix["spec"] == {"mtls": {"mode": "STRICT"}}
    assert "legacy/sleep" in f.issue.fix  # the plaintext clients STRICT would refuse
    assert f.rule.fixable


def test_001_applying_the_fix_clears_it() -> None:
    fix = one("", "TM-MTLS-001").issue.fix
    assert findings(fix, "TM-MTLS-001") == []
    assert findings(fix, "TM-MTLS-002") == []


def test_001_explicit_permissive_mesh_policy_is_located() -> None:
    text = pa("mesh", "istio-system", "PERMISSIVE")
    f = one(text, "TM-MTLS-001")
    assert f.issue.resource == "PeerAuthentication/istio-system/mesh"
    assert f.issue.location is not None
    assert f.issue.location.field == "spec.mtls.mode"
    assert f.issue.location.line == line_of(text, "mtls:")
    (fix,) = [d for d in yaml.safe_load_all(f.issue.fix) if d]
    assert fix["metadata"]["name"] == "mesh"  # replaces the policy in place


def test_001_mesh_strict_is_clean() -> None:
    assert findings(pa("default", "istio-system"), "TM-MTLS-001") == []


def test_001_every_sidecar_namespace_strict_is_clean() -> None:
    # No mesh-wide policy, but foo and bar (the only sidecar namespaces) are STRICT.
    assert findings(pa("default", "foo") + pa("default", "bar"), "TM-MTLS-001") == []


def test_001_only_the_namespace_left_permissive_is_named() -> None:
    f = one(pa("default", "foo"), "TM-MTLS-001")
    assert f.issue.workloads == ("bar/httpbin", "bar/sleep")


def test_001_root_namespace_selector_policy_is_ignored() -> None:
    # Istio ignores a selector policy in the root namespace: foo/httpbin stays PERMISSIVE.
    text = pa("default", "foo") + pa("default", "bar")
    text += pa("httpbin", "istio-system", "PERMISSIVE", selector="{app: httpbin}")
    assert findings(text, "TM-MTLS-001") == []
    text = pa("httpbin", "istio-system", selector="{app: httpbin}")
    assert "foo/httpbin" in one(text, "TM-MTLS-001").issue.workloads


def test_001_leaves_downgrades_to_002() -> None:
    text = pa("default", "foo") + pa("default", "bar")
    text += pa("echo", "foo", selector="{app: tcp-echo}", ports="9001: {mode: PERMISSIVE}")
    assert findings(text, "TM-MTLS-001") == []
    assert len(findings(text, "TM-MTLS-002")) == 1


# --- TM-MTLS-002: downgrades ---------------------------------------------------------------------


def test_002_port_level_disable_under_strict() -> None:
    # istio.io scenario 14: workload STRICT in bar + portLevelMtls 8000 DISABLE.
    text = pa("default", "istio-system")
    text += pa("httpbin", "bar", selector="{app: httpbin}", ports="8000: {mode: DISABLE}")
    f = one(text, "TM-MTLS-002")
    assert f.issue.workloads == ("bar/httpbin",)
    assert f.issue.resource == "PeerAuthentication/bar/httpbin"
    assert f.issue.location is not None
    assert f.issue.location.field == "spec.portLevelMtls.8000.mode"
    assert f.issue.location.line == line_of(text, "8000: {mode: DISABLE}")
    assert "bar/httpbin:8000" in f.issue.message and "only plaintext" in f.issue.message
    (fix,) = [d for d in yaml.safe_load_all(f.issue.fix) if d]
    assert fix["spec"]["portLevelMtls"] == {8000: {"mode": "STRICT"}}
    assert fix["spec"]["selector"] == {"matchLabels": {"app": "httpbin"}}


def test_002_namespace_permissive_under_mesh_strict() -> None:
    text = pa("default", "istio-system") + pa("relaxed", "bar", "PERMISSIVE")
    f = one(text, "TM-MTLS-002")
    assert f.issue.workloads == ("bar/httpbin", "bar/sleep")
    assert f.issue.location is not None
    assert f.issue.location.field == "spec.mtls.mode"
    assert f.issue.location.line == line_of(text, "mtls: {mode: PERMISSIVE}")
    assert "istio-system/default" in f.issue.message


def test_002_permissive_without_a_stricter_parent_is_not_a_downgrade() -> None:
    assert findings(pa("relaxed", "bar", "PERMISSIVE"), "TM-MTLS-002") == []


def test_002_root_namespace_selector_policy_is_ignored() -> None:
    text = pa("default", "istio-system")
    text += pa("httpbin", "istio-system", "PERMISSIVE", selector="{app: httpbin}")
    assert findings(text, "TM-MTLS-002") == []


def test_002_downgrade_fully_overridden_by_workload_policies_is_clean() -> None:
    # bar is PERMISSIVE, but a workload policy makes both bar workloads (version: v1) STRICT.
    text = pa("default", "istio-system") + pa("relaxed", "bar", "PERMISSIVE")
    text += pa("all", "bar", selector="{version: v1}")
    assert findings(text, "TM-MTLS-002") == []


def test_002_namespace_without_sidecars_is_clean() -> None:
    text = pa("default", "istio-system") + pa("relaxed", "legacy", "PERMISSIVE")
    assert findings(text, "TM-MTLS-002") == []


# --- TM-MTLS-003: DestinationRule TLS vs PeerAuthentication --------------------------------------


def test_003_disable_towards_strict_is_an_error() -> None:
    text = pa("default", "foo") + dr(
        "httpbin", "foo", "httpbin.foo.svc.cluster.local", "{mode: DISABLE}"
    )
    f = one(text, "TM-MTLS-003")
    assert f.severity is Severity.ERROR
    assert f.issue.workloads == ("foo/httpbin",)
    assert f.issue.location is not None
    assert f.issue.location.field == "spec.trafficPolicy.tls.mode"
    assert f.issue.location.line == line_of(text, "tls: {mode: DISABLE}")
    assert "connection reset" in f.issue.message and "foo/default" in f.issue.message


def test_003_disable_towards_permissive_sidecar_is_a_downgrade() -> None:
    text = dr("httpbin", "foo", "httpbin.foo.svc.cluster.local", "{mode: DISABLE}")
    f = one(text, "TM-MTLS-003")
    assert f.severity is Severity.WARNING
    assert f.issue.properties["conflict"] == "plaintext-to-sidecar"


def test_003_matching_settings_are_clean() -> None:
    text = dr("legacy", "legacy", "httpbin.legacy.svc.cluster.local", "{mode: DISABLE}")
    text += dr("foo", "foo", "httpbin.foo.svc.cluster.local", "{mode: ISTIO_MUTUAL}")
    assert findings(pa("default", "foo") + text, "TM-MTLS-003") == []


def test_003_istio_mutual_towards_a_pod_without_sidecar() -> None:
    text = dr("legacy", "legacy", "httpbin.legacy.svc.cluster.local", "{mode: ISTIO_MUTUAL}")
    f = one(text, "TM-MTLS-003")
    assert f.severity is Severity.ERROR and f.issue.workloads == ("legacy/httpbin",)
    assert "no sidecar" in f.issue.message


def test_003_port_level_istio_mutual_towards_disable_port() -> None:
    text = pa("httpbin", "bar", selector="{app: httpbin}", ports="8000: {mode: DISABLE}")
    text += (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        "metadata: {name: httpbin, namespace: bar}\n"
        "spec:\n  host: httpbin.bar.svc.cluster.local\n  trafficPolicy:\n"
        "    portLevelSettings:\n    - port: {number: 8000}\n      tls: {mode: ISTIO_MUTUAL}\n"
    )
    f = one(text, "TM-MTLS-003")
    assert f.issue.location is not None
    assert f.issue.location.field == "spec.trafficPolicy.portLevelSettings[0].tls.mode"
    assert f.issue.location.line == line_of(text, "tls: {mode: ISTIO_MUTUAL}")
    assert f.issue.properties["conflict"] == "mtls-to-disable"


def test_003_shadowed_rule_is_not_blamed() -> None:
    # Clients look in their namespace, then the service's, then the root: foo's rule wins
    # for every client, so the root rule never carries traffic to foo/httpbin.
    text = pa("default", "foo")
    text += dr("root", "istio-system", "httpbin.foo.svc.cluster.local", "{mode: DISABLE}")
    assert len(findings(text, "TM-MTLS-003")) == 1
    text += dr("foo", "foo", "httpbin.foo.svc.cluster.local", "{mode: ISTIO_MUTUAL}")
    assert findings(text, "TM-MTLS-003") == []


# --- TM-MTLS-004 / 005: SIMPLE / MUTUAL hygiene --------------------------------------------------

EXTERNAL = (
    "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n"
    "metadata: {name: api, namespace: foo}\n"
    "spec:\n  hosts: [api.example.com]\n  ports: [{number: 443, name: http, protocol: HTTP}]\n"
    "---\n"
)


def test_004_no_ca_on_old_istio_is_never_verified() -> None:
    text = EXTERNAL + dr("api", "foo", "api.example.com", "{mode: SIMPLE}")
    f = one(text, "TM-MTLS-004", version="1.20.4")
    assert f.severity is Severity.WARNING
    assert f.issue.workloads == SIDECARS  # exported everywhere: every sidecar client
    assert f.issue.location is not None
    assert f.issue.location.field == "spec.trafficPolicy.tls.caCertificates"
    assert f.issue.location.line == line_of(text, "tls: {mode: SIMPLE}")


def test_004_ca_given_or_new_istio_is_clean() -> None:
    with_ca = EXTERNAL + dr(
        "api", "foo", "api.example.com", "{mode: SIMPLE, caCertificates: /ca.pem}"
    )
    assert findings(with_ca, "TM-MTLS-004", version="1.20.4") == []
    text = EXTERNAL + dr("api", "foo", "api.example.com", "{mode: SIMPLE}")
    assert findings(text, "TM-MTLS-004", version="1.22.0") == []  # OS trust store


def test_004_unknown_version_is_info_and_compatibility_profile_counts() -> None:
    text = EXTERNAL + dr("api", "foo", "api.example.com", "{mode: SIMPLE}")
    assert one(text, "TM-MTLS-004").severity is Severity.INFO
    operator = (
        "apiVersion: install.istio.io/v1alpha1\nkind: IstioOperator\n"
        "metadata: {name: istio, namespace: istio-system}\n"
        'spec:\n  values:\n    compatibilityVersion: "1.20"\n---\n'
    )
    f = one(operator + text, "TM-MTLS-004", version="1.22.0")
    assert f.severity is Severity.WARNING and "compatibilityVersion 1.20" in f.issue.message


def test_004_insecure_skip_verify_on_any_version() -> None:
    tls = "{mode: SIMPLE, caCertificates: /ca.pem, insecureSkipVerify: true}"
    text = EXTERNAL + dr("api", "foo", "api.example.com", tls, extra="  exportTo: [.]\n")
    f = one(text, "TM-MTLS-004", version="1.24.0")
    assert f.issue.location is not None
    assert f.issue.location.field == "spec.trafficPolicy.tls.insecureSkipVerify"
    assert f.issue.workloads == ("foo/httpbin", "foo/sleep", "foo/tcp-echo")  # exportTo: .


def test_005_sni_without_subject_alt_names() -> None:
    tls = "{mode: SIMPLE, caCertificates: /ca.pem, sni: api.example.com}"
    text = EXTERNAL + dr("api", "foo", "api.example.com", tls)
    f = one(text, "TM-MTLS-005", version="1.24.0")
    assert f.severity is Severity.WARNING
    assert f.issue.location is not None
    assert f.issue.location.field == "spec.trafficPolicy.tls.subjectAltNames"
    assert "foo/sleep" in f.issue.workloads


def test_005_subject_alt_names_are_clean() -> None:
    tls = (
        "{mode: SIMPLE, caCertificates: /ca.pem, sni: api.example.com,"
        " subjectAltNames: [api.example.com]}"
    )
    text = EXTERNAL + dr("api", "foo", "api.example.com", tls)
    assert findings(text, "TM-MTLS-005", version="1.24.0") == []


def test_005_auto_san_covers_http_only() -> None:
    tls = "{mode: SIMPLE, caCertificates: /ca.pem}"
    text = EXTERNAL + dr("api", "foo", "api.example.com", tls)
    assert findings(text, "TM-MTLS-005", version="1.24.0") == []  # HTTP: auto SNI + SAN check
    assert one(text, "TM-MTLS-005", version="1.20.0").severity is Severity.WARNING
    tcp = EXTERNAL.replace(
        "{number: 443, name: http, protocol: HTTP}", "{number: 5432, name: pg, protocol: TCP}"
    )
    f = one(tcp + dr("api", "foo", "api.example.com", tls), "TM-MTLS-005", version="1.24.0")
    assert f.severity is Severity.INFO and "5432" in f.issue.message


def test_005_unverified_server_is_left_to_004() -> None:
    tls = "{mode: SIMPLE, insecureSkipVerify: true}"
    assert findings(EXTERNAL + dr("api", "foo", "api.example.com", tls), "TM-MTLS-005") == []


# --- TM-MTLS-006: identity fields where plaintext is accepted -------------------------------------


def authz(name: str, action: str, rules: str, *, selector: str = "{app: httpbin}") -> str:
    return (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        f"metadata: {{name: {name}, namespace: foo}}\n"
        f"spec:\n  selector: {{matchLabels: {selector}}}\n  action: {action}\n"
        f"  rules:\n{rules}---\n"
    )


DENY_LEGACY = authz("deny-legacy", "DENY", "  - from:\n    - source: {namespaces: [legacy]}\n")


def test_006_deny_on_namespace_is_bypassed_by_plaintext() -> None:
    f = one(DENY_LEGACY, "TM-MTLS-006")
    assert f.issue.workloads == ("foo/httpbin",)
    assert f.issue.location is not None
    assert f.issue.location.field == "spec.rules[0].from[0].source.namespaces"
    assert f.issue.location.line == line_of(DENY_LEGACY, "namespaces: [legacy]")
    # Proven with the evaluator: legacy/sleep has no sidecar and is not denied.
    assert "legacy/sleep → foo/httpbin:8000 GET / is allowed" in f.issue.message


def test_006_strict_workload_is_clean() -> None:
    assert findings(pa("default", "foo") + DENY_LEGACY, "TM-MTLS-006") == []


def test_006_dry_run_deny_is_not_enforced() -> None:
    dry = DENY_LEGACY.replace(
        "namespace: foo}", "namespace: foo, annotations: {istio.io/dry-run: 'true'}}"
    )
    assert findings(dry, "TM-MTLS-006") == []


def test_006_plaintext_already_denied_is_clean() -> None:
    # An ALLOW that needs a principal fails closed for plaintext: the DENY loses nothing.
    allow = authz(
        "allow-sleep",
        "ALLOW",
        "  - from:\n    - source: {principals: [cluster.local/ns/foo/sa/sleep]}\n",
    )
    assert findings(DENY_LEGACY + allow, "TM-MTLS-006") == []
    # Istio's recipe to refuse plaintext under PERMISSIVE: DENY notPrincipals ["*"].
    no_plain = authz("no-plaintext", "DENY", '  - from:\n    - source: {notPrincipals: ["*"]}\n')
    assert findings(DENY_LEGACY + no_plain, "TM-MTLS-006") == []


def test_006_allow_with_not_namespaces_admits_plaintext() -> None:
    text = authz("not-legacy", "ALLOW", "  - from:\n    - source: {notNamespaces: [legacy]}\n")
    f = one(text, "TM-MTLS-006")
    assert f.issue.location is not None
    assert f.issue.location.field == "spec.rules[0].from[0].source.notNamespaces"
    assert "allowed by ns[foo]-policy[not-legacy]-rule[0]" in f.issue.message


def test_006_allow_with_positive_identity_fails_closed() -> None:
    text = authz(
        "mixed",
        "ALLOW",
        "  - from:\n    - source:\n        namespaces: [foo]\n"
        "        notPrincipals: [cluster.local/ns/foo/sa/x]\n",
    )
    assert findings(text, "TM-MTLS-006") == []


def test_006_port_level_modes_decide() -> None:
    # tcp-echo is STRICT except port 9001: a DENY limited to 9000 is enforced on mTLS only.
    strict = pa("echo", "foo", selector="{app: tcp-echo}", ports="9001: {mode: PERMISSIVE}")
    rule_on = (
        "  - from:\n    - source: {{principals: [cluster.local/ns/bar/sa/sleep]}}\n"
        "    to:\n    - operation: {{ports: ['{}']}}\n"
    )
    on_9000 = authz("deny-9000", "DENY", rule_on.format(9000), selector="{app: tcp-echo}")
    assert findings(strict + on_9000, "TM-MTLS-006") == []
    on_9001 = authz("deny-9001", "DENY", rule_on.format(9001), selector="{app: tcp-echo}")
    f = one(strict + on_9001, "TM-MTLS-006")
    assert "foo/tcp-echo:9001" in f.issue.message and "9000" not in f.issue.message


# --- TM-MTLS-007: reliance on auto mTLS ----------------------------------------------------


def test_007_auto_mtls_default_is_info_on_sidecar_services() -> None:
    f = one("", "TM-MTLS-007")
    assert f.severity is Severity.INFO
    assert f.issue.workloads == ("bar/httpbin", "foo/httpbin", "foo/tcp-echo")  # not legacy
    assert f.issue.location is None


def test_007_explicit_setting_is_located() -> None:
    f = one("", "TM-MTLS-007", mesh="enableAutoMtls: true\n")
    assert f.issue.location is not None
    assert (f.issue.location.file, f.issue.location.line) == ("mesh.yaml", 1)
    assert f.issue.location.field == "enableAutoMtls"


def test_007_applying_the_fix_clears_it_without_conflicts() -> None:
    fix = one("", "TM-MTLS-007").issue.fix
    kinds = {d["kind"] for d in yaml.safe_load_all(fix) if d}
    assert kinds == {"DestinationRule"}
    assert findings(fix, "TM-MTLS-007") == []
    assert findings(fix, "TM-MTLS-003") == []  # never ISTIO_MUTUAL towards legacy


def test_007_auto_mtls_off_sends_plaintext_between_sidecars() -> None:
    found = findings(pa("default", "foo"), "TM-MTLS-007", mesh="enableAutoMtls: false\n")
    by_severity = {f.severity: f for f in found}
    assert set(by_severity) == {Severity.ERROR, Severity.WARNING}
    assert by_severity[Severity.ERROR].issue.workloads == ("foo/httpbin", "foo/tcp-echo")
    assert by_severity[Severity.WARNING].issue.workloads == ("bar/httpbin",)


def test_007_fix_leaves_out_services_istio_mutual_would_break() -> None:
    # bar/httpbin:8000 is DISABLE; foo/httpbin gains an endpoint without a sidecar.
    text = pa("httpbin", "bar", selector="{app: httpbin}", ports="8000: {mode: DISABLE}")
    text += (
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: httpbin-plain, namespace: foo}\n"
        "spec:\n  template:\n    metadata:\n"
        "      labels: {app: httpbin, sidecar.istio.io/inject: 'false'}\n"
        "    spec:\n      containers:\n      - name: httpbin\n"
        "        ports: [{containerPort: 8000}]\n---\n"
    )
    fix = one(text, "TM-MTLS-007").issue.fix
    hosts = {d["spec"]["host"] for d in yaml.safe_load_all(fix) if d}
    assert hosts == {"tcp-echo.foo.svc.cluster.local"}
    assert "Left out" in fix and "httpbin.foo.svc.cluster.local" in fix
    assert findings(text + fix, "TM-MTLS-003") == []
