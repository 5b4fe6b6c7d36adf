"""``trustmesh harden``: the YAML that fixes findings with a mechanical fix, for review.

Each fixable finding carries its fix as YAML: whole resources (a PeerAuthentication, an
allow-nothing AuthorizationPolicy, a DestinationRule) or a ``meshConfig`` fragment. The
resources are emitted as they are (deduplicated); mesh fragments are merged into one
IstioOperator overlay, which ``istioctl install -f`` merges into the running config.
Nothing is applied: the output is written for a person to review.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml

from trustmesh.analyze.findings import Finding


@dataclass(slots=True)
class HardenPlan:
    resources: list[dict[str, Any]] = field(default_factory=list)
    mesh_config: dict[str, Any] = field(default_factory=dict)
    # resource key → rule IDs it fixes (or "implied calls" for an ALLOW that keeps them)
    reasons: dict[str, list[str]] = field(default_factory=dict)
    comments: dict[str, list[str]] = field(default_factory=dict)  # resource key → lines
    skipped: list[Finding] = field(default_factory=list)

    def render(self) -> str:
        chunks: list[str] = []
        for resource in self.resources:
            key = resource_key(resource)
            reasons = sorted(set(self.reasons[key]))
            rules = [r for r in reasons if r.startswith("TM-")]
            header = f"# fixes {', '.join(rules)}\n" if rules else ""
            if "recorded traffic" in reasons:
                header += "# least privilege from recorded traffic (proven by replay)\n"
            elif len(rules) < len(reasons):
                header += "# keeps calls the inputs imply working under the fixes above\n"
            header += "".join(f"# {line}\n" for line in self.comments.get(key, ()))
            chunks.append(header + yaml.safe_dump(resource, sort_keys=False))
        if self.mesh_config:
            overlay = {
                "apiVersion": "install.istio.io/v1alpha1",
                "kind": "IstioOperator",
                "metadata": {"name": "trustmesh-harden", "namespace": "istio-system"},
                "spec": {"meshConfig": self.mesh_config},
            }
            fixed = ", ".join(sorted(set(self.reasons.get("meshConfig", []))))
            chunks.append(
                f"# fixes {fixed}\n# merge into your install: istioctl install -f <this file>\n"
                + yaml.safe_dump(overlay, sort_keys=False)
            )
        return "---\n".join(chunks)


def plan(findings: Iterable[Finding]) -> HardenPlan:
    result = HardenPlan()
    seen: dict[str, dict[str, Any]] = {}
    for finding in findings:
        if not finding.rule.fixable or not finding.issue.fix:
            continue
        try:
            documents = [d for d in yaml.safe_load_all(finding.issue.fix) if d]
        except yaml.YAMLError:
            result.skipped.append(finding)
            continue
        for document in documents:
            if not isinstance(document, dict):
                result.skipped.append(finding)
            elif "kind" in document and "apiVersion" in document:
                if document.get("kind") == "IstioOperator":
                    mesh = (document.get("spec") or {}).get("meshConfig") or {}
                    _merge(result.mesh_config, mesh)
                    result.reasons.setdefault("meshConfig", []).append(finding.rule.id)
                    continue
                key = resource_key(document)
                if key not in seen:
                    seen[key] = document
                    result.resources.append(document)
                result.reasons.setdefault(key, []).append(finding.rule.id)
            elif "meshConfig" in document:
                _merge(result.mesh_config, document["meshConfig"])
                result.reasons.setdefault("meshConfig", []).append(finding.rule.id)
            else:
                result.skipped.append(finding)
    return result


def resource_key(document: dict[str, Any]) -> str:
    """``Kind/namespace/name`` of a resource document, as :attr:`Resource.key` spells it."""
    meta = document.get("metadata") or {}
    return f"{document.get('kind')}/{meta.get('namespace', '')}/{meta.get('name', '')}"


def _merge(into: dict[str, Any], fragment: dict[str, Any]) -> None:
    for key, value in fragment.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
