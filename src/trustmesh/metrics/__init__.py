"""Prometheus metrics of the local mesh: the control plane's own, and each sidecar's.

- :mod:`~trustmesh.metrics.exposition`: counters under exact names (Istio's have no
  ``_total``) and the text rendering of every family;
- :mod:`~trustmesh.metrics.controlplane`: what the xDS server, the reloads and the CA
  count (the observers they are given), under Istio's names where Istio has one;
- :mod:`~trustmesh.metrics.sidecars`: each Envoy's RBAC and ext_authz counters, read
  from its admin endpoint with a bounded wait and re-exported with pod labels;
- :mod:`~trustmesh.metrics.server`: the plain-HTTP ``GET /metrics`` listener;
- :mod:`~trustmesh.metrics.top`: what ``trustmesh top`` reads and shows.
"""
