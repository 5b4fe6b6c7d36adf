"""Each sidecar's authorization counters, read from its Envoy and re-exported per pod.

Envoy counts what its RBAC and ext_authz filters decide under documented stat names:

- ``http.<hcm prefix>.rbac.[<rules prefix>.]allowed|denied|shadow_allowed|shadow_denied``
  (every HTTP RBAC filter of a chain counts in the same counter unless it has its own
  ``rules_stat_prefix``: as in Istio, a request that passes a DENY and an ALLOW filter
  counts twice in ``allowed``; trustmesh's own guard filter has the prefix
  ``trustmesh_guard_`` and is counted apart);
- ``<network prefix>rbac.[<prefix>.]…`` for TCP chains (trustmesh's prefix is ``tcp.``);
- ``http.<hcm prefix>.ext_authz.[<prefix>.]ok|denied|error|failure_mode_allowed|disabled``
  and ``ext_authz.<prefix>.…`` for the network ext_authz filter.

:func:`scrape` asks every sidecar's admin endpoint for ``/stats?format=json`` filtered
to those names — from inside the pod's network namespace in the sandbox, where the admin
port is on the pod's own loopback — all at once in worker threads, each bounded by a
timeout: a dead or stopped sidecar is reported down (``trustmesh_sidecar_up 0``) and
never holds the scrape up. :func:`families` turns the results into Prometheus families
with ``namespace`` and ``pod`` labels (no address, no node id).
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import re
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client.core import GaugeMetricFamily, Metric

from trustmesh.xds.guards import GUARD_STAT_PREFIX

__all__ = [
    "SCRAPE_TIMEOUT",
    "STATS_PATH",
    "SidecarCounts",
    "SidecarTarget",
    "classify",
    "families",
    "scrape",
    "scrape_one",
]

SCRAPE_TIMEOUT = 1.0  # per sidecar: an Envoy answers its admin in milliseconds
MAX_STATS_BYTES = 4 << 20  # the filtered stats of one Envoy are a few kB
_WORKERS = 8
STATS_PATH = "/stats?format=json&filter=" + "rbac%5C.%7Cext_authz%5C."  # rbac\.|ext_authz\.

# Istio's CUSTOM action: an RBAC filter whose shadow rules (this prefix) only mark the
# requests the ext_authz filter then checks; its results are the ext_authz counters.
_CUSTOM_SHADOW_PREFIX = "istio_ext_authz"
RBAC_RESULTS = ("allowed", "denied", "shadow_allowed", "shadow_denied")
EXT_AUTHZ_RESULTS = ("ok", "denied", "error", "failure_mode_allowed", "disabled")
_HTTP_RBAC = re.compile(
    r"^http\.(?P<prefix>.+)\.rbac\.(?:(?P<rules>[^.]+)\.)?(?P<result>"
    + "|".join(RBAC_RESULTS)
    + ")$"
)
_TCP_RBAC = re.compile(
    r"^(?P<prefix>.*)rbac\.(?:(?P<rules>[^.]+)\.)?(?P<result>" + "|".join(RBAC_RESULTS) + ")$"
)
_HTTP_EXT_AUTHZ = re.compile(
    r"^http\.(?P<prefix>.+)\.ext_authz\.(?:(?P<rules>[^.]+)\.)?(?P<result>"
    + "|".join(EXT_AUTHZ_RESULTS)
    + ")$"
)
_TCP_EXT_AUTHZ = re.compile(
    r"^ext_authz\.(?P<prefix>.+)\.(?P<result>" + "|".join(EXT_AUTHZ_RESULTS) + ")$"
)


@dataclass(frozen=True, slots=True)
class SidecarTarget:
    """Where one pod's Envoy admin answers: ``admin`` is ``host:port`` (None: not known
    yet), reached from inside network namespace ``netns`` when given."""

    namespace: str
    pod: str
    admin: str | None
    netns: str | None = None


@dataclass(frozen=True, slots=True)
class SidecarCounts:
    """One pod's counters, summed over its listeners; ``error`` set when it is down.

    ``rbac[(protocol, result)]``, ``ext_authz[(protocol, result)]`` and ``guard[result]``,
    ``protocol`` ``http`` or ``tcp``.
    """

    target: SidecarTarget
    rbac: Mapping[tuple[str, str], float] = field(default_factory=dict)
    ext_authz: Mapping[tuple[str, str], float] = field(default_factory=dict)
    guard: Mapping[str, float] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0

    @property
    def up(self) -> bool:
        return self.error is None


def classify(
    stats: Mapping[str, float],
) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], float], dict[str, float]]:
    """Envoy stat name → value, summed into (rbac, ext_authz, guard) as in
    :class:`SidecarCounts`. Names that are none of these are ignored."""
    rbac: dict[tuple[str, str], float] = defaultdict(float)
    ext_authz: dict[tuple[str, str], float] = defaultdict(float)
    guard: dict[str, float] = defaultdict(float)
    for protocol in ("http", "tcp"):  # every result present, at 0 when nothing happened
        for result in RBAC_RESULTS:
            rbac[(protocol, result)] += 0.0
    for name, value in stats.items():
        if match := _HTTP_EXT_AUTHZ.match(name):
            ext_authz[("http", match["result"])] += value
        elif match := _TCP_EXT_AUTHZ.match(name):
            ext_authz[("tcp", match["result"])] += value
        elif match := _HTTP_RBAC.match(name) or _TCP_RBAC.match(name):
            protocol = "http" if name.startswith("http.") else "tcp"
            if match["rules"] == GUARD_STAT_PREFIX:
                guard[match["result"]] += value
            elif (match["rules"] or "").startswith(_CUSTOM_SHADOW_PREFIX):
                continue  # CUSTOM's shadow rules pick requests for ext_authz: not a dry run
            else:
                rbac[(protocol, match["result"])] += value
    return dict(rbac), dict(ext_authz), dict(guard)


def _admin_get(target: SidecarTarget, timeout: float) -> bytes:
    assert target.admin is not None
    host, _, port = target.admin.rpartition(":")
    connection = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)
    try:
        if target.netns is None:
            connection.connect()
        else:  # the socket is made in the pod's namespace and stays there
            from trustmesh.runtime.netns import entered

            with entered(target.netns):
                connection.connect()
        connection.request("GET", STATS_PATH, headers={"Connection": "close"})
        response = connection.getresponse()
        body = response.read(MAX_STATS_BYTES + 1)
        if response.status != 200:
            raise OSError(f"admin answered {response.status}")
        if len(body) > MAX_STATS_BYTES:
            raise OSError("admin answered more than expected")
        return body
    finally:
        connection.close()


def scrape_one(target: SidecarTarget, timeout: float = SCRAPE_TIMEOUT) -> SidecarCounts:
    """One sidecar's counters; a sidecar that does not answer within ``timeout`` (per
    socket operation) is down, with the reason."""
    started = time.monotonic()
    if target.admin is None:
        return SidecarCounts(target, error="no admin address reported yet")
    try:
        document = json.loads(_admin_get(target, timeout))
        stats = {
            str(entry["name"]): float(entry["value"])
            for entry in document.get("stats", [])
            if isinstance(entry, dict) and "name" in entry and "value" in entry
        }
    except (OSError, http.client.HTTPException, ValueError, TypeError, AttributeError) as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
        return SidecarCounts(target, error=reason, seconds=time.monotonic() - started)
    rbac, ext_authz, guard = classify(stats)
    return SidecarCounts(target, rbac, ext_authz, guard, seconds=time.monotonic() - started)


def scrape(
    targets: Sequence[SidecarTarget], timeout: float = SCRAPE_TIMEOUT
) -> list[SidecarCounts]:
    """Every target's counters, read in parallel; at most about ``3 × timeout`` in all
    (connect, send, read), whatever the sidecars do. Blocking: call it from a thread."""
    if not targets:
        return []
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(_WORKERS, len(targets)))
    try:
        futures = [pool.submit(scrape_one, target, timeout) for target in targets]
        done, _ = concurrent.futures.wait(futures, timeout=3 * timeout + 0.5)
        return [
            future.result() if future in done else SidecarCounts(target, error="timed out")
            for future, target in zip(futures, targets, strict=True)
        ]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def families(results: Sequence[SidecarCounts]) -> Iterator[Metric]:
    """Prometheus families of the scraped sidecars, labelled ``namespace`` and ``pod``."""
    pod_labels = ("namespace", "pod")
    up = GaugeMetricFamily(
        "trustmesh_sidecar_up",
        "1 if the sidecar's Envoy admin answered the scrape.",
        labels=pod_labels,
    )
    took = GaugeMetricFamily(
        "trustmesh_sidecar_scrape_seconds",
        "Seconds reading the sidecar's stats.",
        labels=pod_labels,
    )
    rbac = Metric(
        "trustmesh_sidecar_rbac",
        "Envoy RBAC decisions of the sidecar's authorization filters (dry-run: shadow_*), "
        "summed over its listeners.",
        "counter",
    )
    ext_authz = Metric(
        "trustmesh_sidecar_ext_authz",
        "Envoy ext_authz (CUSTOM) results of the sidecar, summed over its listeners.",
        "counter",
    )
    guard = Metric(
        "trustmesh_sidecar_guard",
        "Requests trustmesh's ambiguous-host guard let through or refused.",
        "counter",
    )
    for result in results:
        labels = (result.target.namespace, result.target.pod)
        up.add_metric(labels, 1.0 if result.up else 0.0)
        took.add_metric(labels, result.seconds)
        named = dict(zip(pod_labels, labels, strict=True))
        for (protocol, outcome), value in sorted(result.rbac.items()):
            rbac.add_sample(
                "trustmesh_sidecar_rbac_total",
                {**named, "protocol": protocol, "result": outcome},
                value,
            )
        for (protocol, outcome), value in sorted(result.ext_authz.items()):
            ext_authz.add_sample(
                "trustmesh_sidecar_ext_authz_total",
                {**named, "protocol": protocol, "result": outcome},
                value,
            )
        for outcome, value in sorted(result.guard.items()):
            guard.add_sample("trustmesh_sidecar_guard_total", {**named, "result": outcome}, value)
    yield from (up, took, rbac, ext_authz, guard)
