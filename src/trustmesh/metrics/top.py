"""What ``trustmesh top`` shows: one snapshot of a running mesh, from its metrics.

:func:`read_snapshot` scrapes the control plane's ``/metrics`` (entering the node
namespace in the sandbox, where it listens on the bridge address) and reads
``/debug/syncz`` from the owner-only debug socket; :func:`parse` turns the Prometheus
text into a :class:`TopSnapshot` — per pod its RBAC allow / deny / dry-run counts,
ext_authz results, whether its sidecar answered, its xDS sync state and how long its
certificate has left — and :func:`rates` compares two snapshots. Rendering (a rich table
or JSON) is :func:`table` / :func:`to_json`.
"""

from __future__ import annotations

import http.client
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from rich.table import Table

from trustmesh.runtime.layout import read_json
from trustmesh.runtime.running import RunningMesh

__all__ = [
    "MetricsUnavailable",
    "PodView",
    "TopSnapshot",
    "fetch_metrics",
    "parse",
    "rates",
    "read_snapshot",
    "table",
    "to_json",
]

FETCH_TIMEOUT = 5.0  # the control plane reads every sidecar per scrape (about 3 s at most)
MAX_METRICS_BYTES = 16 << 20


class MetricsUnavailable(RuntimeError):
    """The control plane's metrics cannot be read (not running, or an older version)."""


@dataclass(frozen=True, slots=True)
class PodView:
    """One sidecar pod as ``top`` shows it; counters are Envoy's totals since it started."""

    ref: str
    identity: str
    up: bool
    rbac: Mapping[str, float]  # allowed / denied / shadow_allowed / shadow_denied (http+tcp)
    ext_authz: Mapping[str, float]  # ok / denied / error / failure_mode_allowed / disabled
    synced: bool | None  # None: the debug endpoint did not answer
    nack: str | None
    cert_expiry_seconds: float | None


@dataclass(frozen=True, slots=True)
class TopSnapshot:
    """The mesh at ``taken_at`` (monotonic seconds): control-plane totals and every pod."""

    taken_at: float
    control_plane: Mapping[str, float]
    pods: tuple[PodView, ...]
    config_errors: tuple[str, ...] = field(default_factory=tuple)


def _why(exc: Exception) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def fetch_metrics(running: RunningMesh, timeout: float = FETCH_TIMEOUT) -> str:
    """The control plane's ``/metrics`` text."""
    try:
        info = read_json(running.layout.control_plane)
    except (OSError, ValueError) as exc:
        why = f"the control plane has not reported where it serves: {_why(exc)}"
        raise MetricsUnavailable(why) from None
    address = info.get("metrics") if isinstance(info, dict) else None
    if not isinstance(address, str) or ":" not in address:
        raise MetricsUnavailable(
            "the control plane reports no metrics address (started by an older trustmesh?)"
        )
    host, _, port = address.rpartition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        if running.plan.sandboxed:  # it listens on the bridge, in the node namespace
            from trustmesh.runtime.netns import entered

            with entered(running.plan.node_netns):
                connection.connect()
        else:
            connection.connect()
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        body = response.read(MAX_METRICS_BYTES)
        if response.status != 200:
            raise MetricsUnavailable(f"{address}/metrics answered {response.status}")
        return body.decode("utf-8", errors="replace")
    except (OSError, http.client.HTTPException) as exc:
        why = f"cannot read the control plane's metrics at {address}: {_why(exc)}"
        raise MetricsUnavailable(why) from None
    finally:
        connection.close()


_PLANE_SERIES = {
    "pilot_xds": "connected_proxies",
    "pilot_xds_pushes": "xds_pushes",
    "trustmesh_xds_acks": "xds_acks",
    "pilot_total_xds_rejects": "xds_rejects",
    "citadel_server_success_cert_issuance_count": "certs_issued",
    "trustmesh_ca_refusals": "cert_refusals",
    "trustmesh_config_errors": "config_errors",
    "trustmesh_config_last_reload_errors": "last_reload_errors",
}


