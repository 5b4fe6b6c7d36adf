"""Helpers: run `trustmesh graph` and index its JSON edges."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from trustmesh.cli.main import app

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
BOOKINFO = [str(ROOT / "examples" / "bookinfo"), str(ROOT / "examples" / "bookinfo-authz-http")]
MESH = str(ROOT / "examples" / "mesh")
NOW = "1790000000"
runner = CliRunner()


def graph_json(*files: str, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    args = ["graph", *(a for f in files for a in ("-f", f)), "-o", "json", "--now", NOW, *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    body: dict[str, Any] = json.loads(result.stdout)
    return body


def edges_by_pair(body: dict[str, Any]) -> dict[tuple[str, str, int], dict[str, Any]]:
    return {(e["src"], e["dst"], e["port"]): e for e in body["edges"]}
