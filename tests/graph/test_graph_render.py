"""The pictures: real SVG/PNG from the dot layout program `make` installs, a
self-contained HTML page, Mermaid text, a plain matrix when not a terminal; bad input
named by file, line and field."""

from __future__ import annotations

import json
import re
from pathlib import Path

from trustmesh.cli.main import app
from trustmesh.graph.render import layout_program

from .graphutil import BOOKINFO, FIXTURES, MESH, NOW, runner

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _graph(*args: str) -> bytes:
    files = [a for f in BOOKINFO for a in ("-f", f)]
    result = runner.invoke(app, ["graph", *files, "--now", NOW, *args])
    assert result.exit_code == 0, result.output
    return result.stdout_bytes


def test_dot_layout_program_is_installed() -> None:
    # pyproject pins graphviz-pure: `make` puts its binary next to this Python.
    program = layout_program()
    assert program is not None and Path(program).name in ("graphviz-pure", "dot")


def test_png_is_a_real_image(tmp_path: Path) -> None:
    target = tmp_path / "bookinfo.png"
    assert _graph("-o", "png", "--output", str(target)) == b""
    data = target.read_bytes()
    assert data.startswith(PNG_MAGIC)
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 400 and height > 200  # a laid-out graph, not an empty canvas


def test_svg_has_clusters_and_verdict_colours() -> None:
    svg = _graph("-o", "svg").decode()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    assert "namespace default" in svg
    assert "#ef6c00" in svg and "#c62828" in svg  # conditional and denied edges
    assert "reviews&#45;viewer[0]" in svg or "reviews-viewer[0]" in svg
    assert "stroke-dasharray" in svg  # plaintext edges from outside the mesh


def test_dot_source_groups_alike_workloads() -> None:
    dot = _graph("-o", "dot").decode()
    assert "subgraph cluster_0" in dot
    assert "reviews-v1, reviews-v2, reviews-v3" in dot
    ungrouped = _graph("-o", "dot", "--no-group").decode()
    assert "reviews-v1, reviews-v2" not in ungrouped and "reviews-v2" in ungrouped


def test_html_is_self_contained() -> None:
    page = _graph("-o", "html").decode()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page
    assert not re.search(r"<(script|link|img)\b[^>]*(src|href)=", page)
    assert "ns[default]-policy[reviews-viewer]-rule[0]" in page


def test_mermaid_text() -> None:
    text = _graph("-o", "mermaid").decode()
    assert text.startswith("flowchart LR\n")
    assert 'subgraph ns0["namespace default"]' in text
    assert "-.->" in text  # plaintext
    assert "linkStyle 0 stroke:" in text


def test_matrix_is_plain_when_not_a_terminal() -> None:
    text = _graph().decode()
    assert "\x1b[" not in text
    assert "legend: A allowed  C conditional  D denied" in text
    row = next(line for line in text.splitlines() if "productpage-v1 " in line and "│" in line)
    # columns: details-v1, productpage-v1, ratings-v1, reviews (3)
    assert [c.strip() for c in row.split("│")[2:-1]] == ["C", "", "D", "C"]
    assert (
        "C productpage-v1 → reviews-v1, reviews-v2, reviews-v3:9080: only if (method GET)"
        " [reviews-viewer[0]]"
    ) in text


def test_bad_input_names_file_line_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: x, namespace: foo}\nspec:\n  action: ALOW\n"
    )
    result = runner.invoke(app, ["graph", "-f", MESH, "-f", str(bad)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert f"{bad}:5" in result.output and "spec.action" in result.output
    as_json = runner.invoke(app, ["graph", "-f", MESH, "-f", str(bad), "-o", "json"])
    assert as_json.exit_code == 1
    (problem,) = json.loads(as_json.stdout)["diagnostics"]
    assert (problem["file"], problem["line"], problem["field"]) == (str(bad), 5, "spec.action")


def test_usage_errors() -> None:
    conditional = str(FIXTURES / "conditional.yaml")
    result = runner.invoke(app, ["graph", "-f", MESH, "-f", conditional, "-o", "gif"])
    assert result.exit_code == 2 and "-o must be one of" in result.output
    result = runner.invoke(app, ["graph", "-f", MESH, "--show", "some"])
    assert result.exit_code == 2 and "--show" in result.output
