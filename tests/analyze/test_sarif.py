"""SARIF for CI: valid against the 2.1.0 schema *and* what GitHub code scanning requires.

GitHub rejects a whole upload when one result lacks a location, so every result must carry
a physical location with a URI and a region, a ruleId that the driver lists, and message
text — findings about something missing included (they point at the nearest file), and
invalid input too (its errors become results of TM-INPUT-001).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from trustmesh.analyze import report
from trustmesh.analyze.anchors import nearest, usable
from trustmesh.analyze.context import build_context
from trustmesh.analyze.engine import AnalysisResult, analyze
from trustmesh.analyze.findings import Finding, Issue
from trustmesh.analyze.registry import all_rules
from trustmesh.cli.main import app
from trustmesh.config import load_config

from .test_ambient import DENY_POST
from .test_ambient import WORKLOADS as AMBIENT
from .test_edge import ADMIN, GUEST, INGRESS, gateway, virtual_service
from .test_mtls import DENY_LEGACY
from .util import context_from

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = Path(sys.prefix) / "share" / "sarif-schema-2.1.0.json"
SCENARIOS = sorted(p for p in (ROOT / "examples" / "scenarios").iterdir() if p.is_dir())

# Inputs that make the authorization value checks and others fire next to the examples.
FIXTURE = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: dead-values, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/*/sa/sleep"]
    to:
    - operation:
        methods: ["delete"]
        paths: ["admin", "/x/*/y"]
        ports: ["80"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: typo-namespace, namespace: fooo}
spec:
  action: DENY
  rules:
  - {}
"""


# One trigger for each rule no example above fires (with the istio.io layout as base).
MORE = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: bar}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules:
  - {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: exact-host, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules:
  - to:
    - operation:
        hosts: ["httpbin.foo"]
        ports: ["8000"]
  - from:
    - source:
        requestPrincipals: ["https://issuer.example/alice"]
    to:
    - operation:
        ports: ["8000"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: CUSTOM
  provider: {name: nowhere}
  rules:
  - to:
    - operation:
        paths: ["/ext/*"]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: httpbin-permissive, namespace: bar}
spec:
  selector: {matchLabels: {app: httpbin}}
  mtls: {mode: PERMISSIVE}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: by-identity, namespace: bar}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/foo/sa/sleep"]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: external, namespace: foo}
spec:
  host: api.example.com
  trafficPolicy:
    tls: {mode: SIMPLE, insecureSkipVerify: true}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: external-mutual, namespace: foo}
spec:
  host: pay.example.com
  trafficPolicy:
    tls:
      mode: MUTUAL
      clientCertificate: /etc/c.pem
      privateKey: /etc/k.pem
      caCertificates: /etc/ca.pem
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: foo}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: ["*"]
    tls: {mode: PASSTHROUGH}
  - port: {number: 443, name: https-api, protocol: HTTPS}
    hosts: ["api.example.com"]
    tls: {mode: SIMPLE, credentialName: api-cert, minProtocolVersion: TLSV1_0}
  - port: {number: 8443, name: https-mtls, protocol: HTTPS}
    hosts: ["pay.example.com"]
    tls: {mode: MUTUAL, credentialName: other/pay-cert}
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: api, namespace: foo}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
---
apiVersion: rbac.istio.io/v1alpha1
kind: ServiceRole
metadata: {name: old, namespace: foo}
spec:
  rules: [{services: ["*"], methods: ["GET"]}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: foo}
spec:
  template:
    metadata:
      labels: {app: web}
      annotations:
        traffic.sidecar.istio.io/excludeInboundPorts: "8080"
        sidecar.istio.io/proxyImage: docker.io/me/proxy:latest
    spec:
      containers:
      - name: web
        image: web
        securityContext:
          runAsUser: 1337
          capabilities: {add: [NET_ADMIN]}
        ports: [{containerPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: noinject, namespace: foo}
spec:
  template:
    metadata:
      labels: {app: noinject, sidecar.istio.io/inject: "false"}
    spec:
      containers:
      - name: app
        ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: noinject, namespace: foo}
spec:
  selector: {app: noinject}
  ports: [{name: http, port: 80, targetPort: 8080}]
