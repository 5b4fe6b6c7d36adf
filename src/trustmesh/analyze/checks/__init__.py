"""Check modules, one per family; importing this package registers every rule."""

from trustmesh.analyze.checks import (  # noqa: F401
    ambient,
    authn,
    authz,
    authz_scope,
    capture,
    edge,
    install,
    mtls,
    mtls_client,
    versions,
)
