"""Each AuthorizationPolicy's rule trees, compiled once per mesh and read by everyone.

:func:`~trustmesh.policy.compose.compile_mesh` compiles every selected policy for HTTP and
TCP chains with its own action and leaves the trees here; the evaluator's rules are built
from the same trees, and the Envoy RBAC translation (:mod:`trustmesh.xds.rbac`) reads them
with :func:`rule_trees` instead of compiling again. A tree for another action (a CUSTOM
policy's rules, ...) is compiled on first use and kept for the mesh's lifetime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trustmesh.api import models as m
from trustmesh.api.resources import Resource
from trustmesh.policy.derived import Derived
from trustmesh.policy.rule_tree import CompiledRules, compile_rules

if TYPE_CHECKING:
    from trustmesh.policy.compose import MeshPolicy

__all__ = ["RULE_TREES", "TreeKey", "rule_trees", "tree_key"]

# (id of a policy the mesh holds, the action compiled for, for_tcp). The mesh holds its
# policies for its lifetime, so the id is stable while the table exists; the trust
# bundle is the mesh's own.
TreeKey = tuple[int, m.Action, bool]
RULE_TREES: Derived[MeshPolicy, TreeKey, CompiledRules] = Derived("rule trees")


def tree_key(policy: Resource[Any], *, for_tcp: bool, action: m.Action | None = None) -> TreeKey:
    spec: m.AuthorizationPolicySpec = policy.spec
    return (id(policy), action or spec.action, for_tcp)


def rule_trees(
    mesh: MeshPolicy,
    policy: Resource[Any],
    *,
    for_tcp: bool,
    action: m.Action | None = None,
) -> CompiledRules:
    """``policy``'s trees in ``mesh`` (one of the mesh's own policies) for HTTP or TCP
    chains, built for ``action`` (default: the policy's own)."""
    table = RULE_TREES.table(mesh)
    key = tree_key(policy, for_tcp=for_tcp, action=action)
    found = table.get(key)
    if found is None:
        found = table[key] = compile_rules(policy, mesh.bundle, for_tcp=for_tcp, action=key[1])
    return found
