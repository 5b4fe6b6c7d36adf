"""The per-workload agent: serves the workload identity to its Envoy and runs that Envoy."""
