"""Client TLS is decided once (policy.upstream_tls.upstream_tls): the evaluator's verdict and the
sidecar's Envoy cluster read the same value, so SNI, mode and the deciding rule agree."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.meshutil import compile_text, http, policy
from trustmesh.policy.compose import MeshPolicy
from trustmesh.policy.decision import Verdict
from trustmesh.policy.trace import render_trace
from trustmesh.policy.upstream_tls import UpstreamMode, upstream_tls
from trustmesh.xds.translate import translate

HTTPBIN = "httpbin.foo.svc.cluster.local"
CLUSTER = f"outbound|8000||{HTTPBIN}"


def rule(tls: str) -> str:
    return f"""apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: httpbin-tls, namespace: foo}}
spec:
  host: httpbin
  trafficPolicy:
    tls: {tls}
---
"""


def sni_only(sni: str) -> str:
    return policy(
        "by-sni",
        "foo",
        f"""selector: {{matchLabels: {{app: httpbin}}}}
rules:
- when: [{{key: connection.sni, values: ["{sni}"]}}]""",
    )


def sleep_cluster(mesh: MeshPolicy) -> dict[str, Any]:
    resources = translate(
        mesh, "foo/sleep", inbound_address="127.0.0.50", outbound_address="127.0.0.51"
    )
    (found,) = [c for c in resources.clusters if c["name"] == CLUSTER]
    return found


def sent_sni(cluster: dict[str, Any]) -> str:
    if "transport_socket" in cluster:
        return str(cluster["transport_socket"]["typed_config"]["sni"])
    (mesh,) = [m for m in cluster["transport_socket_matches"] if m["name"] == "tlsMode-istio"]
    return str(mesh["transport_socket"]["typed_config"]["sni"])


def test_a_rules_istio_mutual_sni_is_what_the_evaluator_and_envoy_send() -> None:
    """``tls.sni`` overrides the mesh SNI at the cluster; connection.sni sees it offline
    too (the evaluator used to assume the mesh SNI)."""
    mesh = compile_text(
        rule("{mode: ISTIO_MUTUAL, sni: custom.example}") + sni_only("custom.example")
    )
    assert sent_sni(sleep_cluster(mesh)) == "custom.example"
    decision = http(mesh)
    assert decision.verdict is Verdict.ALLOW, render_trace(decision.trace)
    assert any(
        "DestinationRule foo/httpbin-tls tls ISTIO_MUTUAL: mesh mTLS as" in s
        for s in render_trace(decision.trace)
    )
    other = compile_text(rule("{mode: ISTIO_MUTUAL}") + sni_only("custom.example"))
    assert sent_sni(sleep_cluster(other)) == f"outbound_.8000_._.{HTTPBIN}"
    assert http(other).verdict is Verdict.DENY


@pytest.mark.parametrize(
    ("tls", "mode", "socket", "verdict", "says"),
    [
        ("", UpstreamMode.AUTO, "matches", Verdict.ALLOW, "auto mTLS: destination has a sidecar"),
        (
            "{mode: DISABLE}",
            UpstreamMode.PLAINTEXT,
            None,
            Verdict.ALLOW,
            "DestinationRule foo/httpbin-tls tls DISABLE: plaintext",
        ),
        (
            "{mode: SIMPLE}",
            UpstreamMode.SIMPLE,
            "socket",
            Verdict.RESET,
            "DestinationRule foo/httpbin-tls tls SIMPLE originates TLS a sidecar does not"
            " terminate: connection reset",
        ),
    ],
)
def test_the_cluster_and_the_verdict_follow_one_decision(
    tls: str, mode: UpstreamMode, socket: str | None, verdict: Verdict, says: str
) -> None:
    mesh = compile_text(rule(tls) if tls else "")
    (service,) = [s for s in mesh.snapshot.services if s.hostname == HTTPBIN]
    decided = upstream_tls(mesh, "foo", service, 8000)
    assert decided.mode is mode
    if tls:
        assert decided.rule == "foo/httpbin-tls"
        assert decided.location is not None and decided.location.line > 0
        assert decided.location.field == "spec.trafficPolicy.tls"
    cluster = sleep_cluster(mesh)
    found = (
        "socket"
        if "transport_socket" in cluster
        else "matches"
        if "transport_socket_matches" in cluster
        else None
    )
    assert found == socket
    decision = http(mesh)
    assert decision.verdict is verdict
    assert any(says in step for step in render_trace(decision.trace)), render_trace(decision.trace)


def test_a_rule_not_exported_to_the_clients_namespace_does_not_apply() -> None:
    """``exportTo: ["."]`` on a rule in httpbin's namespace: foo's own clients follow it
    (DISABLE, plaintext), bar's do not (auto mTLS) — in their clusters and offline."""
    text = rule("{mode: DISABLE}").replace(
        "spec:\n  host: httpbin\n", "spec:\n  host: httpbin\n  exportTo: [.]\n"
    )
    mesh = compile_text(text)
    (service,) = [s for s in mesh.snapshot.services if s.hostname == HTTPBIN]
    assert upstream_tls(mesh, "foo", service, 8000).mode is UpstreamMode.PLAINTEXT
    assert upstream_tls(mesh, "bar", service, 8000).mode is UpstreamMode.AUTO
    assert "transport_socket_matches" not in sleep_cluster(mesh)
    bar = translate(mesh, "bar/sleep", inbound_address="127.0.0.50", outbound_address="127.0.0.51")
    (cluster,) = [c for c in bar.clusters if c["name"] == CLUSTER]
    assert sent_sni(cluster) == f"outbound_.8000_._.{HTTPBIN}"
    plain = "DestinationRule foo/httpbin-tls tls DISABLE: plaintext"
    assert any(plain in step for step in render_trace(http(mesh).trace))
    assert not any(plain in step for step in render_trace(http(mesh, src="bar/sleep").trace))
    assert any(
        "auto mTLS: destination has a sidecar" in s
        for s in render_trace(http(mesh, src="bar/sleep").trace)
    )


def test_a_proxy_sees_every_rule_of_its_own_namespace_whatever_its_export_to() -> None:
    """istiod: a namespace's own DestinationRules always apply to its proxies; exportTo
    decides for the other namespaces."""
    text = rule("{mode: DISABLE}").replace(
        "spec:\n  host: httpbin\n", "spec:\n  host: httpbin\n  exportTo: [bar]\n"
    )
    mesh = compile_text(text)
    (service,) = [s for s in mesh.snapshot.services if s.hostname == HTTPBIN]
    modes = {ns: upstream_tls(mesh, ns, service, 8000).mode for ns in ("foo", "bar", "legacy")}
    assert modes == {
        "foo": UpstreamMode.PLAINTEXT,
        "bar": UpstreamMode.PLAINTEXT,
        "legacy": UpstreamMode.AUTO,
    }
