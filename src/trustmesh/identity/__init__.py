"""Workload identity: SPIFFE IDs, the certificate authority, bootstrap tokens, rotation."""
