"""An httpbin.org look-alike: the HTTP backend that mesh examples and tests talk to.

It answers with what it received, so a test behind a sidecar can see what Envoy forwarded
(``/headers`` shows ``X-Forwarded-Client-Cert`` or a JWT claim header). Routes:

- ``GET /get`` → ``{"args", "headers", "origin", "url"}``
- ``GET /headers`` → ``{"headers"}``; ``GET /ip`` → ``{"origin"}``
- ``/status/N`` (any method) → status N, empty body
- ``POST /post``, ``PUT /put``, ``PATCH /patch``, ``DELETE /delete`` → also
  ``{"data", "files", "form", "json"}``
- ``/anything[/...]`` (any method) → everything above plus ``"method"``

As on httpbin.org, header names are shown Title-Case (``X-Jwt-Claim-Foo``), repeated
headers are joined with commas, JSON keys are sorted, and ``origin`` is the first
``X-Forwarded-For`` address, else the peer's. Anything else is 404; a wrong method 405.

The HTTP/1.1 server is :mod:`trustmesh.samples.http1`'s. Routing (:func:`route`) is pure,
so it is tested without sockets.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from urllib.parse import parse_qsl, urlsplit

from trustmesh.samples import Ready
from trustmesh.samples.http1 import (
    BadRequest,
    Request,
    Response,
    encode_response,
    json_response,
    read_request,
    serve_http,
)

__all__ = [
    "DEFAULT_PORT",
    "BadRequest",
    "Request",
    "Response",
    "encode_response",
    "read_request",
    "route",
    "serve",
]

DEFAULT_PORT = 8000
_DIGITS = re.compile(r"[0-9]+")
_BODY_METHODS = {"/post": "POST", "/put": "PUT", "/patch": "PATCH", "/delete": "DELETE"}


def route(request: Request) -> Response:
    """The httpbin answer to ``request``; pure, so it is tested without a socket."""
    path = urlsplit(request.target).path
    method = "GET" if request.method == "HEAD" else request.method
    if path in ("/get", "/headers", "/ip"):
        if method != "GET":
            return _not_allowed("GET, HEAD")
        if path == "/headers":
            return _json({"headers": _headers(request)})
        if path == "/ip":
            return _json({"origin": _origin(request)})
        return _json(_echo(request, body=False))
    if path in _BODY_METHODS:
        if method != _BODY_METHODS[path]:
            return _not_allowed(_BODY_METHODS[path])
        return _json(_echo(request, body=True))
    if path == "/anything" or path.startswith("/anything/"):
        return _json({**_echo(request, body=True), "method": request.method})
    if path.startswith("/status/"):
        code = path.removeprefix("/status/")
        if not _DIGITS.fullmatch(code) or not 200 <= int(code) <= 599:
            return _json({"error": f"invalid status code {code!r}"}, status=400)
        return Response(int(code), content_type="")
    if path == "/":
        return Response(200, b"trustmesh httpbin sample\n", "text/plain; charset=utf-8")
    return _json({"error": "not found", "path": path}, status=404)


def _echo(request: Request, *, body: bool) -> dict[str, object]:
    parts = urlsplit(request.target)
    echo: dict[str, object] = {
        "args": _multi_dict(parse_qsl(parts.query, keep_blank_values=True)),
        "headers": _headers(request),
        "origin": _origin(request),
        "url": _url(request),
    }
    if body:
        echo.update(_body_fields(request))
    return echo


def _body_fields(request: Request) -> dict[str, object]:
    content_type = (request.header("content-type") or "").split(";")[0].strip().lower()
    form: dict[str, str | list[str]] = {}
    data = ""
    if content_type == "application/x-www-form-urlencoded":
        text = request.body.decode("utf-8", "replace")
        form = _multi_dict(parse_qsl(text, keep_blank_values=True))
    else:
        try:
            data = request.body.decode("utf-8")
        except UnicodeDecodeError:
            encoded = base64.b64encode(request.body).decode()
            data = f"data:application/octet-stream;base64,{encoded}"
    try:
        parsed: object = json.loads(request.body) if request.body else None
    except ValueError:
        parsed = None
    return {"data": data, "files": {}, "form": form, "json": parsed}


def _headers(request: Request) -> dict[str, str]:
    # httpbin.org shows names the way WSGI rebuilds them: each dash-separated word
    # capitalized (str.title), so x-jwt-claim-foo is X-Jwt-Claim-Foo.
    merged: dict[str, list[str]] = {}
    for name, value in request.headers:
        merged.setdefault(name.title(), []).append(value)
    return {name: ",".join(values) for name, values in merged.items()}


def _origin(request: Request) -> str:
    forwarded = request.header("x-forwarded-for")
    if forwarded:
        first = forwarded.split(",")[0].strip()
        if first:
            return first
    return request.peer


def _url(request: Request) -> str:
    if request.target.startswith(("http://", "https://")):
        return request.target
    scheme = (request.header("x-forwarded-proto") or "http").split(",")[0].strip()
    host = (request.header("host") or "").split(",")[0].strip()
    return f"{scheme}://{host}{request.target}"


def _multi_dict(pairs: list[tuple[str, str]]) -> dict[str, str | list[str]]:
    # httpbin.org: a key given once maps to its value, a repeated key to the list of values.
    grouped: dict[str, list[str]] = {}
    for key, value in pairs:
        grouped.setdefault(key, []).append(value)
    return {k: v[0] if len(v) == 1 else v for k, v in grouped.items()}


def _json(value: object, status: int = 200) -> Response:
    return json_response(value, status)


def _not_allowed(allow: str) -> Response:
    return Response(405, b'{"error": "method not allowed"}\n', headers=(("Allow", allow),))


async def serve(host: str, port: int, *, stop: asyncio.Event, ready: Ready | None = None) -> None:
    """Serve httpbin on ``host:port`` until ``stop`` is set.

    Example::

        stop = asyncio.Event()
        task = asyncio.create_task(serve("127.0.0.1", 0, stop=stop, ready=print))
        ...
        stop.set(); await task
    """
    await serve_http(_route, host, port, stop=stop, ready=ready)


async def _route(request: Request) -> Response:
    return route(request)
