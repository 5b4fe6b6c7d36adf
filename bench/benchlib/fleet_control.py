"""The fleet benchmark's handle on its control-plane child process: started as
``<script> --serve-control-plane``, driven by one JSON command per line on its stdin (one
JSON answer per line on its stdout, in order), stopped by its PID."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from benchlib.fleet_config import FleetConfig, Json
from benchlib.procstat import memory_mib


class ControlPlaneProcess:
    """The child running the control plane: commands over its stdin/stdout, stopped by PID."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.info: Json = {}
        self._lock = asyncio.Lock()  # one command at a time: answers come back in order

    @classmethod
    @contextlib.asynccontextmanager
    async def running(
        cls, script: Path, config: FleetConfig, ca_dir: Path, interval: float, debounce: float
    ) -> AsyncIterator[ControlPlaneProcess]:
        """``script`` (the benchmark's entry point) run with ``--serve-control-plane``."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            "--serve-control-plane",
            f"--config-dir={config.path}",
            f"--ca-dir={ca_dir}",
            f"--interval={interval}",
            f"--debounce={debounce}",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 22,  # an events answer for a few hundred proxies is one long line
        )
        child = cls(process)
        try:
            child.info = await child._read(timeout=60)
            yield child
        finally:
            await child.stop()

    @property
    def pid(self) -> int:
        return self.process.pid

    def memory(self) -> dict[str, float]:
        return memory_mib(self.pid)

    async def call(self, command: str, timeout: float = 120, **args: Any) -> Json:
        assert self.process.stdin is not None
        async with self._lock:
            self.process.stdin.write(json.dumps({"cmd": command, **args}).encode() + b"\n")
            await self.process.stdin.drain()
            answer = await self._read(timeout)
        if "error" in answer:
            raise RuntimeError(f"control plane: {command}: {answer['error']}")
        return answer

    async def reload(self) -> None:
        """ControlPlane.reload(), called at once; raises if any proxy was left behind."""
        problems = (await self.call("reload"))["problems"]
        if problems:
            raise RuntimeError(f"control plane: reload: {problems}")

    async def _read(self, timeout: float) -> Json:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"control plane exited (status {await self.process.wait()})")
        answer: Json = json.loads(line)
        return answer

    async def wait_synced(self, count: int, reloads: int = 0, timeout: float = 90) -> Json:
        """Until ``count`` proxies are registered and have ACKed their current config, after
        at least ``reloads`` applied reloads."""
        deadline = time.monotonic() + timeout
        while True:
            state = await self.call("status")
            if state["rejected_reloads"] or state["nacks"]:
                raise RuntimeError(f"control plane refused or was refused: {state}")
            done = state["registered"] == state["synced"] == count
            if done and state["reloads"] >= reloads:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"not synced within {timeout}s: {state}")
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; by PID, this process's own child only."""
        if self.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.terminate()
        try:
            await asyncio.wait_for(self.process.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()
