"""The command line on inputs where how workloads meet the mesh matters: manifests without
Namespace objects (bookinfo as shipped), ambient namespaces, gateways, live pod dumps."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from trustmesh.cli.main import app

runner = CliRunner()

# Like Istio's bookinfo manifest: no Namespace object, no metadata.namespace.
BOOKINFO_LIKE = """apiVersion: v1
kind: Service
metadata: {name: details, labels: {app: details}}
spec:
  ports: [{port: 9080, name: http}]
  selector: {app: details}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: bookinfo-details}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: details-v1, labels: {app: details, version: v1}}
spec:
  replicas: 1
  selector: {matchLabels: {app: details, version: v1}}
  template:
    metadata: {labels: {app: details, version: v1}}
    spec:
      serviceAccountName: bookinfo-details
      containers:
      - name: details
        image: docker.io/istio/examples-bookinfo-details-v1:1.20.3
        ports: [{containerPort: 9080}]
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: bookinfo-productpage}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: productpage-v1, labels: {app: productpage, version: v1}}
spec:
  template:
    metadata: {labels: {app: productpage, version: v1}}
    spec:
      serviceAccountName: bookinfo-productpage
      containers:
      - name: productpage
        image: docker.io/istio/examples-bookinfo-productpage-v1:1.20.3
        ports: [{containerPort: 9080}]
"""
ALLOW_NOTHING = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing}
spec: {}
"""


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args))


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def check(files: list[str], *extra: str):  # type: ignore[no-untyped-def]
    args = ["authz", "check"]
    for f in files:
        args += ["-f", f]
    return invoke(*args, *extra)


def test_bookinfo_without_namespaces_says_injection_is_unknown(tmp_path: Path) -> None:
    files = [
        write(tmp_path, "bookinfo.yaml", BOOKINFO_LIKE),
        write(tmp_path, "p.yaml", ALLOW_NOTHING),
    ]
    question = ["--from", "productpage-v1", "--to", "details-v1", "--port", "9080"]
    unknown = check(files, *question, "-o", "json")
    assert unknown.exit_code == 0, unknown.output
    body = json.loads(unknown.stdout)
    assert body["verdict"] == "allow"
    assert "injection is unknown" in body["reason"]
    assert any(
        a.startswith("destination default/details-v1: injection unknown")
        for a in body["assumptions"]
    )
    table = check(files, *question)
    assert "assumed" in table.stdout and "--assume-injected" in table.stdout

    assumed = check(files, *question, "--assume-injected", "-o", "json")
    assert assumed.exit_code == 3, assumed.output
    body = json.loads(assumed.stdout)
    assert (body["verdict"], body["status"]) == ("deny", 403)  # the allow-nothing applies
    assert body["principal"] == "cluster.local/ns/default/sa/bookinfo-productpage"
    assert any("sidecar (assumed)" in a for a in body["assumptions"])


def test_namespace_flag_places_objects_and_resolves_names(tmp_path: Path) -> None:
    shop = """apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio-injection: enabled}}
"""
    files = [
        write(tmp_path, "bookinfo.yaml", BOOKINFO_LIKE),
        write(tmp_path, "ns.yaml", shop),
        write(tmp_path, "p.yaml", ALLOW_NOTHING),
    ]
    result = check(
        files,
        "-n",
        "shop",
        "--from",
        "productpage-v1",
        "--to",
        "details-v1",
        "--port",
        "9080",
        "-o",
        "json",
    )
    assert result.exit_code == 3, result.output
    body = json.loads(result.stdout)
    assert body["verdict"] == "deny" and body["assumptions"] == []
    bad = check(files, "-n", "Not_A_Namespace", "--to", "details-v1", "--plaintext")
    assert bad.exit_code == 2 and "not a namespace name" in bad.output


AMBIENT = """apiVersion: v1
kind: Namespace
metadata: {name: amb, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: httpbin, namespace: amb}
spec:
  template:
    metadata: {labels: {app: httpbin}}
    spec:
      serviceAccountName: httpbin
      containers: [{name: httpbin, ports: [{containerPort: 8080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: amb, labels: {istio.io/use-waypoint: waypoint}}
spec: {selector: {app: httpbin}, ports: [{name: http, port: 8000, targetPort: 8080}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: curl, namespace: amb}
spec:
  template:
    metadata: {labels: {app: curl}}
    spec: {serviceAccountName: curl, containers: [{name: curl}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: amb}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules: [{}]
"""


