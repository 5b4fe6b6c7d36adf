"""The captured layout live: real Envoys as uid 1337 in pod network namespaces behind
istio-init's capture rules (nftables), fed the translation over ADS and SDS.

Each test builds its own lab (capture_rig.py): a bridge, pods ``httpbin`` / ``sleep``
(sidecars, captured), ``legacy`` (no sidecar, no capture) and ``ext`` (a host outside
the mesh), and checks what the layout promises: inbound traffic reaches the app only
through Envoy, with policy and mTLS mode applied; outbound traffic to a ClusterIP reaches
the destination's Envoy over mesh mTLS as the client's identity; unknown destinations
follow outboundTrafficPolicy; ports no Service declares pass through per
PeerAuthentication — and the offline evaluator says the same for each request.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import pytest

from tests.envoy.conftest import MiniCA, ca, run
from tests.unit.meshutil import compile_text
from tests.xds.capture_rig import (
    Lab,
    Mesh,
    Pod,
    Seen,
    echo_app,
    http_app,
    http_request,
    lab,
    needs_root,
    tcp_exchange,
)
from trustmesh.policy.compose import MeshPolicy
from trustmesh.policy.evaluate import evaluate
from trustmesh.policy.request import HttpRequest, Request, Source
from trustmesh.runtime.capture import PROXY_UID
from trustmesh.runtime.livenet import app_socket
from trustmesh.xds.translate import CaptureMode, translate

__all__ = ["ca", "lab"]  # fixtures, used by name

pytestmark = [pytest.mark.envoy, pytest.mark.sandbox, needs_root]

SLEEP_ID = "spiffe://cluster.local/ns/foo/sa/sleep"
HTTPBIN_IP = "10.96.0.10"  # foo/httpbin's ClusterIP
TCP_ECHO_IP = "10.96.0.11"
LEGACY = Source.workload("legacy/sleep")
SLEEP = Source.workload("foo/sleep")


# The lab's mesh: httpbin has a Service on 8000 and two ports no Service declares (9090
# HTTP, 9191 TCP); tcp-echo a TCP Service on 9000; legacy is outside the mesh.
WORKLOADS = """
apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: httpbin, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  template:
    metadata: {labels: {app: httpbin}}
    spec:
      serviceAccountName: httpbin
      containers:
      - name: httpbin
        command: [app]
        ports: [{containerPort: 8000}, {containerPort: 9090}, {containerPort: 9191}]
---
apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: foo}
spec:
  selector: {app: httpbin}
  ports: [{name: http, port: 8000, targetPort: 8000}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: tcp-echo, namespace: foo}
spec:
  selector: {matchLabels: {app: tcp-echo}}
  template:
    metadata: {labels: {app: tcp-echo}}
    spec:
      serviceAccountName: tcp-echo
      containers:
      - {name: tcp-echo, command: [app], ports: [{containerPort: 9000}]}
---
apiVersion: v1
kind: Service
metadata: {name: tcp-echo, namespace: foo}
spec:
  selector: {app: tcp-echo}
  ports: [{name: tcp, port: 9000}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: sleep, namespace: foo}
spec:
  selector: {matchLabels: {app: sleep}}
  template:
    metadata: {labels: {app: sleep}}
    spec:
      serviceAccountName: sleep
      containers: [{name: sleep, command: [app]}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: sleep, namespace: legacy}
spec:
  selector: {matchLabels: {app: sleep}}
  template:
    metadata: {labels: {app: sleep}}
    spec:
      containers: [{name: sleep, command: [app]}]
"""
STRICT = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"""
DENY_GET = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-get, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules: [{to: [{operation: {methods: [GET]}}]}]
"""
ONLY_SLEEP = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-sleep, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules: [{from: [{source: {principals: [cluster.local/ns/foo/sa/sleep]}}]}]
"""
REGISTRY_ONLY = "outboundTrafficPolicy:\n  mode: REGISTRY_ONLY\n"
CLUSTER_IPS = {"foo/httpbin": HTTPBIN_IP, "foo/tcp-echo": TCP_ECHO_IP}
# Lab pod → the workload it runs.
WORKLOAD_OF = {"httpbin": "foo/httpbin", "sleep": "foo/sleep", "tcp-echo": "foo/tcp-echo"}
EXT_HOST = 200  # the host outside the mesh: 10.88.0.200


def _policy(*documents: str, mesh: str = "") -> MeshPolicy:
    return compile_text("\n---\n".join((WORKLOADS, *documents)), mesh=mesh, base=False)


