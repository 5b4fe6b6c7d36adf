"""How a sample app calls another service: ``GET http://reviews:9080/reviews/0``, by name.

Apps in a mesh are written for Kubernetes: they call a Service by its name and let the
platform route it. :func:`http_get` does what Python's ``requests`` does for such a call:

* with ``http_proxy`` / ``HTTP_PROXY`` set (the local runtime's process mode points it at
  the sidecar's outbound listener), it connects to the proxy and sends the absolute-form
  target (``GET http://reviews:9080/reviews/0``), unless ``no_proxy`` / ``NO_PROXY``
  names the host;
* otherwise it resolves the name and connects to it directly (in a pod sandbox the name
  resolves to the Service's address and the pod's capture rules hand the connection to
  its sidecar; without a sidecar kube-proxy's rules send it to an endpoint).

A failure to connect, a reset, a timeout or an answer that is not HTTP raises
:class:`CallFailed`; any HTTP answer, whatever its status, is returned. Standard library
only; one connection per call (``Connection: close``), as bookinfo's productpage does to
spread its calls over every version of a service.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["MAX_BODY", "Answer", "CallFailed", "http_get", "proxy_for"]

MAX_BODY = 4 * 1024 * 1024


class CallFailed(Exception):
    """No HTTP answer came back: refused, reset, timed out or not HTTP."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        return next((v for k, v in self.headers if k.lower() == lowered), None)

    def json(self) -> object:
        """The body as JSON; ``ValueError`` if it is not."""
        return json.loads(self.body)


def proxy_for(url: str, environ: Mapping[str, str] | None = None) -> tuple[str, int] | None:
    """The HTTP proxy ``(host, port)`` an ``http://`` URL goes through, or None to connect
    directly. Lower-case variables win over upper-case ones, as in ``requests``/``curl``."""
    env = os.environ if environ is None else environ
    proxy = env.get("http_proxy") or env.get("HTTP_PROXY")
    if not proxy:
        return None
    parts = urlsplit(url)
    no_proxy = env.get("no_proxy") or env.get("NO_PROXY") or ""
    if _bypassed(parts.hostname or "", parts.port or 80, no_proxy):
        return None
    parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    if parts.scheme != "http" or not parts.hostname:
        raise CallFailed(f"unsupported proxy {proxy!r}: only http:// proxies are used")
    return parts.hostname, parts.port or 80


def _bypassed(host: str, port: int, no_proxy: str) -> bool:
    """``no_proxy`` as curl and ``requests`` read it: ``*``, host names matching
    themselves and their subdomains (a leading dot optional), ``host:port``, and IP
    addresses or CIDR blocks."""
    host = host.lower().strip("[]")
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if entry == "*":
            return True
        if not entry:
            continue
        name, _, entry_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if entry_port and entry_port != str(port):
            continue
        name = name.lstrip(".").strip("[]")
        if host == name or host.endswith("." + name):
            return True
        try:
            if ipaddress.ip_address(host) in ipaddress.ip_network(name, strict=False):
                return True
        except ValueError:
            continue
    return False


async def http_get(
    url: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    timeout: float = 10.0,
    environ: Mapping[str, str] | None = None,
) -> Answer:
    """GET ``url`` (``http://`` only) and read the whole answer within ``timeout`` seconds."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise CallFailed(f"only http:// URLs with a host are called, not {url!r}")
    port = parts.port or 80
    authority = parts.hostname if port == 80 else f"{parts.hostname}:{port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    proxy = proxy_for(url, environ)
    if proxy is not None:
        address, request_target = proxy, f"http://{authority}{target}"
    else:
        address, request_target = (parts.hostname, port), target
    lines = [f"GET {request_target} HTTP/1.1", f"Host: {authority}"]
    lines += [f"{name}: {value}" for name, value in headers if name.lower() != "host"]
    lines.append("Connection: close")
    wire = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    where = f"{address[0]}:{address[1]}" + (" (HTTP proxy)" if proxy is not None else "")
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(*address, limit=MAX_BODY)
            try:
                writer.write(wire)
                await writer.drain()
                return await _read_answer(reader)
            finally:
                writer.transport.abort()
    except TimeoutError:
        raise CallFailed(f"{url}: no answer from {where} within {timeout:g}s") from None
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        raise CallFailed(f"{url}: {where}: {exc}") from None
    except ValueError:  # a status line or a length that is not a number
        raise CallFailed(f"{url}: the answer from {where} is not HTTP/1.x") from None


async def _read_answer(reader: asyncio.StreamReader) -> Answer:
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")[:-2]
        version, _, rest = status_line.partition(" ")
        if not version.startswith("HTTP/1."):
            raise ValueError(status_line)
        status = int(rest.split(" ", 1)[0])
        if not 100 <= status < 200:
            break  # an interim answer (100 Continue) comes before the real one
    answer_headers = tuple(
        (name.strip(), value.strip())
        for name, _, value in (line.partition(":") for line in header_lines)
    )
    answer = Answer(status, answer_headers, b"")
    length = answer.header("content-length")
    if status in (204, 304):
        body = b""
    elif (answer.header("transfer-encoding") or "").lower() == "chunked":
        body = await _read_chunked(reader)
    elif length is not None:
        body = await reader.readexactly(min(int(length), MAX_BODY))
    else:
        body = await reader.read(MAX_BODY)
    return Answer(status, answer_headers, body)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass  # trailers
            return bytes(body)
        if len(body) + size > MAX_BODY:
            raise ValueError("body too large")
        body += await reader.readexactly(size)
        await reader.readexactly(2)
