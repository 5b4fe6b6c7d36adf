"""Policy at the ingress gateway through a real gateway Envoy (issue 12, must show 2).

RequestAuthentication + AuthorizationPolicy selecting the gateway pods: no token 403,
an invalid token 401, a valid RS256 token 200. ``remoteIpBlocks`` with
``gatewayTopology.numTrustedProxies: 1`` (one load balancer in front that appends the
client's address to X-Forwarded-For): the client address from X-Forwarded-For decides,
and an extra entry a client forges in front does not. One mesh for the module.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from tests.gateway.rig import GATEWAY, HOST, GatewayMesh, gateway_mesh, http_get
from trustmesh.config import load_config
from trustmesh.policy.evaluate import evaluate
from trustmesh.policy.request import HttpRequest, Request, Source

HTTP_PORT = 8080  # the gateway Service maps 80 → 8080, as Istio's chart does
ISSUER = "testing@secure.istio.io"
MESH_CONFIG = """
defaultConfig:
  gatewayTopology:
    numTrustedProxies: 1
"""

ROUTES = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: httpbin-gateway, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin, namespace: foo}
spec:
  hosts: ["*"]
  gateways: [istio-system/httpbin-gateway]
  http:
  - route:
    - destination: {host: httpbin.foo.svc.cluster.local, port: {number: 8000}}
"""


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    good = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(RSAAlgorithm.to_jwk(good.public_key()))
    public.update(kid="k1", alg="RS256", use="sig")
    return {"good": good, "other": other, "jwks": json.dumps({"keys": [public]})}


def token(keys: dict[str, Any], key: str = "good") -> str:
    now = int(time.time())  # Envoy checks exp against the real clock
    payload = {"iss": ISSUER, "sub": ISSUER, "iat": now, "exp": now + 3600}
    return pyjwt.encode(payload, keys[key], algorithm="RS256", headers={"kid": "k1"})


def jwt_policies(keys: dict[str, Any]) -> str:
    return f"""
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt-example, namespace: istio-system}}
spec:
  selector: {{matchLabels: {{istio: ingressgateway}}}}
  jwtRules:
  - issuer: {ISSUER}
    jwks: '{keys["jwks"]}'
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: require-jwt, namespace: istio-system}}
spec:
  selector: {{matchLabels: {{istio: ingressgateway}}}}
  action: ALLOW
  rules:
  - from:
    - source: {{requestPrincipals: ["{ISSUER}/{ISSUER}"]}}
"""


REMOTE_IP_POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ingress-policy, namespace: istio-system}
spec:
  selector: {matchLabels: {app: istio-ingressgateway}}
  action: ALLOW
  rules:
  - from:
    - source: {remoteIpBlocks: ["203.0.113.0/24"]}
"""


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayMesh]:
    root = tmp_path_factory.mktemp("gateway-policy")
    with gateway_mesh(root, base="127.70.0.0", config=ROUTES, mesh_config=MESH_CONFIG) as running:
        yield running


def status(mesh: GatewayMesh, headers: dict[str, str] | None = None) -> int:
    return http_get(mesh.address(), HTTP_PORT, "/headers", headers=headers)[0]


def test_jwt_required_at_the_ingress(mesh: GatewayMesh, keys: dict[str, Any]) -> None:
    mesh.apply(ROUTES + "---\n" + jwt_policies(keys))
    assert status(mesh) == 403  # no token: no request principal, the ALLOW does not match
    bad = token(keys, "other")  # signed by a key the JWKS does not hold
    assert status(mesh, {"Authorization": f"Bearer {bad}"}) == 401
    assert status(mesh, {"Authorization": "Bearer not-a-jwt"}) == 401
    good = {"Authorization": f"Bearer {token(keys)}"}
    for headers, expected in (({}, 403), ({"Authorization": f"Bearer {bad}"}, 401), (good, 200)):
        assert offline(mesh, headers) == expected
    answer, body, _ = http_get(mesh.address(), HTTP_PORT, "/headers", headers=good)
    assert answer == 200
    seen = json.loads(body)["headers"]
    assert "Authorization" not in seen  # forwardOriginalToken false: the token is removed
    # The gateway called httpbin over mesh mTLS with its own identity.
    gateway_id = "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"
    assert f"URI={gateway_id}" in seen["X-Forwarded-Client-Cert"]


def offline(mesh: GatewayMesh, headers: dict[str, str]) -> int | None:
    """What ``trustmesh authz check`` answers for the same request from 127.0.0.1."""
    loaded = load_config([str(mesh.config_dir)], mesh_config=[str(mesh.root / "mesh.yaml")])
    assert not loaded.errors and loaded.mesh is not None
    request = Request(
        Source.plaintext("127.0.0.1"),
        GATEWAY,
        HTTP_PORT,
        HttpRequest("GET", "/headers", HOST, tuple(headers.items())),
    )
    return evaluate(loaded.mesh, request, now=time.time()).status


@pytest.mark.parametrize(
    ("forwarded_for", "expected"),
    [
        ("203.0.113.7", 200),  # the load balancer in front appended the client's address
        ("198.51.100.9", 403),
        # The client forged an allowed address in front; the balancer appended the real one.
        ("203.0.113.7, 198.51.100.9", 403),
        # Whatever the client itself sent comes first; the entry the balancer appended decides.
        ("198.51.100.9, 203.0.113.7", 200),
        (None, 403),  # none: the connection's own address (127.x), outside the block
    ],
)
def test_remote_ip_blocks_read_the_trusted_x_forwarded_for_entry(
    mesh: GatewayMesh, forwarded_for: str | None, expected: int
) -> None:
    mesh.apply(ROUTES + "---\n" + REMOTE_IP_POLICY)
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    assert status(mesh, headers) == expected
    assert offline(mesh, headers) == expected  # authz check agrees with the gateway Envoy


ROUTING = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: httpbin-gateway, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["foo/*"]
  - port: {number: 80, name: http-redirect, protocol: HTTP}
    hosts: [secure.example.com]
    tls: {httpsRedirect: true}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: httpbin, namespace: foo}
spec:
  host: httpbin.foo.svc.cluster.local
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin, namespace: foo}
spec:
  hosts: ["*"]
  gateways: [istio-system/httpbin-gateway]
  http:
  - match: [{uri: {exact: /old}}]
    redirect: {uri: /new, redirectCode: 302}
  - match: [{uri: {prefix: /api/}, headers: {x-version: {exact: v2}}}]
    route:
    - destination: {host: httpbin, subset: v2, port: {number: 8000}}
  - match: [{uri: {prefix: /api/}}]
    rewrite: {uri: /anything/}
    headers: {request: {set: {x-routed-by: gateway}}}
    route:
    - destination: {host: httpbin, subset: v1, port: {number: 8000}}
      weight: 100
    - destination: {host: httpbin, subset: v2, port: {number: 8000}}
      weight: 0
  - match: [{uri: {prefix: /teapot}, method: {exact: POST}}]
    directResponse: {status: 418, body: {string: short and stout}}
  - match: [{uri: {regex: "/status/2[0-9]{2}"}}]
    route:
    - destination: {host: httpbin, port: {number: 8000}}
---
# Another namespace's VirtualService: the first server only admits foo's.
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: elsewhere, namespace: istio-system}
spec:
  hosts: [elsewhere.example.com]
  gateways: [httpbin-gateway]
  http:
  - route:
    - destination: {host: httpbin.foo.svc.cluster.local, port: {number: 8000}}
"""