async def _sidecars(cp: Mesh, ca: MiniCA, policy: MeshPolicy, *pods: Pod) -> None:
    """Translate and publish each pod's workload (every pod's address known to all),
    then start their Envoys."""
    addresses = {
        WORKLOAD_OF[name]: pod.ip for name, pod in cp.lab.pods.items() if name in WORKLOAD_OF
    }
    for pod in pods:
        resources = translate(
            policy,
            WORKLOAD_OF[pod.name],
            inbound_address=pod.ip,
            capture=CaptureMode.TRANSPARENT,
            service_addresses=CLUSTER_IPS,
            workload_addresses=addresses,
        )
        cp.publish(pod, resources)
    for pod in pods:
        namespace, _, name = WORKLOAD_OF[pod.name].partition("/")
        await cp.sidecar(pod, ca.issue(namespace, name))


def _apps_saw_only_envoy(seen: list[Seen], pod: Pod) -> None:
    """Every request the app got came from its own Envoy (127.0.0.6) to the address the
    client dialled (the pod IP): nobody reached the app around its sidecar."""
    assert seen, "the app saw nothing"
    for request in seen:
        assert request.peer == "127.0.0.6", request
        assert request.local.startswith(f"{pod.ip}:"), request


def test_inbound_is_captured_and_policy_applies(lab: Lab, ca: MiniCA) -> None:
    """A client without a sidecar dials the pod IP: capture sends it through Envoy, which
    applies the DENY on GET (403) and lets POST reach the app — from 127.0.0.6."""
    policy = _policy(DENY_GET)
    httpbin, legacy = lab.pod("httpbin", captured=True), lab.pod("legacy", captured=False)
    seen: list[Seen] = []

    async def scenario() -> None:
        async with Mesh(lab).running() as cp, http_app(httpbin, 8000, seen):
            await _sidecars(cp, ca, policy, httpbin)
            denied = await http_request(legacy, httpbin.ip, 8000, "GET", "/get")
            assert (denied.status, denied.body) == (403, b"RBAC: access denied")
            allowed = await http_request(
                legacy, httpbin.ip, 8000, "POST", "/post",
                headers={"x-forwarded-client-cert": "URI=spiffe://forged"},
            )  # fmt: skip
            assert allowed.status == 200, allowed
            assert [(s.method, s.path) for s in seen] == [("POST", "/post")]
            _apps_saw_only_envoy(seen, httpbin)
            # A forged client certificate header is dropped: plaintext has no identity.
            assert "x-forwarded-client-cert" not in seen[0].headers

    run(scenario(), timeout=60)
    assert _offline(policy, LEGACY, "foo/httpbin", 8000, "GET", "/get") == ("deny", 403)
    assert _offline(policy, LEGACY, "foo/httpbin", 8000, "POST", "/post") == ("allow", 200)


def test_strict_resets_plaintext_and_a_clusterip_reaches_the_peer_over_mtls(
    lab: Lab, ca: MiniCA
) -> None:
    """Under STRICT, plaintext to the app port (and to a port no Service declares) is
    reset; the sleep app dialling httpbin's ClusterIP reaches it through both Envoys over
    mesh mTLS: the app sees sleep's identity (XFCC) and an ALLOW on that principal holds."""
    policy = _policy(STRICT, ONLY_SLEEP)
    httpbin, sleep = lab.pod("httpbin", captured=True), lab.pod("sleep", captured=True)
    legacy = lab.pod("legacy", captured=False)
    seen: list[Seen] = []

    async def scenario() -> None:
        async with (
            Mesh(lab).running() as cp,
            http_app(httpbin, 8000, seen),
            http_app(httpbin, 9090, seen),
        ):
            await _sidecars(cp, ca, policy, httpbin, sleep)
            for port in (8000, 9090):
                with pytest.raises((ConnectionError, OSError)):
                    await http_request(legacy, httpbin.ip, port, "GET", "/get")
            assert seen == []
            reply = await http_request(sleep, HTTPBIN_IP, 8000, "GET", "/get", host="httpbin:8000")
            assert reply.status == 200, reply
            (request,) = seen
            assert f"URI={SLEEP_ID}" in request.headers["x-forwarded-client-cert"]
            _apps_saw_only_envoy(seen, httpbin)
            # By Host, too: the ClusterIP is one of the service's names.
            by_ip = await http_request(sleep, HTTPBIN_IP, 8000, "GET", "/ip")
            assert by_ip.status == 200, by_ip

    run(scenario(), timeout=60)
    assert _offline(policy, Source.plaintext(), "foo/httpbin", 8000, "GET", "/get")[0] == "reset"
    assert _offline(policy, Source.plaintext(), "foo/httpbin", 9090, "GET", "/get")[0] == "reset"
    assert _offline(policy, SLEEP, "foo/httpbin", 8000, "GET", "/get") == ("allow", 200)


