"""AuthorizationPolicy → Envoy RBAC filters for one workload's inbound chains (pure).

This is the Envoy side of Istio's ``pilot/pkg/security/authz`` (``builder.go``) for
sidecars. The rules arrive compiled, as :class:`~trustmesh.policy.rule_tree.RuleTree`
values — the same trees the offline evaluator interprets, with Istio's rule-dropping
already applied — and :mod:`trustmesh.xds.rbac_matchers` maps each matcher to its Envoy
message. This module only assembles filters:

* one Envoy policy per rule, named ``ns[<ns>]-policy[<name>]-rule[<i>]``; Envoy keeps
  them in a ``std::map`` and reports the lexicographically smallest match, which is the
  order :class:`~trustmesh.policy.authz.RuleSet` uses too;
* a policy written without rules gets one never-matching policy (ALLOW with nothing =
  deny all);
* dry-run (``istio.io/dry-run: "true"``) ALLOW / DENY policies become the
  ``shadow_rules`` of the same action's filter: evaluated and reported, never enforced.

Filter order on the inbound HTTP chain: :func:`http_custom_filters`, then jwt_authn,
then :func:`http_rbac_filters` (AUDIT, DENY, ALLOW), then the router.

CUSTOM (ext_authz, :mod:`trustmesh.xds.ext_authz`): per provider, an RBAC filter holding
the provider's rules as shadow rules (named ``istio-ext-authz-<provider>-ns[..]-policy[..]
-rule[..]``), then the ext_authz filter it enables. A provider that cannot be used
(missing from ``meshConfig.extensionProviders``, invalid, its service unknown) or two
providers on one workload (Istio's default) turn the rules into an enforced DENY, as
Istio does (``...-deny-due-to-bad-CUSTOM-action``). On TCP chains a gRPC provider gets the
network pair; an HTTP provider is left out.

Outputs are proto3-JSON dicts (``json_format.ParseDict`` them at the edge). Per-policy
results are remembered per compiled mesh (``_POLICY_RULES``), so dicts returned for two
workloads of one mesh may share sub-dicts: treat them as read-only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from trustmesh.api import models as m
from trustmesh.api.extension_providers import (
    ExtAuthzProvider,
)
from trustmesh.api.resources import Resource
from trustmesh.policy.compose import MeshPolicy, WorkloadPolicy
from trustmesh.policy.custom import custom_providers
from trustmesh.policy.derived import Derived
from trustmesh.policy.rule_tree import CompiledRules, TrustBundle, compile_rules
from trustmesh.policy.rule_trees import rule_trees
from trustmesh.xds import rbac_matchers as mt
from trustmesh.xds.ext_authz import (
    EXT_AUTHZ_SHADOW_PREFIX,
    HTTP_EXT_AUTHZ,
    NETWORK_EXT_AUTHZ,
    http_ext_authz_config,
    network_ext_authz_config,
)
from trustmesh.xds.rbac_matchers import Json

__all__ = [
    "DRY_RUN_ALLOW_PREFIX",
    "DRY_RUN_DENY_PREFIX",
    "HTTP_RBAC",
    "HTTP_RBAC_TYPE",
    "NETWORK_RBAC",
    "NETWORK_RBAC_TYPE",
    "http_custom_filters",
    "http_rbac_filters",
    "network_custom_filters",
    "network_rbac_filters",
    "policy_rules",
]

HTTP_RBAC = "envoy.filters.http.rbac"
NETWORK_RBAC = "envoy.filters.network.rbac"
HTTP_RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
NETWORK_RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"
DRY_RUN_ALLOW_PREFIX = "istio_dry_run_allow_"
DRY_RUN_DENY_PREFIX = "istio_dry_run_deny_"
TCP_STAT_PREFIX = "tcp."
_EXT_AUTHZ_PREFIX = "istio-ext-authz"
_BAD_CUSTOM_SUFFIX = "-deny-due-to-bad-CUSTOM-action"

# Envoy's never-matching policy, for a policy without rules (Istio rbacPolicyMatchNever).
_MATCH_NEVER: Json = {
    "permissions": [{"not_rule": {"any": True}}],
    "principals": [{"not_id": {"any": True}}],
}

# RBAC action per AuthorizationPolicy action (CUSTOM rules are built as DENY, like Istio).
_ENVOY_ACTION = {
    m.Action.ALLOW: "ALLOW",
    m.Action.DENY: "DENY",
    m.Action.AUDIT: "LOG",
    m.Action.CUSTOM: "DENY",
}


# --- filters ------------------------------------------------------------------------


def http_custom_filters(wp: WorkloadPolicy, mesh: MeshPolicy) -> list[Json]:
    """CUSTOM on the HTTP chain (before jwt_authn), per provider in name order: the
    shadow RBAC filter and the ext_authz filter it enables — or, for a provider that
    cannot be used, one enforced RBAC DENY filter. Nothing if no CUSTOM policy applies."""
    out: list[Json] = []
    for plan in _custom_plans(wp, mesh, for_tcp=False):
        if plan.provider is None:
            out.append(_http_filter({"rules": _rbac("DENY", plan.denied())}))
            continue
        shadow: Json = {"shadow_rules": _rbac("DENY", plan.rules)}
        shadow["shadow_rules_stat_prefix"] = EXT_AUTHZ_SHADOW_PREFIX
        out.append(_http_filter(shadow))
        config = http_ext_authz_config(plan.provider)
        out.append({"name": HTTP_EXT_AUTHZ, "typed_config": config})
    return out


def network_custom_filters(wp: WorkloadPolicy, mesh: MeshPolicy) -> list[Json]:
    """CUSTOM on a TCP chain: the network pair for a gRPC provider, nothing for an HTTP
    provider (Istio leaves it out), a DENY RBAC filter for a provider that cannot be used."""
    out: list[Json] = []
    for plan in _custom_plans(wp, mesh, for_tcp=True):
        if plan.provider is None:
            out.append(_network_filter({"rules": _rbac("DENY", plan.denied())}))
            continue
        config = network_ext_authz_config(plan.provider)
        if config is None:
            continue
        shadow: Json = {"shadow_rules": _rbac("DENY", plan.rules)}
        shadow["shadow_rules_stat_prefix"] = EXT_AUTHZ_SHADOW_PREFIX
        out.append(_network_filter(shadow))
        out.append({"name": NETWORK_EXT_AUTHZ, "typed_config": config})
    return out


def http_rbac_filters(wp: WorkloadPolicy, mesh: MeshPolicy) -> list[Json]:
    """The RBAC HTTP filters of ``wp``'s inbound chain, in order: AUDIT (``LOG``), DENY,
    ALLOW — each only if a policy of that action (enforced or dry-run) applies.

    Example: a DENY ``methods: [GET]`` policy gives one filter, ``rules.action: DENY``
    with the policy ``ns[foo]-policy[deny-get]-rule[0]``.
    """
    return [_http_filter(config) for config in _action_configs(wp, mesh, for_tcp=False) if config]


def network_rbac_filters(wp: WorkloadPolicy, mesh: MeshPolicy, port: int | None) -> list[Json]:
    """The RBAC network filters of ``wp``'s TCP chain for ``port`` (None: a passthrough
    chain, any port): CUSTOM (fail closed), AUDIT, DENY, ALLOW, with Istio's TCP handling
    of HTTP-only attributes.

    The rules are the same for every port — port conditions are ``destination_port``
    matchers inside them, as in Istio — so ``port`` is only checked.
    """
    if port is not None and (
        not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535
    ):
        raise ValueError(f"port must be 1..65535, got {port!r}")
    configs = _action_configs(wp, mesh, for_tcp=True)
    custom = network_custom_filters(wp, mesh)
    return [*custom, *(_network_filter(config) for config in configs if config)]


def _http_filter(config: Json) -> Json:
    return {"name": HTTP_RBAC, "typed_config": {"@type": HTTP_RBAC_TYPE, **config}}


def _network_filter(config: Json) -> Json:
    typed = {"@type": NETWORK_RBAC_TYPE, "stat_prefix": TCP_STAT_PREFIX, **config}
    return {"name": NETWORK_RBAC, "typed_config": typed}


def _action_configs(wp: WorkloadPolicy, mesh: MeshPolicy, *, for_tcp: bool) -> list[Json | None]:
    authz = wp.authz
    return [
        _rbac_config(mesh, m.Action.AUDIT, authz.audit.policies, (), for_tcp),
        _rbac_config(
            mesh, m.Action.DENY, authz.deny.policies, authz.dry_run_deny.policies, for_tcp
        ),
        _rbac_config(
            mesh, m.Action.ALLOW, authz.allow.policies, authz.dry_run_allow.policies, for_tcp
        ),
    ]


def _rbac_config(
    mesh: MeshPolicy,
    action: m.Action,
    enforced: Sequence[Resource[Any]],
    dry_run: Sequence[Resource[Any]],
    for_tcp: bool,
) -> Json | None:
    if not enforced and not dry_run:
        return None
    envoy_action = _ENVOY_ACTION[action]
    config: Json = {}
    if enforced:
        config["rules"] = _rbac(envoy_action, _merged(mesh, enforced, action, for_tcp))
    if dry_run:
        config["shadow_rules"] = _rbac(envoy_action, _merged(mesh, dry_run, action, for_tcp))
    # Istio names the prefix after the shadow rules' action, and falls back to the ALLOW
    # prefix when there are none (a nil RBAC's action reads as ALLOW); kept for parity.
    dry_deny = dry_run and action is m.Action.DENY
    config["shadow_rules_stat_prefix"] = DRY_RUN_DENY_PREFIX if dry_deny else DRY_RUN_ALLOW_PREFIX
    return config


def _rbac(action: str, policies: dict[str, Json]) -> Json:
    return {"action": action, "policies": policies}


def _merged(
    mesh: MeshPolicy, policies: Iterable[Resource[Any]], action: m.Action, for_tcp: bool
) -> dict[str, Json]:
    merged: dict[str, Json] = {}
    for policy in policies:
        merged.update(_remembered_rules(mesh, policy, action, for_tcp))
    return dict(sorted(merged.items()))


@dataclass(frozen=True, slots=True)
class _CustomPlan:
    """One provider's CUSTOM rules on a workload, and the provider if it can be used."""

    rules: dict[str, Json]  # istio-ext-authz-<provider>-ns[..]-policy[..]-rule[..] → policy
    provider: ExtAuthzProvider | None

    def denied(self) -> dict[str, Json]:
        return {f"{name}{_BAD_CUSTOM_SUFFIX}": p for name, p in self.rules.items()}


