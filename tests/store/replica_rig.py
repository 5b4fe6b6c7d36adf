"""Replicas as real processes (``python -m trustmesh control-plane``) over a real etcd,
and small helpers to fill the store. Every process is stopped by PID, also on failure."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trustmesh.cli.store import apply_resources
from trustmesh.config import load_config
from trustmesh.store.base import ResourceStore
from trustmesh.store.etcd_server import EtcdCluster

START_TIMEOUT = 60.0  # a replica's start under a loaded 2-core machine


@dataclass
class ReplicaProcess:
    name: str
    process: subprocess.Popen[str]
    info: dict[str, Any]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def xds_port(self) -> int:
        return int(self.info["address"].rpartition(":")[2])

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def terminate(self, timeout: float = 15) -> int:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"replica {self.name} did not stop on SIGTERM") from None


def start_replica(
    etcd: EtcdCluster, workdir: Path, name: str, ca_dir: Path, *extra: str
) -> ReplicaProcess:
    """One replica; returns once it printed its ready line (AssertionError otherwise)."""
    state = workdir / f"replica-{name}"
    state.mkdir(parents=True, exist_ok=True)
    log = state / "stderr.log"
    command = [
        sys.executable, "-m", "trustmesh", "control-plane",
        "--store", etcd.url, "--listen", "127.0.0.1:0", "--name", name,
        "--ca", str(ca_dir), "--state", str(state), *extra,
    ]  # fmt: skip
    with open(log, "wb") as err:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True
        )
    assert process.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT
    line = ""
    try:
        while time.monotonic() < deadline:
            line = process.stdout.readline()  # blocks until the ready line or exit
            if line.strip().startswith("{") or process.poll() is not None:
                break
        info = json.loads(line) if line.strip() else {}
        if not info.get("ready"):
            raise AssertionError(
                f"replica {name} did not start: {line!r}\n{log.read_text()[-3000:]}"
            )
    except BaseException:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        raise
    return ReplicaProcess(name, process, info, log)


@contextlib.contextmanager
def replicas(
    etcd: EtcdCluster, workdir: Path, names: list[str], ca_dir: Path, *extra: str
) -> Iterator[list[ReplicaProcess]]:
    started: list[ReplicaProcess] = []
    try:
        for name in names:
            started.append(start_replica(etcd, workdir, name, ca_dir, *extra))
        yield started
    finally:
        for replica in started:
            replica.kill()


_applies = 0


async def apply_text(store: ResourceStore, text: str, workdir: Path) -> int:
    """``trustmesh apply -f`` of ``text`` (validated as the CLI does); the revision of the
    newest object stored."""
    global _applies
    _applies += 1
    path = workdir / f"apply-{_applies}.yaml"
    await asyncio.to_thread(path.write_text, text)
    loaded = load_config([str(path)], compile_policy=False)
    assert not loaded.errors, loaded.errors
    await apply_resources(store, loaded.snapshot.resources)
    stored, _ = await store.list()
    return max(r.resource_version for r in stored)  # the commit's (the store's may be later)
