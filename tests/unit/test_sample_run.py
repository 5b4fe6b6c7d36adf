"""``python -m trustmesh sample …`` — the command every stand-in runs — starts without the
command line (typer, rich, pydantic, the policy engine: ~0.7 s of CPU per process, and a
mesh starts one per pod), and answers like ``trustmesh sample`` for anything else."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from trustmesh.samples.run import Invocation, fast_invocation


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["helloworld"], {}, Invocation("helloworld", "127.0.0.1")),
        (["helloworld"], {"HOST": "0.0.0.0", "PORT": "5000"}, Invocation("helloworld", "0.0.0.0", (5000,))),  # noqa: E501
        (["reviews", "--port=9080"], {"HOST": "10.88.1.10"}, Invocation("reviews", "10.88.1.10", (9080,))),  # noqa: E501
        (["httpbin", "--host", "127.0.0.9", "--port", "0"], {}, Invocation("httpbin", "127.0.0.9", (0,))),  # noqa: E501
        (
            ["tcp-echo", "--port=9000", "--port=9001", "--prefix=hello"],
            {"PORT": "1"},
            Invocation("tcp-echo", "127.0.0.1", (9000, 9001), "hello"),
        ),
        (["sleep"], {"PORT": "80"}, Invocation("sleep", "127.0.0.1")),  # sleep listens nowhere
    ],
)  # fmt: skip
def test_plain_runs_are_served_without_the_command_line(
    args: list[str], env: dict[str, str], expected: Invocation
) -> None:
    assert fast_invocation(args, env) == expected


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--help"],
        ["helloworld", "--help"],
        ["nosuch"],
        ["helloworld", "--port", "65536"],
        ["helloworld", "--port", "-1"],
        ["helloworld", "--port"],
        ["helloworld", "--port", "1", "--port", "2"],  # one port: the CLI says so
        ["helloworld", "--prefix", "x"],  # tcp-echo's option only
        ["helloworld", "--host", ""],
        ["helloworld", "--verbose"],
    ],
)
def test_anything_else_goes_to_the_command_line(args: list[str]) -> None:
    assert fast_invocation(args, {}) is None


def test_a_bad_port_in_the_environment_goes_to_the_command_line() -> None:
    assert fast_invocation(["helloworld"], {"PORT": "http"}) is None


def _module_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("HOST", "PORT")}


def test_a_stand_in_starts_without_importing_the_command_line(tmp_path: Path) -> None:
    argv = [sys.executable, "-X", "importtime", "-m", "trustmesh", "sample", "helloworld"]
    report = tmp_path / "imports.txt"  # a file: a full pipe would block the child
    with report.open("w") as stderr:
        process = subprocess.Popen(
            [*argv, "--host", "127.0.0.1", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**_module_env(), "SERVICE_VERSION": "v7", "HOSTNAME": "hello-pod"},
        )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("listening on 127.0.0.1:"), line
        url = f"http://{line.removeprefix('listening on ')}/hello"
        with urllib.request.urlopen(url, timeout=10) as answer:
            assert answer.read().decode().strip() == "Hello version: v7, instance: hello-pod"
    finally:
        process.terminate()
        process.communicate(timeout=10)
    assert process.returncode == 0  # SIGTERM: a clean stop
    imports = report.read_text()
    loaded = {line.rsplit("|", 1)[-1].strip() for line in imports.splitlines() if "|" in line}
    assert "trustmesh.samples.helloworld" in loaded  # -X importtime did report
    assert not {"typer", "rich", "pydantic", "trustmesh.cli", "trustmesh.policy"} & loaded


def test_other_arguments_get_the_command_lines_answer() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "trustmesh", "sample", "helloworld", "--port", "65536"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_module_env(),
        check=False,
    )
    assert done.returncode == 2
    assert "--port" in done.stderr and "65535" in done.stderr
