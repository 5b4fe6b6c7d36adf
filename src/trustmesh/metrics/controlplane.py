"""The control plane's own metrics: what the ADS server, the reloads and the CA count.

:class:`ControlPlaneMetrics` is the observer handed to
:class:`~trustmesh.xds.controlplane.ControlPlane` (``observer=``) and to
:class:`~trustmesh.identity.server.CaServer` (``observer=``); each hook is a dict update
or a histogram observation on the event loop's thread, so a push costs nothing
measurable. Istio's names are used where istiod has the same metric (``pilot_xds_pushes``,
``pilot_total_xds_rejects``, ``pilot_xds``, ``citadel_server_*``), so its dashboards carry
over; the rest are ``trustmesh_*``. Label values come from closed sets (Istio's short xDS
type names, diagnostic and refusal codes) or from identities (``spiffe://td/ns/N/sa/S``):
never an address, a node id, a file path or a message.

Example::

    metrics = ControlPlaneMetrics(ca=ca)
    plane = ControlPlane(paths, ca=ca, observer=metrics)
    ca_server = CaServer(ca, observer=metrics)
    text = metrics.render()
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from trustmesh.api.diagnostics import Diagnostic
from trustmesh.identity.ca import CertificateAuthority
from trustmesh.identity.spiffe import SpiffeId
from trustmesh.metrics.exposition import CounterFamily, render
from trustmesh.xds.cache import (
    TYPE_CLUSTER,
    TYPE_ECDS,
    TYPE_ENDPOINT,
    TYPE_LISTENER,
    TYPE_ROUTE,
    TYPE_SECRET,
)

__all__ = ["ControlPlaneMetrics", "refusal_counter", "xds_type"]

Clock = Callable[[], dt.datetime]

# Istio's v3.GetMetricType. Any other type URL (a proxy may send whatever it likes) is
# "other": a client must not be able to mint label values.
_SHORT_TYPES = {
    TYPE_CLUSTER: "cds",
    TYPE_LISTENER: "lds",
    TYPE_ROUTE: "rds",
    TYPE_ENDPOINT: "eds",
    TYPE_SECRET: "sds",
    TYPE_ECDS: "ecds",
}
# Istio's buckets with a finer start: a change reaches a local proxy in milliseconds.
_CONVERGENCE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 3.0, 5.0, 10.0, 20.0, 30.0)
# Push → ACK is milliseconds on one host; the tail shows a stalled proxy.
_ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_AUTHENTICATION = "citadel_server_authentication_failure_count"
_CSR_PARSING = "citadel_server_csr_parsing_err_count"
_ID_EXTRACTION = "citadel_server_id_extraction_err_count"
_CSR_SIGN = "citadel_server_csr_sign_err_count"
_PARSING_CODES = frozenset(
    {"csr-too-large", "csr-malformed", "csr-bad-signature", "weak-key", "csr-requests-ca"}
)
_IDENTITY_CODES = frozenset({"san-mismatch", "wrong-trust-domain"})


def xds_type(type_url: str) -> str:
    """Istio's metric label for an xDS type URL (``cds``, ``lds``, …; else ``other``)."""
    return _SHORT_TYPES.get(type_url, "other")


