"""Envoy configuration for the data plane: translation (pure), snapshot cache and ADS server."""
