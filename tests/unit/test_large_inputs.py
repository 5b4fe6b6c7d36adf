"""Large inputs: the two-core reader gives exactly the one-core result, progress is shown
only on a terminal and only past a second, typed documents do not keep their raw values."""

from __future__ import annotations

import io
import os

import pytest
from rich.console import Console

from tests.unit.test_yamldoc import stream
from trustmesh import yamlread
from trustmesh.api.loader import load_sources
from trustmesh.api.yamldoc import Restart, YamlDocument, iter_yaml, parse_yaml
from trustmesh.cli.render import LoadProgress


def summary(text: str, parse: object) -> tuple[list[object], list[str]]:
    loaded = load_sources([("big.yaml", text.encode())], parse=parse)  # type: ignore[arg-type]
    resources = [
        (r.key, r.line, r.spec, r.document.line_of(("spec", "rules"))) for r in loaded.resources
    ]
    return resources, [str(d) for d in loaded.diagnostics]


@pytest.fixture
def forks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make every input large enough to be split, and count the forks."""
    monkeypatch.setattr(yamlread, "_parallel_ok", lambda text: True)
    made: list[int] = []
    real_fork = os.fork

    def fork() -> int:
        pid = real_fork()
        if pid:
            made.append(pid)
        return pid

    monkeypatch.setattr(yamlread.os, "fork", fork)
    return made


def broken(text: str, *names: str) -> str:
    for name in names:
        text = text.replace(f"name: {name}\n", f"name: [{name}\n")
    return text


@pytest.mark.parametrize("damaged", [(), ("p3",), ("p37",), ("p3", "p37")])
def test_two_readers_give_the_one_reader_result(forks: list[int], damaged: tuple[str, ...]) -> None:
    text = broken(stream(40, pad=1), *damaged)
    assert summary(text, yamlread.read_yaml) == summary(text, iter_yaml)
    assert len(forks) == 1


def test_a_failing_child_makes_the_parent_read_everything(
    forks: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object) -> None:
        raise RuntimeError("child broke")

    monkeypatch.setattr(yamlread, "_send", fail)  # runs in the forked child
    text = stream(20)
    items = list(yamlread.read_yaml(text, "big.yaml"))
    assert any(isinstance(i, Restart) for i in items)
    after = items[max(i for i, x in enumerate(items) if isinstance(x, Restart)) + 1 :]
    expected, _ = parse_yaml(text, "big.yaml")
    assert [(d.line, d.body) for d in after if isinstance(d, YamlDocument)] == [
        (d.line, d.body) for d in expected
    ]
    assert summary(text, yamlread.read_yaml) == summary(text, iter_yaml)


def test_small_inputs_and_threaded_processes_are_read_here(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert not yamlread._parallel_ok(stream(3))
    monkeypatch.setattr(yamlread, "PARALLEL_MIN_CHARS", 10)
    monkeypatch.setattr(yamlread.threading, "active_count", lambda: 3)
    assert not yamlread._parallel_ok(stream(3))


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_shows_only_on_a_terminal_after_a_second() -> None:
    for terminal in (True, False):
        out = io.StringIO()
        console = Console(file=out, force_terminal=terminal, width=80)
        clock = FakeClock()
        with LoadProgress(console, delay=1.0, clock=clock) as progress:
            progress(10, 100)
            assert out.getvalue() == ""  # a fast load shows nothing
            clock.now += 1.5
            progress(50, 100)
        assert ("reading configuration" in out.getvalue()) is terminal


def test_the_loader_reports_how_far_it_read() -> None:
    text = stream(600)
    seen: list[int] = []
    load_sources([("a.yaml", text.encode()), ("b.yaml", text.encode())], progress=seen.append)
    assert seen == sorted(seen)
    assert seen[-1] == 2 * len(text.encode())
    assert len(seen) > 4
