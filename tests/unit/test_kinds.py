"""Kinds and versions: what a cluster with Istio refuses is an error, never silently skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from trustmesh.api import kinds
from trustmesh.api.diagnostics import Diagnostic
from trustmesh.api.loader import load_sources
from trustmesh.cli.main import app

from .meshutil import BASE

DENY_ALL = """apiVersion: {api}
kind: {kind}
metadata:
  name: deny-all
  namespace: foo
spec:
  action: DENY
  rules: [{{}}]
"""


def errors_of(text: str) -> list[Diagnostic]:
    return load_sources([("policies.yaml", text.encode())]).errors


def only_error(text: str) -> Diagnostic:
    errors = errors_of(text)
    assert len(errors) == 1, [str(d) for d in errors]
    return errors[0]


def test_misspelled_security_kind_is_an_error_with_a_suggestion() -> None:
    problem = only_error(DENY_ALL.format(api="security.istio.io/v1", kind="AuthorisationPolicy"))
    assert (problem.code, problem.location.line, problem.location.field) == (
        "unknown-kind",
        2,
        "kind",
    )
    assert "did you mean AuthorizationPolicy?" in problem.message


def test_security_kind_under_the_networking_group_names_its_group() -> None:
    problem = only_error(DENY_ALL.format(api="networking.istio.io/v1", kind="AuthorizationPolicy"))
    assert (problem.location.line, problem.location.field) == (1, "apiVersion")
    assert "AuthorizationPolicy is in security.istio.io, not networking.istio.io" in problem.message
    assert "apiVersion: security.istio.io/v1" in problem.message


def test_a_typo_across_groups_suggests_the_kind_with_its_api_version() -> None:
    problem = only_error(DENY_ALL.format(api="networking.istio.io/v1", kind="AuthorisationPolicy"))
    assert problem.location.field == "kind"
    assert "did you mean AuthorizationPolicy (apiVersion: security.istio.io/v1)?" in (
        problem.message
    )


def test_a_security_kind_in_the_core_group_is_refused() -> None:
    problem = only_error(DENY_ALL.format(api="v1", kind="AuthorizationPolicy"))
    assert "AuthorizationPolicy is in security.istio.io" in problem.message


def test_case_matters_as_it_does_for_the_api_server() -> None:
    problem = only_error(DENY_ALL.format(api="security.istio.io/v1", kind="authorizationpolicy"))
    assert "did you mean AuthorizationPolicy?" in problem.message


@pytest.mark.parametrize(
    ("api", "kind", "line", "expected"),
    [
        ("security.istio.io/v1alpha1", "AuthorizationPolicy", 1, "security.istio.io/v1beta1"),
        ("networking.istio.io/v1", "EnvoyFilter", 1, "served: networking.istio.io/v1alpha3"),
        ("telemetry.istio.io/v2", "Telemetry", 1, "telemetry.istio.io/v1alpha1"),
        ("securty.istio.io/v1", "AuthorizationPolicy", 1, "is in security.istio.io"),
        ("policy.istio.io/v1", "Widget", 1, "Istio serves extensions.istio.io,"),
        ("securiti.istio.io/v1", "Widget", 1, "did you mean security.istio.io?"),
        ("networking.istio.io/v1", "Sidecars", 2, "did you mean Sidecar?"),
        ("security.istio.io", "PeerAuthentication", 1, "GROUP/VERSION"),
    ],
)
def test_unserved_istio_groups_kinds_and_versions(
    api: str, kind: str, line: int, expected: str
) -> None:
    problem = only_error(DENY_ALL.format(api=api, kind=kind))
    assert problem.location.line == line
    assert expected in problem.message


@pytest.mark.parametrize(
    ("api", "kind"),
    [
        ("networking.istio.io/v1beta1", "ProxyConfig"),
        ("telemetry.istio.io/v1", "Telemetry"),
        ("telemetry.istio.io/v1alpha1", "Telemetry"),
        ("extensions.istio.io/v1alpha1", "WasmPlugin"),
        ("extensions.istio.io/v1alpha1", "TrafficExtension"),
        ("v1", "PersistentVolumeClaim"),  # Secret is read now: gateways serve its tls.crt
        ("apps/v1", "ReplicaSet"),
    ],
)
def test_kinds_istio_or_kubernetes_serve_but_trustmesh_does_not_model_are_kept(
    api: str, kind: str
) -> None:
    result = load_sources(
        [("x.yaml", f"apiVersion: {api}\nkind: {kind}\nmetadata: {{name: x}}\n".encode())]
    )
    assert result.diagnostics == []
    assert [(u.kind, u.api_version) for u in result.unknown] == [(kind, api)]


@pytest.mark.parametrize(
    ("api", "kind", "expected"),
    [
        ("apps/v1", "Deploymnet", "did you mean Deployment?"),
        ("v1", "Servcie", "did you mean Service?"),
        ("v1", "pod", "did you mean Pod?"),
        ("app/v1", "Deployment", "use apiVersion: apps/v1"),
        ("apps/v1beta2", "Deployment", "served: apps/v1"),
        ("v1", "Deployment", "Deployment is in apps"),
    ],
)
def test_misspelled_kubernetes_builtins_are_refused_like_the_api_server_does(
    api: str, kind: str, expected: str
) -> None:
    problem = only_error(f"apiVersion: {api}\nkind: {kind}\nmetadata: {{name: x}}\n")
    assert expected in problem.message


@pytest.mark.parametrize(
    ("api", "kind", "expected"),
    [
        ("rbac.istio.io/v1alpha1", "ServiceRole", "removed in Istio 1.6"),
        ("authentication.istio.io/v1alpha1", "Policy", "PeerAuthentication"),
        ("config.istio.io/v1alpha2", "QuotaSpec", "removed with Mixer"),
        ("extensions/v1beta1", "Deployment", "removed in Kubernetes 1.16"),
    ],
)
def test_removed_apis_are_named_and_kept_unenforced(api: str, kind: str, expected: str) -> None:
    """No cluster serves them, so Istio enforces nothing of them either: a warning at the
    apiVersion (the analyzer's TM-INST-015 gives the rewrite), never a silent skip."""
    text = f"apiVersion: {api}\nkind: {kind}\nmetadata: {{name: old, namespace: foo}}\n"
    result = load_sources([("old.yaml", text.encode())])
    [problem] = result.diagnostics
    assert (problem.is_error, problem.code, problem.location.field) == (
        False,
        "removed-api",
        "apiVersion",
    )
    assert expected in problem.message
    assert [(u.kind, u.api_version) for u in result.unknown] == [(kind, api)]


def test_every_served_kind_and_version_is_accepted_and_a_typo_finds_it() -> None:
    for group, served in kinds.SERVED.items():
        for kind, versions in served.items():
            for version in versions:
                assert kinds.check(kinds.api_version(group, version), kind) is None
            if len(kind) >= 6:
                typo = kind[:2] + kind[3] + kind[2] + kind[4:]  # swap two letters
                found = kinds.check(kinds.api_version(group, versions[0]), typo)
                assert found is not None and f"did you mean {kind}" in found.message, typo


def test_other_groups_stay_open_and_only_near_misses_of_known_groups_are_refused() -> None:
    assert kinds.check("gateway.networking.k8s.io/v1", "HTTPRoute") is None
    assert kinds.check("gateway.networking.k8s.io/v1", "Gateway") is None
    assert kinds.check("serving.knative.dev/v1", "Service") is None
    found = kinds.check("security.istio.i0/v1", "AuthorizationPolicy")
    assert found is not None and "is in security.istio.io" in found.message


def test_typed_lists_are_flattened_like_kubectl_does() -> None:
    item = DENY_ALL.format(api="security.istio.io/v1", kind="AuthorizationPolicy")
    indented = "\n".join("  " + line for line in item.splitlines())
    text = (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicyList\nitems:\n-"
        + (indented[1:])
    )
    result = load_sources([("dump.yaml", text.encode())])
    assert result.diagnostics == []
    assert [r.name for r in result.resources] == ["deny-all"]


def test_authz_check_refuses_a_misspelled_deny_all_instead_of_allowing(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        BASE.decode()
        + "---\n"
        + DENY_ALL.format(api="networking.istio.io/v1", kind="AuthorizationPolicy")
    )
    args = ["authz", "check", "-f", str(config), "--to", "foo/httpbin", "--from", "foo/sleep"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "AuthorizationPolicy is in security.istio.io" in result.output
    assert "ALLOW" not in result.output


def test_validate_lists_ignored_kinds_in_table_and_json(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: a}\n---\n"
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: b}\n---\n"
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: c}\n"
    )
    table = CliRunner().invoke(app, ["validate", "-f", str(config)])
    assert table.exit_code == 0, table.output
    assert "HTTPRoute (gateway.networking.k8s.io/v1) ×2, unknown kind" in table.output
    assert f"{config}:1, {config}:5" in table.output
    assert "Telemetry (telemetry.istio.io/v1) ×1, not modelled" in table.output
    data = json.loads(CliRunner().invoke(app, ["validate", "-f", str(config), "-o", "json"]).output)
    assert data["valid"] is True
    by_kind = {i["kind"]: i for i in data["ignored"]}
    assert by_kind["HTTPRoute"]["count"] == 2
    assert by_kind["HTTPRoute"]["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert by_kind["HTTPRoute"]["locations"] == [
        {"file": str(config), "line": 1},
        {"file": str(config), "line": 5},
    ]
    assert by_kind["Telemetry"]["reason"] == "not modelled by trustmesh"
