"""Workloads, sidecars and mesh config as Istio resolves them before any policy."""

from __future__ import annotations

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.api.loader import load_sources
from trustmesh.api.snapshot import build_snapshot
from trustmesh.api.yamldoc import parse_yaml

# The oracle parses with the engine the loader uses (libyaml; pure PyYAML differs on tabs).
_LIBYAML = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

NS = """apiVersion: v1
kind: Namespace
metadata: {name: %s, labels: {%s}}
---
"""


def snapshot(text: str, mesh: str = ""):  # type: ignore[no-untyped-def]
    loaded = load_sources([("in.yaml", text.encode())])
    assert not loaded.errors, loaded.errors
    docs = tuple(parse_yaml(mesh, "mesh.yaml")[0]) if mesh else ()
    return build_snapshot(loaded, docs)


def test_sidecar_from_namespace_label_revision_and_pod_override() -> None:
    text = (
        NS % ("inj", "istio-injection: enabled")
        + NS % ("rev", "istio.io/rev: canary")
        + NS % ("plain", "")
        + """apiVersion: v1
kind: Pod
metadata: {name: a, namespace: inj}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: inj, annotations: {sidecar.istio.io/inject: "false"}}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: rev}
---
apiVersion: v1
kind: Pod
metadata: {name: d, namespace: plain, labels: {sidecar.istio.io/inject: "true"}}
---
apiVersion: v1
kind: Pod
metadata: {name: e, namespace: plain}
spec: {containers: [{name: app}, {name: istio-proxy}]}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm, namespace: plain}
spec: {address: 10.0.0.9, serviceAccount: vm-sa, labels: {app: vm}}
"""
    )
    snap = snapshot(text)
    sidecars = {w.ref: w.has_sidecar for w in snap.workloads}
    assert sidecars == {
        "inj/a": True,
        "inj/b": False,
        "rev/c": True,
        "plain/d": True,
        "plain/e": True,
        "plain/vm": True,
    }
    vm = snap.workload("plain/vm")
    assert vm is not None and (vm.service_account, vm.ip) == ("vm-sa", "10.0.0.9")
    assert snap.workload("inj/a").service_account == "default"  # type: ignore[union-attr]


def test_mesh_config_layers_configmap_operator_and_file() -> None:
    text = """apiVersion: install.istio.io/v1alpha1
kind: IstioOperator
metadata: {name: op, namespace: istio-system}
spec:
  meshConfig: {trustDomain: from-operator, enableAutoMtls: false}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |-
    trustDomain: from-configmap
    outboundTrafficPolicy: {mode: REGISTRY_ONLY}
"""
    snap = snapshot(text)
    assert snap.mesh.trust_domain == "from-configmap"
    assert snap.mesh.enable_auto_mtls is False
    assert snap.mesh.outbound_traffic_policy.mode.value == "REGISTRY_ONLY"
    overridden = snapshot(text, mesh="trustDomain: from-file\n")
    assert overridden.mesh.trust_domain == "from-file"
    assert [d.code for d in overridden.diagnostics] == ["mesh-config-layers"]


def test_bad_mesh_config_is_reported_at_its_field() -> None:
    loaded = load_sources([("in.yaml", b"")])
    snap = build_snapshot(loaded, tuple(parse_yaml("enableAutoMtls: maybe\n", "m.yaml")[0]))
    (problem,) = snap.diagnostics
    assert (problem.location.file, problem.location.line, problem.location.field) == (
        "m.yaml",
        1,
        "enableAutoMtls",
    )


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_loader_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    result = load_sources([("fuzz.yaml", data)])
    for problem in result.diagnostics:
        assert problem.location.file == "fuzz.yaml"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="{}[]:-,'\"#&*!|>%@`\n \tabc01", max_size=200))
def test_loader_never_raises_on_yaml_like_text(text: str) -> None:
    """Whatever the text, the loader answers with data: every document it could not
    read is a diagnostic located in the file, within its lines, and nothing is lost —
    each non-empty document is either a resource, unknown, or named by a diagnostic."""
    result = load_sources([("fuzz.yaml", text.encode())])
    lines = text.count("\n") + 1
    for problem in result.diagnostics:
        assert problem.location.file == "fuzz.yaml"
        assert 0 <= (problem.location.line or 0) <= lines, problem
        assert problem.message
    try:
        documents = [d for d in yaml.load_all(text, Loader=_LIBYAML) if d not in (None, "")]
    except yaml.YAMLError:
        documents = []
        assert result.diagnostics, "text libyaml refuses must be reported"
    if documents:
        accounted = len(result.resources) + len(result.unknown) + len(result.diagnostics)
        assert accounted > 0, "documents were read but nothing was kept or reported"


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.dictionaries(st.sampled_from("abc"), st.sampled_from("xy"), max_size=3), max_size=4
    ),
    st.lists(
        st.dictionaries(st.sampled_from("abc"), st.sampled_from("xy"), max_size=3), max_size=4
    ),
)
def test_services_of_matches_every_selector_check(
    pod_labels: list[dict[str, str]], selectors: list[dict[str, str]]
) -> None:
    """The label index behind services_of answers exactly what checking every service's
    selector against the workload answers."""
    docs = []
    for i, labels in enumerate(pod_labels):
        docs.append(
            "apiVersion: v1\nkind: Pod\n"
            f"metadata: {{name: p{i}, namespace: ns, labels: {dict(labels) or '{}'}}}\n"
            "spec: {containers: [{name: c}]}\n"
        )
    for i, selector in enumerate(selectors):
        docs.append(
            "apiVersion: v1\nkind: Service\n"
            f"metadata: {{name: s{i}, namespace: ns}}\n"
            f"spec: {{selector: {dict(selector) or '{}'}, ports: [{{port: 80}}]}}\n"
        )
    snap = snapshot("---\n".join(docs))
    for workload in snap.workloads:
        expected = [s.name for s in snap.services if s.selects(workload)]
        assert [s.name for s in snap.services_of(workload)] == expected