def parse(
    text: str,
    running: RunningMesh,
    syncz: Mapping[str, Any] | None,
    taken_at: float | None = None,
) -> TopSnapshot:
    """A snapshot from the metrics text, the mesh's plan and its syncz (None: unknown)."""
    plane: dict[str, float] = dict.fromkeys(_PLANE_SERIES.values(), 0.0)
    up: dict[str, bool] = {}
    rbac: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    ext_authz: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    expiry: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            ref = f"{labels.get('namespace')}/{labels.get('pod')}"
            if family.name in _PLANE_SERIES and not sample.name.endswith("_created"):
                plane[_PLANE_SERIES[family.name]] += sample.value
            elif family.name == "trustmesh_sidecar_up":
                up[ref] = sample.value == 1.0
            elif family.name == "trustmesh_sidecar_rbac":
                rbac[ref][labels["result"]] += sample.value
            elif family.name == "trustmesh_sidecar_ext_authz":
                ext_authz[ref][labels["result"]] += sample.value
            elif family.name == "trustmesh_workload_cert_expiry_seconds":
                expiry[labels["identity"]] = sample.value
    proxies = {p.get("workload"): p for p in (syncz or {}).get("proxies", {}).values()}
    pods = []
    for pod in running.plan.pods:
        if not pod.sidecar:
            continue
        identity = (
            f"spiffe://{running.plan.trust_domain}/ns/{pod.namespace}/sa/{pod.service_account}"
        )
        proxy = proxies.get(pod.ref)
        pods.append(
            PodView(
                ref=pod.ref,
                identity=identity,
                up=up.get(pod.ref, False),
                rbac=dict(rbac.get(pod.ref, {})),
                ext_authz=dict(ext_authz.get(pod.ref, {})),
                synced=None if proxy is None else bool(proxy.get("synced")),
                nack=None if proxy is None else proxy.get("nack"),
                cert_expiry_seconds=expiry.get(identity),
            )
        )
    errors = tuple(str(e) for e in (syncz or {}).get("errors", []))
    return TopSnapshot(
        time.monotonic() if taken_at is None else taken_at, dict(plane), tuple(pods), errors
    )


def read_snapshot(running: RunningMesh) -> TopSnapshot:
    """Scrape the running mesh now."""
    text = fetch_metrics(running)
    return parse(text, running, running.syncz())


def rates(before: TopSnapshot, after: TopSnapshot) -> dict[str, dict[str, float]]:
    """Per pod, allowed / denied per second between two snapshots (a counter that went
    down — a restarted sidecar — counts from 0)."""
    seconds = after.taken_at - before.taken_at
    if seconds <= 0:
        return {}
    earlier = {pod.ref: pod for pod in before.pods}
    out: dict[str, dict[str, float]] = {}
    for pod in after.pods:
        old = earlier.get(pod.ref)
        per_second = {}
        for result in ("allowed", "denied"):
            now = pod.rbac.get(result, 0.0)
            then = old.rbac.get(result, 0.0) if old is not None else 0.0
            per_second[result] = (now - then if now >= then else now) / seconds
        out[pod.ref] = per_second
    return out


def to_json(snapshot: TopSnapshot, per_second: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    return {
        "control_plane": dict(snapshot.control_plane),
        "config_errors": list(snapshot.config_errors),
        "pods": [
            {
                "pod": pod.ref,
                "identity": pod.identity,
                "sidecar_up": pod.up,
                "rbac": dict(pod.rbac),
                "ext_authz": dict(pod.ext_authz),
                "rates": dict(per_second[pod.ref]) if pod.ref in per_second else None,
                "xds": {"synced": pod.synced, "nack": pod.nack},
                "cert_expiry_seconds": pod.cert_expiry_seconds,
            }
            for pod in snapshot.pods
        ],
    }


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds <= 0:
        return "EXPIRED"
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m"


def table(snapshot: TopSnapshot, per_second: Mapping[str, Mapping[str, float]]) -> Table:
    """The terminal view: one row per sidecar pod, the control plane in the caption.
    A/s, D/s: allowed / denied per second; ALLOW, DENY: in all; DRY A/D: dry-run (shadow)
    allowed / denied; EXT: ext_authz ok / denied / error."""
    plane = snapshot.control_plane
    caption = (
        f"control plane: {plane.get('connected_proxies', 0):.0f} proxies connected, "
        f"{plane.get('xds_pushes', 0):.0f} pushes, {plane.get('xds_acks', 0):.0f} ACKs, "
        f"{plane.get('xds_rejects', 0):.0f} NACKs, {plane.get('certs_issued', 0):.0f} certs "
        f"issued, {plane.get('cert_refusals', 0):.0f} refused, "
        f"{plane.get('last_reload_errors', 0):.0f} config errors"
    )
    view = Table(caption=caption, box=None, pad_edge=False, caption_justify="left")
    view.add_column("POD", no_wrap=True)
    for column in ("UP", "A/s", "D/s", "ALLOW", "DENY", "DRY A/D", "EXT", "XDS"):
        view.add_column(column)
    view.add_column("CERT", no_wrap=True)
    for pod in snapshot.pods:
        rate = per_second.get(pod.ref)
        xds = "-" if pod.synced is None else ("SYNCED" if pod.synced else "STALE")
        if pod.nack:
            xds += " (NACK)"
        ext = pod.ext_authz
        view.add_row(
            pod.ref,
            "yes" if pod.up else "DOWN",
            "-" if rate is None else f"{rate['allowed']:.1f}",
            "-" if rate is None else f"{rate['denied']:.1f}",
            _count(pod.rbac.get("allowed")),
            _count(pod.rbac.get("denied")),
            f"{_count(pod.rbac.get('shadow_allowed'))}/{_count(pod.rbac.get('shadow_denied'))}",
            f"{_count(ext.get('ok'))}/{_count(ext.get('denied'))}/{_count(ext.get('error'))}",
            xds,
            _duration(pod.cert_expiry_seconds),
        )
    return view
