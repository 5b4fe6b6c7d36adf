"""The terminal view: sources × destination ports, one coloured cell per edge, a legend,
and the conditions of every conditional cell underneath.

Cells are letters as well as colours (``A`` allowed, ``C`` conditional, ``D`` denied,
``?`` unsupported; a lower-case letter: plaintext), so the matrix reads the same when
it is not a terminal and rich writes no colour.
"""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from trustmesh.graph.group import GroupedGraph
from trustmesh.graph.model import Edge, EdgeVerdict
from trustmesh.graph.render import COLOURS, short_rule

_LETTERS = {
    EdgeVerdict.ALLOWED: "A",
    EdgeVerdict.CONDITIONAL: "C",
    EdgeVerdict.DENIED: "D",
    EdgeVerdict.UNSUPPORTED: "?",
}


def cell(edge: Edge) -> Text:
    letter = _LETTERS[edge.verdict]
    if edge.mtls is False:
        letter = letter.lower()
    return Text(letter, style=f"bold {COLOURS[edge.verdict]}")


def matrix(grouped: GroupedGraph) -> Table:
    columns: dict[tuple[str, int, int | None], None] = {}
    for ge in grouped.edges:
        columns.setdefault((ge.destination, ge.edge.port, ge.edge.service_port), None)
    ordered = sorted(columns, key=lambda c: ([g.id for g in grouped.groups].index(c[0]), c[1]))
    table = Table(title="who may talk to whom (rows: sources, columns: destination:port)")
    table.add_column("source", no_wrap=True)
    for destination, port, _ in ordered:
        label = grouped.group(destination).short_label
        table.add_column(f"{label}\n:{port}", justify="center", overflow="fold")
    cells: dict[tuple[str, tuple[str, int, int | None]], Edge] = {}
    for ge in grouped.edges:
        cells[(ge.source, (ge.destination, ge.edge.port, ge.edge.service_port))] = ge.edge
    sources = [g for g in grouped.groups if any(ge.source == g.id for ge in grouped.edges)]
    for group in sources:
        row: list[Text | str] = [group.label]
        for column in ordered:
            edge = cells.get((group.id, column))
            row.append(cell(edge) if edge is not None else "")
        table.add_row(*row)
    return table


def legend() -> Text:
    text = Text("legend: ")
    for verdict, letter in _LETTERS.items():
        text.append(f"{letter} {verdict.value}", style=f"bold {COLOURS[verdict]}")
        text.append("  ")
    text.append("lower case: plaintext (no mTLS)  blank: not shown")
    return text


def details(grouped: GroupedGraph) -> list[str]:
    """One line per conditional or unsupported cell: its conditions and rules."""
    lines = []
    for ge in grouped.edges:
        edge = ge.edge
        if edge.verdict not in (EdgeVerdict.CONDITIONAL, EdgeVerdict.UNSUPPORTED):
            continue
        source = grouped.group(ge.source).label
        destination = grouped.group(ge.destination).label
        what = edge.conditions.describe() if edge.conditions else edge.reason
        rules = ", ".join(short_rule(r) for r in edge.rules)
        lines.append(
            f"{_LETTERS[edge.verdict]} {source} → {destination}:{edge.port}: {what}"
            + (f" [{rules}]" if rules else "")
        )
    return lines
