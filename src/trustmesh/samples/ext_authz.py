"""An external authorizer behaving as Istio's ``ext-authz`` sample (samples/extauthz).

It answers Envoy's ext_authz checks two ways at once:

* HTTP (default port 8000), for ``envoyExtAuthzHttp`` providers: any method and path;
  allowed (200) when the request carries ``x-ext-authz: allow``, denied (403, a text
  body saying why) otherwise;
* gRPC (default port 9000), ``envoy.service.auth.v3.Authorization/Check``, for
  ``envoyExtAuthzGrpc`` providers: allowed when the checked request carries
  ``x-ext-authz: allow``; without that header (a TCP connection has none) allowed when
  the caller's principal ends with ``/sa/<allowed service account>`` (default ``a``),
  denied otherwise (gRPC status PERMISSION_DENIED with an HTTP 403).

Every answer carries ``x-ext-authz-check-result: allowed|denied`` and
``x-ext-authz-check-received`` (what was checked), and
``x-ext-authz-additional-header-override`` (HTTP: the request's value echoed; gRPC:
``grpc-additional-header-override-value``), as the sample does. One log line per check
goes to stdout; :attr:`ExtAuthzServer.checks` counts them (tests read it).

Example::

    server = ExtAuthzServer()
    await server.serve("127.0.0.1", 8000, 9000, stop=stop)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from trustmesh.samples import Ready, format_address
from trustmesh.samples.http1 import Request, Response, serve_http

__all__ = [
    "ALLOWED_VALUE",
    "CHECK_HEADER",
    "DEFAULT_GRPC_PORT",
    "DEFAULT_HTTP_PORT",
    "RESULT_HEADER",
    "ExtAuthzServer",
]

DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 9000
CHECK_HEADER = "x-ext-authz"
ALLOWED_VALUE = "allow"
RESULT_HEADER = "x-ext-authz-check-result"
RECEIVED_HEADER = "x-ext-authz-check-received"
OVERRIDE_HEADER = "x-ext-authz-additional-header-override"
GRPC_OVERRIDE_VALUE = "grpc-additional-header-override-value"
DENY_BODY = (
    f"denied by ext_authz for not found header `{CHECK_HEADER}: {ALLOWED_VALUE}` in the request"
)
_MAX_RECEIVED = 60_000  # Envoy refuses headers past 60 KiB: the sample says <too-long>


def _not_too_long(text: str) -> str:
    return text if len(text) <= _MAX_RECEIVED else "<too-long>"


@dataclass
class ExtAuthzServer:
    """The authorizer's state: the service account allowed without the header, and how
    many checks each side answered."""

    allowed_service_account: str = "a"
    log: Callable[[str], None] = field(default=lambda line: print(line, flush=True))
    checks: dict[str, int] = field(default_factory=lambda: {"http": 0, "grpc": 0})

    # --- HTTP --------------------------------------------------------------------------

    async def http_check(self, request: Request) -> Response:
        self.checks["http"] += 1
        headers = ", ".join(f"{k}: {v}" for k, v in request.headers)
        received = f"{request.method} {request.target}, headers: [{headers}]"
        allowed = request.header(CHECK_HEADER) == ALLOWED_VALUE
        verdict = "allowed" if allowed else "denied"
        self.log(f"[HTTP][{verdict}]: {received}")
        answer = (
            (RESULT_HEADER, verdict),
            (OVERRIDE_HEADER, request.header(OVERRIDE_HEADER) or ""),
            (RECEIVED_HEADER, _not_too_long(received)),
        )
        if allowed:
            return Response(200, b"", "text/plain; charset=utf-8", answer)
        return Response(403, DENY_BODY.encode(), "text/plain; charset=utf-8", answer)

    # --- gRPC --------------------------------------------------------------------------

    def grpc_check(
        self, request: external_auth_pb2.CheckRequest
    ) -> external_auth_pb2.CheckResponse:
        self.checks["grpc"] += 1
        attributes = request.attributes
        http = attributes.request.http
        if CHECK_HEADER in http.headers:
            allowed = http.headers[CHECK_HEADER] == ALLOWED_VALUE
        else:
            principal = attributes.source.principal
            allowed = bool(principal) and principal.endswith(f"/sa/{self.allowed_service_account}")
        verdict = "allowed" if allowed else "denied"
        received = _not_too_long(str(attributes).replace("\n", " ").strip())
        self.log(f"[gRPCv3][{verdict}]: {http.host}{http.path}, attributes: {received}")
        headers = [
            base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, value=value))
            for key, value in (
                (RESULT_HEADER, verdict),
                (RECEIVED_HEADER, received),
                (OVERRIDE_HEADER, GRPC_OVERRIDE_VALUE),
            )
        ]
        if allowed:
            return external_auth_pb2.CheckResponse(
                status=status_pb2.Status(code=code_pb2.OK),
                ok_response=external_auth_pb2.OkHttpResponse(headers=headers),
            )
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED),
            denied_response=external_auth_pb2.DeniedHttpResponse(
                status=http_status_pb2.HttpStatus(code=http_status_pb2.Forbidden),
                headers=headers,
                body=DENY_BODY,
            ),
        )

    # --- serving -----------------------------------------------------------------------

    async def serve(
        self,
        host: str,
        http_port: int,
        grpc_port: int,
        *,
        stop: asyncio.Event,
        ready: Ready | None = None,
    ) -> None:
        """Serve both sides until ``stop`` is set; ``ready`` is told each bound address
        (HTTP first). Port 0 picks a free port."""
        server = grpc.aio.server()
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(_Servicer(self), server)
        bound = server.add_insecure_port(format_address(host, grpc_port))
        if bound == 0:
            raise OSError(f"cannot listen on {format_address(host, grpc_port)}")
        http_ready = asyncio.Event()

        def http_bound(bound_host: str, bound_port: int) -> None:
            if ready is not None:
                ready(bound_host, bound_port)
            http_ready.set()

        http = asyncio.create_task(
            serve_http(self.http_check, host, http_port, stop=stop, ready=http_bound)
        )
        try:
            await asyncio.wait(
                [http, asyncio.create_task(http_ready.wait())],
                return_when=asyncio.FIRST_COMPLETED,
            )
            if http.done():
                await http  # it failed to listen: raise that
            await server.start()
            if ready is not None:
                ready(host, bound)
            await http
        finally:
            with contextlib.suppress(Exception):
                await server.stop(grace=1.0)
            if not http.done():
                http.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await http


class _Servicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self, owner: ExtAuthzServer) -> None:
        self._owner = owner

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> external_auth_pb2.CheckResponse:
        return self._owner.grpc_check(request)
