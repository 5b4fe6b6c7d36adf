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

The HTTP/1.1 server is small and strict: keep-alive (HTTP/1.0 only on request),
Content-Length or chunked request bodies, ``Expect: 100-continue``, HEAD, ``Content-Length``
on every response that may carry one, and 400 (connection closed) on malformed input.
Routing (:func:`route`) is pure, so it is tested without sockets.
"""

from __future__ import annotations

import asyncio
import base64
import http
import json
import re
from dataclasses import dataclass, replace
from urllib.parse import parse_qsl, urlsplit

from trustmesh.samples import Ready, serve_connections

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
MAX_LINE = 16 * 1024
MAX_HEADERS = 100
MAX_BODY = 10 * 1024 * 1024

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(r"HTTP/1\.[01]")
_DIGITS = re.compile(r"[0-9]+")
_BODY_METHODS = {"/post": "POST", "/put": "PUT", "/patch": "PATCH", "/delete": "DELETE"}
_GET_ONLY = ("GET", "HEAD")


class BadRequest(Exception):
    """A request the server cannot parse; answered with ``status`` and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Request:
    """One parsed HTTP/1.x request; ``headers`` keeps names and order as received."""

    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""
    peer: str = ""

    def header(self, name: str) -> str | None:
        """All values of header ``name`` joined with commas, or None when absent."""
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return ",".join(values) if values else None

    @property
    def keep_alive(self) -> bool:
        """Whether the connection stays open after the response (RFC 9112 §9.3)."""
        tokens = {t.strip().lower() for t in (self.header("connection") or "").split(",")}
        if self.version == "HTTP/1.1":
            return "close" not in tokens
        return "keep-alive" in tokens