"""


def every_rule_inputs() -> list[tuple[str, bool]]:
    """Config texts (and whether the istio.io layout is their base) that, between them and
    the examples, make every rule fire."""
    edge = INGRESS + gateway(GUEST + ADMIN) + virtual_service("admin", '"admin.example.com"', "gw")
    return [(MORE, True), (edge, True), (DENY_LEGACY, True), (AMBIENT + DENY_POST, False)]


def github_problems(sarif: dict[str, Any]) -> list[str]:
    """What GitHub code scanning refuses or cannot show, one line per problem."""
    problems: list[str] = []
    for run in sarif["runs"]:
        rule_ids = [r["id"] for r in run["tool"]["driver"]["rules"]]
        if len(set(rule_ids)) != len(rule_ids):
            problems.append("duplicate rule ids")
        for i, result in enumerate(run["results"]):
            where = f"result {i} ({result.get('ruleId')})"
            if result.get("ruleId") not in rule_ids:
                problems.append(f"{where}: ruleId missing or not in driver.rules")
            if not result.get("message", {}).get("text"):
                problems.append(f"{where}: no message.text")
            locations = result.get("locations") or []
            if not locations:
                problems.append(f"{where}: no locations")
            for location in locations:
                physical = location.get("physicalLocation", {})
                uri = physical.get("artifactLocation", {}).get("uri", "")
                if not uri or "<" in uri or (uri.startswith("/") and not uri.startswith("file:")):
                    problems.append(f"{where}: artifactLocation.uri {uri!r}")
                if physical.get("region", {}).get("startLine", 0) < 1:
                    problems.append(f"{where}: no region.startLine")
    return problems


def check(sarif: dict[str, Any]) -> None:
    jsonschema.Draft4Validator(json.loads(SCHEMA.read_text())).validate(sarif)
    assert github_problems(sarif) == []


def analyze_paths(*paths: str) -> AnalysisResult:
    loaded = load_config(list(paths))
    assert loaded.mesh is not None, loaded.errors
    context = build_context(loaded.snapshot, loaded.mesh, loaded.helm_values, None, loaded.unknown)
    return analyze(context)


def corpus(tmp_path: Path) -> list[list[str]]:
    fixture = tmp_path / "fixture.yaml"
    fixture.write_text(FIXTURE)
    mesh = str(ROOT / "examples" / "mesh")
    runs = [[str(ROOT / "examples" / "insecure")], [mesh, str(fixture)]]
    runs += [[mesh, str(s / "config.yaml")] for s in SCENARIOS if (s / "config.yaml").exists()]
    # Inputs in the style of istioctl analyze's tests, where the suite has them: every
    # rule they make fire must give located results too.
    coverage = Path(__file__).parent / "istio_coverage"
    if (coverage / "reference.yaml").exists():
        cases = yaml.safe_load((coverage / "reference.yaml").read_text())["cases"]
        runs += [[str(coverage / "inputs" / name) for name in c["inputs"]] for c in cases]
    return runs


def test_every_rule_fires_on_examples_or_fixtures_and_gives_located_results(
    tmp_path: Path,
) -> None:
    fired: set[str] = set()
    nearest_rules: set[str] = set()
    for paths in corpus(tmp_path):
        result = analyze_paths(*paths)
        sarif = report.to_sarif(result, base_dir=str(ROOT))
        check(sarif)
        results = sarif["runs"][0]["results"]
        assert len(results) == len(result.findings)
        fired |= {r["ruleId"] for r in results}
        nearest_rules |= {r["ruleId"] for r in results if r["properties"].get("nearest")}
    for text, base in every_rule_inputs():
        result = analyze(context_from(text, base=base))
        sarif = report.to_sarif(result, base_dir=str(ROOT))
        check(sarif)
        fired |= {r["ruleId"] for r in sarif["runs"][0]["results"]}
    # The findings about something missing are among them, and are located too.
    assert {"TM-MTLS-001", "TM-EDGE-001", "TM-MTLS-007"} <= nearest_rules
    never = sorted({r.id for r in all_rules()} - fired)
    assert never == [], f"add a trigger for {never} to every_rule_inputs() in this file"


def test_missing_things_point_at_where_the_fix_goes() -> None:
    sarif = report.to_sarif(analyze_paths(str(ROOT / "examples" / "insecure")), str(ROOT))
    where = {
        r["ruleId"]: r["locations"][0]["physicalLocation"]
        for r in sarif["runs"][0]["results"]
        if r["properties"].get("nearest")
    }
    install = {"artifactLocation": {"uri": "examples/insecure/install.yaml"}, "region": {}}
    # outboundTrafficPolicy and enableAutoMtls are mesh config: the IstioOperator's spec.
    lines = (ROOT / "examples" / "insecure" / "install.yaml").read_text().splitlines()
    spec = next(i for i, line in enumerate(lines, 1) if line.startswith("spec:"))
    install["region"] = {"startLine": spec + 1}
    assert where["TM-EDGE-001"] == install
    assert where["TM-MTLS-007"] == install
    # No mesh-wide PeerAuthentication: next to the namespace's own (shop's PERMISSIVE mode).
    policies = (ROOT / "examples" / "insecure" / "policies.yaml").read_text().splitlines()
    mode = next(i for i, line in enumerate(policies, 1) if "mode: PERMISSIVE" in line)
    assert where["TM-MTLS-001"] == {
        "artifactLocation": {"uri": "examples/insecure/policies.yaml"},
        "region": {"startLine": mode},
    }


@pytest.mark.parametrize("rule", [r.id for r in all_rules()])
def test_any_rule_without_a_location_is_anchored_to_a_file(rule: str) -> None:
    """Whatever a rule (today's or a future one) reports without a location gets one."""
    ctx = context_from("")
    info = next(r for r in all_rules() if r.id == rule)
    issues = [
        Issue("mesh-wide", None),
        Issue("one namespace", None, workloads=("foo/httpbin",)),
        Issue("a resource", None, resource="Deployment/foo/httpbin"),
    ]
    findings = tuple(Finding(info, issue, nearest(ctx, info, issue)) for issue in issues)
    assert all(usable(f.anchor) for f in findings)
    sarif = report.to_sarif(AnalysisResult(findings, (), (rule,)), base_dir=str(ROOT))
    check(sarif)


def test_stdin_input_still_gives_located_results() -> None:
    text = (ROOT / "examples" / "insecure" / "policies.yaml").read_bytes()
    result = CliRunner().invoke(
        app, ["analyze", "-f", "-", "-o", "sarif", "--fail-on", "error"], input=text
    )
    assert result.exit_code in (0, 1), result.output
    sarif = json.loads(result.stdout)
    check(sarif)
    assert {
        loc["physicalLocation"]["artifactLocation"]["uri"]
        for r in sarif["runs"][0]["results"]
        for loc in r["locations"]
    } == {"stdin"}


BROKEN = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad, namespace: foo}
spec:
  action: DENY
  rules:
  - to:
    - operation:
        ports: ["http"]
