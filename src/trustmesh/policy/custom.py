"""What Istio does with a workload's CUSTOM policies, decided once (pure).

The evaluator and the RBAC translation (:mod:`trustmesh.xds.rbac`) both read these
values: per provider, the policies naming it and either the provider to ask or why every
rule of it becomes an enforced DENY (``-deny-due-to-bad-CUSTOM-action``) — the provider
is missing from ``meshConfig.extensionProviders`` or cannot be used, or two providers
select one workload (Istio's default, ``PILOT_ENABLE_MULTIPLE_CUSTOM_AUTHZ_PROVIDERS``
off, fails closed).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trustmesh.api import models as m
from trustmesh.api.extension_providers import ExtAuthzProvider, ext_authz_providers
from trustmesh.api.resources import Resource
from trustmesh.policy.compose import MeshPolicy, WorkloadPolicy
from trustmesh.policy.derived import Derived

__all__ = ["CustomProvider", "custom_providers", "mesh_ext_authz_providers"]


@dataclass(frozen=True, slots=True)
class CustomProvider:
    """One provider's CUSTOM policies on a workload, in provider-name order."""

    name: str  # as the policies name it ("" when they name none)
    policies: tuple[Resource[Any], ...]
    provider: ExtAuthzProvider | None  # the authorizer to ask; None: its rules DENY
    why_denied: str = ""  # why the rules became an enforced DENY

    def used_on_tcp(self) -> bool:
        """Whether this provider has a filter on TCP chains: Istio builds none for an
        HTTP authorizer (a DENY for an unusable provider applies everywhere)."""
        return self.provider is None or self.provider.serves_tcp


def custom_providers(wp: WorkloadPolicy, mesh: MeshPolicy) -> tuple[CustomProvider, ...]:
    """The CUSTOM providers of ``wp``, each with its verdict on usability."""
    if not wp.authz.custom.policies:
        return ()
    by_name: dict[str, list[Resource[Any]]] = defaultdict(list)
    for policy in wp.authz.custom.policies:
        spec: m.AuthorizationPolicySpec = policy.spec
        by_name[spec.provider.name if spec.provider else ""].append(policy)
    configured = mesh_ext_authz_providers(mesh)
    names = sorted(by_name)
    found: list[CustomProvider] = []
    for name in names:
        provider = configured.get(name)
        if len(names) > 1:
            why = (
                f"CUSTOM providers {', '.join(names)} on one workload: Istio fails closed"
                " (PILOT_ENABLE_MULTIPLE_CUSTOM_AUTHZ_PROVIDERS is off by default)"
            )
        elif provider is None:
            why = f"CUSTOM provider {name!r} is not in meshConfig.extensionProviders (fails closed)"
        elif not provider.usable:
            why = (
                f"CUSTOM provider {name!r} cannot be used (fails closed): {provider.why_unusable()}"
            )
        else:
            why = ""
        usable = provider if not why else None
        found.append(CustomProvider(name, tuple(by_name[name]), usable, why))
    return tuple(found)


def mesh_ext_authz_providers(mesh: MeshPolicy) -> Mapping[str, ExtAuthzProvider]:
    """The mesh's ext_authz providers, resolved once per compiled mesh."""
    return _PROVIDERS.get(mesh, None)


_PROVIDERS: Derived[MeshPolicy, None, Mapping[str, ExtAuthzProvider]] = Derived(
    "ext_authz providers", lambda mesh, _: ext_authz_providers(mesh.snapshot)
)
