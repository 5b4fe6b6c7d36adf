"""``trustmesh graph``: who may talk to whom, as a matrix, JSON or a picture."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from trustmesh.cli import render
from trustmesh.cli.options import AssumeInjectedOpt, NamespaceOpt, namespace_problem
from trustmesh.config import load_config

if TYPE_CHECKING:  # imported when the command runs: other commands do not pay for them
    from trustmesh.graph.group import GroupedGraph
    from trustmesh.graph.model import MeshGraph

FORMATS = ("matrix", "json", "dot", "svg", "png", "html", "mermaid")
SHOW = ("all", "allowed", "denied")


def graph_command(
    files: Annotated[
        list[str],
        typer.Option("-f", "--filename", help="YAML file, directory (recursive) or - for stdin."),
    ],
    fmt: Annotated[
        str, typer.Option("-o", "--format", help="matrix, json, dot, svg, png, html or mermaid")
    ] = "matrix",
    output: Annotated[
        Path | None, typer.Option("--output", help="Write to FILE instead of stdout.")
    ] = None,
    show: Annotated[str, typer.Option("--show", help="all, allowed or denied edges")] = "all",
    group: Annotated[
        bool, typer.Option("--group/--no-group", help="Merge workloads policy treats alike.")
    ] = True,
    extra_sources: Annotated[
        bool,
        typer.Option(
            "--extra-sources/--no-extra-sources",
            help="Also a client outside the mesh and any other workload of each namespace.",
        ),
    ] = True,
    mesh_config: Annotated[
        list[str] | None, typer.Option("--mesh-config", help="MeshConfig or IstioOperator file.")
    ] = None,
    jwks: Annotated[list[str] | None, typer.Option("--jwks", help="URI=FILE for jwksUri.")] = None,
    now: Annotated[float | None, typer.Option("--now", help="Clock, epoch seconds.")] = None,
    namespace: NamespaceOpt = "default",
    assume_injected: AssumeInjectedOpt = False,
) -> None:
    """Every workload pair and port: allowed, denied or conditional, mTLS or plaintext,
    and the deciding rules.

    Exit codes: 0 done; 1 invalid configuration or the picture could not be made;
    2 bad arguments.
    """
    problem = _usage_problem(fmt, show, namespace, output)
    jwks_files: dict[str, str] = {}
    for item in jwks or []:
        uri, sep, file = item.partition("=")
        if not sep or not uri:
            problem = problem or f"--jwks must look like URI=FILE, got {item!r}"
        jwks_files[uri] = file
    if problem:
        render.usage_error(problem)
        raise typer.Exit(2)
    with render.LoadProgress() as progress:
        loaded = load_config(
            files,
            mesh_config=mesh_config or (),
            jwks_files=jwks_files,
            default_namespace=namespace,
            assume_injected=assume_injected,
            progress=progress,
        )
    if loaded.mesh is None:
        render.diagnostics(loaded.diagnostics, "json" if fmt == "json" else "table", summary=loaded)
        raise typer.Exit(1)
    from trustmesh.graph import render as graph_render
    from trustmesh.graph.build import build_graph
    from trustmesh.graph.group import Show, filtered, grouped

    with render.StepProgress("deciding every pair (destinations)") as progress_edges:
        graph = build_graph(
            loaded.mesh,
            now=time.time() if now is None else now,
            extra_sources=extra_sources,
            progress=progress_edges,
        )
    graph = filtered(graph, Show(show))
    shown = grouped(graph, merge=group)
    try:
        data = _rendered(fmt, graph, shown, output)
    except graph_render.RenderError as exc:
        render.usage_error(str(exc))
        raise typer.Exit(1) from None
    if data is None:
        return
    if output is not None:
        output.write_bytes(data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()


def _usage_problem(fmt: str, show: str, namespace: str, output: Path | None) -> str | None:
    if fmt not in FORMATS:
        return f"-o must be one of {', '.join(FORMATS)}, got {fmt!r}"
    if show not in SHOW:
        return f"--show must be all, allowed or denied, got {show!r}"
    if fmt == "png" and output is None and sys.stdout.isatty():
        return "-o png writes binary data: give --output FILE (or redirect stdout)"
    return namespace_problem(namespace)


def _rendered(
    fmt: str,
    graph: MeshGraph,
    shown: GroupedGraph,
    output: Path | None,
) -> bytes | None:
    from trustmesh.graph import matrix as graph_matrix
    from trustmesh.graph import render as graph_render

    if fmt == "json":
        return (graph_render.to_json(graph) + "\n").encode()
    if fmt == "mermaid":
        return graph_render.to_mermaid(shown).encode()
    dot = graph_render.to_dot(shown)
    if fmt == "dot":
        return dot.encode()
    if fmt in graph_render.IMAGE_FORMATS:
        return graph_render.render_image(dot, fmt)
    if fmt == "html":
        svg = graph_render.render_image(dot, "svg").decode()
        return graph_render.to_html(shown, graph, svg).encode()
    stream = open(output, "w", encoding="utf-8") if output else None  # noqa: SIM115
    # Not a terminal: plain text (rich writes no colour) and no wrapping at 80 columns.
    terminal = stream is None and sys.stdout.isatty()
    console = Console(file=stream, width=None if terminal else 1000)
    try:
        console.print(graph_matrix.matrix(shown))
        console.print(graph_matrix.legend())
        for line in graph_matrix.details(shown):
            console.print(line, highlight=False, markup=False)
    finally:
        if output is not None:
            console.file.close()
    return None