def test_authz_check_answers_unsupported_with_its_own_exit_code(tmp_path: Path) -> None:
    files = [write(tmp_path, "ambient.yaml", AMBIENT)]
    question = ["--from", "amb/curl", "--to", "amb/httpbin", "--port", "8080"]
    result = check(files, *question, "-o", "json")
    assert result.exit_code == 4, result.output
    body = json.loads(result.stdout)
    assert body["verdict"] == "unsupported"
    assert body["reason"].startswith("unsupported: ambient:") and "waypoint" in body["reason"]
    table = check(files, *question)
    assert table.exit_code == 4 and "UNSUPPORTED" in table.stdout
    # Without the waypoint ztunnel decides: the DENY matches every connection.
    files = [
        write(
            tmp_path,
            "ambient.yaml",
            AMBIENT.replace(", labels: {istio.io/use-waypoint: waypoint}", ""),
        )
    ]
    denied = check(files, *question, "-o", "json")
    assert denied.exit_code == 3
    assert json.loads(denied.stdout)["rule"] == "ns[amb]-policy[deny-all]-rule[0]"


def test_policy_tests_can_expect_unsupported(tmp_path: Path) -> None:
    config = write(tmp_path, "ambient.yaml", AMBIENT)
    tests = write(
        tmp_path,
        "test.yaml",
        """apiVersion: trustmesh.dev/v1alpha1
kind: PolicyTest
metadata: {name: ambient}
spec:
  cases:
  - name: waypoint path is not modelled
    from: {workload: amb/curl}
    to: {workload: amb/httpbin, port: 8080}
    tcp: true
    expect: unsupported
  - name: a wrong expectation fails with the reason
    from: {workload: amb/curl}
    to: {workload: amb/httpbin, port: 8080}
    tcp: true
    expect: allow
""",
    )
    result = invoke("test", "-f", config, tests, "-o", "json")
    assert result.exit_code == 1, result.output
    body = json.loads(result.stdout)
    first, second = body["cases"]
    assert first["passed"] and not second["passed"]
    assert "expected allow, got unsupported (unsupported: ambient:" in second["failures"][0]


def test_policy_test_output_says_when_injection_was_assumed(tmp_path: Path) -> None:
    config = write(tmp_path, "bookinfo.yaml", BOOKINFO_LIKE + "---\n" + ALLOW_NOTHING)
    tests = write(
        tmp_path,
        "test.yaml",
        """apiVersion: trustmesh.dev/v1alpha1
kind: PolicyTest
metadata: {name: bookinfo}
spec:
  cases:
  - name: details refuses productpage
    from: {workload: default/productpage-v1}
    to: {workload: default/details-v1, port: 9080}
    request: {method: GET, path: /details/0}
    expect: deny
""",
    )
    unknown = invoke("test", "-f", config, tests)
    assert unknown.exit_code == 1  # answered as not injected: allowed
    assert "injection unknown" in unknown.stdout
    assumed = invoke("test", "-f", config, tests, "--assume-injected", "-o", "json")
    assert assumed.exit_code == 0, assumed.output
    body = json.loads(assumed.stdout)
    assert body["passed"] == 1
    assert any("--assume-injected" in a for a in body["assumptions"])
    table = invoke("test", "-f", config, tests, "--assume-injected")
    assert "rests on an assumption" in table.stdout and "assumed:" in table.stdout


def test_analyze_reports_strict_and_default_deny_for_bookinfo_when_assumed(tmp_path: Path) -> None:
    files = write(tmp_path, "bookinfo.yaml", BOOKINFO_LIKE)
    unknown = invoke("analyze", "-f", files, "-o", "json")
    body = json.loads(unknown.stdout)
    assert any("sidecar injection unknown" in note for note in body["notes"])
    rules = {f["rule"] for f in body["findings"]}
    assert "TM-MTLS-001" not in rules and "TM-AUTHZ-001" not in rules

    assumed = invoke("analyze", "-f", files, "--assume-injected", "-o", "json")
    body = json.loads(assumed.stdout)
    rules = {f["rule"] for f in body["findings"]}
    assert {"TM-MTLS-001", "TM-AUTHZ-001"} <= rules
    assert any("assumed sidecar" in note for note in body["notes"])

    sarif = json.loads(invoke("analyze", "-f", files, "-o", "sarif").stdout)
    (run,) = sarif["runs"]
    assert any("injection unknown" in n for n in run["properties"]["notes"])
    text = invoke("analyze", "-f", files).stdout
    assert text.startswith("NOTE sidecar injection unknown for default/details-v1")


GATEWAY = """apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio-injection: enabled}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: istio-ingressgateway, namespace: istio-system}
spec:
  template:
    metadata:
      labels: {app: istio-ingressgateway, istio: ingressgateway}
      annotations: {sidecar.istio.io/inject: "false"}
    spec:
      serviceAccountName: istio-ingressgateway-service-account
      containers:
      - name: istio-proxy
        args: [proxy, router, --domain, $(POD_NAMESPACE).svc.cluster.local]
        ports: [{containerPort: 8080}, {containerPort: 8443}]
---
apiVersion: v1
kind: Service
metadata: {name: istio-ingressgateway, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  ports: [{name: http2, port: 80, targetPort: 8080}, {name: https, port: 443, targetPort: 8443}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: web, ports: [{containerPort: 8080}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ingress-allow-list, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  rules: [{from: [{source: {ipBlocks: [203.0.113.0/24]}}]}]
"""


