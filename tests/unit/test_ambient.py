"""Ambient mode: connections to workloads enrolled in ambient are decided as ztunnel does
(istiod's conversion of AuthorizationPolicy / PeerAuthentication, ztunnel's matching), and
what trustmesh cannot decide exactly is answered ``unsupported`` with the reason."""

from __future__ import annotations

from trustmesh.policy.decision import Verdict
from trustmesh.policy.request import Source
from trustmesh.policy.trace import render_trace

from .meshutil import compile_text, http, policy, tcp

# Namespace amb is ambient (istio.io/dataplane-mode); sidecar is injected; legacy is neither.
LAYOUT = """apiVersion: v1
kind: Namespace
metadata: {name: amb, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: side, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
"""


def app(name: str, ns: str, port: int | None = 8080, labels: str = "") -> str:
    ports = f", ports: [{{containerPort: {port}}}]" if port else ""
    text = f"""apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: {ns}}}
spec:
  template:
    metadata: {{labels: {{app: {name}{", " + labels if labels else ""}}}}}
    spec:
      serviceAccountName: {name}
      containers: [{{name: {name}{ports}}}]
---
"""
    if port:
        text += f"""apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {ns}}}
spec: {{selector: {{app: {name}}}, ports: [{{name: http, port: 8000, targetPort: {port}}}]}}
---
"""
    return text


WORKLOADS = (
    LAYOUT
    + app("httpbin", "amb")
    + app("curl", "amb", None)
    + app("other", "amb", None)
    + app("web", "side")
    + app("client", "side", None)
    + app("sleep", "legacy", None)
)


def mesh(extra: str = "", *, mesh_config: str = "", workloads: str = WORKLOADS):  # type: ignore[no-untyped-def]
    return compile_text(workloads + extra, base=False, mesh=mesh_config)


ALLOW_CURL = policy(
    "allow-curl",
    "amb",
    """
selector: {matchLabels: {app: httpbin}}
rules:
- from: [{source: {principals: [cluster.local/ns/amb/sa/curl]}}]
""",
)


def ask(m, src: str = "amb/curl", **kwargs: object):  # type: ignore[no-untyped-def]
    return http(m, "/get", src=src, dst="amb/httpbin", port=8080, **kwargs)  # type: ignore[arg-type]


def test_ztunnel_enforces_l4_policy_where_today_nothing_was_enforced() -> None:
    m = mesh(ALLOW_CURL)
    allowed = ask(m)
    assert (allowed.verdict, allowed.rule) == (Verdict.ALLOW, "ns[amb]-policy[allow-curl]-rule[0]")
    assert allowed.principal == "cluster.local/ns/amb/sa/curl"  # HBONE carries the identity
    denied = ask(m, src="amb/other")
    assert (denied.verdict, denied.status) == (Verdict.DENY, None)  # closed, no 403
    assert "ztunnel closes the connection" in denied.reason
    plain = ask(m, src="legacy/sleep")
    assert plain.verdict is Verdict.DENY and plain.principal is None


def test_allow_rules_with_http_attributes_are_dropped_at_ztunnel() -> None:
    allow_get = policy(
        "allow-get",
        "amb",
        """
selector: {matchLabels: {app: httpbin}}
rules:
- from: [{source: {principals: [cluster.local/ns/amb/sa/curl]}}]
  to: [{operation: {methods: [GET]}}]
""",
    )
    d = ask(mesh(allow_get), method="GET")
    # Istio's docs: the identity is right, yet the L7 rule makes ztunnel deny (curl exit 56).
    assert (d.verdict, d.rule) == (Verdict.DENY, None)
    assert any("dropped by ztunnel" in step for step in render_trace(d.trace))