def test_virtual_service_routes_at_the_gateway(mesh: GatewayMesh) -> None:
    mesh.apply(ROUTING)
    address = mesh.address()
    moved = http_get(address, HTTP_PORT, "/old")
    assert moved[0] == 302 and moved[2]["location"].endswith("/new")
    # Rewritten to /anything/x on v1 (the v2 subset has no endpoint: weight 0 never sends)
    for _ in range(5):
        code, body, _ = http_get(address, HTTP_PORT, "/api/x")
        assert code == 200
        echoed = json.loads(body)
        assert echoed["url"].endswith("/anything/x")
        assert echoed["headers"]["X-Routed-By"] == "gateway"
    assert http_get(address, HTTP_PORT, "/api/x", headers={"x-version": "v2"})[0] == 503
    assert http_get(address, HTTP_PORT, "/teapot")[0] == 404  # GET: no route matches
    assert http_get(address, HTTP_PORT, "/status/204")[0] == 204
    assert http_get(address, HTTP_PORT, "/status/404x")[0] == 404  # regex matches whole path
    # httpsRedirect on its server's hosts only.
    redirected = http_get(address, HTTP_PORT, "/status/200", host="secure.example.com")
    assert redirected[0] == 301
    assert redirected[2]["location"].startswith("https://secure.example.com")
    # istio-system's VirtualService is not admitted by a "foo/*" server.
    assert http_get(address, HTTP_PORT, "/get", host="elsewhere.example.com")[0] == 404


HOSTS_POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-httpbin-host, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  action: ALLOW
  rules:
  - to:
    - operation: {hosts: ["httpbin.example.com"], paths: ["/status/*", "/headers"]}
"""


@pytest.mark.parametrize(
    ("host", "path", "expected"),
    [
        (HOST, "/headers", 200),
        ("HTTPBIN.example.com", "/headers", 200),  # hosts match case-insensitively
        ("other.example.com", "/headers", 403),
        (f"{HOST}:80", "/headers", 403),  # host:port is not the host
        (HOST, "/get", 403),
    ],
)
def test_hosts_and_paths_at_the_ingress(
    mesh: GatewayMesh, host: str, path: str, expected: int
) -> None:
    mesh.apply(ROUTES + "---\n" + HOSTS_POLICY)
    assert http_get(mesh.address(), HTTP_PORT, path, host=host)[0] == expected
    loaded = load_config([str(mesh.config_dir)], mesh_config=[str(mesh.root / "mesh.yaml")])
    assert loaded.mesh is not None
    request = Request(
        Source.plaintext("127.0.0.1"), GATEWAY, HTTP_PORT, HttpRequest("GET", path, host)
    )
    assert evaluate(loaded.mesh, request, now=time.time()).status == expected


def workload_policy(principal: str) -> str:
    return f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: httpbin-from-ingress, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  action: ALLOW
  rules:
  - from:
    - source: {{principals: ["{principal}"]}}
"""


GATEWAY_PRINCIPAL = "cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"


@pytest.mark.parametrize(
    ("principal", "expected"),
    [(GATEWAY_PRINCIPAL, 200), ("cluster.local/ns/foo/sa/sleep", 403)],
)
def test_the_workload_sees_the_gateways_principal(
    mesh: GatewayMesh, principal: str, expected: int
) -> None:
    mesh.apply(ROUTES + "---\n" + workload_policy(principal))
    assert status(mesh) == expected  # the 403 is httpbin's sidecar's, through the gateway
