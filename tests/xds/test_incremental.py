"""An incremental rebuild (xds.incremental, via the control plane's build) serves exactly
what a full rebuild serves: the same snapshot version and per-type versions for every
proxy, over hand-picked changes of every kind and a generated sequence of policy edits.

Each step is applied to the configuration directory and built twice: from scratch, and
from the previous incremental build. Policy-only steps must actually take the
incremental path (else this test would prove nothing about it)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from trustmesh.api.loader import SourceCache
from trustmesh.xds import controlplane as cp
from trustmesh.xds.controlplane import ProxyRegistration
from trustmesh.xds.translate import CaptureMode

_BASE = """\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: other, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
"""


def _app(namespace: str, name: str, port: int | None, port_name: str = "http") -> str:
    ports = f"        ports: [{{containerPort: {port}}}]\n" if port else ""
    text = (
        "apiVersion: v1\nkind: ServiceAccount\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\n"
        f"---\napiVersion: apps/v1\nkind: Deployment\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\n"
        f"spec:\n  selector:\n    matchLabels: {{app: {name}}}\n"
        f"  template:\n    metadata:\n      labels: {{app: {name}, version: v1}}\n"
        f"    spec:\n      serviceAccountName: {name}\n"
        f"      containers:\n      - name: app\n{ports}"
    )
    if port:
        text += (
            "---\napiVersion: v1\nkind: Service\n"
            f"metadata: {{name: {name}, namespace: {namespace}}}\n"
            f"spec:\n  selector: {{app: {name}}}\n"
            f"  ports: [{{name: {port_name}, port: {port}, targetPort: {port}}}]\n"
        )
    return text


def _policy(name: str, namespace: str, body: str, selector: str | None = None) -> str:
    select = f"  selector:\n    matchLabels: {{app: {selector}}}\n" if selector else ""
    return (
        f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{select}{body}"
    )


_ALLOW_GET = "  action: ALLOW\n  rules:\n  - to: [{operation: {methods: [GET]}}]\n"
_ALLOW_POST = "  action: ALLOW\n  rules:\n  - to: [{operation: {methods: [POST]}}]\n"
_DENY_OTHER = "  action: DENY\n  rules:\n  - from: [{source: {namespaces: [other]}}]\n"
_DENY_GET = "  action: DENY\n  rules:\n  - to: [{operation: {methods: [GET]}}]\n"
_AUDIT = "  action: AUDIT\n  rules:\n  - to: [{operation: {paths: [/audit]}}]\n"
_ALLOW_ALL = "  rules:\n  - {}\n"
_HEADER = "  action: DENY\n  rules:\n  - when: [{key: 'request.headers[x-block]', values: ['1']}]\n"
_HOSTS = "  action: ALLOW\n  rules:\n  - to: [{operation: {hosts: [web.shop]}}]\n"
_PRINCIPAL = (
    "  action: ALLOW\n  rules:\n"
    "  - from: [{source: {principals: [cluster.local/ns/other/sa/client]}}]\n"
)
_JWKS = (
    '{"keys":[{"kty":"EC","crv":"P-256","x":"gS-hfNlLJtH4Nr1fnNxkKz7QrU9aCmAM_l5ScqQKbJM",'
    '"y":"9zuUKr3qJG2ZCWZzxqSPL4QXqCq3JMK1Beb1d7TdQKI","kid":"k","alg":"ES256","use":"sig"}]}'
)
_REQUEST_AUTHN = (
    "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
    "metadata: {name: jwt, namespace: shop}\nspec:\n  selector:\n    matchLabels: {app: web}\n"
    f"  jwtRules:\n  - issuer: https://issuer.example\n    jwks: '{_JWKS}'\n"
)
_PEER_STRICT = (
    "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
    "metadata: {name: default, namespace: shop}\nspec:\n  mtls: {mode: STRICT}\n"
)
_DESTINATION_RULE = (
    "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
    "metadata: {name: web, namespace: shop}\nspec:\n  host: web.shop.svc.cluster.local\n"
    "  trafficPolicy:\n    tls: {mode: DISABLE}\n"
)


def _virtual_service(timeout: str) -> str:
    # Only the route changes between two of these: the model of a VirtualService holds
    # its hosts, so the change is seen in the spec as written.
    return (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        "metadata: {name: web, namespace: shop}\nspec:\n  hosts: [web.shop.svc.cluster.local]\n"
        "  http:\n  - route:\n    - destination: {host: web.shop.svc.cluster.local}\n"
        f"    timeout: {timeout}\n"
    )


# The policies a generated step switches on and off (file name → document).
_POOL = {
    "p-web-get": _policy("web-get", "shop", _ALLOW_GET, "web"),
    "p-web-post": _policy("web-get", "shop", _ALLOW_POST, "web"),  # the same policy, edited
    "p-db-deny": _policy("db-deny", "shop", _DENY_OTHER, "db"),
    "p-api-deny-get": _policy("api-deny", "shop", _DENY_GET, "api"),
    "p-api-audit": _policy("api-audit", "shop", _AUDIT, "api"),
    "p-shop-wide": _policy("shop-wide", "shop", _DENY_OTHER),
    "p-root": _policy("root-allow", "istio-system", _ALLOW_ALL),
    "p-header": _policy("header", "shop", _HEADER, "web"),
    "p-hosts": _policy("hosts", "shop", _HOSTS, "web"),
    "p-principal": _policy("principal", "shop", _PRINCIPAL, "api"),
    "p-selector-moved": _policy("moved", "shop", _ALLOW_GET, "web"),
    "p-selector-moved2": _policy("moved", "shop", _ALLOW_GET, "api"),  # selector changed
    "p-other": _policy("other-allow", "other", _ALLOW_GET),
    "ra-jwt": _REQUEST_AUTHN,
}
_POLICY_ONLY = set(_POOL)


def _registrations() -> dict[str, ProxyRegistration]:
    regs = [
        ProxyRegistration.sidecar("shop/web", "127.0.30.1", app_address="127.0.31.1"),
        ProxyRegistration.sidecar("shop/db", "127.0.30.2", app_address="127.0.31.2"),
        ProxyRegistration.sidecar(
            "shop/api",
            "127.0.30.3",
            capture=CaptureMode.TRANSPARENT,
            service_addresses={"shop/web": "10.96.0.1", "shop/db": "10.96.0.2"},
        ),
        ProxyRegistration.sidecar(
            "other/client", "127.0.30.4", app_address="127.0.31.4", outbound_address="127.0.32.4"
        ),
    ]
    return {r.node_id: r for r in regs}


class _Rig:
    def __init__(self, root: Path) -> None:
        self.dir = root / "config"
        self.dir.mkdir()
        (self.dir / "00-base.yaml").write_text(
            _BASE
            + "---\n"
            + _app("shop", "web", 8080)
            + "---\n"
            + _app("shop", "db", 5432, "tcp-db")
            + "---\n"
            + _app("shop", "api", 9000)
            + "---\n"
            + _app("other", "client", None)
        )
        self.registrations = _registrations()
        self.sources = SourceCache()
        self.previous = self.full()

    def write(self, name: str, text: str | None) -> None:
        path = self.dir / f"{name}.yaml"
        if text is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(text)

    def full(self) -> cp._Build:
        build = cp._build([str(self.dir)], [], self.registrations, {}, SourceCache())
        assert not build.errors and not build.problems, build.errors or build.problems
        return build

    def step(self) -> tuple[cp._Build, cp._Build]:
        """(incremental, full) builds of the directory as it is now."""
        incremental = cp._build(
            [str(self.dir)], [], self.registrations, {}, self.sources, frozenset(), self.previous
        )
        assert not incremental.errors and not incremental.problems
        self.previous = incremental
        return incremental, self.full()


def _assert_same(incremental: cp._Build, full: cp._Build, what: str) -> None:
    assert incremental.snapshots.keys() == full.snapshots.keys()
    for node_id, expected in full.snapshots.items():
        got = incremental.snapshots[node_id]
        assert dict(got.versions) == dict(expected.versions), f"{what}: {node_id}"
        assert got.version == expected.version
        for type_url in expected.resources:
            assert dict(got.get(type_url)) == dict(expected.get(type_url)), (what, node_id)
        assert not got.consistency_errors() and not got.encoding_errors()


_CHANGES: list[tuple[str, str, str | None, bool]] = [
    # (what, file, new content or None to remove, is a policy-only change)
    ("policy added", "p1", _POOL["p-web-get"], True),
    ("policy edited", "p1", _POOL["p-web-post"], True),
    ("TCP policy added", "p2", _POOL["p-db-deny"], True),
    ("selector changed", "p1", _policy("web-get", "shop", _ALLOW_POST, "api"), True),
    ("namespace-wide policy", "p3", _POOL["p-shop-wide"], True),
    ("root namespace policy", "p4", _POOL["p-root"], True),
    ("header condition (guard)", "p5", _POOL["p-header"], True),
    ("hosts (host guard)", "p6", _POOL["p-hosts"], True),
    ("RequestAuthentication", "ra", _REQUEST_AUTHN, True),
    ("policy removed", "p1", None, True),
    ("PeerAuthentication", "pa", _PEER_STRICT, False),
    ("DestinationRule", "dr", _DESTINATION_RULE, False),
    ("Service and workload added", "w2", _app("shop", "cart", 7070), False),
    ("VirtualService added", "vs", _virtual_service("5s"), False),
    ("VirtualService route edited, hosts kept", "vs", _virtual_service("7s"), False),
    ("policy after a non-policy change", "p1", _POOL["p-web-get"], True),
    (
        "namespace label",
        "ns",
        "apiVersion: v1\nkind: Namespace\n"
        "metadata: {name: other, labels: {istio-injection: enabled, team: blue}}\n",
        False,
    ),
    ("policy after a namespace label", "p1", _POOL["p-web-post"], True),
    ("everything removed again", "*", None, False),
]


def test_incremental_equals_full_over_each_kind_of_change(tmp_path: Path) -> None:
    rig = _Rig(tmp_path)
    patched_or_reused = 0
    for what, name, text, policy_only in _CHANGES:
        if name == "*":
            for path in rig.dir.glob("*.yaml"):
                if path.name != "00-base.yaml":
                    path.unlink()
        else:
            rig.write(name, text)
        incremental, full = rig.step()
        _assert_same(incremental, full, what)
        assert incremental.stats is not None
        if policy_only:
            # a change confined to policies never translates an unaffected proxy whole
            patched_or_reused += incremental.stats.reused + incremental.stats.patched
        else:
            assert incremental.stats.reused + incremental.stats.patched == 0, what
    assert patched_or_reused >= 10


def test_unaffected_proxy_keeps_its_snapshot_and_affected_one_keeps_listeners(
    tmp_path: Path,
) -> None:
    rig = _Rig(tmp_path)
    before = rig.previous
    rig.write("p1", _POOL["p-web-get"])
    incremental, full = rig.step()
    _assert_same(incremental, full, "one policy")
    assert incremental.stats is not None
    assert incremental.stats.patched == 1 and incremental.stats.translated == 0
    web = next(n for n, r in rig.registrations.items() if r.workload_ref == "shop/web")
    for node_id, snapshot in incremental.snapshots.items():
        if node_id == web:
            continue
        assert snapshot is before.snapshots[node_id]  # no new version: no push
    old, new = before.snapshots[web], incremental.snapshots[web]
    assert old.version != new.version
    for type_url in old.resources:
        if type_url.endswith(("TypedExtensionConfig", "RouteConfiguration")):
            continue
        assert old.version_of(type_url) == new.version_of(type_url)


@pytest.mark.parametrize("seed", range(4))
def test_incremental_equals_full_over_generated_policy_edits(tmp_path: Path, seed: int) -> None:
    rig = _Rig(tmp_path)
    rng = random.Random(seed)
    names = sorted(_POOL)
    present: dict[str, str] = {}  # file → pool entry
    took_fast_path = 0
    for step in range(12):
        for _ in range(rng.randint(1, 3)):
            entry = rng.choice(names)
            file = f"gen-{_POOL[entry].split('name: ', 1)[1].split(',', 1)[0]}"
            if file in present and rng.random() < 0.4:
                del present[file]
                rig.write(file, None)
            else:
                present[file] = entry
                rig.write(file, _POOL[entry])
        if step == 6:
            rig.write("pa", _PEER_STRICT)  # one non-policy change in the middle
        incremental, full = rig.step()
        _assert_same(incremental, full, f"seed {seed} step {step}: {sorted(present.values())}")
        assert incremental.stats is not None
        took_fast_path += incremental.stats.reused + incremental.stats.patched
    assert took_fast_path > 0


def test_snapshot_replaced_equals_a_snapshot_built_from_scratch() -> None:
    from trustmesh.xds.cache import TYPE_ECDS, Snapshot

    def ecds(name: str, action: str) -> dict[str, object]:
        typed = {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {"action": action, "policies": {}},
        }
        return {"@type": TYPE_ECDS, "name": name, "typed_config": typed}

    before = Snapshot.from_resources([ecds("a", "ALLOW"), ecds("b", "DENY")])
    assert not before.consistency_errors() and not before.encoding_errors()
    memo: dict[tuple[object, ...], object] = {}
    changes = {TYPE_ECDS: {"b": ecds("b", "ALLOW")}}
    after = before.replaced(changes, memo=memo)
    expected = Snapshot.from_resources([ecds("a", "ALLOW"), ecds("b", "ALLOW")])
    assert after.version == expected.version and dict(after.versions) == dict(expected.versions)
    assert after.consistency_errors() == [] and after.encoding_errors() == []
    again = before.replaced(changes, memo=memo)  # from the memo: the same content
    assert again.version == expected.version
    with pytest.raises(ValueError, match="not in the snapshot"):
        before.replaced({TYPE_ECDS: {"c": ecds("c", "ALLOW")}})


def test_a_proxy_translated_whole_is_prepared_for_the_next_policy_change(
    tmp_path: Path,
) -> None:
    from trustmesh.xds import incremental
    from trustmesh.xds.cache import TYPE_LISTENER

    with incremental._LISTENER_FACTS._lock:
        incremental._LISTENER_FACTS._entries.clear()  # nothing left by another test
    rig = _Rig(tmp_path)
    for snapshot in rig.previous.snapshots.values():
        for digest in snapshot.digests(TYPE_LISTENER).values():
            # Known already: the first change does not walk every listener again.
            assert incremental._LISTENER_FACTS.get(digest, _unexpected) is not None


def _unexpected() -> tuple[frozenset[str], bool]:
    raise AssertionError("a listener's facts were not worked out when it was translated")
