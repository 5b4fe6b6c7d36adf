"""A real local mesh for end-to-end tests: ``trustmesh up --detach`` in a temp directory.

The mesh runs as separate processes, exactly as a user starts it; :class:`LiveMesh`
rewrites its configuration files (the control plane watches them), waits until every
proxy ACKed the new configuration, and stops everything by PID at the end — also when a
test fails.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.unit.meshutil import ROOT
from trustmesh.config import LoadedConfig, load_config
from trustmesh.runtime.live import LiveCaseResult, LiveRunner
from trustmesh.runtime.running import RunningMesh

EXAMPLES = ROOT / "examples"
SCENARIOS = EXAMPLES / "scenarios"
START_TIMEOUT = 240


def trustmesh(*args: str, state: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TRUSTMESH_STATE": str(state)}
    return subprocess.run(
        [sys.executable, "-m", "trustmesh", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


@dataclass
class LiveMesh:
    root: Path
    state: Path
    config_dir: Path
    mesh_config: Path

    @property
    def running(self) -> RunningMesh:
        return RunningMesh.open(self.state)

    def write(self, scenario: Path | None, *, log_every_request: bool = True) -> bool:
        """Make ``scenario``'s config.yaml and mesh.yaml (None: none) the mesh's files;
        whether that changed them. The control plane notices by itself."""
        text = (scenario / "config.yaml").read_text() if scenario is not None else ""
        changed = replace_file(self.config_dir / "scenario.yaml", text)
        mesh_config = mesh_config_of(scenario)
        if not log_every_request:
            mesh_config = mesh_config.replace(LOG_EVERY_REQUEST, "") or "{}\n"
        return replace_file(self.mesh_config, mesh_config) | changed

    def apply(self, scenario: Path | None, *, log_every_request: bool = True) -> LoadedConfig:
        """:meth:`write`, wait until every proxy has it, and return the same configuration
        loaded for offline answers."""
        self.write(scenario, log_every_request=log_every_request)
        asyncio.run(self.running.wait_synced(timeout=30))  # the files as just written
        loaded = load_config([str(self.config_dir)], mesh_config=[str(self.mesh_config)])
        assert not loaded.errors, loaded.errors
        return loaded

    def run_cases(self, loaded: LoadedConfig, test_file: Path) -> list[LiveCaseResult]:
        tests = load_config(
            [str(self.config_dir)], mesh_config=[str(self.mesh_config)], test_paths=[str(test_file)]
        ).tests
        assert tests and loaded.mesh is not None
        running = self.running
        runner = LiveRunner(running.plan, running.layout)
        suites = [(s.name, s.located_cases()) for s in tests]
        return asyncio.run(runner.run(loaded.mesh, suites))


# Every request logged, so live tests also read the rule that ALLOWed a request and
# dry-run "allowed" results (by default sidecars log refused requests only).
LOG_EVERY_REQUEST = "accessLogFile: /dev/stdout\n"


def mesh_config_of(scenario: Path | None) -> str:
    """The scenario's mesh.yaml (none: an empty one) with every request logged."""
    text = ""
    if scenario is not None and (scenario / "mesh.yaml").exists():
        text = (scenario / "mesh.yaml").read_text()
    return text + ("\n" if text and not text.endswith("\n") else "") + LOG_EVERY_REQUEST


def replace_file(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` whole; whether that changed it."""
    if path.exists() and path.read_text() == text:
        return False
    partial = path.with_suffix(".partial")  # not .yaml: never read half written
    partial.write_text(text)
    os.replace(partial, path)
    return True


@contextmanager
def live_mesh(root: Path, *, base: str, scenario: Path | None = None) -> Iterator[LiveMesh]:
    """Start the example mesh (with ``scenario``'s config, whose workloads then run too)
    and stop it afterwards."""
    config_dir, state = root / "config", root / "state"
    config_dir.mkdir(parents=True)
    shutil.copy(EXAMPLES / "mesh" / "workloads.yaml", config_dir / "workloads.yaml")
    seed = (scenario / "config.yaml").read_text() if scenario is not None else ""
    (config_dir / "scenario.yaml").write_text(seed)
    mesh_file = root / "mesh.yaml"
    mesh_file.write_text(mesh_config_of(scenario))
    with mesh_started(config_dir, mesh_file, state=state, base=base):
        yield LiveMesh(root, state, config_dir, mesh_file)


@contextmanager
def mesh_started(
    config_dir: Path, mesh_file: Path, *, state: Path, base: str, sandboxed: bool = False
) -> Iterator[None]:
    """``up -d`` of ``config_dir`` with ``mesh_file`` (pods sandboxed in network
    namespaces, or processes in a free address block), and ``down`` afterwards — also
    when the test failed."""
    if sandboxed:
        started = trustmesh(
            *("up", "--isolation", "netns", str(config_dir), "--mesh-config", str(mesh_file)),
            *("--detach", "--base", base),
            state=state,
            timeout=START_TIMEOUT,
        )
    else:
        started = _up_in_a_free_block(config_dir, mesh_file, state, base)
    try:
        assert started.returncode == 0, f"trustmesh up failed:\n{started.stderr}\n{started.stdout}"
        yield
    finally:
        stopped = trustmesh("down", state=state)
        assert stopped.returncode == 0, stopped.stderr


BLOCK_TAKEN = ("are used by the mesh running from", "is already in use by")


def up_in_a_free_block(
    config_dir: Path, *extra: str, state: Path, base: str, timeout: float = START_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """``up --isolation process -d CONFIG_DIR EXTRA… --base`` at ``base``, or — while
    another mesh (another checkout's test session on this machine) holds that address
    block — at the next free one of the following ten. Any other failure is returned at
    once."""
    first = int(base.split(".")[1])
    started: subprocess.CompletedProcess[str] | None = None
    for block in range(first, first + 10):
        started = trustmesh(
            *("up", "--isolation", "process", str(config_dir), "--detach", *extra),
            *("--base", f"127.{block}.0.0"),
            state=state,
            timeout=timeout,
        )
        if started.returncode == 0 or not any(why in started.stderr for why in BLOCK_TAKEN):
            return started
    assert started is not None
    return started


def _up_in_a_free_block(
    config_dir: Path, mesh_file: Path, state: Path, base: str
) -> subprocess.CompletedProcess[str]:
    return up_in_a_free_block(config_dir, "--mesh-config", str(mesh_file), state=state, base=base)


def report(results: list[LiveCaseResult]) -> str:
    lines = []
    for r in results:
        if r.passed:
            continue
        lines.append(f"{r.suite} / {r.case}: {r.not_run or ''}")
        lines.append(f"    {r.detail}")
        lines += [f"    {f}" for f in r.failures]
        lines += [f"    offline differs: {m}" for m in r.mismatches]
    return "\n".join(lines)
