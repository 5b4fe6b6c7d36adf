"""`trustmesh apply / get / delete` against a real etcd and against a directory store."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from trustmesh.cli.main import app
from trustmesh.config import load_config
from trustmesh.store import open_store
from trustmesh.store.apply import apply_resources
from trustmesh.store.etcd_client import TLS_ENV
from trustmesh.store.etcd_server import EtcdCluster

runner = CliRunner()

POLICIES = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-get
  namespace: foo
spec:
  action: DENY
  rules:
  - to:
    - operation:
        methods: ["GET"]
        ports: ["8080"]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: foo
spec:
  mtls:
    mode: STRICT
"""

VALID_THEN_INVALID = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: fine
  namespace: foo
spec:
  action: ALLOW
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: broken
  namespace: foo
spec:
  action: DENYY
"""


def invoke(*args: str, stdin: str | None = None):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args), input=stdin)


def use_certificate(monkeypatch: pytest.MonkeyPatch, etcd: EtcdCluster) -> None:
    """The operator's etcd client certificate through the environment (--etcd-*file's)."""
    assert etcd.tls is not None
    for name, path in zip(TLS_ENV, (etcd.tls.ca, etcd.tls.cert, etcd.tls.key), strict=True):
        monkeypatch.setenv(name, str(path))


@pytest.fixture(params=["etcd", "file"])
def store(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    if request.param == "file":
        yield f"file:{tmp_path / 'store'}"
        return
    etcd: EtcdCluster = request.getfixturevalue("etcd")
    use_certificate(monkeypatch, etcd)
    # A fresh key space per test: a separate etcd would cost a start; clear ours instead.
    yield etcd.url
    listed = invoke("get", "all", "-A", "-o", "json", "--store", etcd.url)
    for item in json.loads(listed.stdout)["items"]:
        meta = item["metadata"]
        kind = item["kind"]
        invoke("delete", kind, meta["name"], "-n", meta.get("namespace", ""), "--store", etcd.url)


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_apply_reports_created_unchanged_configured(tmp_path: Path, store: str) -> None:
    policies = write(tmp_path, "p.yaml", POLICIES)
    first = invoke("apply", "-f", policies, "--store", store)
    assert first.exit_code == 0, first.output
    assert first.stdout.splitlines() == [
        "authorizationpolicy.security.istio.io/deny-get created",
        "peerauthentication.security.istio.io/default created",
    ]
    again = invoke("apply", "-f", policies, "--store", store)
    assert again.stdout.splitlines() == [
        "authorizationpolicy.security.istio.io/deny-get unchanged",
        "peerauthentication.security.istio.io/default unchanged",
    ]
    changed = write(tmp_path, "p2.yaml", POLICIES.replace("STRICT", "PERMISSIVE"))
    third = invoke("apply", "-f", changed, "--store", store)
    assert third.stdout.splitlines() == [
        "authorizationpolicy.security.istio.io/deny-get unchanged",
        "peerauthentication.security.istio.io/default configured",
    ]
    table = invoke("get", "peerauthentications", "-n", "foo", "--store", store)
    assert table.exit_code == 0
    assert "default" in table.stdout and "RESOURCE VERSION" in table.stdout
    shown = invoke("get", "pa", "default", "-n", "foo", "-o", "json", "--store", store)
    assert json.loads(shown.stdout)["spec"]["mtls"]["mode"] == "PERMISSIVE"


def test_an_invalid_document_writes_nothing_and_names_file_line_field(
    tmp_path: Path, store: str
) -> None:
    bad = write(tmp_path, "bad.yaml", VALID_THEN_INVALID)
    result = invoke("apply", "-f", bad, "--store", store)
    assert result.exit_code == 1
    assert f"{bad}:15 spec.action" in result.stderr
    assert "nothing was written" in result.stderr
    assert "Traceback" not in result.output
    listed = invoke("get", "ap", "-A", "-o", "json", "--store", store)
    assert json.loads(listed.stdout)["items"] == []  # not even the valid first document


def test_get_output_round_trips_through_apply(tmp_path: Path, store: str) -> None:
    invoke("apply", "-f", write(tmp_path, "p.yaml", POLICIES), "--store", store)
    for output in ("yaml", "json"):
        one = invoke("get", "ap", "deny-get", "-n", "foo", "-o", output, "--store", store)
        every = invoke("get", "all", "-A", "-o", output, "--store", store)
        for text in (one.stdout, every.stdout):
            back = invoke("apply", "-f", "-", "--store", store, stdin=text)
            assert back.exit_code == 0, back.output
            assert back.stdout.strip() and all(
                line.endswith(" unchanged") for line in back.stdout.splitlines()
            )
    body = yaml.safe_load(
        invoke("get", "ap", "deny-get", "-n", "foo", "-o", "yaml", "--store", store).stdout
    )
    assert body["spec"]["rules"][0]["to"][0]["operation"]["methods"] == ["GET"]
    assert int(body["metadata"]["resourceVersion"]) > 0


def test_a_stale_resource_version_is_refused(tmp_path: Path, store: str) -> None:
    invoke("apply", "-f", write(tmp_path, "p.yaml", POLICIES), "--store", store)
    read = invoke("get", "pa", "default", "-n", "foo", "-o", "yaml", "--store", store).stdout
    # Someone else changes the object after we read it…
    other = write(tmp_path, "other.yaml", POLICIES.replace("STRICT", "PERMISSIVE"))
    assert invoke("apply", "-f", other, "--store", store).exit_code == 0
    # …so our edit, made on the old copy, must not overwrite theirs.
    mine = write(tmp_path, "mine.yaml", read.replace("STRICT", "DISABLE"))
    result = invoke("apply", "-f", mine, "--store", store)
    assert result.exit_code == 1
    assert "changed by someone else" in result.stderr
    assert "nothing was written" in result.stderr
    now = invoke("get", "pa", "default", "-n", "foo", "-o", "json", "--store", store).stdout
    assert json.loads(now)["spec"]["mtls"]["mode"] == "PERMISSIVE"


def test_delete_by_file_and_by_name(tmp_path: Path, store: str) -> None:
    policies = write(tmp_path, "p.yaml", POLICIES)
    invoke("apply", "-f", policies, "--store", store)
    gone = invoke("delete", "authorizationpolicy", "deny-get", "-n", "foo", "--store", store)
    assert gone.stdout.strip() == "authorizationpolicy.security.istio.io/deny-get deleted"
    missing = invoke("delete", "-f", policies, "--store", store)
    assert missing.exit_code == 1 and "not found" in missing.stderr
    assert "nothing was deleted" in missing.stderr
    # The PeerAuthentication is still there: the failed delete removed nothing.
    assert invoke("get", "pa", "default", "-n", "foo", "--store", store).exit_code == 0
    invoke("apply", "-f", policies, "--store", store)
    both = invoke("delete", "-f", policies, "--store", store)
    assert both.exit_code == 0 and len(both.stdout.splitlines()) == 2
    after = invoke("get", "all", "-A", "-o", "json", "--store", store)
    assert json.loads(after.stdout)["items"] == []


def test_kinds_trustmesh_does_not_read_are_refused(tmp_path: Path, store: str) -> None:
    odd = write(
        tmp_path,
        "odd.yaml",
        "apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: w\n  namespace: foo\n",
    )
    result = invoke("apply", "-f", odd, "--store", store)
    assert result.exit_code == 1 and f"{odd}:1" in result.stderr and "Widget" in result.stderr


def test_bad_store_address_is_a_clear_error(tmp_path: Path) -> None:
    policies = write(tmp_path, "p.yaml", POLICIES)
    result = invoke("apply", "-f", policies, "--store", "etcd://nohost")
    assert result.exit_code == 1 and "is not HOST:PORT" in result.stderr
    assert "Traceback" not in result.output


def test_the_file_store_is_a_directory_trustmesh_validate_reads(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    invoke("apply", "-f", write(tmp_path, "p.yaml", POLICIES), "--store", f"file:{directory}")
    validated = invoke("validate", "-f", str(directory))
    assert validated.exit_code == 0, validated.output
    assert sorted(p.name for p in (directory / "foo").iterdir()) == [
        "authorizationpolicy-deny-get.yaml",
        "peerauthentication-default.yaml",
    ]


def test_apply_latency_against_etcd(
    tmp_path: Path, etcd: EtcdCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_certificate(monkeypatch, etcd)
    policies = write(tmp_path, "p.yaml", POLICIES)
    timings = []
    for mode in ("STRICT", "PERMISSIVE") * 5:
        changed = write(tmp_path, "p.yaml", POLICIES.replace("STRICT", mode))
        started = time.perf_counter()
        result = invoke("apply", "-f", changed, "--store", etcd.url)
        timings.append(time.perf_counter() - started)
        assert result.exit_code == 0, result.output
    # The store's share: read each object, one transaction (what a replica's apply costs).
    versions = []
    for mode in ("STRICT", "PERMISSIVE"):
        path = write(tmp_path, f"{mode}.yaml", POLICIES.replace("STRICT", mode))
        versions.append(load_config([path], compile_policy=False).snapshot.resources)

    async def commits() -> list[float]:
        store = open_store(etcd.url, etcd.tls)
        out = []
        try:
            for i in range(20):
                started = time.perf_counter()
                outcome = await apply_resources(store, versions[i % 2])
                assert "configured" in dict(outcome).values()
                out.append(time.perf_counter() - started)
        finally:
            await store.close()
        return sorted(out)

    store_timings = asyncio.run(commits())
    invoke("delete", "-f", policies, "--store", etcd.url)
    timings.sort()
    print(
        f"\napply CLI (validate + one etcd transaction) median {timings[5] * 1000:.1f} ms;"
        f" store part median {store_timings[10] * 1000:.1f} ms"
    )
    assert timings[5] < 2.0


@pytest.mark.parametrize(
    ("name", "namespace", "field"),
    [
        ("../../escape", "foo", "metadata.name"),
        ("a/b", "foo", "metadata.name"),
        ("Upper", "foo", "metadata.name"),
        ("ok", "../up", "metadata.namespace"),
    ],
)
def test_names_the_api_server_would_refuse_are_refused_before_any_write(
    tmp_path: Path, name: str, namespace: str, field: str
) -> None:
    directory = tmp_path / "deep" / "store"
    bad = write(
        tmp_path,
        "n.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n"
        f'  name: "{name}"\n  namespace: "{namespace}"\nspec: {{}}\n',
    )
    result = invoke("apply", "-f", bad, "--store", f"file:{directory}")
    assert result.exit_code == 1
    assert f"{bad}:{4 if field.endswith('name') else 5} {field}" in result.stderr
    assert "nothing was written" in result.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "n.yaml"]
    assert written == []