def test_tcp_service_by_clusterip(lab: Lab, ca: MiniCA) -> None:
    """A TCP Service is dialled at its ClusterIP: the client sidecar's listener for that
    address and port sends it to the endpoint's Envoy (mTLS), which hands it to the app."""
    policy = _policy()
    echo, sleep = lab.pod("tcp-echo", captured=True), lab.pod("sleep", captured=True)

    async def scenario() -> None:
        async with Mesh(lab).running() as cp, echo_app(echo, 9000):
            await _sidecars(cp, ca, policy, echo, sleep)
            answer = await tcp_exchange(sleep, TCP_ECHO_IP, 9000, b"hello")
            assert answer == b"127.0.0.6|hello"

    run(scenario(), timeout=60)
    assert _offline(policy, SLEEP, "foo/tcp-echo", 9000) == ("allow", None)


@pytest.mark.parametrize("mode", ["REGISTRY_ONLY", "ALLOW_ANY", "sidecar-ALLOW_ANY"])
def test_unknown_destinations_follow_outbound_traffic_policy(
    lab: Lab, ca: MiniCA, mode: str
) -> None:
    """The sleep app dials a host outside the registry: under ALLOW_ANY its sidecar passes
    the connection on to where it was going (TCP via virtualOutbound, HTTP via the port's
    route), under REGISTRY_ONLY it is closed (TCP) or answered 502 (HTTP); a Sidecar's
    outboundTrafficPolicy overrides the mesh's."""
    sidecar = """
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: foo}
spec: {outboundTrafficPolicy: {mode: ALLOW_ANY}}
"""
    if mode == "REGISTRY_ONLY":
        policy = _policy(mesh=REGISTRY_ONLY)
    elif mode == "ALLOW_ANY":
        policy = _policy()
    else:
        policy = _policy(sidecar, mesh=REGISTRY_ONLY)
    sleep = lab.pod("sleep", captured=True)
    ext = lab.pod("ext", captured=False, host=EXT_HOST)
    seen: list[Seen] = []

    async def scenario() -> None:
        async with Mesh(lab).running() as cp, echo_app(ext, 7777), http_app(ext, 8000, seen):
            await _sidecars(cp, ca, policy, sleep)
            if mode == "REGISTRY_ONLY":
                with pytest.raises((ConnectionError, OSError)):
                    await tcp_exchange(sleep, ext.ip, 7777, b"out")
                blocked = await http_request(sleep, ext.ip, 8000, "GET", "/get")
                assert blocked.status == 502, blocked
                assert seen == []
            else:
                # Passed through as it was: the host sees the pod's own address.
                assert await tcp_exchange(sleep, ext.ip, 7777, b"out") == f"{sleep.ip}|out".encode()
                reply = await http_request(sleep, ext.ip, 8000, "GET", "/get")
                assert reply.status == 200, reply
                assert reply.json()["peer"] == sleep.ip

    run(scenario(), timeout=60)
    tcp = _egress(policy, f"{ext_ip(EXT_HOST)}:7777", http=False)
    web = _egress(policy, f"{ext_ip(EXT_HOST)}:8000", http=True)
    if mode == "REGISTRY_ONLY":
        assert (tcp, web) == (("reset", None), ("deny", 502))
    else:
        assert (tcp, web) == (("allow", None), ("allow", 200))


@pytest.mark.parametrize("deny_get", [True, False], ids=["deny-get", "no-policy"])
def test_ports_without_a_service_pass_through_per_peer_authentication(
    lab: Lab, ca: MiniCA, deny_get: bool
) -> None:
    """Ports no Service declares go through virtualInbound's passthrough chains: under
    PERMISSIVE plaintext HTTP reaches the app with the HTTP policy applied (sniffed:
    DENY GET gives 403, POST passes), plaintext TCP reaches it unless a policy denies it
    (Istio drops ``methods`` from a TCP DENY rule, which then denies every connection)
    — from 127.0.0.6, to the port the client dialled."""
    policy = _policy(DENY_GET) if deny_get else _policy()
    httpbin, legacy = lab.pod("httpbin", captured=True), lab.pod("legacy", captured=False)
    seen: list[Seen] = []
    # Not HTTP to the HTTP inspector (a text line could still become a request line).
    raw = b"\x00raw bytes\r\n"

    async def scenario() -> None:
        async with (
            Mesh(lab).running() as cp,
            http_app(httpbin, 9090, seen),
            echo_app(httpbin, 9191),
        ):
            await _sidecars(cp, ca, policy, httpbin)
            get = await http_request(legacy, httpbin.ip, 9090, "GET", "/get")
            if deny_get:
                assert (get.status, get.body) == (403, b"RBAC: access denied")
            else:
                assert get.status == 200, get
            allowed = await http_request(legacy, httpbin.ip, 9090, "POST", "/post")
            assert allowed.status == 200, allowed
            _apps_saw_only_envoy(seen, httpbin)
            assert {s.local for s in seen} == {f"{httpbin.ip}:9090"}
            if deny_get:
                with pytest.raises(ConnectionError):
                    await tcp_exchange(legacy, httpbin.ip, 9191, raw)
            else:
                assert await tcp_exchange(legacy, httpbin.ip, 9191, raw) == b"127.0.0.6|" + raw

    run(scenario(), timeout=60)
    get_verdict = ("deny", 403) if deny_get else ("allow", 200)
    assert _offline(policy, LEGACY, "foo/httpbin", 9090, "GET", "/get") == get_verdict
    assert _offline(policy, LEGACY, "foo/httpbin", 9090, "POST", "/post") == ("allow", 200)
    tcp_verdict = ("deny", None) if deny_get else ("allow", None)
    assert _offline(policy, LEGACY, "foo/httpbin", 9191) == tcp_verdict


