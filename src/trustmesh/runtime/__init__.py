"""The local mesh: manifests → processes (control plane, sidecars, apps) on one host."""
