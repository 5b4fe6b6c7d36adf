"""Check modules, one per family; importing this package registers every rule."""

from trustmesh.analyze.checks import authn, authz, edge, install, mtls  # noqa: F401
