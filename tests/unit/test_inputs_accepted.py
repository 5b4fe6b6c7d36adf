"""Inputs Kubernetes and Istio accept are accepted; wrong ones are explained in YAML terms.

Nulls (the API server treats a field set to null as absent), Sidecar / ServiceEntry
``workloadSelector.labels``, Istio's install profiles and Helm values, and the wording of
every schema error (what YAML was expected where, never the validation library's words).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.unit.meshutil import NOW, compile_text, diagnostics_of, http, policy
from trustmesh.api.loader import load_sources
from trustmesh.cli.main import app
from trustmesh.config import load_config
from trustmesh.policy.decision import Verdict
from trustmesh.policy.evaluate import evaluate
from trustmesh.policy.request import HttpRequest, Request, Source

# --- nulls -------------------------------------------------------------------------------

NULL_FIELDS = """apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: foo
  labels: {app: web}
  annotations:
spec:
  serviceAccountName:
  containers:
  - name: web
    image: nginx
    command:
    args:
    env:
    ports:
  - name: side
    image: busybox
    ports:
    - containerPort: 8080
      name:
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: foo, labels: null}
spec:
  selector: {app: web}
  ports:
  - port: 80
    targetPort:
    appProtocol:
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: foo}
spec:
  host: web
  trafficPolicy:
  subsets:
"""


def test_fields_set_to_null_are_absent_as_the_api_server_treats_them() -> None:
    loaded = load_sources([("dump.yaml", NULL_FIELDS.encode())])
    assert loaded.diagnostics == []
    pod, service, _ = loaded.resources
    assert pod.annotations == {}
    assert [c.args for c in pod.spec.spec.containers] == [(), ()]
    assert pod.spec.spec.containers[1].ports[0].container_port == 8080
    assert service.spec.ports[0].target_port is None


def test_a_null_selector_is_no_selector_namespace_wide() -> None:
    deny_all = policy("deny-all", "foo", "selector:\naction: DENY\nrules: [{}]")
    decision = http(compile_text(deny_all))
    assert decision.verdict is Verdict.DENY
    assert decision.rule == "ns[foo]-policy[deny-all]-rule[0]"


def test_null_rules_are_no_rules_allow_nothing() -> None:
    allow_nothing = policy("nothing", "foo", "selector: {matchLabels: {app: httpbin}}\nrules:")
    assert http(compile_text(allow_nothing)).verdict is Verdict.DENY


def test_a_null_map_entry_is_pruned_as_the_api_server_prunes_it_from_a_crd() -> None:
    text = policy("p", "foo", "selector: {matchLabels: {app: null}}\naction: DENY\nrules: [{}]")
    problems = diagnostics_of(text)
    assert [(d.code, d.is_error) for d in problems] == [("empty-selector", False)]
    decision = http(compile_text(text))  # the selector selects the whole namespace
    assert decision.rule == "ns[foo]-policy[p]-rule[0]"


def test_a_null_inside_a_list_is_still_an_error_with_its_place() -> None:
    text = policy("p", "foo", "rules: [{to: [{operation: {paths: [/a, null]}}]}]")
    [problem] = [d for d in diagnostics_of(text) if d.is_error]
    assert problem.location.field == "spec.rules[0].to[0].operation.paths[1]"
    assert problem.message == "expected a string, got null"


# --- workloadSelector.labels on Sidecar and ServiceEntry ----------------------------------

SIDECAR = """apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: sleep-egress, namespace: foo}
spec:
  workloadSelector:
    labels: {app: sleep}
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
---
"""


def egress(mesh_text: str, source: str) -> Verdict:
    mesh = compile_text(mesh_text)
    request = Request(
        Source.workload(source), "", 80, HttpRequest("GET", "/"), "unknown.example.com"
    )
    return evaluate(mesh, request, now=NOW).verdict


def test_sidecar_workload_selector_labels_select_the_workloads() -> None:
    # REGISTRY_ONLY, and no HTTP service on port 80 gives the sidecar a listener there:
    # BlackHoleCluster closes the connection
    assert egress(SIDECAR, "foo/sleep") is Verdict.RESET
    assert egress(SIDECAR, "foo/httpbin") is Verdict.ALLOW  # not selected: ALLOW_ANY
    other = SIDECAR.replace("app: sleep", "app: nothing-has-this")
    assert egress(other, "foo/sleep") is Verdict.ALLOW


def test_match_labels_on_a_sidecar_is_the_error_kubectl_gives() -> None:
    text = SIDECAR.replace("    labels:", "    matchLabels:")
    [problem] = [d for d in diagnostics_of(text) if d.is_error]
    assert problem.code == "unknown-field"
    assert problem.location.field == "spec.workloadSelector.matchLabels"
    assert "did you mean labels?" in problem.message


def test_service_entry_workload_selector_labels_are_read() -> None:
    text = """apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: internal, namespace: foo}
spec:
  hosts: [internal.example.com]
  location: MESH_INTERNAL
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8000}]
  resolution: STATIC
  workloadSelector:
    labels: {app: httpbin}