@dataclass(frozen=True)
class Response:
    """What :func:`route` answers; :func:`encode_response` turns it into bytes."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


async def read_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None = None, peer: str = ""
) -> Request | None:
    """Read the next request; None when the client closed the connection between requests.

    ``writer`` is used only to send ``100 Continue`` to a client that waits for it before
    sending its body. Raises :class:`BadRequest` for anything malformed.
    """
    line = await _read_line(reader, 414, "request line too long")
    for _ in range(4):  # RFC 9112 §2.2: ignore empty lines before the request line
        if line not in (b"\r\n", b"\n"):
            break
        line = await _read_line(reader, 414, "request line too long")
    if not line:
        return None
    method, target, version = _request_line(line)
    headers = await _read_headers(reader)
    request = Request(method, target, version, headers, peer=peer)
    length = _body_length(request)
    expects = (request.header("expect") or "").lower() == "100-continue"
    if expects and length != 0 and version == "HTTP/1.1" and writer is not None:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
    if length is None:
        body = await _read_chunked(reader)
    else:
        body = await _read_exactly(reader, length)
    return Request(method, target, version, headers, body, peer)


async def _read_line(reader: asyncio.StreamReader, status: int, too_long: str) -> bytes:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise BadRequest(400, "request ended inside a line") from None
        return b""
    except asyncio.LimitOverrunError:
        raise BadRequest(status, too_long) from None
    if len(line) > MAX_LINE:
        raise BadRequest(status, too_long)
    return line


def _request_line(line: bytes) -> tuple[str, str, str]:
    try:
        text = line.decode("ascii").rstrip("\r\n")
    except UnicodeDecodeError:
        raise BadRequest(400, "request line is not ASCII") from None
    parts = text.split(" ")
    if len(parts) != 3:
        raise BadRequest(400, "request line must be METHOD TARGET VERSION")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise BadRequest(400, f"bad method {method!r}")
    if not _VERSION.fullmatch(version):
        raise BadRequest(400, f"unsupported version {version!r}")
    if not (target.startswith("/") or target.startswith(("http://", "https://")) or target == "*"):
        raise BadRequest(400, f"bad request target {target!r}")
    if any(c <= " " or c == "\x7f" for c in target):
        raise BadRequest(400, "request target has control characters")
    return method, target, version


async def _read_headers(reader: asyncio.StreamReader) -> tuple[tuple[str, str], ...]:
    headers: list[tuple[str, str]] = []
    while True:
        line = await _read_line(reader, 431, "header line too long")
        if not line:
            raise BadRequest(400, "request ended inside the headers")
        if line in (b"\r\n", b"\n"):
            return tuple(headers)
        if len(headers) >= MAX_HEADERS:
            raise BadRequest(431, "too many headers")
        if line[:1] in (b" ", b"\t"):
            raise BadRequest(400, "obsolete header line folding")
        name, sep, value = line.decode("latin-1").rstrip("\r\n").partition(":")
        if not sep or not _TOKEN.fullmatch(name):
            raise BadRequest(400, f"bad header line {name!r}")
        headers.append((name, value.strip(" \t")))


def _body_length(request: Request) -> int | None:
    """Bytes of body to read, or None for a chunked body (RFC 9112 §6.3)."""
    encoding = request.header("transfer-encoding")
    length = request.header("content-length")
    if encoding is not None:
        if length is not None:
            # Both framings at once is how requests are smuggled past proxies; refuse.
            raise BadRequest(400, "both Transfer-Encoding and Content-Length")
        codings = [c.strip().lower() for c in encoding.split(",")]
        if codings != ["chunked"]:
            raise BadRequest(501, f"unsupported transfer coding {encoding!r}")
        return None
    if length is None:
        return 0
    values = {v.strip() for v in length.split(",")}
    if len(values) != 1 or not _DIGITS.fullmatch(next(iter(values))):
        raise BadRequest(400, f"bad Content-Length {length!r}")
    size = int(values.pop())
    if size > MAX_BODY:
        raise BadRequest(413, "request body too large")
    return size


async def _read_exactly(reader: asyncio.StreamReader, size: int) -> bytes:
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise BadRequest(400, "request body shorter than declared") from None


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        line = await _read_line(reader, 400, "chunk size line too long")
        size_text = line.split(b";", 1)[0].strip()
        if not size_text or any(c not in b"0123456789abcdefABCDEF" for c in size_text):
            raise BadRequest(400, "bad chunk size")
        size = int(size_text, 16)
        if size == 0:
            await _read_headers(reader)  # trailers: read and dropped
            return bytes(body)
        if len(body) + size > MAX_BODY:
            raise BadRequest(413, "request body too large")
        body += await _read_exactly(reader, size)
        if await _read_line(reader, 400, "bad chunk end") not in (b"\r\n", b"\n"):
            raise BadRequest(400, "chunk not followed by a line end")


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
    return Response(status, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def _not_allowed(allow: str) -> Response:
    return Response(405, b'{"error": "method not allowed"}\n', headers=(("Allow", allow),))


def encode_response(response: Response, *, head: bool = False, close: bool = False) -> bytes:
    """The response's bytes: status line, headers, body (none for HEAD).

    Content-Length is always sent, except where RFC 9110 §8.6 forbids it (204), so a
    keep-alive client never has to wait for the connection to close to find the end.
    """
    try:
        reason = http.HTTPStatus(response.status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {response.status} {reason}"]
    if response.content_type and response.body:
        lines.append(f"Content-Type: {response.content_type}")
    if response.status != 204:
        lines.append(f"Content-Length: {len(response.body)}")
    lines.extend(f"{name}: {value}" for name, value in response.headers)
    if close:
        lines.append("Connection: close")
    head_bytes = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    if head or response.status in (204, 304):
        return head_bytes
    # One write per response: a separate small write for the body would be a second
    # segment on the wire, exactly what Nagle and delayed ACKs punish.
    return head_bytes + response.body


async def serve(host: str, port: int, *, stop: asyncio.Event, ready: Ready | None = None) -> None:
    """Serve httpbin on ``host:port`` until ``stop`` is set.

    Example::

        stop = asyncio.Event()
        task = asyncio.create_task(serve("127.0.0.1", 0, stop=stop, ready=print))
        ...
        stop.set(); await task
    """
    await serve_connections(_handle, host, port, stop=stop, ready=ready)


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    peername = writer.get_extra_info("peername")
    peer = str(peername[0]) if peername else ""
    while True:
        try:
            request = await read_request(reader, writer, peer)
        except BadRequest as exc:
            error = _json({"error": exc.message}, status=exc.status)
            writer.write(encode_response(error, close=True))
            await writer.drain()
            return
        if request is None:
            return
        try:
            response = route(request)
        except Exception as exc:  # a bug in a route must not kill the other connections
            response = _json({"error": f"internal error: {exc!r}"}, status=500)
        close = not request.keep_alive
        if not close and request.version == "HTTP/1.0":
            # HTTP/1.0 closes by default; say explicitly that this connection stays open.
            response = replace(response, headers=(*response.headers, ("Connection", "keep-alive")))
        writer.write(encode_response(response, head=request.method == "HEAD", close=close))
        await writer.drain()
        if close:
            return
