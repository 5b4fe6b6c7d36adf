"""How the supervisor runs a mesh's processes in the pod sandbox (netns isolation).

What the kubelet and the container runtime do for a pod, given the namespaces and files
:class:`~trustmesh.runtime.sandbox.Sandbox` made:

* the control plane (CA + xDS) runs as root in the node namespace, listening on the
  bridge address; its state (the CA's keys) stays in the state directory, root only;
* a sidecar (agent + Envoy) runs in its pod's namespace as uid 1337 with the pod's own
  group (which alone opens the pod's ``proxy/`` directory): its spec, bootstrap token and
  the trust bundle are copied there, readable by that group only;
* the app runs in its pod's namespace as its uid, without capabilities, with
  ``no_new_privs``, with the pod's /etc/hosts and /etc/resolv.conf, in its own working
  directory and with only its pod's environment (not the supervisor's).

Every process is started by :mod:`trustmesh.runtime.podexec` and ``exec``'d, so the PID
the supervisor records is the process itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import sys
from pathlib import Path

from trustmesh.runtime import netns
from trustmesh.runtime.capture import PROXY_UID
from trustmesh.runtime.interpreter import SandboxPython, sandbox_python
from trustmesh.runtime.layout import PodPaths
from trustmesh.runtime.netns import sandbox_support
from trustmesh.runtime.plan import Isolation, MeshPlan, PodPlan
from trustmesh.runtime.podexec import podexec_argv

__all__ = [
    "PROCESS_MODE_NOTE",
    "accepts_in",
    "app_argv",
    "choose_isolation",
    "control_plane_argv",
    "install_proxy_file",
    "pod_python",
    "sidecar_argv",
]

PROCESS_MODE_NOTE = (
    "process isolation: pods are processes of one user on shared loopback addresses — "
    "not isolated: any local process can connect to an app's own port behind its sidecar, "
    "read any pod's SDS socket (its private key), use every Envoy's admin port, and "
    "reach any address without its sidecar; apps reach the mesh through HTTP_PROXY"
)
_BASE_ENV = ("PATH", "LANG", "LC_ALL", "TZ")


def choose_isolation(requested: Isolation | None) -> tuple[Isolation, str | None]:
    """The mode to run and, when the sandbox is not used by default, why (said once).

    ``requested`` None: the sandbox when this host allows it. An explicit ``netns`` on a
    host that cannot: ``ValueError`` with the reason."""
    why = sandbox_support() if requested is not Isolation.PROCESS else None
    if requested is Isolation.NETNS:
        if why is not None:
            raise ValueError(f"--isolation netns is not possible here: {why}")
        return Isolation.NETNS, None
    if requested is Isolation.PROCESS:
        return Isolation.PROCESS, None
    if why is None:
        return Isolation.NETNS, None
    return Isolation.PROCESS, f"the pod sandbox is not available ({why}); {PROCESS_MODE_NOTE}"


def pod_python() -> SandboxPython:
    """The interpreter sandboxed processes run (readable by their uids)."""
    python = sandbox_python()
    if isinstance(python, str):  # sandbox_support() said yes, so this cannot happen
        raise RuntimeError(python)
    return python


def _base_env() -> dict[str, str]:
    env = {k: os.environ[k] for k in _BASE_ENV if k in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    return env


def control_plane_argv(plan: MeshPlan, state: Path) -> list[str]:
    """The control plane in the node namespace, as root (it holds the CA)."""
    command = [sys.executable, "-m", "trustmesh.runtime.control_plane", str(state)]
    return podexec_argv(sys.executable, plan.node_netns, command)


def sidecar_argv(
    pod: PodPlan, paths: PodPaths, spec_file: Path
) -> tuple[list[str], dict[str, str]]:
    """The agent (which starts Envoy) in the pod's namespace as uid 1337, group: the
    pod's own; argv and environment."""
    assert pod.netns is not None
    python = pod_python()
    command = python.argv("trustmesh.runtime.sidecar", str(spec_file))
    # The pod's names, as the app's: the host's resolv.conf names a server no pod reaches,
    # and Envoy's DNS clusters (ServiceEntry hosts) would wait on it before warming.
    argv = podexec_argv(
        sys.executable,
        pod.netns,
        command,
        uid=PROXY_UID,
        gid=paths.group,
        hosts=str(paths.hosts),
        resolv=str(paths.resolv),
        cwd=str(paths.proxy),
    )
    env = {**_base_env(), **python.env, "HOME": str(paths.proxy)}
    return argv, env


def app_argv(pod: PodPlan, paths: PodPaths) -> tuple[list[str], dict[str, str]]:
    """The app in the pod's namespace as its uid, with the pod's names; argv and
    environment (the pod's own, not the supervisor's)."""
    assert pod.netns is not None
    python = pod_python()
    command = list(pod.command)
    if command[0] == "trustmesh":  # this installation's, whatever PATH says
        command = python.argv("trustmesh", *command[1:])
    argv = podexec_argv(
        sys.executable,
        pod.netns,
        command,
        uid=pod.uid,
        gid=pod.gid,
        hosts=str(paths.hosts),
        resolv=str(paths.resolv),
        cwd=str(paths.app),
        hostname=pod.name[:64],  # a pod's host name is its name (HOSTNAME too)
    )
    env = {**_base_env(), **python.env, "HOME": str(paths.app), **pod.env}
    return argv, env


def install_proxy_file(source: Path, paths: PodPaths, name: str) -> Path:
    """Copy ``source`` into the pod's proxy directory, readable by its group only."""
    target = paths.proxy / name
    tmp = target.with_name(f".{name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    with os.fdopen(fd, "wb") as out, source.open("rb") as src:
        shutil.copyfileobj(src, out)
    os.chown(tmp, 0, paths.group)
    os.replace(tmp, target)
    return target


async def accepts_in(netns_name: str, address: str, port: int) -> bool:
    """Does something accept on ``address:port``, connecting from inside the namespace?
    (The app's readiness probe, at its pod IP as the kubelet's: from the pod itself the
    connection is not captured — only uid 1337's would be — so Envoy does not answer for
    the app.)"""
    sock = netns.netns_socket(netns_name)
    sock.setblocking(False)
    try:
        connecting = asyncio.get_running_loop().sock_connect(sock, (address, port))
        await asyncio.wait_for(connecting, 1)
    except (OSError, TimeoutError):
        return False
    finally:
        sock.close()
    return True


def in_netns(name: str, address: tuple[str, int], timeout: float) -> socket.socket:
    """A TCP connection opened from inside namespace ``name`` (blocking)."""
    sock = netns.netns_socket(name)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock
