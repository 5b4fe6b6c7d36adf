"""``trustDomains`` / ``notTrustDomains`` / ``source.trustDomain`` through real Envoy over
mesh mTLS: the differential rig is plaintext and cannot present a peer identity, so here
clients with certificates of several trust domains call a sidecar built by translate(),
and every answer must be the evaluator's."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.envoy.conftest import (  # fixtures are registered by importing them
    Loopback,
    MiniCA,
    Sidecars,
    ca,
    loopback,
    mesh_client_tls,
    run,
    sidecars,
    workroot,
)
from tests.unit.meshutil import NOW, compile_text, policy
from tests.xds.translate_rig import _app, _bootstrap_patch, _request
from trustmesh.policy.evaluate import evaluate
from trustmesh.policy.request import HttpRequest, Request, Source
from trustmesh.xds.translate import translate

__all__ = ["ca", "loopback", "sidecars", "workroot"]  # re-exported fixtures, used by name

POLICIES = policy(
    "trusted",
    "foo",
    """
selector: {matchLabels: {app: httpbin}}
rules:
- from:
  - source: {trustDomains: ["cluster.local", "*.partner.example"]}
  to: [{operation: {paths: ["/get"]}}]
- from:
  - source: {notTrustDomains: ["bad*", "untrusted"]}
  to: [{operation: {paths: ["/open"]}}]
- to: [{operation: {paths: ["/when"]}}]
  when: [{key: source.trustDomain, values: ["prod-*"]}]
""",
)
DOMAINS = (
    "cluster.local",
    "eu.partner.example",
    "partner.example",
    "bad-actor.io",
    "untrusted",
    "prod-eu",
    "cluster.local.evil",
)
PATHS = ("/get", "/open", "/when")


@pytest.mark.envoy
def test_envoy_and_the_evaluator_agree_on_trust_domains(
    ca: MiniCA, loopback: Loopback, sidecars: Sidecars, workroot: Path
) -> None:
    mesh = compile_text(POLICIES)
    inbound, app = loopback.address(), loopback.address()
    resources = translate(mesh, "foo/httpbin", inbound_address=inbound, app_address=app)
    clients = {}
    for domain in DOMAINS:
        context = mesh_client_tls(ca.issue("foo", "sleep", domain), workroot)
        context.set_alpn_protocols(["istio-http/1.1"])
        clients[domain] = context

    def offline(domain: str | None, path: str) -> int:
        source = (
            Source.plaintext() if domain is None else Source.principal(f"{domain}/ns/foo/sa/sleep")
        )
        request = Request(source, "foo/httpbin", 8000, HttpRequest("GET", path))
        status = evaluate(mesh, request, now=NOW).status
        assert status is not None
        return status

    async def scenario() -> list[str]:
        differences: list[str] = []
        async with (
            _app(app, 8000),
            sidecars.run("httpbin", ca.issue("foo", "httpbin"), patch=_bootstrap_patch(resources)),
        ):
            for domain in (*DOMAINS, None):
                for path in PATHS:
                    tls = clients[domain] if domain is not None else None
                    reply = await _request(inbound, 8000, "GET", path, tls=tls)
                    expected = offline(domain, path)
                    if reply.status != expected:
                        differences.append(
                            f"{domain} {path}: envoy {reply.status}, offline {expected}"
                        )
        return differences

    differences = run(scenario(), timeout=60)
    assert not differences, "\n".join(differences)
    # The grid is not trivially uniform: both answers occur for every path.
    for path in PATHS:
        answers = {offline(d, path) for d in (*DOMAINS, None)}
        assert answers == {200, 403}, (path, answers)
