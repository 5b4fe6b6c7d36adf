"""``trustmesh request --from NS/POD`` in the pod sandbox: sent from inside the pod.

In netns isolation a request "as a pod" is made the way the pod's app makes it: from a
process in the pod's network namespace, as the app's uid, with the pod's /etc/hosts — so
the name resolves to the Service's ClusterIP and the capture rules take the connection
to the pod's sidecar (or, without one, kube-proxy's DNAT to an endpoint). The parent
(:func:`request_in_pod`) starts ``python -m trustmesh.runtime.podclient`` through
:mod:`~trustmesh.runtime.podexec` and reads one JSON line back: the same
:class:`~trustmesh.runtime.client.HttpResult` / ``TcpResult`` the process mode gives.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import subprocess
import sys
from typing import Any
from urllib.parse import urlsplit

from trustmesh.runtime.client import (
    HttpResult,
    RequestError,
    TcpResult,
    http_request,
    outside_pod,
    tcp_exchange,
)
from trustmesh.runtime.plan import MeshPlan, PodPlan

__all__ = ["request_in_pod"]

_NO_PLAN = MeshPlan((), "")
_SPARE_SECONDS = 10.0  # entering the pod and starting Python, on a loaded host


def _resolve(host: str) -> str:
    try:
        return str(socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0])
    except OSError:
        raise RequestError(f"{host}: no such host in this pod's /etc/hosts") from None


async def _send(request: dict[str, Any]) -> dict[str, Any]:
    pod = outside_pod(request["pod_ip"])
    timeout = float(request["timeout"])
    if request["kind"] == "tcp":
        address = _resolve(request["host"])
        data = base64.b64decode(request["data"])
        tcp = await tcp_exchange(
            _NO_PLAN,
            pod,
            request["host"],
            request["port"],
            data,
            timeout=timeout,
            direct=(address, request["port"]),
        )
        return {
            "received": base64.b64encode(tcp.received).decode(),
            "reset": tcp.reset,
            "why": tcp.why,
        }
    parts = urlsplit(request["url"] if "://" in request["url"] else f"http://{request['url']}")
    host = parts.hostname or ""
    address = _resolve(host)
    answer = await http_request(
        _NO_PLAN,
        pod,
        request["url"],
        method=request["method"],
        headers=[(k, v) for k, v in request["headers"]],
        body=base64.b64decode(request["body"]),
        timeout=timeout,
        direct=(address, parts.port or 80),
    )
    return {
        "status": answer.status,
        "reason": answer.reason,
        "headers": [list(h) for h in answer.headers],
        "body": base64.b64encode(answer.body).decode(),
        "reset": answer.reset,
        "why": answer.why,
    }


def request_in_pod(plan: MeshPlan, pod: PodPlan, request: dict[str, Any]) -> HttpResult | TcpResult:
    """Send ``request`` from inside ``pod`` as its app; raises :class:`RequestError`."""
    from trustmesh.runtime.podexec import podexec_argv
    from trustmesh.runtime.sandboxed import pod_python

    paths = plan.paths(pod)
    if paths is None or pod.netns is None:
        raise RequestError(f"{pod.ref} is not in a sandbox")
    python = pod_python()
    command = python.argv("trustmesh.runtime.podclient")
    argv = podexec_argv(
        sys.executable,
        pod.netns,
        command,
        uid=pod.uid,
        gid=pod.gid,
        hosts=str(paths.hosts),
        resolv=str(paths.resolv),
        cwd=str(paths.app),
    )
    payload = json.dumps({**request, "pod_ip": pod.pod_ip}).encode()
    try:
        done = subprocess.run(
            argv,
            input=payload,
            capture_output=True,
            env={"PATH": "/usr/bin:/bin", **python.env},
            timeout=float(request["timeout"]) + _SPARE_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise RequestError(f"the request from inside {pod.ref} did not finish") from None
    if done.returncode != 0 or not done.stdout.strip():
        why = done.stderr.decode(errors="replace").strip().splitlines()
        raise RequestError(f"cannot send from inside {pod.ref}: {why[-1] if why else '?'}")
    answer = json.loads(done.stdout)
    if "error" in answer:
        raise RequestError(str(answer["error"]))
    if request["kind"] == "tcp":
        return TcpResult(
            received=base64.b64decode(answer["received"]),
            reset=bool(answer["reset"]),
            why=str(answer["why"]),
            sent=base64.b64decode(request["data"]),
        )
    return HttpResult(
        status=int(answer["status"]),
        reason=str(answer["reason"]),
        headers=tuple((str(k), str(v)) for k, v in answer["headers"]),
        body=base64.b64decode(answer["body"]),
        reset=bool(answer["reset"]),
        why=str(answer["why"]),
    )


def main() -> int:
    request = json.loads(sys.stdin.buffer.read())
    try:
        answer = asyncio.run(_send(request))
    except RequestError as exc:
        answer = {"error": str(exc)}
    sys.stdout.write(json.dumps(answer) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
