"""Documents → typed resources, with every problem reported at its file:line and field.

Pure: callers hand in ``(name, bytes)`` pairs; reading files is the caller's business
(see :mod:`trustmesh.sources`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from trustmesh.api import models as m
from trustmesh.api.diagnostics import Diagnostic, Location, error
from trustmesh.api.resources import Resource, UnknownResource
from trustmesh.api.yamldoc import FieldPath, YamlDocument, decode_text, parse_yaml

TEST_GROUP = "trustmesh.dev"
# Top-level keys of Istio's Helm values (istiod / base / cni charts): a document with no
# apiVersion/kind made of these is a values file, not a broken resource.
HELM_VALUE_KEYS = frozenset(
    {
        "global",
        "pilot",
        "meshConfig",
        "cni",
        "istio_cni",
        "sidecarInjectorWebhook",
        "components",
        "telemetry",
        "gateways",
        "revision",
        "base",
        "defaults",
        "istiodRemote",
        "ztunnel",
        "profile",
    }
)
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class KindInfo:
    model: type[BaseModel]
    versions: frozenset[str]
    payload: str | None = "spec"  # None: the model reads the whole object
    namespaced: bool = True


_ISTIO_SECURITY = frozenset({"v1", "v1beta1"})
_ISTIO_NETWORKING = frozenset({"v1", "v1beta1", "v1alpha3"})
_V1 = frozenset({"v1"})

KINDS: dict[tuple[str, str], KindInfo] = {
    ("security.istio.io", "PeerAuthentication"): KindInfo(
        m.PeerAuthenticationSpec, _ISTIO_SECURITY
    ),
    ("security.istio.io", "RequestAuthentication"): KindInfo(
        m.RequestAuthenticationSpec, _ISTIO_SECURITY
    ),
    ("security.istio.io", "AuthorizationPolicy"): KindInfo(
        m.AuthorizationPolicySpec, _ISTIO_SECURITY
    ),
    ("networking.istio.io", "DestinationRule"): KindInfo(m.DestinationRuleSpec, _ISTIO_NETWORKING),
    ("networking.istio.io", "ServiceEntry"): KindInfo(m.ServiceEntrySpec, _ISTIO_NETWORKING),
    ("networking.istio.io", "WorkloadEntry"): KindInfo(m.WorkloadEntrySpec, _ISTIO_NETWORKING),
    ("networking.istio.io", "Sidecar"): KindInfo(m.SidecarSpec, _ISTIO_NETWORKING),
    ("networking.istio.io", "Gateway"): KindInfo(m.HostsSpec, _ISTIO_NETWORKING),
    ("networking.istio.io", "VirtualService"): KindInfo(m.HostsSpec, _ISTIO_NETWORKING),
    ("", "Namespace"): KindInfo(m.Empty, _V1, None, namespaced=False),
    ("", "ServiceAccount"): KindInfo(m.Empty, _V1, None),
    ("", "Pod"): KindInfo(m.PodObject, _V1, None),
    ("", "Service"): KindInfo(m.ServiceSpec, _V1),
    ("", "ConfigMap"): KindInfo(m.ConfigMapObject, _V1, None),
    ("apps", "Deployment"): KindInfo(m.WorkloadControllerSpec, _V1),
    ("apps", "StatefulSet"): KindInfo(m.WorkloadControllerSpec, _V1),
    ("apps", "DaemonSet"): KindInfo(m.WorkloadControllerSpec, _V1),
    ("install.istio.io", "IstioOperator"): KindInfo(m.IstioOperatorSpec, frozenset({"v1alpha1"})),
}


@dataclass(slots=True)
class LoadResult:
    """Everything read from the input, in input order, and every problem found."""

    resources: list[Resource[Any]] = field(default_factory=list)
    unknown: list[UnknownResource] = field(default_factory=list)
    test_documents: list[tuple[YamlDocument, FieldPath]] = field(default_factory=list)
    helm_values: list[YamlDocument] = field(default_factory=list)
    diagnostics: list[Diagnostic] = field(default_factory=list)

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.is_error]


class SourceCache:
    """What each source file loaded to, by name and content: a control plane that reloads
    after one file changed parses only that file again. Results are immutable values, so
    sharing them between loads is safe; entries for content no longer seen are dropped."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, bytes], LoadResult] = {}
        self._used: set[tuple[str, bytes]] = set()

    def load(self, name: str, data: bytes, default_namespace: str) -> LoadResult:
        key = (name, hashlib.sha256(data).digest() + default_namespace.encode())
        self._used.add(key)
        found = self._entries.get(key)
        if found is None:
            found = self._entries[key] = _load_source(name, data, default_namespace)
        return found

    def forget_unused(self) -> None:
        """Drop what the loads since the last call did not ask for."""
        self._entries = {k: v for k, v in self._entries.items() if k in self._used}
        self._used = set()


def load_sources(
    sources: Iterable[tuple[str, bytes]],
    default_namespace: str = "default",
    cache: SourceCache | None = None,
) -> LoadResult:
    """Parse and type every document of every source. Never raises on bad input."""
    result = LoadResult()
    for name, data in sources:
        if cache is None:
            one = _load_source(name, data, default_namespace)
        else:
            one = cache.load(name, data, default_namespace)
        offset = len(result.resources)  # "oldest wins" counts positions over all sources
        result.resources += [
            r if r.order == offset + i else dataclasses.replace(r, order=offset + i)
            for i, r in enumerate(one.resources)
        ]
        result.unknown += one.unknown
        result.test_documents += one.test_documents
        result.helm_values += one.helm_values
        result.diagnostics += one.diagnostics
    result.diagnostics.sort(key=Diagnostic.sort_key)
    return result


