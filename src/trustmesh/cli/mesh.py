"""``trustmesh up / status / logs / down / proxy-config / request``: the local mesh.

Thin: parse arguments, call :mod:`trustmesh.runtime`, render. The mesh is found through
its state directory (``--state``, default ``./.trustmesh``; ``TRUSTMESH_STATE`` too).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from trustmesh.cli import render
from trustmesh.cli.options import StateOpt
from trustmesh.runtime.client import (
    HttpResult,
    RequestError,
    TcpResult,
    http_request,
    tcp_exchange,
)
from trustmesh.runtime.commands import parse_image_command
from trustmesh.runtime.layout import DEFAULT_STATE, Layout, cluster_file, read_json
from trustmesh.runtime.plan import DEFAULT_BASE, Isolation, PodPlan
from trustmesh.runtime.podclient import request_in_pod
from trustmesh.runtime.restarts import DEFAULT_BACKOFF, Backoff
from trustmesh.runtime.running import NotRunning, RunningMesh

# What starts a mesh (the supervisor, the multi-host cluster, the sandbox) is imported by
# the commands that start or stop one: `status`, `request`, `logs` only read its record,
# and a mesh's tests and users run those many times (each import costs CPU at start).
if TYPE_CHECKING:
    from trustmesh.runtime.supervisor import MeshRuntime

__all__ = ["down", "logs", "proxy_config", "request", "status", "up"]

State = StateOpt  # the name every mesh command's signature uses
_err = Console(stderr=True, highlight=False, soft_wrap=True)  # paths stay on one line
_out = Console(highlight=False, soft_wrap=True)
DETACH_TIMEOUT = 180.0
RESET_EXIT = 56  # curl's "failure receiving network data"


def _open(state: Path) -> RunningMesh:
    try:
        return RunningMesh.open(state)
    except NotRunning as exc:
        render.usage_error(str(exc))
        raise typer.Exit(1) from None


def _host_state(state: Path, ref: str) -> Path:
    """A pod's host's state directory in a multi-host mesh (``up --hosts``), else ``state``."""
    if not cluster_file(state).exists():
        return state
    for host in read_json(cluster_file(state)).get("hosts", []):
        if ref in host.get("pods", []):
            return Path(host["state"])
    render.usage_error(f"no pod {ref!r} runs on a host of the mesh in {state}")
    raise typer.Exit(1)


def _pod(running: RunningMesh, ref: str) -> PodPlan:
    try:
        return running.pod(ref)
    except LookupError as exc:
        render.usage_error(str(exc))
        raise typer.Exit(1) from None


def up(
    config: Annotated[list[Path], typer.Argument(help="Manifests: files or directories.")],
    mesh_config: Annotated[
        list[Path] | None, typer.Option("--mesh-config", help="MeshConfig / IstioOperator.")
    ] = None,
    state: State = Path(DEFAULT_STATE),
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Run in the background.")] = False,
    base: Annotated[str, typer.Option("--base", help="First pod address block.")] = DEFAULT_BASE,
    image: Annotated[
        list[str] | None,
        typer.Option(
            "--image",
            help="IMAGE=COMMAND: containers of IMAGE without a command run COMMAND (their "
            "args appended). Repeatable; tried in order, before the built-in stand-ins.",
        ),
    ] = None,
    restart_backoff: Annotated[
        float,
        typer.Option(
            "--restart-backoff",
            help="Seconds before restarting an app that exited; doubles per crash up to 30x,"
            " as the kubelet's 10 s / 5 min.",
        ),
    ] = DEFAULT_BACKOFF.initial,
    isolation: Annotated[
        str | None,
        typer.Option(
            "--isolation",
            help="netns: every pod in its own network namespace with transparent capture "
            "and its own users (needs root and nft); process: pods as processes of this "
            "user on loopback addresses. Default: netns when this host allows it.",
        ),
    ] = None,
    hosts: Annotated[
        int,
        typer.Option(
            "--hosts",
            help="Run the pods on N hosts (each `trustmesh node join`) over a 3-member etcd "
            "and --replicas control-plane replicas. With netns isolation each host is its "
            "own network namespace on a LAN namespace; in process mode its pods are processes.",
        ),
    ] = 0,
    replicas: Annotated[
        int, typer.Option("--replicas", help="Control-plane replicas (with --hosts).")
    ] = 0,
    lease_ttl: Annotated[
        int,
        typer.Option(
            "--lease-ttl",
            help="With --hosts: seconds a host's registrations outlive its last keep-alive.",
        ),
    ] = 30,
) -> None:
    """Start the control plane, the CA and every workload of the manifests, with sidecars."""
    if hosts or replicas:
        _up_cluster(config, state, detach, base, hosts, replicas, isolation, lease_ttl)
        return
    try:
        images = [parse_image_command(text) for text in image or []]
        backoff = Backoff.scaled(restart_backoff)
        mode = _isolation(isolation)
    except ValueError as exc:
        render.usage_error(str(exc))
        raise typer.Exit(2) from None
    state = state.resolve()
    try:
        running = RunningMesh.open(state)
        if running.supervisor_alive:
            pid = running.record.get("supervisor_pid")
            render.usage_error(f"a mesh already runs from {state} (pid {pid}): trustmesh down")
            raise typer.Exit(1)
    except NotRunning:
        pass
    from trustmesh.runtime.sandboxed import choose_isolation
    from trustmesh.runtime.supervisor import MeshRuntime

    try:
        mode, note = choose_isolation(mode)
    except ValueError as exc:
        render.usage_error(str(exc))
        raise typer.Exit(1) from None
    if note is not None:  # once, here: the runtime (or background start) gets the mode
        _err.print(note, markup=False)
    if detach:
        extra = [x for text in image or [] for x in ("--image", text)]
        extra += ["--restart-backoff", repr(restart_backoff)]
        extra += ["--isolation", mode.value]
        _up_detached(config, mesh_config or [], state, base, extra)
        return
    runtime = MeshRuntime(
        [str(p) for p in config],
        Layout(state),
        mesh_config=[str(p) for p in mesh_config or []],
        base=base,
        progress=lambda message: _err.print(message, markup=False),
        images=images,
        backoff=backoff,
        isolation=mode,
    )
    raise typer.Exit(asyncio.run(_run_foreground(runtime)))


def _up_cluster(
    config: list[Path],
    state: Path,
    detach: bool,
    base: str,
    hosts: int,
    replicas: int,
    isolation: str | None,
    lease_ttl: int,
) -> None:
    from trustmesh.runtime.cluster import Cluster, cluster_status, stop_cluster
    from trustmesh.runtime.registration import MAX_TTL, MIN_TTL
    from trustmesh.runtime.sandboxed import choose_isolation
    from trustmesh.runtime.supervisor import StartError

    if hosts < 1 or replicas < 1:
        render.usage_error("--hosts and --replicas go together, each at least 1")
        raise typer.Exit(2)
    if not MIN_TTL <= lease_ttl <= MAX_TTL:
        render.usage_error(f"--lease-ttl must be {MIN_TTL}..{MAX_TTL} seconds, not {lease_ttl}")
        raise typer.Exit(2)
    try:
        mode, note = choose_isolation(_isolation(isolation))
    except ValueError as exc:
        render.usage_error(str(exc))
        raise typer.Exit(2) from None
    if note is not None:
        _err.print(note, markup=False)
    state = state.resolve()
    if cluster_file(state).exists():
        previous = read_json(cluster_file(state))
        if previous.get("state") != "stopped":
            render.usage_error(f"a mesh already runs from {state}: trustmesh down --state {state}")
            raise typer.Exit(1)
    cluster = Cluster(state, lambda message: _err.print(message, markup=False))
    try:
        cluster.start([str(p) for p in config], hosts, replicas, base, mode, lease_ttl)
    except StartError as exc:
        render.usage_error(str(exc))
        for problem in exc.diagnostics:
            _err.print(f"  {problem}", markup=False)
        raise typer.Exit(1) from None
    _cluster_table(cluster_status(state))
    if detach:
        _err.print(f"mesh running in the background; trustmesh down --state {state}", markup=False)
        return
    _err.print("serving; Ctrl-C or `trustmesh down` stops the mesh", markup=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    # Stopped by a signal, or by `trustmesh down` from another shell (it marks the record).
    while not stop.wait(1.0):
        with contextlib.suppress(OSError, ValueError):
            if read_json(cluster_file(state)).get("state") == "stopped":
                return
    stop_cluster(state, lambda message: _err.print(message, markup=False))


def _cluster_table(status: dict[str, Any]) -> None:
    _out.print(
        f"mesh {status['state']} ({status['isolation']}); store {status['store']}", markup=False
    )
    for replica in status["replicas"]:
        leader = " (leader)" if replica["leader"] else ""
        _out.print(
            f"replica {replica['name']}{leader} pid {replica['pid']} xds {replica.get('address')}"
            f" serves {len(replica['proxies'])} proxies",
            markup=False,
        )
    for host in status["hosts"]:
        where = f" netns {host['netns']} {host['address']}" if host.get("netns") else ""
        _out.print(
            f"{host['name']} pid {host['pid']}{where} ({host['state']}): {', '.join(host['pods'])}",
            markup=False,
        )


def _isolation(text: str | None) -> Isolation | None:
    if text is None:
        return None
    try:
        return Isolation(text)
    except ValueError:
        raise ValueError(f"--isolation must be netns or process, not {text!r}") from None


async def _run_foreground(runtime: MeshRuntime) -> int:
    return await run_in_foreground(runtime, "serving; Ctrl-C or `trustmesh down` stops the mesh")


async def run_in_foreground(runtime: MeshRuntime, serving: str) -> int:
    """Start ``runtime``, print its pods and ``serving``, supervise until SIGINT / SIGTERM,
    then stop it. 1 when it could not start (the reasons are printed), else 0."""
    from trustmesh.runtime.supervisor import StartError

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await runtime.up()
    except StartError as exc:
        render.usage_error(str(exc))
        for problem in exc.diagnostics:
            _err.print(f"  {problem}", markup=False)
        return 1
    _pods_table(RunningMesh.open(runtime.layout.root), None)
    _err.print(serving, markup=False)
    try:
        await runtime.supervise(stop)
    finally:
        stop.set()
        await runtime.down()
    return 0


def _up_detached(
    config: list[Path], mesh_config: list[Path], state: Path, base: str, extra: list[str]
) -> None:
    """Run ``trustmesh up`` as a background process; return once the mesh is ready."""
    Layout(state).create()
    argv = [sys.executable, "-m", "trustmesh", "up", *map(str, config), "--state", str(state)]
    argv += [x for m in mesh_config for x in ("--mesh-config", str(m))] + ["--base", base]
    argv += extra
    log_path = Layout(state).logs / "supervisor.log"
    with log_path.open("wb") as log:  # this start's output only: it is shown on failure
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    deadline = time.monotonic() + DETACH_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = log_path.read_text(errors="replace")
            _err.print(_start_failure(output, process.returncode), markup=False)
            _err.print(f"(the whole output of this start is in {log_path})", markup=False)
            raise typer.Exit(1)
        try:
            running = RunningMesh.open(state)
        except NotRunning:
            running = None
        ours = running is not None and running.record.get("supervisor_pid") == process.pid
        if running is not None and ours and running.state == "ready":
            _pods_table(running, None)
            _not_honoured(running.syncz())
            _err.print(f"mesh running in the background (pid {process.pid})", markup=False)
            return
        time.sleep(0.1)  # waiting on another process's progress: no event crosses over
    process.terminate()
    render.usage_error(f"the mesh was not ready after {DETACH_TIMEOUT:.0f}s (see {log_path})")
    raise typer.Exit(1)


def _start_failure(output: str, status: int) -> str:
    """Why a background start failed, reason first: the ``error:`` block the foreground
    ``up`` printed (with its diagnostics and log tails), else the end of its output."""
    lines = output.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    if starts:
        return "\n".join(lines[starts[-1] :])[-6000:]
    tail = "\n".join(lines[-40:])
    return f"error: the mesh did not start (exit status {status})" + (
        f"; its last output:\n{tail}" if tail else ""
    )


def status(
    state: State = Path(DEFAULT_STATE),
    output: Annotated[str, typer.Option("-o", "--output", help="table or json")] = "table",
) -> None:
    """Pods, their addresses and processes, and whether each proxy has its config."""
    if cluster_file(state.resolve()).exists():
        from trustmesh.runtime.cluster import cluster_status

        cluster = cluster_status(state.resolve())
        if output == "json":
            sys.stdout.write(json.dumps(cluster, indent=2) + "\n")
        else:
            _cluster_table(cluster)
        return
    running = _open(state.resolve())
    sync = running.syncz()
    if output == "json":
        record = dict(running.record)
        record["supervisor_alive"] = running.supervisor_alive
        record["running"] = {pod.ref: running.pod_processes(pod.ref) for pod in running.plan.pods}
        record["sync"] = sync
        record["gateways"] = gateway_addresses(running)
        sys.stdout.write(json.dumps(record, indent=2) + "\n")
        return
    isolation = "pods sandboxed (netns)" if running.plan.sandboxed else "process isolation"
    _out.print(
        f"mesh {running.state}"
        + ("" if running.supervisor_alive else " (its supervisor is not running)")
        + f"; {isolation}",
        markup=False,
    )
    _pods_table(running, sync)
    if sync is not None and sync.get("errors"):
        _out.print("configuration errors (proxies keep their last good config):", markup=False)
        for problem in sync["errors"]:
            _out.print(f"  {problem}", markup=False)
    _not_honoured(sync)


def _not_honoured(sync: dict[str, Any] | None) -> None:
    if sync is not None and sync.get("warnings"):
        _out.print("not honoured by the proxies (see trustmesh validate):", markup=False)
        for problem in sync["warnings"]:
            _out.print(f"  {problem}", markup=False)


def gateway_addresses(running: RunningMesh) -> dict[str, list[str]]:
    """Each running gateway pod's listener addresses, as its Envoy reports them now (the
    Gateways' server ports, mapped to the gateway Service's target ports)."""
    from trustmesh.runtime.gateway import envoy_listener_addresses

    found: dict[str, list[str]] = {}
    for pod in running.plan.pods:
        if pod.gateway and running.plan.sandboxed:  # published on this host by the runtime
            found[pod.ref] = list(running.pod_record(pod.ref).get("published", []))
            continue
        admin = running.pod_record(pod.ref).get("admin")
        if not pod.gateway or running.pod_processes(pod.ref)["envoy"] is None or not admin:
            continue
        found[pod.ref] = envoy_listener_addresses(str(admin))
    return found


def _pods_table(running: RunningMesh, sync: dict[str, Any] | None) -> None:
    proxies = {p["workload"]: p for p in (sync or {}).get("proxies", {}).values()}
    table = Table(box=None, pad_edge=False, collapse_padding=True)
    notes: list[str] = []
    for column in ("POD", "POD IP", "SIDECAR", "PROXY", "APP PID", "RESTARTS", "STATUS"):
        table.add_column(column)
    for pod in running.plan.pods:
        record = running.pod_record(pod.ref)
        # Only processes that run now are shown with a PID: the record keeps the PIDs of
        # a stopped or crashed mesh, which may belong to other programs by now.
        processes = running.pod_processes(pod.ref)
        proxy = "-"
        if pod.sidecar:
            seen = proxies.get(pod.ref)
            if seen is None:
                proxy = "?" if sync is None else "NOT CONNECTED"
            else:
                proxy = "NACK" if seen.get("nack") else "SYNCED" if seen["synced"] else "STALE"
        envoy, app = processes["envoy"], processes["app"]
        status = str(record.get("status", "?"))
        kinds = ("envoy",) if pod.gateway else ("app", "envoy")[: 1 + pod.sidecar]
        gone = [kind for kind in kinds if processes[kind] is None]
        if not any(processes.values()):
            status = "stopped" if running.state in ("stopped", "stopping") else "not running"
        elif status == "running" and gone:
            status = f"not running: {', '.join(gone)}"
        table.add_row(
            pod.ref,
            pod.pod_ip,
            (("gateway " if pod.gateway else "envoy ") + (str(envoy) if envoy else "-"))
            if pod.sidecar
            else "none",
            proxy,
            str(app) if app else "-",
            str(int(record.get("restarts", 0) or 0)),
            status,
        )
        if running.supervisor_alive and (note := _restart_note(record)):
            notes.append(f"{pod.ref}: {note}")
    _out.print(table)
    for note in notes:
        _out.print(note, markup=False)
    for ref, addresses in gateway_addresses(running).items():
        where = ", ".join(addresses) if addresses else "no listener yet"
        _out.print(f"gateway {ref} (clients outside the mesh connect here): {where}", markup=False)


def _restart_note(record: dict[str, Any]) -> str:
    """The last exit, the last and next restart (UTC) and readiness, when the app exited."""
    ended = record.get("last_exit")
    if not isinstance(ended, dict):
        return ""
    how = f"code {ended.get('exit_code')}"
    if ended.get("signal"):
        how = f"{ended['signal']}, {how}"
    parts = [f"exited ({how}) at {ended.get('finished_at')}"]
    if record.get("last_restart"):
        parts.append(f"restarted at {record['last_restart']}")
    if record.get("next_restart"):
        parts.append(f"next restart at {record['next_restart']}")
    if not record.get("ready", True):
        parts.append("not ready: its endpoints get no traffic")
    return "; ".join(parts)


def logs(
    pod: Annotated[str, typer.Argument(help="NAMESPACE/POD")],
    proxy: Annotated[bool, typer.Option("--proxy", help="The sidecar's Envoy log.")] = False,
    agent: Annotated[bool, typer.Option("--agent", help="The sidecar's agent log.")] = False,
    tail: Annotated[int, typer.Option("--tail", help="Last N lines (0: all).")] = 0,
    state: State = Path(DEFAULT_STATE),
) -> None:
    """A pod's app output (or its sidecar's Envoy / agent log)."""
    running = _open(state.resolve())
    plan = _pod(running, pod)
    layout = running.layout
    path = layout.app_log(plan.key)
    if proxy or agent:
        if not plan.sidecar:
            render.usage_error(f"{pod} has no sidecar")
            raise typer.Exit(1)
        envoy_log = layout.envoy_log_of(plan.key, running.plan.paths(plan))  # in its pod
        path = envoy_log if proxy else layout.agent_log(plan.key)
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        text = ""
    lines = text.splitlines()
    sys.stdout.write("\n".join(lines[-tail:] if tail else lines) + ("\n" if lines else ""))


def down(state: State = Path(DEFAULT_STATE)) -> None:
    """Stop everything the mesh started (by PID), and nothing else."""
    if cluster_file(state.resolve()).exists():
        from trustmesh.runtime.cluster import stop_cluster

        stopped = stop_cluster(state.resolve(), lambda message: _err.print(message, markup=False))
        _err.print(f"mesh stopped ({stopped} process(es) signalled)", markup=False)
        return
    running = _open(state.resolve())
    if running.state == "stopped" and not running.supervisor_alive:
        try:  # a sandbox whose teardown failed before: the ledger says what is left
            running.remove_sandbox()
        except OSError as exc:
            render.usage_error(f"the mesh is stopped, but {exc}")
            raise typer.Exit(1) from None
        _err.print("the mesh is already stopped", markup=False)
        return
    try:
        stopped = running.stop()
    except OSError as exc:  # the sandbox's namespaces or rules could not all be removed
        render.usage_error(f"the mesh's processes are stopped, but {exc}")
        raise typer.Exit(1) from None
    _err.print(f"mesh stopped ({stopped} process(es) signalled)", markup=False)


_SECTIONS = {
    "listeners": "ListenersConfigDump",
    "clusters": "ClustersConfigDump",
    "routes": "RoutesConfigDump",
    "secrets": "SecretsConfigDump",
    "rbac": "EcdsConfigDump",
}


def proxy_config(
    pod: Annotated[str, typer.Argument(help="NAMESPACE/POD")],
    kind: Annotated[
        str, typer.Argument(help="listeners, clusters, routes, secrets, rbac or all")
    ] = "all",
    state: State = Path(DEFAULT_STATE),
) -> None:
    """The sidecar's Envoy configuration, from its admin /config_dump."""
    if kind != "all" and kind not in _SECTIONS:
        render.usage_error(f"kind must be one of {', '.join(_SECTIONS)} or all, not {kind!r}")
        raise typer.Exit(2)
    running = _open(state.resolve())
    try:
        dump = json.loads(running.envoy_get(pod, "/config_dump"))
    except LookupError as exc:
        render.usage_error(str(exc))
        raise typer.Exit(1) from None
    except OSError as exc:
        render.usage_error(f"{pod}: its Envoy admin does not answer: {exc}")
        raise typer.Exit(1) from None
    if kind != "all":
        dump = _section(dump, kind)
    sys.stdout.write(json.dumps(dump, indent=2) + "\n")