def test_deny_rules_lose_their_http_attributes() -> None:
    only_l7 = policy(
        "deny-post",
        "amb",
        """
selector: {matchLabels: {app: httpbin}}
action: DENY
rules:
- to: [{operation: {methods: [POST]}}]
""",
    )
    # Nothing left to match: the DENY protects nothing (a sidecar would have refused POST).
    post = ask(mesh(only_l7), method="POST")
    assert post.verdict is Verdict.ALLOW
    with_port = policy(
        "deny-post-8080",
        "amb",
        """
selector: {matchLabels: {app: httpbin}}
action: DENY
rules:
- to: [{operation: {methods: [POST], ports: ["8080"]}}]
""",
    )
    # The port is kept, the method dropped: every connection to 8080 is denied, GET too.
    get = ask(mesh(with_port), method="GET")
    assert (get.verdict, get.rule) == (Verdict.DENY, "ns[amb]-policy[deny-post-8080]-rule[0]")
    header = policy(
        "deny-header",
        "amb",
        """
selector: {matchLabels: {app: httpbin}}
action: DENY
rules:
- from: [{source: {namespaces: [amb]}}]
  when: [{key: "request.headers[x-evil]", values: ["1"]}]
""",
    )
    assert ask(mesh(header), headers=(("x-evil", "1"),)).verdict is Verdict.ALLOW


def test_l4_when_conditions_and_service_accounts_match_at_ztunnel() -> None:
    deny_other = policy(
        "deny-other",
        "amb",
        """
selector: {matchLabels: {app: httpbin}}
action: DENY
rules:
- from: [{source: {serviceAccounts: [other]}}]
- when: [{key: source.namespace, values: [legacy]}]
""",
    )
    m = mesh(deny_other)
    assert ask(m, src="amb/other").rule == "ns[amb]-policy[deny-other]-rule[0]"
    assert ask(m, src="amb/curl").verdict is Verdict.ALLOW
    # A plaintext client has no namespace: the condition does not match it.
    assert ask(m, src="legacy/sleep").verdict is Verdict.ALLOW
    peer = ask(m, source=Source.principal("cluster.local/ns/legacy/sa/x"))
    assert peer.rule == "ns[amb]-policy[deny-other]-rule[1]"


def test_peer_authentication_at_ztunnel() -> None:
    strict = policy("default", "istio-system", "mtls: {mode: STRICT}", kind="PeerAuthentication")
    m = mesh(strict)
    plain = ask(m, src="legacy/sleep")
    assert plain.verdict is Verdict.RESET and "STRICT" in plain.reason
    assert ask(m).verdict is Verdict.ALLOW  # ambient peers always speak mTLS (HBONE)
    # DISABLE means nothing with HBONE: ztunnel treats it as PERMISSIVE.
    disable = policy(
        "no-mtls",
        "amb",
        "selector: {matchLabels: {app: httpbin}}\nmtls: {mode: DISABLE}",
        kind="PeerAuthentication",
    )
    m = mesh(strict + disable)
    assert ask(m, src="legacy/sleep").verdict is Verdict.ALLOW
    assert ask(m).principal == "cluster.local/ns/amb/sa/curl"
    port_level = policy(
        "ports",
        "amb",
        """
selector: {matchLabels: {app: httpbin}}
mtls: {mode: STRICT}
portLevelMtls: {"8080": {mode: PERMISSIVE}}
""",
        kind="PeerAuthentication",
    )
    m = mesh(port_level)
    assert ask(m, src="legacy/sleep").verdict is Verdict.ALLOW
    assert tcp(m, 9090, src="legacy/sleep", dst="amb/httpbin").verdict is Verdict.RESET


def test_principals_are_not_expanded_to_trust_domain_aliases_at_ztunnel() -> None:
    allow = policy(
        "allow-old",
        "amb",
        """
selector: {matchLabels: {app: httpbin}}
rules:
- from: [{source: {principals: [cluster.local/ns/amb/sa/curl]}}]
""",
    )
    m = mesh(allow, mesh_config="trustDomain: new-td\ntrustDomainAliases: [cluster.local]\n")
    # A sidecar expands cluster.local to every bundle domain; istiod sends ztunnel the
    # principal as written, so the peer new-td/ns/amb/sa/curl does not match it.
    assert ask(m).verdict is Verdict.DENY