def _load_source(name: str, data: bytes, default_namespace: str) -> LoadResult:
    result = LoadResult()
    text, problems = decode_text(data, name)
    result.diagnostics.extend(problems)
    if text is None:
        return result
    documents, problems = parse_yaml(text, name)
    result.diagnostics.extend(problems)
    for document in documents:
        _load_object(document, document.body, (), default_namespace, result)
    return result


def _load_object(
    document: YamlDocument, body: Any, base: FieldPath, default_ns: str, result: LoadResult
) -> None:
    where = document.location(base)
    if not isinstance(body, dict):
        result.diagnostics.append(
            error("not-an-object", where, f"expected a Kubernetes object, got {_kind_of(body)}")
        )
        return
    api_version, kind = body.get("apiVersion"), body.get("kind")
    if (
        api_version is None
        and kind is None
        and not base
        and body
        and (body.keys() <= HELM_VALUE_KEYS)
    ):
        result.helm_values.append(document)
        return
    if not isinstance(api_version, str) or not api_version:
        result.diagnostics.append(
            error(
                "missing-field", document.location((*base, "apiVersion")), "apiVersion is required"
            )
        )
        return
    if not isinstance(kind, str) or not kind:
        result.diagnostics.append(
            error("missing-field", document.location((*base, "kind")), "kind is required")
        )
        return
    if kind == "List" and api_version == "v1":
        items = body.get("items")
        if not isinstance(items, list):
            result.diagnostics.append(
                error("invalid-field", document.location((*base, "items")), "items must be a list")
            )
            return
        for index, item in enumerate(items):
            _load_object(document, item, (*base, "items", index), default_ns, result)
        return
    group, _, version = api_version.rpartition("/")
    if group == TEST_GROUP:
        result.test_documents.append((document, base))
        return
    info = KINDS.get((group, kind))
    metadata = body.get("metadata")
    meta, meta_problems = _validate(m.ObjectMeta, metadata, document, (*base, "metadata"))
    if info is None:
        name = meta.name if meta else "?"
        namespace = (meta.namespace if meta else None) or default_ns
        result.unknown.append(
            UnknownResource(api_version, kind, name, namespace, where, body, document, base)
        )
        return
    if version not in info.versions:
        served = ", ".join(sorted(f"{group}/{v}" if group else v for v in info.versions))
        result.diagnostics.append(
            error(
                "unsupported-version",
                document.location((*base, "apiVersion")),
                f"{api_version} is not a served version of {kind} (served: {served})",
            )
        )
        return
    payload_path: FieldPath = (info.payload,) if info.payload else ()
    payload = body.get(info.payload, {}) if info.payload else body
    if payload is None:
        payload = {}
    spec, spec_problems = _validate(info.model, payload, document, (*base, *payload_path))
    result.diagnostics.extend(meta_problems)
    result.diagnostics.extend(spec_problems)
    if meta is None or spec is None:
        return
    namespace = (meta.namespace or default_ns) if info.namespaced else ""
    result.resources.append(
        Resource(
            group=group,
            version=version,
            kind=kind,
            name=meta.name,
            namespace=namespace,
            labels=meta.labels,
            annotations=meta.annotations,
            creation_timestamp=meta.creation_timestamp,
            order=len(result.resources),
            spec=spec,
            document=document,
            base_path=base,
            spec_path=payload_path,
        )
    )


def validate_model(
    model: type[M], value: Any, document: YamlDocument, path: FieldPath
) -> tuple[M | None, list[Diagnostic]]:
    """Validate ``value`` against ``model``; problems carry the document's positions."""
    return _validate(model, value, document, path)


def _validate(
    model: type[M], value: Any, document: YamlDocument, path: FieldPath
) -> tuple[M | None, list[Diagnostic]]:
    if value is None:
        return None, [error("missing-field", document.location(path), "is required")]
    if not isinstance(value, dict):
        return None, [
            error(
                "invalid-field",
                document.location(path),
                f"expected a mapping, got {_kind_of(value)}",
            )
        ]
    try:
        return model.model_validate(value), []
    except ValidationError as exc:
        return None, [_pydantic_problem(e, document, path) for e in exc.errors()]


def _pydantic_problem(err: Any, document: YamlDocument, base: FieldPath) -> Diagnostic:
    loc: FieldPath = tuple(p for p in err["loc"] if isinstance(p, str | int) and p != "[key]")
    # Pydantic appends the tried type to union locations ("int", "str"): not a field.
    while loc and isinstance(loc[-1], str) and loc[-1] in {"int", "str", "constrained-int"}:
        loc = loc[:-1]
    location = document.location((*base, *loc))
    kind = err["type"]
    if kind == "extra_forbidden":
        return error("unknown-field", location, "unknown field")
    if kind == "missing":
        return error("missing-field", location, "is required")
    message = err["msg"]
    if "input" in err and kind not in {"missing"}:
        message = f"{message} (got {_short(err['input'])})"
    return error("invalid-field", location, message)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind_of(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    return type(value).__name__


__all__ = ["KINDS", "LoadResult", "Location", "load_sources", "validate_model"]