def test_gateway_ports_are_not_sidecar_ports(tmp_path: Path) -> None:
    files = write(tmp_path, "gw.yaml", GATEWAY)
    body = json.loads(invoke("analyze", "-f", files, "-o", "json").stdout)
    (mtls,) = [f for f in body["findings"] if f["rule"] == "TM-MTLS-001"]
    assert mtls["workloads"] == ["shop/web"]
    assert "istio-ingressgateway" not in mtls["message"]
    # The gateway enforces its selector policy: not "a policy that enforces nothing".
    assert not [f for f in body["findings"] if f["rule"] == "TM-AUTHZ-008"]
    # The gateway calls in-mesh services with its own identity (mTLS).
    result = check(
        [files],
        "--from",
        "istio-system/istio-ingressgateway",
        "--to",
        "shop/web",
        "--port",
        "8080",
        "-o",
        "json",
    )
    assert json.loads(result.stdout)["principal"] == (
        "cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"
    )
    # HTTP to the gateway is decided by the policy selecting it (ipBlocks: the client's
    # own address); TCP to a gateway is not modelled.
    to_gateway = check(
        [files], "--plaintext", "--to", "istio-system/istio-ingressgateway", "--port", "8080"
    )
    assert to_gateway.exit_code == 3 and "gateway" in to_gateway.stdout
    allowed = check(
        [files],
        *("--plaintext", "--source-ip", "203.0.113.5"),
        *("--to", "istio-system/istio-ingressgateway", "--port", "8080"),
    )
    assert allowed.exit_code == 0, allowed.stdout
    tcp = check(
        [files],
        *("--plaintext", "--tcp", "--to", "istio-system/istio-ingressgateway", "--port", "8080"),
    )
    assert tcp.exit_code == 4 and "gateway" in tcp.stdout


LIVE_DUMP = """apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Namespace
  metadata: {name: shop, labels: {istio-injection: enabled}}
- apiVersion: v1
  kind: Pod
  metadata:
    name: web-7d4b9c-x2x9q
    namespace: shop
    uid: 8c2b7e8e-43c1-4c54-a1b2-9b0c2b7c0a11
    resourceVersion: "102934"
    labels: {app: web}
  spec:
    containers: [{name: web, ports: [{containerPort: 8080}]}]
  status: {phase: Running, podIP: 10.244.1.17}
- apiVersion: v1
  kind: Pod
  metadata:
    name: node-exporter-abcde
    namespace: shop
    uid: 3f1e7a30-2a66-4c1b-8a3f-0f5a4d7c9e21
    labels: {app: node-exporter}
  spec:
    hostNetwork: true
    containers: [{name: exporter, ports: [{containerPort: 9100}]}]
  status: {phase: Running, podIP: 192.168.1.10}
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: web-allow-nothing, namespace: shop}
  spec: {selector: {matchLabels: {app: web}}}
"""


def test_a_live_pod_dump_is_read_as_running(tmp_path: Path) -> None:
    files = [write(tmp_path, "dump.yaml", LIVE_DUMP)]
    # The pod was created before the namespace was labelled: no istio-proxy, so nothing
    # enforces its allow-nothing policy, whatever the namespace label says now.
    result = check(
        files, "--plaintext", "--to", "shop/web-7d4b9c-x2x9q", "--port", "8080", "-o", "json"
    )
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["verdict"] == "allow" and body["assumptions"] == []
    assert any("without an istio-proxy container" in step for step in body["trace"])
    analysis = json.loads(invoke("analyze", "-f", files[0], "-o", "json").stdout)
    enforced = [f for f in analysis["findings"] if f["rule"] == "TM-AUTHZ-008"]
    assert enforced and "without a sidecar" in enforced[0]["message"]


def test_no_enforces_nothing_claim_on_workloads_of_unknown_injection(tmp_path: Path) -> None:
    selector = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: details-viewer}
spec:
  selector: {matchLabels: {app: details}}
  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/bookinfo-productpage]}}]}]
"""
    files = write(tmp_path, "bookinfo.yaml", BOOKINFO_LIKE + "---\n" + selector)
    body = json.loads(invoke("analyze", "-f", files, "-o", "json").stdout)
    assert not [f for f in body["findings"] if f["rule"] == "TM-AUTHZ-008"]
    assert body["notes"]
