"""``trustmesh sample …``: run a sample workload (httpbin, tcp-echo, sleep) in the foreground.

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
from trustmesh.samples import format_address
from trustmesh.samples import httpbin as httpbin_sample
from trustmesh.samples import sleep as sleep_sample
from trustmesh.samples import tcp_echo as tcp_echo_sample

app = typer.Typer(
    help="Sample workloads for the local mesh (Istio's httpbin, tcp-echo and sleep).",
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