def test_what_ztunnel_does_not_enforce_is_said_not_silently_skipped() -> None:
    custom = policy(
        "ext",
        "amb",
        """
selector: {matchLabels: {app: httpbin}}
action: CUSTOM
provider: {name: opa}
rules: [{}]
""",
    )
    dry = policy(
        "dry-deny",
        "amb",
        "selector: {matchLabels: {app: httpbin}}\naction: DENY\nrules: [{}]",
        extra_meta='  annotations: {"istio.io/dry-run": "true"}\n',
    )
    d = ask(mesh(custom + dry, mesh_config="extensionProviders: [{name: opa}]\n"))
    assert d.verdict is Verdict.ALLOW and d.dry_run == ()
    assert any("does not support the CUSTOM action" in step for step in render_trace(d.trace))
    assert any("dry-run policies are not sent to ztunnel" in step for step in render_trace(d.trace))


def test_a_waypoint_in_the_path_is_unsupported_not_guessed() -> None:
    workloads = WORKLOADS.replace(
        "metadata: {name: httpbin, namespace: amb}\nspec: {selector",
        "metadata: {name: httpbin, namespace: amb, labels: {istio.io/use-waypoint: wp}}\n"
        "spec: {selector",
    )
    d = ask(mesh(ALLOW_CURL, workloads=workloads))
    assert d.verdict is Verdict.UNSUPPORTED
    assert d.reason.startswith("unsupported: ambient:") and "waypoint wp" in d.reason


def test_between_ambient_and_sidecars() -> None:
    m = mesh()
    # Sidecar client → ambient pod: HBONE with the sidecar's identity.
    to_ambient = ask(m, src="side/client")
    assert to_ambient.principal == "cluster.local/ns/side/sa/client"
    # Ambient client → sidecar: depends on the sidecar's HBONE support the input does not show.
    d = http(m, "/get", src="amb/curl", dst="side/web", port=8080)
    assert d.verdict is Verdict.UNSUPPORTED and "networking.istio.io/tunnel" in d.reason
    hbone = mesh(mesh_config="defaultConfig: {proxyMetadata: {ISTIO_META_ENABLE_HBONE: 'true'}}\n")
    d = http(hbone, "/get", src="amb/curl", dst="side/web", port=8080)
    assert (d.verdict, d.principal) == (Verdict.ALLOW, "cluster.local/ns/amb/sa/curl")
    # A DestinationRule on the sidecar client is not combined with HBONE here.
    rule = """apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: httpbin, namespace: side}
spec: {host: httpbin.amb.svc.cluster.local, trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}}
"""
    assert ask(mesh(rule), src="side/client").verdict is Verdict.UNSUPPORTED


def test_ambient_egress_is_not_controlled_by_outbound_traffic_policy() -> None:
    from trustmesh.policy.evaluate import evaluate
    from trustmesh.policy.request import HttpRequest, Request

    from .meshutil import NOW

    m = mesh(mesh_config="outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n")
    question = Request(Source.workload("amb/curl"), "", 80, HttpRequest(), "example.com")
    d = evaluate(m, question, now=NOW)
    assert d.verdict is Verdict.ALLOW and "ztunnel does not apply" in d.reason
    sidecar = Request(Source.workload("side/client"), "", 80, HttpRequest(), "example.com")
    assert evaluate(m, sidecar, now=NOW).verdict is Verdict.RESET  # no HTTP listener on 80


def test_the_local_runtime_refuses_ambient_pods_it_cannot_enforce() -> None:
    from trustmesh.runtime.plan import plan_mesh

    plan, problems = plan_mesh(mesh().snapshot)
    assert plan is None
    ambient = {p.message.split(" ", 1)[0] for p in problems if p.code == "ambient-not-run"}
    assert ambient == {"amb/httpbin", "amb/curl", "amb/other"}
