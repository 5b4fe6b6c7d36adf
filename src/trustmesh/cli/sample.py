"""``trustmesh sample …``: run a sample workload in the foreground.

httpbin, tcp-echo, sleep, helloworld and bookinfo's productpage, details, reviews and
ratings: the stand-ins ``trustmesh up`` runs for Istio's sample images
(:mod:`trustmesh.samples.images`), each reading the environment its image reads.

Servers print one line, ``listening on HOST:PORT``, once they accept connections (the
port actually bound, so ``--port 0`` is usable), and exit 0 on SIGTERM or SIGINT. HOST and
PORT in the environment set the defaults, as a workload launcher would pass them. The
serving itself is :func:`trustmesh.samples.run.serve`, which ``python -m trustmesh sample``
reaches without loading this command line when the arguments are plain ones.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from trustmesh.samples import bookinfo
from trustmesh.samples import helloworld as helloworld_sample
from trustmesh.samples import httpbin as httpbin_sample
from trustmesh.samples import tcp_echo as tcp_echo_sample
from trustmesh.samples.run import DEFAULT_HOST, Invocation, serve

app = typer.Typer(
    help="Sample workloads for the local mesh (Istio's httpbin, tcp-echo, sleep, helloworld, "
    "bookinfo, ext-authz).",
    no_args_is_help=True,
)

Host = Annotated[str, typer.Option("--host", envvar="HOST", help="Address to listen on.")]
_PORT_HELP = "Port to listen on (0: any free port)."


def _run(invocation: Invocation) -> None:
    code = serve(invocation)
    if code:
        raise typer.Exit(code)


@app.command("httpbin")
def httpbin(
    host: Host = DEFAULT_HOST,
    port: Annotated[
        int, typer.Option("--port", envvar="PORT", min=0, max=65535, help=_PORT_HELP)
    ] = httpbin_sample.DEFAULT_PORT,
) -> None:
    """An httpbin.org look-alike: /get, /headers, /ip, /status/N, /post, /anything."""
    _run(Invocation("httpbin", host, (port,)))


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
    _run(Invocation("tcp-echo", host, tuple(port or [tcp_echo_sample.DEFAULT_PORT]), prefix))


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
    del port
    _run(Invocation("sleep", host))


def _port_option() -> Any:
    return typer.Option("--port", envvar="PORT", min=0, max=65535, help=_PORT_HELP)


BookinfoPort = Annotated[int, _port_option()]


@app.command("helloworld")
def helloworld(
    host: Host = DEFAULT_HOST,
    port: Annotated[int, _port_option()] = (helloworld_sample.DEFAULT_PORT),
) -> None:
    """Istio's helloworld: GET /hello answers "Hello version: $SERVICE_VERSION, instance:
    $HOSTNAME"."""
    _run(Invocation("helloworld", host, (port,)))


@app.command("productpage")
def productpage_command(
    host: Host = DEFAULT_HOST, port: BookinfoPort = bookinfo.DEFAULT_PORT
) -> None:
    """Bookinfo's product page: /productpage calls details and reviews (by name, through
    $HTTP_PROXY when set) and shows the book, its reviews and their stars."""
    _run(Invocation("productpage", host, (port,)))


@app.command("details")
def details(host: Host = DEFAULT_HOST, port: BookinfoPort = bookinfo.DEFAULT_PORT) -> None:
    """Bookinfo's details: GET /details/ID answers the book's details."""
    _run(Invocation("details", host, (port,)))


@app.command("reviews")
def reviews(host: Host = DEFAULT_HOST, port: BookinfoPort = bookinfo.DEFAULT_PORT) -> None:
    """Bookinfo's reviews: GET /reviews/ID; with ENABLE_RATINGS=true it calls ratings and
    adds stars in $STAR_COLOR (Istio's v2: black, v3: red)."""
    _run(Invocation("reviews", host, (port,)))


@app.command("ratings")
def ratings(host: Host = DEFAULT_HOST, port: BookinfoPort = bookinfo.DEFAULT_PORT) -> None:
    """Bookinfo's ratings: GET /ratings/ID answers each reviewer's stars ($SERVICE_VERSION
    picks Istio's faulty, delayed and unavailable variants)."""
    _run(Invocation("ratings", host, (port,)))


@app.command("ext-authz")
def ext_authz(
    host: Host = DEFAULT_HOST,
    http_port: Annotated[
        int, typer.Option("--http", "--http-port", min=0, max=65535, help="HTTP check port.")
    ] = 8000,
    grpc_port: Annotated[
        int, typer.Option("--grpc", "--grpc-port", min=0, max=65535, help="gRPC check port.")
    ] = 9000,
    allow_service_account: Annotated[
        str,
        typer.Option(
            "--allow-service-account",
            "--allow_service_account",
            help="gRPC checks without the x-ext-authz header allow callers whose principal "
            "ends with /sa/NAME.",
        ),
    ] = "a",
) -> None:
    """Istio's ext-authz sample: an external authorizer for CUSTOM policies. Allows a
    request carrying `x-ext-authz: allow`, denies (403) others; HTTP checks on --http,
    Envoy's Authorization/Check gRPC service on --grpc."""
    _run(Invocation("ext-authz", host, (http_port, grpc_port), "", allow_service_account))
