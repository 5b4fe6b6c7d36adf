"""compile_mesh computes what a workload's namespace and labels decide once per distinct
(namespace, labels): each WorkloadPolicy must still equal the per-workload answer."""

from __future__ import annotations

from trustmesh.pipeline import compile_sources
from trustmesh.policy import compose
from trustmesh.policy.compose import MeshPolicy

NAMESPACES = ("alpha", "beta")


def _pod(ns: str, name: str, labels: dict[str, str], sa: str = "default") -> str:
    rendered = ", ".join(f"{k}: {v}" for k, v in labels.items())
    return (
        f"apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n"
        f"  labels: {{{rendered}}}\nspec:\n  serviceAccountName: {sa}\n"
        "  containers:\n  - name: app\n    ports: [{containerPort: 8000}]\n"
        "  - {name: istio-proxy, image: istio/proxyv2}\n"
    )


def _fleet() -> str:
    docs = [
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: istio-system\n",
        # mesh-wide PERMISSIVE, beta STRICT, a workload-level DISABLE with a port override
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: PERMISSIVE}}\n",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: ns, namespace: beta}\nspec: {mtls: {mode: STRICT}}\n",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: web, namespace: alpha}\n"
        "spec:\n  selector: {matchLabels: {app: web}}\n  mtls: {mode: STRICT}\n"
        "  portLevelMtls: {8000: {mode: DISABLE}}\n",
        # policies: namespace-wide, by app, by app+tier, root-namespace mesh-wide DENY
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: ns-allow, namespace: alpha}\n"
        "spec:\n  action: ALLOW\n  rules: [{to: [{operation: {methods: [GET]}}]}]\n",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: web-only, namespace: alpha}\n"
        "spec:\n  selector: {matchLabels: {app: web}}\n  action: DENY\n"
        "  rules: [{to: [{operation: {paths: [/admin]}}]}]\n",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: web-front, namespace: alpha}\n"
        "spec:\n  selector: {matchLabels: {app: web, tier: front}}\n  action: ALLOW\n"
        "  rules: [{to: [{operation: {methods: [POST]}}]}]\n",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: mesh-deny, namespace: istio-system}\n"
        "spec:\n  action: DENY\n  rules: [{to: [{operation: {paths: [/secret]}}]}]\n",
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
        "metadata: {name: jwt, namespace: beta}\n"
        "spec:\n  selector: {matchLabels: {app: api}}\n"
        "  jwtRules: [{issuer: https://issuer.example, jwksUri: https://issuer.example/jwks}]\n",
        # a Sidecar for alpha's db pods only: REGISTRY_ONLY
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\n"
        "metadata: {name: db, namespace: alpha}\n"
        "spec:\n  workloadSelector: {labels: {app: db}}\n"
        "  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n",
    ]
    for ns in NAMESPACES:
        docs.append(
            f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n"
            "  labels: {istio-injection: enabled}\n"
        )
        for app in ("web", "api", "db"):
            docs.append(
                f"apiVersion: v1\nkind: Service\nmetadata: {{name: {app}, namespace: {ns}}}\n"
                f"spec:\n  selector: {{app: {app}}}\n"
                "  ports: [{name: http, port: 8000, targetPort: 8000}]\n"
            )
        docs.append(  # a Service selecting only the front tier of web
            f"apiVersion: v1\nkind: Service\nmetadata: {{name: web-front, namespace: {ns}}}\n"
            "spec:\n  selector: {app: web, tier: front}\n"
            "  ports: [{name: http, port: 8000, targetPort: 8000}]\n"
        )
        for i in range(3):
            docs.append(_pod(ns, f"web-front-{i}", {"app": "web", "tier": "front"}, "web"))
            docs.append(_pod(ns, f"web-back-{i}", {"app": "web", "tier": "back"}, "web"))
            docs.append(_pod(ns, f"api-{i}", {"app": "api"}, "api"))
            docs.append(_pod(ns, f"db-{i}", {"app": "db"}, "db"))
            docs.append(_pod(ns, f"db-tier-{i}", {"tier": "front", "app": "db"}, "db"))
    return "---\n".join(docs)


def _mesh() -> MeshPolicy:
    compiled = compile_sources([("fleet.yaml", _fleet().encode())])
    assert compiled.mesh is not None, "\n".join(map(str, compiled.errors))
    return compiled.mesh


def test_each_workload_policy_equals_its_own_computation() -> None:
    mesh = _mesh()
    snapshot = mesh.snapshot
    root = snapshot.mesh.root_namespace
    peers = list(snapshot.of_kind("PeerAuthentication"))
    scopes = compose._mtls_scopes(peers, root)
    sidecars = list(snapshot.of_kind("Sidecar"))
    authz = compose._Selector(snapshot.of_kind("AuthorizationPolicy"), root)
    jwt = compose._Selector(snapshot.of_kind("RequestAuthentication"), root)
    assert len(mesh.workloads) == 2 * 5 * 3
    shapes = set()
    for workload in snapshot.workloads:
        wp = mesh.workloads[workload.ref]
        assert wp.workload is workload
        assert wp.mtls == compose._mtls_for(workload, scopes, peers, root)
        assert wp.egress_mode == compose._egress_mode(workload, sidecars, snapshot.mesh, root)
        assert wp.services == snapshot.services_of(workload)
        assert [p.name for a in _actions(wp.authz) for p in a.policies] == [
            p.name for p in _by_action(authz.select(workload))
        ]
        assert tuple(p.source for p in wp.jwt_providers) == tuple(
            f"{p.namespace}/{p.name}" for p in jwt.select(workload)
        )
        shapes.add(repr((wp.mtls, wp.egress_mode, wp.services, id(wp.authz), wp.jwt_providers)))
    # The fleet really has distinct answers (so a memo keyed too coarsely would fail).
    assert len(shapes) >= 6


def test_pods_of_one_shape_share_their_compiled_values() -> None:
    mesh = _mesh()
    a, b = mesh.workloads["alpha/web-front-0"], mesh.workloads["alpha/web-front-2"]
    assert a.authz is b.authz and a.mtls is b.mtls and a.services is b.services
    back = mesh.workloads["alpha/web-back-0"]
    assert back.authz is not a.authz  # web-front selects one more policy
    assert [s.name for s in a.services] == ["web", "web-front"]
    assert [s.name for s in back.services] == ["web"]
    assert a.mtls.for_port(8000).mode.value == "DISABLE"
    assert mesh.workloads["beta/web-front-0"].mtls.workload.mode.value == "STRICT"
    assert mesh.workloads["alpha/db-0"].egress_mode.value == "REGISTRY_ONLY"
    assert mesh.workloads["alpha/api-0"].egress_mode.value == "ALLOW_ANY"
    assert [p.issuer for p in mesh.workloads["beta/api-1"].jwt_providers] == [
        "https://issuer.example"
    ]
    assert mesh.workloads["alpha/api-1"].jwt_providers == ()


def _actions(authz: compose.AuthzPolicy) -> list[compose.ActionRules]:
    return [
        authz.custom,
        authz.deny,
        authz.allow,
        authz.audit,
        authz.dry_run_deny,
        authz.dry_run_allow,
    ]


def _by_action(policies: list) -> list:  # type: ignore[type-arg]
    order = ["CUSTOM", "DENY", "ALLOW", "AUDIT"]
    return sorted(policies, key=lambda p: order.index(p.spec.action.value))
