"""Which isolation `trustmesh up` runs: the sandbox by default where the host allows it,
else process mode saying plainly what is not isolated; --isolation forces either."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from trustmesh.cli.main import app
from trustmesh.runtime import sandboxed
from trustmesh.runtime.plan import Isolation
from trustmesh.runtime.sandboxed import choose_isolation


def test_the_sandbox_is_the_default_where_the_host_allows_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sandboxed, "sandbox_support", lambda: None)
    assert choose_isolation(None) == (Isolation.NETNS, None)
    assert choose_isolation(Isolation.PROCESS) == (Isolation.PROCESS, None)


def test_without_the_sandbox_process_mode_says_what_is_not_isolated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sandboxed, "sandbox_support", lambda: "not running as root")
    mode, note = choose_isolation(None)
    assert mode is Isolation.PROCESS and note is not None
    assert note.startswith("the pod sandbox is not available (not running as root)")
    for exposed in ("SDS socket", "admin port", "without its sidecar", "HTTP_PROXY"):
        assert exposed in note
    # asked for explicitly, the sandbox is an error naming the reason, not a silent fallback
    with pytest.raises(ValueError, match="--isolation netns is not possible here: not running"):
        choose_isolation(Isolation.NETNS)


def test_an_unknown_isolation_is_a_usage_error() -> None:
    result = CliRunner().invoke(app, ["up", "--isolation", "vm", "x.yaml"])
    assert result.exit_code == 2
    assert "--isolation must be netns or process, not 'vm'" in result.output


def test_up_says_once_what_process_mode_does_not_isolate(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(sandboxed, "sandbox_support", lambda: "not running as root")
    missing = tmp_path / "nothing.yaml"
    result = CliRunner().invoke(app, ["up", str(missing), "--state", str(tmp_path / "s")])
    assert result.exit_code == 1
    assert result.output.count("the pod sandbox is not available (not running as root)") == 1
    # explicit process mode: no note; explicit netns: the reason, and nothing started
    result = CliRunner().invoke(
        app, ["up", "--isolation", "process", str(missing), "--state", str(tmp_path / "s")]
    )
    assert "not available" not in result.output
    result = CliRunner().invoke(
        app, ["up", "--isolation", "netns", str(missing), "--state", str(tmp_path / "s")]
    )
    assert result.exit_code == 1
    assert "--isolation netns is not possible here: not running as root" in result.output
