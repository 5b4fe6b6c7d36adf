"""Who is who in the data-plane benchmark: identities, loopback addresses, the request
every path carries and the app's answer to it, the policy that turns RBAC on."""

from __future__ import annotations

import json

from trustmesh.identity.spiffe import SpiffeId

APP_PORT = 8000  # httpbin's service and container port in examples/mesh/workloads.yaml
HTTPBIN = SpiffeId("cluster.local", "foo", "httpbin")
SLEEP = SpiffeId("cluster.local", "foo", "sleep")
# A small JSON body, the size of a typical API answer; the same app serves every path.
BODY = json.dumps({"args": {}, "headers": {"host": "httpbin.foo:8000"}, "url": "/get"})

# Absolute form, as clients with HTTP_PROXY set send it: trustmesh's proxy picks the route
# by its Host. Every path gets these very bytes (servers must accept absolute form too,
# RFC 9112 §3.2.2, and Envoy does).
REQUEST = b"GET http://httpbin.foo:8000/get HTTP/1.1\r\nHost: httpbin.foo:8000\r\n\r\n"

# One loopback address per role, so each listener has its own address and ports never
# collide.
APP_ADDRESS = "127.0.77.1"
HAND_CLIENT_ADDRESS = "127.0.77.2"
HAND_SERVER_ADDRESS = "127.0.77.3"
HAND_LOG_CLIENT_ADDRESS = "127.0.77.4"
HAND_LOG_SERVER_ADDRESS = "127.0.77.5"
SLEEP_POD_ADDRESS = "127.0.77.6"
SLEEP_OUTBOUND_ADDRESS = "127.0.77.7"
HTTPBIN_POD_ADDRESS = "127.0.77.8"

ALLOW_SLEEP = f"""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow-sleep, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{principals: [{SLEEP.uri.removeprefix("spiffe://")}]}}}}]
"""