def _custom_plans(wp: WorkloadPolicy, mesh: MeshPolicy, *, for_tcp: bool) -> list[_CustomPlan]:
    plans = []
    for custom in custom_providers(wp, mesh):
        prefix = f"{_EXT_AUTHZ_PREFIX}-{custom.name}-" if custom.name else f"{_EXT_AUTHZ_PREFIX}-"
        rules = _merged(mesh, custom.policies, m.Action.CUSTOM, for_tcp)
        named = {f"{prefix}{rule}": p for rule, p in rules.items()}
        plans.append(_CustomPlan(dict(sorted(named.items())), custom.provider))
    return plans


def _remembered_rules(
    mesh: MeshPolicy, policy: Resource[Any], action: m.Action, for_tcp: bool
) -> dict[str, Json]:
    remembered = _POLICY_RULES.table(mesh)
    # The mesh holds every policy for its lifetime, so id() is a stable key here.
    key = (id(policy), action, for_tcp)
    found = remembered.get(key)
    if found is None:
        compiled = rule_trees(mesh, policy, for_tcp=for_tcp, action=action)
        found = remembered[key] = envoy_policies(compiled)
    return found


_POLICY_RULES: Derived[MeshPolicy, tuple[int, m.Action, bool], dict[str, Json]] = Derived(
    "envoy rbac policies"
)


# --- one policy -----------------------------------------------------------------------


def policy_rules(
    policy: Resource[Any], bundle: TrustBundle, action: m.Action, *, for_tcp: bool
) -> dict[str, Json]:
    """The Envoy RBAC policies (name → Policy) of one AuthorizationPolicy, built for
    ``action`` (its own, or CUSTOM / dry-run handled as the caller decides)."""
    return envoy_policies(compile_rules(policy, bundle, for_tcp=for_tcp, action=action))


def envoy_policies(compiled: CompiledRules) -> dict[str, Json]:
    """The Envoy RBAC policies (name → Policy) of one policy's rule trees."""
    if compiled.match_never is not None:
        return {compiled.match_never: _MATCH_NEVER}
    return {tree.name: mt.policy(tree) for tree in compiled.rules}
