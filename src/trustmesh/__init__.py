"""trustmesh: zero-trust service-mesh security that speaks Istio's security API."""
