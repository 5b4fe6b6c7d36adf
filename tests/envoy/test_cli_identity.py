"""The identity plane from the command line, as an operator runs it: separate processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import Loopback

pytestmark = pytest.mark.envoy
CLI = [sys.executable, "-m", "trustmesh"]


def _wait_for_line(process: subprocess.Popen[str], needle: str, timeout: float) -> str:
    """Read the process's output until ``needle`` shows up (bounded)."""
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    seen = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            if process.poll() is not None:
                break
            continue
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"{needle!r} not printed; output:\n{''.join(seen)}")


def test_ca_and_two_agents_with_envoy_from_the_cli(tmp_path: Path, loopback: Loopback) -> None:
    ca_dir = tmp_path / "ca"
    subprocess.run([*CLI, "ca", "init", "--dir", str(ca_dir)], check=True, capture_output=True)
    root = next(ca_dir.glob("slots/*/root-cert.pem"))
    enroll, renew = loopback.endpoint(), loopback.endpoint()
    server_at, client_at = loopback.endpoint(), loopback.endpoint()
    processes: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [*CLI, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        processes.append(process)
        return process

    try:
        ca = start(
            "ca",
            "serve",
            "--dir",
            str(ca_dir),
            "--listen",
            f"{enroll[0]}:{enroll[1]}",
            "--renewal-listen",
            f"{renew[0]}:{renew[1]}",
            "--workers",
            "2",  # two processes share both ports: the agents may reach either
        )
        _wait_for_line(ca, "serving:", 30)
        for name in ("server", "client"):
            token = subprocess.run(
                [*CLI, "ca", "token", "--dir", str(ca_dir), "-n", "shop", "-s", name],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
            (tmp_path / f"{name}.token").write_text(token)
        common = [
            "--ca",
            f"{enroll[0]}:{enroll[1]}",
            "--ca-renewal",
            f"{renew[0]}:{renew[1]}",
            "--ca-root",
            str(root),
            "--envoy",
        ]
        server = start(
            "agent",
            "-n",
            "shop",
            "-s",
            "server",
            *common,
            "--token-file",
            str(tmp_path / "server.token"),
            "--sds-socket",
            str(tmp_path / "server.sock"),
            "--inbound",
            f"{server_at[0]}:{server_at[1]}=direct:hello\n",
            "--workdir",
            str(tmp_path / "server-envoy"),
        )
        client = start(
            "agent",
            "-n",
            "shop",
            "-s",
            "client",
            *common,
            "--token-file",
            str(tmp_path / "client.token"),
            "--sds-socket",
            str(tmp_path / "client.sock"),
            "--outbound",
            f"{client_at[0]}:{client_at[1]}={server_at[0]}:{server_at[1]}"
            "@spiffe://cluster.local/ns/shop/sa/server",
            "--workdir",
            str(tmp_path / "client-envoy"),
        )
        _wait_for_line(server, "envoy running", 60)
        _wait_for_line(client, "envoy running", 60)
        url = f"http://{client_at[0]}:{client_at[1]}/"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
            assert response.read() == b"hello\n"
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