"""


@pytest.fixture
def broken(tmp_path: Path) -> Path:
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    return path


def test_invalid_input_writes_sarif_with_the_errors_as_results(broken: Path) -> None:
    result = CliRunner().invoke(app, ["analyze", "-f", str(broken), "-o", "sarif"])
    assert result.exit_code == 3
    sarif = json.loads(result.stdout)
    check(sarif)
    run = sarif["runs"][0]
    assert run["invocations"] == [{"executionSuccessful": False}]
    assert [r["id"] for r in run["tool"]["driver"]["rules"]] == ["TM-INPUT-001"]
    errors = [r for r in run["results"] if r["level"] == "error"]
    assert errors and all(r["ruleId"] == "TM-INPUT-001" for r in errors)
    first = errors[0]["locations"][0]
    assert first["physicalLocation"]["region"]["startLine"] == 9
    assert first["message"]["text"] == "spec.rules[0].to[0].operation.ports[0]"
    assert first["physicalLocation"]["artifactLocation"]["uri"].endswith("broken.yaml")


@pytest.mark.parametrize("output", ["json", "yaml"])
def test_invalid_input_writes_a_machine_readable_error_document(broken: Path, output: str) -> None:
    result = CliRunner().invoke(app, ["analyze", "-f", str(broken), "-o", output])
    assert result.exit_code == 3
    document = json.loads(result.stdout) if output == "json" else yaml.safe_load(result.stdout)
    assert document["valid"] is False and document["findings"] == []
    error = document["input_errors"][0]
    assert (Path(error["file"]).name, error["line"], error["field"]) == (
        "broken.yaml",
        9,
        "spec.rules[0].to[0].operation.ports[0]",
    )
    assert document["summary"]["input_errors"] == len(document["input_errors"])


def test_exit_codes_tell_invalid_input_from_findings(broken: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    insecure = str(ROOT / "examples" / "insecure")
    assert runner.invoke(app, ["analyze", "-f", insecure, "--fail-on", "warning"]).exit_code == 1
    clean = runner.invoke(app, ["analyze", "-f", insecure, "--rules", "TM-INST-016"])
    assert clean.exit_code == 0, clean.output
    assert runner.invoke(app, ["analyze", "-f", str(broken)]).exit_code == 3
    assert runner.invoke(app, ["analyze", "-f", str(broken), "--fail-on", "info"]).exit_code == 3
    missing = runner.invoke(app, ["analyze", "-f", str(tmp_path / "nope.yaml"), "-o", "sarif"])
    assert missing.exit_code == 3
    check(json.loads(missing.stdout))
    assert runner.invoke(app, ["analyze", "-f", insecure, "--fail-on", "often"]).exit_code == 2
    assert runner.invoke(app, ["harden", "-f", str(broken)]).exit_code == 3
    assert "Exit codes" in runner.invoke(app, ["analyze", "--help"]).stdout


def test_json_gives_the_nearest_file_of_a_finding_without_a_location() -> None:
    result = CliRunner().invoke(
        app, ["analyze", "-f", str(ROOT / "examples" / "insecure"), "-o", "json"]
    )
    found = {f["rule"]: f for f in json.loads(result.stdout)["findings"]}
    edge = found["TM-EDGE-001"]
    assert edge["file"] is None  # nothing of its own to point at
    assert edge["nearest"]["file"].endswith("examples/insecure/install.yaml")
    assert edge["nearest"]["line"] > 0
    assert "nearest" not in found["TM-AUTHZ-004"]
