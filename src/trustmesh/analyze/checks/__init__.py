"""Check modules, one per family; importing this package registers every rule."""

from trustmesh.analyze.checks import (  # noqa: F401
    ambient,
    authn,
    authz,
    authz_scope,
    capture,
    edge,
    envoy_filters,
    gateway_secrets,
    injection,
    install,
    jwks_fetch,
    jwt_routing,
    mtls,
    mtls_client,
    policy_attachment,
    policy_status,
    proxy_images,
    sidecar_egress,
    versions,
    webhooks,
)
