"""A small, strict HTTP/1.1 server for the sample workloads (standard library only).

Every HTTP sample (httpbin, helloworld, bookinfo's four services) answers through
:func:`serve_http`: keep-alive (HTTP/1.0 only on request), Content-Length or chunked
request bodies, ``Expect: 100-continue``, HEAD, ``Content-Length`` on every response that
may carry one, and 400 (connection closed) on malformed input. A sample supplies a
*router*, ``async (Request) -> Response``; parsing and framing live here so each sample is
only its routes, tested without sockets.
"""

from __future__ import annotations

import asyncio
import http
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from trustmesh.samples import Ready, serve_connections

__all__ = [
    "BadRequest",
    "Request",
    "Response",
    "Router",
    "encode_response",
    "json_response",
    "read_request",
    "serve_http",
    "text_response",
]

MAX_LINE = 16 * 1024
MAX_HEADERS = 100
MAX_BODY = 10 * 1024 * 1024

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(r"HTTP/1\.[01]")
_DIGITS = re.compile(r"[0-9]+")


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


Router = Callable[[Request], Awaitable[Response]]
"""Answers one request; a sample's whole behaviour."""


def json_response(value: object, status: int = 200, *, compact: bool = False) -> Response:
    """``value`` as JSON: indented with sorted keys (httpbin's look), or ``compact`` in
    the order given (what Node's ``JSON.stringify`` and Ruby's ``to_json`` send)."""
    if compact:
        return Response(status, json.dumps(value, separators=(",", ":")).encode())
    return Response(status, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def text_response(text: str, status: int = 200, content_type: str = "text/plain") -> Response:
    return Response(status, text.encode(), f"{content_type}; charset=utf-8")


async def serve_http(
    router: Router, host: str, port: int, *, stop: asyncio.Event, ready: Ready | None = None
) -> None:
    """Answer every request on ``host:port`` with ``router`` until ``stop`` is set."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        peer = str(peername[0]) if peername else ""
        while True:
            try:
                request = await read_request(reader, writer, peer)
            except BadRequest as exc:
                error = json_response({"error": exc.message}, status=exc.status)
                writer.write(encode_response(error, close=True))
                await writer.drain()
                return
            if request is None:
                return
            try:
                response = await router(request)
            except Exception as exc:  # a bug in a route must not kill the other connections
                response = json_response({"error": f"internal error: {exc!r}"}, status=500)
            close = not request.keep_alive
            if not close and request.version == "HTTP/1.0":
                # HTTP/1.0 closes by default: say explicitly that this connection stays open.
                extra = (*response.headers, ("Connection", "keep-alive"))
                response = replace(response, headers=extra)
            writer.write(encode_response(response, head=request.method == "HEAD", close=close))
            await writer.drain()
            if close:
                return

    await serve_connections(handle, host, port, stop=stop, ready=ready)
