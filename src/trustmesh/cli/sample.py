"""``trustmesh sample …``: run a sample workload in the foreground.

httpbin, tcp-echo, sleep, helloworld and bookinfo's productpage, details, reviews and
ratings: the stand-ins ``trustmesh up`` runs for Istio's sample images
(:mod:`trustmesh.samples.images`), each reading the environment its image reads.

Servers print one line, ``listening on HOST:PORT``, once they accept connections (the
port actually bound, so ``--port 0`` is usable), and exit 0 on SIGTERM or SIGINT. HOST and
PORT in the environment set the defaults, as a workload launcher would pass them.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import typer

from trustmesh.cli import render
from trustmesh.samples import bookinfo, format_address, productpage
from trustmesh.samples import helloworld as helloworld_sample
from trustmesh.samples import httpbin as httpbin_sample
from trustmesh.samples import sleep as sleep_sample
from trustmesh.samples import tcp_echo as tcp_echo_sample
from trustmesh.samples.http1 import Router, serve_http

app = typer.Typer(
    help="Sample workloads for the local mesh (Istio's httpbin, tcp-echo, sleep, helloworld, "
    "bookinfo).",
    no_args_is_help=True,
)

DEFAULT_HOST = "127.0.0.1"
Host = Annotated[str, typer.Option("--host", envvar="HOST", help="Address to listen on.")]
_PORT_HELP = "Port to listen on (0: any free port)."


def _announce(host: str, port: int) -> None:
    print(f"listening on {format_address(host, port)}", flush=True)


def _run(main: Callable[[asyncio.Event], Coroutine[Any, Any, None]], where: str) -> None:
    """Run ``main(stop)`` with SIGTERM and SIGINT setting ``stop``; bind errors exit 1."""

    async def supervised() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    try:
        asyncio.run(supervised())
    except OSError as exc:
        render.usage_error(f"cannot listen on {where}: {exc.strerror or exc}")
        raise typer.Exit(1) from None


@app.command("httpbin")
def httpbin(
    host: Host = DEFAULT_HOST,
    port: Annotated[
        int, typer.Option("--port", envvar="PORT", min=0, max=65535, help=_PORT_HELP)
    ] = httpbin_sample.DEFAULT_PORT,
) -> None:
    """An httpbin.org look-alike: /get, /headers, /ip, /status/N, /post, /anything."""
    _run(
        lambda stop: httpbin_sample.serve(host, port, stop=stop, ready=_announce),
        format_address(host, port),
    )


@app.command("tcp-echo")
def tcp_echo(
    host: Host = DEFAULT_HOST,
    port: Annotated[
        list[int] | None,
        typer.Option("--port", envvar="PORT", min=0, max=65535, help=_PORT_HELP + " Repeatable."),
    ] = None,
    prefix: Annotated[
        str, typer.Option("--prefix", help='Answer "PREFIX LINE" to each line (Istio: hello).')
    ] = "",
) -> None:
    """Istio's tcp-echo: every line received is sent back, after the prefix.

    Istio's image listens on 9000, 9001 and 9002: ``--port 9000 --port 9001 --port 9002``.
    """
    ports = port or [tcp_echo_sample.DEFAULT_PORT]

    async def serve_all(stop: asyncio.Event) -> None:
        await asyncio.gather(
            *(
                tcp_echo_sample.serve(host, p, stop=stop, ready=_announce, prefix=prefix)
                for p in dict.fromkeys(ports)
            )
        )

    _run(serve_all, ", ".join(format_address(host, p) for p in ports))


@app.command("sleep")
def sleep(
    host: Annotated[
        str, typer.Option("--host", envvar="HOST", help="Accepted and ignored.")
    ] = DEFAULT_HOST,
    port: Annotated[
        int, typer.Option("--port", envvar="PORT", min=0, max=65535, help="Accepted and ignored.")
    ] = 0,
) -> None:
    """A client workload that idles until stopped; it listens nowhere and prints nothing.

    --host and --port are accepted so a launcher can start every sample the same way (like
    Istio's sleep Service, whose port has no listener behind it).
    """
    del host, port
    _run(lambda stop: sleep_sample.serve(stop=stop), "nothing")


def _port_option() -> Any:
    return typer.Option("--port", envvar="PORT", min=0, max=65535, help=_PORT_HELP)


def _serve(router: Router, host: str, port: int) -> None:
    _run(
        lambda stop: serve_http(router, host, port, stop=stop, ready=_announce),
        format_address(host, port),
    )


BookinfoPort = Annotated[int, _port_option()]


@app.command("helloworld")
def helloworld(
    host: Host = DEFAULT_HOST,
    port: Annotated[int, _port_option()] = (helloworld_sample.DEFAULT_PORT),
) -> None:
    """Istio's helloworld: GET /hello answers "Hello version: $SERVICE_VERSION, instance:
    $HOSTNAME"."""
    _serve(helloworld_sample.HelloWorld().route, host, port)


@app.command("productpage")
def productpage_command(
    host: Host = DEFAULT_HOST, port: BookinfoPort = bookinfo.DEFAULT_PORT
) -> None:
    """Bookinfo's product page: /productpage calls details and reviews (by name, through
    $HTTP_PROXY when set) and shows the book, its reviews and their stars."""
    _serve(productpage.ProductPage().route, host, port)


@app.command("details")
def details(host: Host = DEFAULT_HOST, port: BookinfoPort = bookinfo.DEFAULT_PORT) -> None:
    """Bookinfo's details: GET /details/ID answers the book's details."""
    _serve(bookinfo.Details().route, host, port)


@app.command("reviews")
def reviews(host: Host = DEFAULT_HOST, port: BookinfoPort = bookinfo.DEFAULT_PORT) -> None:
    """Bookinfo's reviews: GET /reviews/ID; with ENABLE_RATINGS=true it calls ratings and
    adds stars in $STAR_COLOR (Istio's v2: black, v3: red)."""
    _serve(bookinfo.Reviews().route, host, port)


@app.command("ratings")
def ratings(host: Host = DEFAULT_HOST, port: BookinfoPort = bookinfo.DEFAULT_PORT) -> None:
    """Bookinfo's ratings: GET /ratings/ID answers each reviewer's stars ($SERVICE_VERSION
    picks Istio's faulty, delayed and unavailable variants)."""
    _serve(bookinfo.Ratings().route, host, port)