def refusal_counter(reason: str) -> str:
    """Which of istiod's ``citadel_server_*`` counters a CA refusal code counts in."""
    if reason.startswith(("token-", "renewal-")) or reason == "unauthenticated":
        return _AUTHENTICATION
    if reason in _PARSING_CODES:
        return _CSR_PARSING
    if reason in _IDENTITY_CODES:
        return _ID_EXTRACTION
    return _CSR_SIGN


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class ControlPlaneMetrics:
    """Counters, gauges and a histogram of one control-plane process (see the module doc).

    ``ca``: the CA whose root and signing chain expiry are reported; ``clock``: what
    "seconds until expiry" is measured from; ``process``: add prometheus_client's process,
    platform and GC collectors (``process_cpu_seconds_total``, ``process_resident_memory_bytes``…).
    """

    def __init__(
        self,
        *,
        ca: CertificateAuthority | None = None,
        clock: Clock = _utc_now,
        process: bool = True,
    ) -> None:
        self._ca = ca
        self._clock = clock
        self.pushes = CounterFamily(
            "pilot_xds_pushes", "xDS responses sent to proxies, by type.", ("type",)
        )
        self.acks = CounterFamily(
            "trustmesh_xds_acks_total", "xDS responses proxies accepted (ACK), by type.", ("type",)
        )
        self.rejects = CounterFamily(
            "pilot_total_xds_rejects",
            "Total number of XDS responses from pilot rejected by proxy (NACK), by type.",
            ("type",),
        )
        self.internal_errors = CounterFamily(
            "pilot_total_xds_internal_errors",
            "Proxies a reload could not build a configuration for (they keep their last one).",
        )
        self.config_errors = CounterFamily(
            "trustmesh_config_errors_total",
            "Errors in refused configuration reloads, by diagnostic code.",
            ("code",),
        )
        self.reloads = CounterFamily(
            "trustmesh_config_reloads_total",
            "Configuration reloads, by result (applied or rejected).",
            ("result",),
        )
        self.csrs = CounterFamily("citadel_server_csr_count", "The number of CSRs received.")
        self.issued_count = CounterFamily(
            "citadel_server_success_cert_issuance_count",
            "The number of certificates issuances that have succeeded.",
        )
        self.refusals = CounterFamily(
            "trustmesh_ca_refusals_total", "Certificate requests refused, by reason.", ("reason",)
        )
        self._istio_refusals = {
            _AUTHENTICATION: CounterFamily(
                _AUTHENTICATION, "The number of authentication failures."
            ),
            _CSR_PARSING: CounterFamily(_CSR_PARSING, "The number of errors parsing the CSR."),
            _ID_EXTRACTION: CounterFamily(
                _ID_EXTRACTION, "The number of CSRs whose identity is not the caller's."
            ),
            _CSR_SIGN: CounterFamily(
                _CSR_SIGN, "The number of errors signing the CSR, by error.", ("error",)
            ),
        }
        self.push_to_ack = Histogram(
            "trustmesh_xds_push_to_ack_seconds",
            "Seconds from sending an xDS response to the proxy's ACK, by type.",
            ("type",),
            registry=None,
            buckets=_ACK_BUCKETS,
        )
        self.convergence = Histogram(
            "pilot_proxy_convergence_time",
            "Delay in seconds between config change and a proxy receiving all required "
            "configuration (every type ACKed).",
            registry=None,
            buckets=_CONVERGENCE_BUCKETS,
        )
        # node id → (snapshot version, monotonic time it was published): in memory only,
        # never a label. One entry per proxy with a change on its way.
        self._changes: dict[str, tuple[str, float]] = {}
        self._ack_latency: dict[str, Any] = {}
        self.connected = 0
        self.last_reload_errors = 0
        self._expiry: dict[str, dt.datetime] = {}  # identity → notAfter of its newest cert
        self._serving: dict[str, dt.datetime] = {}  # "xds" / "ca" → its TLS certificate's
        self._process = CollectorRegistry(auto_describe=False)
        if process:
            ProcessCollector(registry=self._process)
            PlatformCollector(registry=self._process)
            GCCollector(registry=self._process)

    # -- XdsObserver -------------------------------------------------------------------

    def stream_opened(self) -> None:
        self.connected += 1

    def stream_closed(self) -> None:
        self.connected -= 1

    def pushed(self, type_url: str) -> None:
        self.pushes.inc((xds_type(type_url),))

    def acked(self, type_url: str, seconds: float) -> None:
        kind = xds_type(type_url)
        self.acks.inc((kind,))
        latency = self._ack_latency.get(kind)
        if latency is None:  # labels() looks the child up under a lock: once per type
            latency = self._ack_latency[kind] = self.push_to_ack.labels(kind)
        latency.observe(seconds)

    def rejected(self, type_url: str) -> None:
        self.rejects.inc((xds_type(type_url),))

    def converged(self, node_id: str, version: str) -> None:
        change = self._changes.get(node_id)
        if change is not None and change[0] == version:
            del self._changes[node_id]
            self.convergence.observe(time.monotonic() - change[1])

    # -- PlaneObserver ------------------------------------------------------------------

    def reloaded(self, applied: bool, errors: Sequence[Diagnostic]) -> None:
        self.reloads.inc(("applied" if applied else "rejected",))
        self.last_reload_errors = len(errors)
        if applied:
            if errors:
                self.internal_errors.inc((), len(errors))
            return
        for diagnostic in errors:
            self.config_errors.inc((diagnostic.code,))

    def published(self, node_id: str, version: str) -> None:
        self._changes[node_id] = (version, time.monotonic())

    def xds_serving_certificate(self, not_after: dt.datetime) -> None:
        self._serving["xds"] = not_after  # one assignment: safe from gRPC's threads

    # -- CaObserver ---------------------------------------------------------------------

    def ca_serving_certificate(self, not_after: dt.datetime) -> None:
        self._serving["ca"] = not_after

    def csr_received(self) -> None:
        self.csrs.inc()

    def issued(self, identity: SpiffeId, not_after: dt.datetime) -> None:
        self.issued_count.inc()
        self._expiry[identity.uri] = not_after

    def refused(self, reason: str) -> None:
        self.refusals.inc((reason,))
        counter = refusal_counter(reason)
        self._istio_refusals[counter].inc((reason,) if counter == _CSR_SIGN else ())

    # -- exposition ---------------------------------------------------------------------

    def families(self) -> Iterator[Metric]:
        """Every family, read now (call on the event loop's thread)."""
        for counter in (
            self.pushes,
            self.acks,
            self.rejects,
            self.internal_errors,
            self.reloads,
            self.config_errors,
            self.csrs,
            self.issued_count,
            *self._istio_refusals.values(),
            self.refusals,
        ):
            yield counter.collect()
        yield from self.push_to_ack.collect()
        yield from self.convergence.collect()
        yield GaugeMetricFamily(
            "pilot_xds",
            "Number of proxies connected to this control plane over xDS.",
            self.connected,
        )
        yield GaugeMetricFamily(
            "trustmesh_config_last_reload_errors",
            "Errors the last reload reported (0: the files as they are now are served).",
            self.last_reload_errors,
        )
        yield from self._expiry_families()
        yield from self._process.collect()

    def render(self) -> str:
        return render(self.families())

    def _expiry_families(self) -> Iterator[Metric]:
        now = self._clock()
        workloads = GaugeMetricFamily(
            "trustmesh_workload_cert_expiry_seconds",
            "Seconds until the newest certificate issued to each identity expires.",
            labels=("identity",),
        )
        for identity, not_after in sorted(self._expiry.items()):
            workloads.add_metric((identity,), (not_after - now).total_seconds())
        yield workloads
        if self._expiry:
            soonest = min(self._expiry.values())
            yield GaugeMetricFamily(
                "trustmesh_workload_cert_soonest_expiry_seconds",
                "Seconds until the first of the newest workload certificates expires.",
                (soonest - now).total_seconds(),
            )
        serving = GaugeMetricFamily(
            "trustmesh_serving_cert_expiry_seconds",
            "Seconds until the control plane's own TLS certificate expires, by server (xds, ca).",
            labels=("server",),
        )
        for server, not_after in sorted(dict(self._serving).items()):
            serving.add_metric((server,), (not_after - now).total_seconds())
        yield serving
        if self._ca is None:
            return
        slot = self._ca.active
        root = slot.root.not_valid_after_utc
        chain = min(cert.not_valid_after_utc for cert in slot.chain)
        for name, when, what in (
            ("root_cert", root, "the CA's root certificate"),
            ("cert_chain", chain, "the CA's signing certificate chain"),
        ):
            yield GaugeMetricFamily(
                f"citadel_server_{name}_expiry_timestamp",
                f"The unix timestamp, in seconds, when {what} will expire.",
                when.timestamp(),
            )
            yield GaugeMetricFamily(
                f"citadel_server_{name}_expiry_seconds",
                f"The time remaining, in seconds, before {what} will expire.",
                (when - now).total_seconds(),
            )
