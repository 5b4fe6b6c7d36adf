"""Sidecar injection, proxy images and webhooks (TM-INST-011, 017…024): the situations the
istio_coverage inputs do not spell out, malformed objects, and install-derived evidence."""

from __future__ import annotations

from trustmesh.analyze.checks.control_plane import Image, selector_matches
from trustmesh.analyze.findings import Severity

from .util import findings


def namespace(name: str, labels: str = "{}") -> str:
    return f"---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {labels}}}\n"


def pod(name: str, ns: str, containers: str, labels: str = "{}", extra: str = "") -> str:
    return (
        f"---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, "
        f"labels: {labels}}}\nspec:\n  containers: {containers}\n{extra}"
    )


RUNNING = "status: {phase: Running}\n"


def test_label_selectors_follow_kubernetes() -> None:
    labels = {"istio.io/rev": "canary", "app": "a"}
    assert selector_matches(None, labels) and selector_matches({}, labels)
    expr = {"matchExpressions": [{"key": "istio-injection", "operator": "DoesNotExist"}]}
    assert selector_matches(expr, labels)
    not_in = {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["a"]}]}
    assert not selector_matches(not_in, labels)
    odd = {"matchExpressions": [{"key": "app", "operator": "Sometimes"}]}
    assert not selector_matches(odd, labels)  # an unknown operator never matches
    assert not selector_matches("app=a", labels)


def test_image_references_compare_by_repository_and_release() -> None:
    assert Image.parse("istio/proxyv2:1.24.2") == Image.parse("docker.io/istio/proxyv2:1.24.2")
    assert Image.parse("proxyv2:1.2").repository == "docker.io/library/proxyv2"
    local = Image.parse("localhost:5000/istio/proxyv2:1.24.2-distroless")
    assert (local.repository, local.release) == ("localhost:5000/istio/proxyv2", "1.24.2")
    assert Image.parse("gcr.io/istio/proxyv2@sha256:abc").tag == ""


def test_pod_manifests_are_not_missing_a_proxy_only_running_pods() -> None:
    text = namespace("shop", "{istio-injection: enabled}")
    text += pod("manifest", "shop", "[{name: app, image: app:1}]")
    text += pod("running", "shop", "[{name: app, image: app:1}]", extra=RUNNING)
    text += pod("job-done", "shop", "[{name: app, image: a}]", extra="status: {phase: Succeeded}\n")
    found = findings(text, "TM-INST-019", base=False)
    assert [f.issue.resource for f in found] == ["Pod/shop/running"]


def test_running_pod_selected_by_an_injection_webhook_in_the_inputs() -> None:
    hook = """---
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {name: istio-sidecar-injector}
webhooks:
- name: object.sidecar-injector.istio.io
  clientConfig: {service: {name: istiod, namespace: istio-system}}
  objectSelector: {matchLabels: {mesh: "yes"}}
"""
    text = hook + namespace("plain")
    text += pod("opted-in", "plain", "[{name: app, image: a}]", "{mesh: 'yes'}", RUNNING)
    text += pod("other", "plain", "[{name: app, image: a}]", "{}", RUNNING)
    found = findings(text, "TM-INST-019", base=False)
    assert [f.issue.resource for f in found] == ["Pod/plain/opted-in"]
    assert "webhook istio-sidecar-injector/object.sidecar-injector.istio.io" in (
        found[0].issue.message
    )


def test_revision_evidence_from_an_istio_operator() -> None:
    iop = """---
apiVersion: install.istio.io/v1alpha1
kind: IstioOperator
metadata: {name: control-plane, namespace: istio-system}
spec: {revision: "1-24"}
"""
    text = iop + namespace("a", "{istio.io/rev: 1-24}") + namespace("b", "{istio.io/rev: 1-23}")
    found = findings(text, "TM-INST-020", base=False)
    assert [f.issue.resource for f in found] == ["Namespace//b"]
    assert "installed: 1-24" in found[0].issue.message
    # no evidence of any installed revision: nothing is claimed
    assert findings(namespace("b", "{istio.io/rev: 1-23}"), "TM-INST-020", base=False) == []


def test_proxy_release_compared_with_the_install_tag_or_istio_version() -> None:
    text = namespace("shop", "{istio-injection: enabled}")
    text += pod(
        "old",
        "shop",
        "[{name: app, image: a}, {name: istio-proxy, image: docker.io/istio/proxyv2:1.22.1}]",
        extra=RUNNING,
    )
    helm = "---\nglobal: {hub: docker.io/istio, tag: 1.24.2}\n"
    [found] = findings(text + helm, "TM-INST-021", base=False)
    assert "docker.io/istio/proxyv2:1.24.2" in found.issue.message
    [by_version] = findings(text, "TM-INST-021", base=False, version="1.24.2")
    assert "release 1.24.2" in by_version.issue.message
    assert findings(text, "TM-INST-021", base=False, version="1.22.1") == []
    assert findings(text, "TM-INST-021", base=False) == []  # nothing to compare with


def test_uid_1337_skipped_only_where_injection_is_ruled_out() -> None:
    container = "[{name: app, image: a, securityContext: {runAsUser: 1337}}]"
    text = namespace("meshed", "{istio-injection: enabled}") + namespace(
        "optout", "{istio-injection: disabled}"
    )
    text += pod("in-mesh", "meshed", container)
    text += pod("outside", "optout", container)
    text += pod("host", "meshed", container, extra="  hostNetwork: true\n")
    text += pod("unknown-ns", "elsewhere", container)
    found = {f.issue.resource: f for f in findings(text, "TM-INST-011", base=False)}
    assert set(found) == {"Pod/meshed/in-mesh", "Pod/elsewhere/unknown-ns"}
    assert found["Pod/meshed/in-mesh"].severity is Severity.WARNING
    assert found["Pod/elsewhere/unknown-ns"].severity is Severity.INFO
    assert "once it is injected" in found["Pod/elsewhere/unknown-ns"].issue.message


def test_namespace_label_findings_skip_system_and_ambient_and_escalate_with_policies() -> None:
    policy = """---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: plain}
spec: {}
"""
    deployment = """---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: plain}
spec:
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: web, image: web:1}]}
"""
    text = namespace("kube-system") + namespace("istio-system") + namespace("plain")
    text += namespace("amb", "{istio.io/dataplane-mode: ambient}") + policy + deployment
    [found] = findings(text, "TM-INST-017", base=False)
    assert found.issue.resource == "Namespace//plain"
    assert found.severity is Severity.WARNING
    assert "AuthorizationPolicy deny-all" in found.issue.message


def test_malformed_webhooks_and_injector_values_give_no_traceback() -> None:
    text = """---
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {name: istio-sidecar-injector}
webhooks: oops
---
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {name: istio-sidecar-injector-2}
webhooks:
- just-a-string
- name: ns.sidecar-injector.istio.io
  namespaceSelector: [not, a, selector]
  clientConfig: {url: "http://plain.example.com/inject"}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: istio-sidecar-injector, namespace: istio-system}
data: {values: "{not json: ["}
"""
    text += namespace("shop", "{istio-injection: enabled}")
    text += pod("p", "shop", "[{name: istio-proxy, image: x:1}]", extra=RUNNING)
    for rule in ("TM-INST-017", "TM-INST-019", "TM-INST-020", "TM-INST-021", "TM-INST-023"):
        findings(text, rule, base=False)
    [target] = findings(text, "TM-INST-024", base=False)
    assert "not an https:// URL" in target.issue.message
    assert target.issue.location is not None
    assert target.issue.location.field == "webhooks[1].clientConfig.url"
