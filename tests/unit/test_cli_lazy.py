"""The command line imports a command's module only when that command runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from trustmesh.cli.main import _COMMANDS, app

# Runs `trustmesh ARGS` in a fresh interpreter, then prints the trustmesh modules loaded.
_PROBE = """
import json
import sys
from trustmesh.cli.main import app
try:
    app(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(m for m in sys.modules if m.startswith("trustmesh."))))
"""


def _loaded_after(*args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=60
    )
    loaded: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return loaded


def test_version_loads_no_command_module() -> None:
    loaded = _loaded_after("version")
    assert not [m for m in loaded if m.startswith(("trustmesh.policy", "trustmesh.runtime"))]
    assert "trustmesh.cli.mesh" not in loaded


def test_an_offline_command_does_not_load_the_mesh_runtime() -> None:
    loaded = _loaded_after("validate", "--help")
    assert "trustmesh.cli.offline" in loaded
    heavy = ("trustmesh.runtime.supervisor", "trustmesh.runtime.cluster", "trustmesh.xds.")
    assert not [m for m in loaded if m.startswith(heavy)]


def test_reading_a_mesh_does_not_load_what_starts_one(tmp_path: Path) -> None:
    # status / request / down only read the mesh's record: no supervisor, no cluster,
    # no compiler (a mesh's users and tests run them many times).
    heavy = (
        "trustmesh.runtime.supervisor",
        "trustmesh.runtime.cluster",
        "trustmesh.xds.",
        "trustmesh.policy.compose",
    )
    state = ["--state", str(tmp_path / "none")]
    for command in (["status"], ["down"], ["request", "--from", "foo/sleep", "http://x"]):
        loaded = _loaded_after(*command, *state)
        assert "trustmesh.cli.mesh" in loaded, command
        assert not [m for m in loaded if m.startswith(heavy)], command


def test_every_command_in_the_table_loads_and_has_help() -> None:
    runner = CliRunner()
    for name in _COMMANDS:
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "Usage:" in result.output, name


def test_an_unknown_command_is_a_usage_error() -> None:
    result = CliRunner().invoke(app, ["no-such-command"])
    assert result.exit_code == 2
    assert "No such command" in result.output
