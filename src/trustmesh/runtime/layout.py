"""Where a running local mesh keeps its files (one state directory per mesh).

```
<state>/mesh.json            what runs: PIDs, addresses, ports (written by the supervisor)
<state>/plan.json            the pods and addresses planned from the manifests
<state>/ca/                  the mesh CA (0700; its keys never leave this directory)
<state>/ca-roots.pem         the trust bundle agents use to verify the CA at enrollment
<state>/control-plane.json   the control plane's ports, once it serves
<state>/not-ready.json       pods whose endpoints are out of the mesh (an app that exited)
<state>/logs/                control-plane.log, <ns>_<pod>.app.log, <ns>_<pod>.agent.log
<state>/pods/<ns>_<pod>/     sidecar.json, token (0600), envoy.json, envoy.log
<state>/s/<n>.sock           SDS sockets (short paths: a Unix socket path has 107 bytes)
<state>/ledger.jsonl         netns isolation: what the sandbox created (see ledger.py)
```

In netns isolation a pod's processes run as other users, who cannot enter the state
directory; what they need lives under ``/run/trustmesh/<mesh id>/<k>/`` (:class:`PodPaths`):

```
hosts, resolv.conf   0644 root     the pod's /etc/hosts and /etc/resolv.conf
app/                 0700 app uid  the app's working directory
sds/                 0700 1337     the SDS socket (the agent serves only its own Envoy)
proxy/               0070 root:G   sidecar.json, token, SDS gRPC socket, Envoy's files;
                                   G is the pod's own group, given to its proxy processes
                                   only (every pod's proxy is uid 1337)
```
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_STATE", "RUN_ROOT", "Layout", "PodPaths", "read_json", "write_json"]

DEFAULT_STATE = ".trustmesh"
ARGS_FILE = "control-plane-args.json"  # how the control plane was started (for status)
CLUSTER_FILE = "cluster.json"  # the record of a mesh over several hosts (up --hosts)
RUN_ROOT = Path("/run/trustmesh")
# A pod's own group (its proxy processes'): distinct per mesh as well as per pod, so the
# proxy of another mesh's pod k cannot open this mesh's pod k proxy directory.
POD_GROUP_BASE = 0x20000000


@dataclass(frozen=True, slots=True)
class PodPaths:
    """A sandboxed pod's runtime files (see the module docstring)."""

    root: Path
    index: int
    mesh_id: str = ""

    @classmethod
    def of(cls, mesh_id: str, index: int) -> PodPaths:
        return cls(RUN_ROOT / mesh_id / str(index), index, mesh_id)

    @property
    def group(self) -> int:
        """``0x20000000 + (20 bits of the mesh id's hash) * 256 + k`` (k < 256)."""
        digest = hashlib.sha256(self.mesh_id.encode()).hexdigest()
        return POD_GROUP_BASE + (int(digest[:5], 16) << 8) + self.index

    @property
    def hosts(self) -> Path:
        return self.root / "hosts"

    @property
    def resolv(self) -> Path:
        return self.root / "resolv.conf"

    @property
    def app(self) -> Path:
        return self.root / "app"

    @property
    def sds_dir(self) -> Path:
        return self.root / "sds"

    @property
    def sds_socket(self) -> Path:
        return self.sds_dir / "sds.sock"

    @property
    def proxy(self) -> Path:
        return self.root / "proxy"


@dataclass(frozen=True, slots=True)
class Layout:
    root: Path

    @property
    def mesh(self) -> Path:
        return self.root / "mesh.json"

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def ca(self) -> Path:
        return self.root / "ca"

    @property
    def roots(self) -> Path:
        return self.root / "ca-roots.pem"

    @property
    def control_plane(self) -> Path:
        return self.root / "control-plane.json"

    @property
    def not_ready(self) -> Path:
        return self.root / "not-ready.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def pod_dir(self, key: str) -> Path:
        return self.root / "pods" / key

    def token(self, key: str) -> Path:
        return self.pod_dir(key) / "token"

    def sidecar_spec(self, key: str) -> Path:
        return self.pod_dir(key) / "sidecar.json"

    def envoy_log(self, key: str) -> Path:
        return self.pod_dir(key) / "envoy.log"

    def app_log(self, key: str) -> Path:
        return self.logs / f"{key}.app.log"

    def agent_log(self, key: str) -> Path:
        return self.logs / f"{key}.agent.log"

    def sds_socket(self, index: int) -> Path:
        return self.root / "s" / f"{index}.sock"

    # -- a pod's sidecar files, wherever its isolation mode keeps them

    def proxy_dir(self, key: str, paths: PodPaths | None) -> Path:
        return paths.proxy if paths is not None else self.pod_dir(key)

    def envoy_log_of(self, key: str, paths: PodPaths | None) -> Path:
        return self.proxy_dir(key, paths) / "envoy.log"

    def token_of(self, key: str, paths: PodPaths | None) -> Path:
        return self.proxy_dir(key, paths) / "token"

    def create(self) -> None:
        for folder in (self.root, self.logs, self.root / "pods", self.root / "s"):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)  # the CA, tokens and logs: the mesh's user (root) only


def write_json(path: Path, value: Any, *, mode: int = 0o600) -> None:
    """Replace ``path`` whole (readers never see half a file), readable by the owner only."""
    partial = path.with_name(path.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as out:
        json.dump(value, out, indent=2, sort_keys=True)
    os.replace(partial, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def cluster_file(state: Path) -> Path:
    """The record of the multi-host mesh whose state directory is ``state``."""
    return state / CLUSTER_FILE