"""
    loaded = load_sources([("se.yaml", text.encode())])
    assert loaded.diagnostics == []
    assert loaded.resources[0].spec.workload_selector.labels == {"app": "httpbin"}
    wildcard = text.replace("app: httpbin", 'app: "*"')
    [problem] = [d for d in diagnostics_of(wildcard) if d.is_error]
    assert problem.code == "invalid-selector"


# --- Istio's install profiles and Helm values ---------------------------------------------

# The shapes of Istio's manifests/profiles/*.yaml: no metadata at all, or a namespace only.
PROFILE_WITHOUT_METADATA = """apiVersion: install.istio.io/v1alpha1
kind: IstioOperator
spec:
  components:
    egressGateways:
    - name: istio-egressgateway
      enabled: true
  meshConfig:
    outboundTrafficPolicy: {mode: REGISTRY_ONLY}
  values:
    profile: demo
"""
PROFILE_WITH_NAMESPACE_ONLY = """apiVersion: install.istio.io/v1alpha1
kind: IstioOperator
metadata:
  namespace: istio-system
spec:
  hub: registry.example/istio
  tag: 1.22
  components:
    base: {enabled: true}
    pilot: {enabled: true}
  values:
    defaultRevision: ""
    global: {istioNamespace: istio-system}
"""
# The shape of Istio's helm-profiles: flat Helm values, no apiVersion.
HELM_PROFILE = """pilot:
  env:
    ENABLE_NATIVE_SIDECARS: "false"
cni:
  cniBinDir: /var/lib/cni/bin
resourceQuotas:
  enabled: true
seLinuxOptions:
  type: spc_t
trustedZtunnelNamespace: kube-system
"""


def test_istio_profiles_and_helm_values_load_with_f(tmp_path: Path) -> None:
    for name, text in (
        ("demo.yaml", PROFILE_WITHOUT_METADATA),
        ("default.yaml", PROFILE_WITH_NAMESPACE_ONLY),
        ("values.yaml", HELM_PROFILE),
    ):
        path = tmp_path / name
        path.write_text(text)
        result = CliRunner().invoke(app, ["validate", "-f", str(path)])
        assert result.exit_code == 0, result.output
        assert "configuration is valid" in result.output


def test_a_profile_without_metadata_sets_the_mesh_config(tmp_path: Path) -> None:
    (tmp_path / "demo.yaml").write_text(PROFILE_WITHOUT_METADATA)
    root = Path(__file__).resolve().parents[2]
    config = load_config([str(root / "examples" / "mesh"), str(tmp_path / "demo.yaml")])
    assert config.errors == []
    assert config.snapshot.mesh.outbound_traffic_policy.mode.value == "REGISTRY_ONLY"
    as_mesh_config = load_config(
        [str(root / "examples" / "mesh")], mesh_config=[str(tmp_path / "demo.yaml")]
    )
    assert as_mesh_config.snapshot.mesh.outbound_traffic_policy.mode.value == "REGISTRY_ONLY"


def test_a_resource_still_needs_its_name() -> None:
    text = (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  namespace: a\n"
    )
    [problem] = load_sources([("x.yaml", text.encode())]).errors
    assert (problem.location.field, problem.message) == ("metadata.name", "is required")


# --- wrong shapes, said in YAML terms -------------------------------------------------------

AP = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n"
PA = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\n"
RA = "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: r}\n"
SE = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: e}\n"
DR = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\n"
SVC = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n"
POD = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n"
# (document, field, message): what a user wrote wrong, and what they are told.
WRONG_SHAPES = [
    (AP + "spec: {action: allow}", "spec.action",
     "expected one of ALLOW, DENY, AUDIT, CUSTOM, got allow"),
    (AP + "spec: {rules: {from: []}}", "spec.rules",
     "expected a list of mappings, got a mapping {from: []}"),
    (AP + "spec: {rules: [{from: [{source: {principals: abc}}]}]}",
     "spec.rules[0].from[0].source.principals", "expected a list of strings, got abc"),
    (AP + "spec: {rules: [{from: [{source: {principals: [{a: 1}]}}]}]}",
     "spec.rules[0].from[0].source.principals[0]", "expected a string, got a mapping {a: 1}"),
    (AP + "spec: {rules: [{from: [{source: x}]}]}", "spec.rules[0].from[0].source",
     "expected a mapping, got x"),
    (AP + "spec: {rules: [{from: [{source: {principal: [a]}}]}]}",
     "spec.rules[0].from[0].source.principal",
     "unknown field 'principal'; did you mean principals?"),
    (AP + "spec: {rules: [{to: [{operation: {methods: 5}}]}]}",
     "spec.rules[0].to[0].operation.methods", "expected a list of strings, got 5"),
    (AP + "spec: {rules: [{when: [{key: source.ip, values: [true]}]}]}",
     "spec.rules[0].when[0].values[0]", "expected a string, got true"),
    (AP + "spec: {selector: {matchLabels: [app]}}", "spec.selector.matchLabels",
     "expected a mapping of strings to strings, got a list [app]"),
    (AP + "spec: {selector: {labels: {app: a}}}", "spec.selector.labels",
     "unknown field 'labels'; did you mean matchLabels?"),
    (AP + "spec: [a, b]", "spec", "expected a mapping, got a list"),
    (SVC + "spec: {ports: 5}", "spec.ports", "expected a list of mappings, got 5"),
    (SVC + "spec: {ports: [{port: 70000}]}", "spec.ports[0].port",
     "expected an integer 1-65535, got 70000"),
    (SVC + "spec: {ports: [{port: http}]}", "spec.ports[0].port",
     "expected an integer 1-65535, got http"),
    (SVC + "spec: {ports: [{port: 80.5}]}", "spec.ports[0].port",
     "expected an integer 1-65535, got 80.5"),
    (SVC + "spec: {ports: [{port: 80, targetPort: [1]}]}", "spec.ports[0].targetPort",
     "expected an integer 1-65535 or a string, got a list [1]"),
    (SVC + "spec: {selector: app}", "spec.selector",
     "expected a mapping of strings to strings, got app"),
    (SVC.replace("{name: s}", "{name: s, labels: [a, b]}"), "metadata.labels",
     "expected a mapping of strings to strings, got a list [a, b]"),
    (SVC.replace("{name: s}", "{name: 5}"), "metadata.name", "expected a string, got 5"),
    (POD + "spec: {containers: [{name: a, args: [1]}]}", "spec.containers[0].args[0]",
     "expected a string, got 1"),
    (POD + "spec: {containers: [{name: a, env: [{name: ''}]}]}",
     "spec.containers[0].env[0].name", "must not be empty"),
    (POD + "spec: {containers: {name: a}}", "spec.containers",
     "expected a list of mappings, got a mapping {name: a}"),
    (PA + "spec: {mtls: {mode: strict}}", "spec.mtls.mode",
     "expected one of UNSET, DISABLE, PERMISSIVE, STRICT, got strict"),
    (PA + "spec: {selector: {matchLabels: {a: b}}, portLevelMtls: {http: {mode: STRICT}}}",
     "spec.portLevelMtls.http", "expected an integer as key, got http"),
    (RA + "spec: {jwtRules: [{issuer: a, forwardOriginalToken: maybe}]}",
     "spec.jwtRules[0].forwardOriginalToken", "expected true or false, got maybe"),
    (RA + "spec: {jwtRules: [{issuer: a, fromHeaders: [x-jwt]}]}",
     "spec.jwtRules[0].fromHeaders[0]", "expected a mapping, got x-jwt"),
    (SE + "spec: {hosts: []}", "spec.hosts",
     "expected a non-empty list of strings, got a list []"),
    (SE + "spec: {hosts: [a.com], ports: [{number: 0}]}", "spec.ports[0].number",
     "expected an integer 1-65535, got 0"),
    (DR + "spec: {host: a, trafficPolicy: {tls: {mode: mutual}}}",
     "spec.trafficPolicy.tls.mode",
     "expected one of DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL, got mutual"),
    ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {mesh: {a: 1}}\n",
     "data.mesh", "expected a string, got a mapping {a: 1}"),
]  # fmt: skip
_LIBRARY_WORDS = re.compile(
    r"valid (tuple|list|dict|string|integer|boolean)|Input should|literal\[|"
    r"\{'|\['|\(got |instance of|pydantic|type=|Value error"
)


@pytest.mark.parametrize(("text", "field", "message"), WRONG_SHAPES)
def test_wrong_shapes_say_what_yaml_was_expected_where(text: str, field: str, message: str) -> None:
    errors = load_sources([("in.yaml", text.encode())]).errors
    assert [(d.location.field, d.message) for d in errors] == [(field, message)]
    assert errors[0].location.line >= 1
    assert not _LIBRARY_WORDS.search(errors[0].message)


def test_long_values_are_cut_and_strings_that_look_like_other_types_are_quoted() -> None:
    long_list = "[" + ", ".join(f"item{i}" for i in range(40)) + "]"
    text = SVC + f"spec: {{selector: {long_list}}}\n"
    [problem] = load_sources([("in.yaml", text.encode())]).errors
    assert problem.message.endswith("...")
    assert len(problem.message) < 140
    text = AP + 'spec: {rules: [{to: [{operation: {ports: [80, "true"]}}]}]}'
    [problem] = load_sources([("in.yaml", text.encode())]).errors
    assert problem.message == "expected a string, got 80"


def test_a_mesh_config_given_as_a_resource_says_where_it_belongs() -> None:
    text = "defaultConfig: {holdApplicationUntilProxyStarts: true}\ntrustDomain: td\n"
    [problem] = load_sources([("mesh.yaml", text.encode())]).errors
    assert problem.message == (
        "apiVersion is required (a MeshConfig file? pass it with --mesh-config)"
    )
