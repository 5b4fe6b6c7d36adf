"""Helpers of the benchmarks under bench/: load generation, Envoy configs, mesh wiring."""