def _section(dump: dict[str, Any], kind: str) -> Any:
    wanted = _SECTIONS[kind]
    for config in dump.get("configs", []):
        if str(config.get("@type", "")).endswith("." + wanted):  # not ScopedRoutes…
            if kind != "rbac":
                return config
            # The authorization filters are delivered over ECDS; keep the RBAC ones.
            filters = config.get("ecds_filters", [])
            rbac_type = "envoy.extensions.filters.http.rbac.v3.RBAC"
            return [
                f
                for f in filters
                if str(f.get("ecds_filter", {}).get("typed_config", {}).get("@type", "")).endswith(
                    rbac_type
                )
            ]
    return {}


def request(
    source: Annotated[str, typer.Option("--from", help="Send as this pod: NAMESPACE/POD.")],
    url: Annotated[str | None, typer.Argument(help="http://HOST[:PORT]/PATH")] = None,
    method: Annotated[str, typer.Option("-X", "--request", help="HTTP method.")] = "GET",
    header: Annotated[list[str] | None, typer.Option("-H", "--header", help="K: V")] = None,
    jwt: Annotated[str, typer.Option("--jwt", help="Sent as Authorization: Bearer.")] = "",
    data: Annotated[str | None, typer.Option("-d", "--data", help="Body / TCP payload.")] = None,
    tcp: Annotated[str, typer.Option("--tcp", help="HOST:PORT: a TCP exchange instead.")] = "",
    timeout: Annotated[float, typer.Option("--timeout")] = 10.0,
    state: State = Path(DEFAULT_STATE),
) -> None:
    """Send a request as a workload (through its sidecar; directly without one).

    Prints status, headers and body. Exit 0 when an answer came (any status), 56 when
    the connection was reset or closed first (as curl), 1/2 for errors.
    """
    running = _open(_host_state(state.resolve(), source))
    pod = _pod(running, source)
    if bool(tcp) == bool(url):
        render.usage_error("give either a URL or --tcp HOST:PORT")
        raise typer.Exit(2)
    try:
        if tcp:
            host, _, port = tcp.rpartition(":")
            if not host or not port.isdigit():
                raise RequestError(f"--tcp must be HOST:PORT, got {tcp!r}")
            payload = (data if data is not None else "hello") + "\n"
            if running.plan.sandboxed:  # from inside the pod, as its app
                wanted = {"kind": "tcp", "host": host, "port": int(port), "timeout": timeout}
                wanted["data"] = base64.b64encode(payload.encode()).decode()
                result = request_in_pod(running.plan, pod, wanted)
                assert isinstance(result, TcpResult)
            else:
                result = asyncio.run(
                    tcp_exchange(
                        running.plan, pod, host, int(port), payload.encode(), timeout=timeout
                    )
                )
            if result.tls_peer:
                _out.print(f"TLS handshake with {result.tls_peer} completed", markup=False)
                return
            if result.reset or not result.received:
                _err.print(f"reset: {result.why}", markup=False)
                raise typer.Exit(RESET_EXIT)
            sys.stdout.write(result.received.decode(errors="replace"))
            return
        assert url is not None
        headers = [_header(h) for h in header or []]
        if jwt:
            headers.append(("Authorization", f"Bearer {jwt}"))
        body = (data or "").encode()
        if running.plan.sandboxed:  # from inside the pod, as its app: through capture
            sent = request_in_pod(
                running.plan,
                pod,
                {
                    "kind": "http",
                    "url": url,
                    "method": method,
                    "headers": headers,
                    "body": base64.b64encode(body).decode(),
                    "timeout": timeout,
                },
            )
            assert isinstance(sent, HttpResult)
            answer = sent
        else:
            answer = asyncio.run(
                http_request(
                    running.plan,
                    pod,
                    url,
                    method=method,
                    headers=headers,
                    body=body,
                    timeout=timeout,
                )
            )
    except RequestError as exc:
        render.usage_error(str(exc))
        raise typer.Exit(2) from None
    _print_http(answer)
    if answer.reset:
        raise typer.Exit(RESET_EXIT)


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise RequestError(f"-H must look like 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def _print_http(answer: HttpResult) -> None:
    if answer.reset:
        _err.print(f"reset: {answer.why}", markup=False)
        return
    _out.print(f"HTTP {answer.status} {answer.reason}", markup=False)
    for name, value in answer.headers:
        _out.print(f"{name}: {value}", markup=False)
    _out.print("", markup=False)
    sys.stdout.flush()
    sys.stdout.write(answer.body.decode(errors="replace"))
    if answer.body and not answer.body.endswith(b"\n"):
        sys.stdout.write("\n")
