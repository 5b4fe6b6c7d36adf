"""Run a sample workload by name — what ``trustmesh sample NAME`` does — on the standard
library alone.

A mesh starts one stand-in per pod (bookinfo: six, a 20-pod benchmark: twenty), and each
is a fresh Python process. Importing the whole command line (typer, rich, pydantic, the
policy engine) costs ~0.7 s of CPU per process, ten times the sample's own start, so
``python -m trustmesh sample …`` — the command the runtime gives a stand-in — is served
here when its arguments are ones this module understands (:func:`fast_invocation`), and by
the full command line otherwise (help, and every error message, come from there).

Both paths run the same code (:func:`serve`): the servers print one line, ``listening on
HOST:PORT``, once they accept connections, and exit 0 on SIGTERM or SIGINT; a failure to
listen prints ``error: cannot listen on …`` and exits 1. ``HOST`` and ``PORT`` in the
environment set the defaults, as a workload launcher passes them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from trustmesh.samples import format_address

__all__ = ["DEFAULT_HOST", "Invocation", "fast_invocation", "serve"]

DEFAULT_HOST = "127.0.0.1"
SAMPLES = (
    "httpbin",
    "tcp-echo",
    "sleep",
    "helloworld",
    "productpage",
    "details",
    "reviews",
    "ratings",
)


@dataclass(frozen=True, slots=True)
class Invocation:
    """One sample to run: where it listens (``ports`` empty: the sample's default)."""

    sample: str
    host: str
    ports: tuple[int, ...] = ()
    prefix: str = ""
    allow_service_account: str = "a"  # ext-authz: allowed without the header (gRPC)


def _default_port(sample: str) -> int:
    from trustmesh.samples import bookinfo, helloworld, httpbin, tcp_echo

    defaults = {
        "ext-authz": 8000,
        "httpbin": httpbin.DEFAULT_PORT,
        "tcp-echo": tcp_echo.DEFAULT_PORT,
        "helloworld": helloworld.DEFAULT_PORT,
        "sleep": 0,
    }
    return defaults.get(sample, bookinfo.DEFAULT_PORT)


def _announce(host: str, port: int) -> None:
    print(f"listening on {format_address(host, port)}", flush=True)


def _main(invocation: Invocation) -> Callable[[asyncio.Event], Coroutine[Any, Any, None]]:
    """``main(stop)`` serving ``invocation`` until ``stop`` is set."""
    host, sample = invocation.host, invocation.sample
    ports = invocation.ports or (_default_port(sample),)
    if sample == "sleep":
        from trustmesh.samples import sleep

        return lambda stop: sleep.serve(stop=stop)
    if sample == "httpbin":
        from trustmesh.samples import httpbin

        return lambda stop: httpbin.serve(host, ports[0], stop=stop, ready=_announce)
    if sample == "ext-authz":
        from trustmesh.samples.ext_authz import DEFAULT_GRPC_PORT, ExtAuthzServer

        http_port, grpc_port = (*invocation.ports, DEFAULT_GRPC_PORT)[:2]
        server = ExtAuthzServer(invocation.allow_service_account)
        return lambda stop: server.serve(host, http_port, grpc_port, stop=stop, ready=_announce)
    if sample == "tcp-echo":
        from trustmesh.samples import tcp_echo

        async def serve_all(stop: asyncio.Event) -> None:
            await asyncio.gather(
                *(
                    tcp_echo.serve(host, p, stop=stop, ready=_announce, prefix=invocation.prefix)
                    for p in dict.fromkeys(ports)
                )
            )

        return serve_all
    from trustmesh.samples.http1 import Router, serve_http

    router: Router
    if sample == "helloworld":
        from trustmesh.samples.helloworld import HelloWorld

        router = HelloWorld().route
    elif sample == "productpage":
        from trustmesh.samples.productpage import ProductPage

        router = ProductPage().route
    else:
        from trustmesh.samples import bookinfo

        if sample == "details":
            router = bookinfo.Details().route
        elif sample == "reviews":
            router = bookinfo.Reviews().route
        else:
            router = bookinfo.Ratings().route
    return lambda stop: serve_http(router, host, ports[0], stop=stop, ready=_announce)


def serve(invocation: Invocation) -> int:
    """Run the sample until SIGTERM / SIGINT: 0; 1 when it cannot listen (said on stderr)."""
    main = _main(invocation)

    async def supervised() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    try:
        asyncio.run(supervised())
    except OSError as exc:
        if invocation.sample == "sleep":
            where = "nothing"
        else:
            ports = invocation.ports or (_default_port(invocation.sample),)
            where = ", ".join(format_address(invocation.host, p) for p in ports)
        print(f"error: cannot listen on {where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def _port(text: str) -> int | None:
    return int(text) if text.isdigit() and 0 <= int(text) <= 65535 else None


def fast_invocation(
    args: Sequence[str], environ: Mapping[str, str] | None = None
) -> Invocation | None:
    """``args`` after ``sample``, when they are a plain run this module can serve: a known
    sample, ``--host``, ``--port`` (repeatable for tcp-echo) and tcp-echo's ``--prefix``,
    each as ``--opt VALUE`` or ``--opt=VALUE``, valid values. None otherwise (help, a
    typo, a bad value): the full command line answers those, with its own messages."""
    env = os.environ if environ is None else environ
    if not args or args[0] not in SAMPLES:
        return None
    sample, rest = args[0], list(args[1:])
    host: str | None = None
    ports: list[int] = []
    prefix = ""
    while rest:
        option = rest.pop(0)
        name, equals, value = option.partition("=")
        if not equals:
            if not rest:
                return None
            value = rest.pop(0)
        if name == "--host" and value:
            host = value
        elif name == "--port" and (port := _port(value)) is not None:
            if ports and sample != "tcp-echo":
                return None  # one port: the full command line says so
            ports.append(port)
        elif name == "--prefix" and sample == "tcp-echo":
            prefix = value
        else:
            return None
    if not ports and sample != "sleep" and "PORT" in env:
        port = _port(env["PORT"].strip())
        if port is None:
            return None
        ports.append(port)
    return Invocation(sample, host or env.get("HOST") or DEFAULT_HOST, tuple(ports), prefix)