def ext_ip(host: int) -> str:
    return f"10.88.0.{host}"


def _egress(policy: MeshPolicy, host: str, *, http: bool) -> tuple[str, int | None]:
    request = Request(
        SLEEP, "", None, HttpRequest("GET", "/get") if http else None, destination_host=host
    )
    decision = evaluate(policy, request, now=time.time())
    return decision.verdict.value, decision.status


def _offline(
    policy: MeshPolicy,
    source: Source,
    destination: str,
    port: int,
    method: str | None = None,
    path: str = "/",
) -> tuple[str, int | None]:
    """The evaluator's verdict and status for the same request (HTTP unless ``method``
    is None)."""
    http = HttpRequest(method=method, path=path) if method else None
    decision = evaluate(policy, Request(source, destination, port, http), now=time.time())
    return decision.verdict.value, decision.status


def test_a_socket_made_as_the_app_uid_is_captured_and_as_1337_is_not(lab: Lab, ca: MiniCA) -> None:
    """``livenet.app_socket`` makes a socket inside a pod as a given uid (``test --live``
    sends a workload's cases that way): the capture rules match its owner, so as the
    app's uid a connection to a host outside the registry meets the sidecar and is closed
    (REGISTRY_ONLY), while as Envoy's uid 1337 the same connection leaves uncaptured."""
    policy = _policy(mesh=REGISTRY_ONLY)
    sleep = lab.pod("sleep", captured=True)
    ext = lab.pod("ext", captured=False, host=EXT_HOST)

    async def exchange(uid: int) -> bytes:
        sock = app_socket(sleep.netns, uid, uid)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(5):
            await loop.sock_connect(sock, (ext.ip, 7777))
            reader, writer = await asyncio.open_connection(sock=sock)
            try:
                writer.write(b"out")
                await writer.drain()
                return await reader.read(100)
            finally:
                writer.transport.abort()

    async def scenario() -> None:
        async with Mesh(lab).running() as cp, echo_app(ext, 7777):
            await _sidecars(cp, ca, policy, sleep)
            with app_socket(sleep.netns, 20001, 20001) as probe:
                assert os.fstat(probe.fileno()).st_uid == 20001
            assert await exchange(PROXY_UID) == f"{sleep.ip}|out".encode()
            with contextlib.suppress(ConnectionError):
                assert await exchange(20001) == b""  # BlackHoleCluster: closed at once

    run(scenario(), timeout=60)


IP_BLOCKS = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: from-addresses, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules: [{from: [{source: {ipBlocks: ["10.88.0.7/32"]}}]}]
"""


def test_ip_blocks_see_the_address_a_request_comes_from(lab: Lab, ca: MiniCA) -> None:
    """An ALLOW on ``ipBlocks: [10.88.0.7/32]``: the same plaintext request is allowed
    from a namespace holding 10.88.0.7 and denied (403) from one holding 10.88.0.8 —
    Envoy sees the real peer address through capture — as the offline verdict says."""
    policy = _policy(IP_BLOCKS)
    httpbin = lab.pod("httpbin", captured=True)
    allowed_source = lab.pod("src-7", captured=False, host=7)
    other_source = lab.pod("src-8", captured=False, host=8)
    seen: list[Seen] = []

    async def scenario() -> None:
        async with Mesh(lab).running() as cp, http_app(httpbin, 8000, seen):
            await _sidecars(cp, ca, policy, httpbin)
            allowed = await http_request(allowed_source, httpbin.ip, 8000, "GET", "/ip")
            assert allowed.status == 200, allowed
            denied = await http_request(other_source, httpbin.ip, 8000, "GET", "/ip")
            assert (denied.status, denied.body) == (403, b"RBAC: access denied")
            assert len(seen) == 1
            _apps_saw_only_envoy(seen, httpbin)

    run(scenario(), timeout=60)
    for address, verdict in (("10.88.0.7", ("allow", 200)), ("10.88.0.8", ("deny", 403))):
        source = Source.plaintext(address)
        assert _offline(policy, source, "foo/httpbin", 8000, "GET", "/ip") == verdict
