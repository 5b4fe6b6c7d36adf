"""Documents → typed resources, with every problem reported at its file:line and field.

Pure: callers hand in ``(name, bytes)`` pairs; reading files is the caller's business
(see :mod:`trustmesh.sources`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from trustmesh.api import expected, kinds
from trustmesh.api import models as m
from trustmesh.api.applied import last_applied, last_applied_unknown
from trustmesh.api.diagnostics import Diagnostic, Location, error, warning
from trustmesh.api.gateway_models import SecretObject
from trustmesh.api.resources import Resource, UnknownResource
from trustmesh.api.traffic import EnvoyFilterSpec
from trustmesh.api.yamldoc import FieldPath, Item, YamlDocument, decode_text, iter_yaml

TEST_GROUP = "trustmesh.dev"
# Top-level keys of Istio's Helm charts' values (base, istiod, cni, ztunnel, gateway(s))
# and of its helm-profiles: a document with no apiVersion, metadata or spec that sets
# some of these is a values file (`helm install -f`), not a broken resource.
HELM_VALUE_KEYS = frozenset(
    {
        "_internal_defaults_do_not_set",
        "global",
        "pilot",
        "meshConfig",
        "cni",
        "istio_cni",
        "sidecarInjectorWebhook",
        "sidecarInjectorWebhookAnnotations",
        "components",
        "telemetry",
        "gateways",
        "revision",
        "revisionTags",
        "base",
        "defaults",
        "defaultRevision",
        "istiodRemote",
        "ztunnel",
        "profile",
        "experimental",
        "resourceQuotas",
        "seLinuxOptions",
        "trustedZtunnelName",
        "trustedZtunnelNamespace",
        "configMap",
        "ambient",
        "cniBinDir",
        "cniConfDir",
        "chained",
        "provider",
        "hub",
        "tag",
        "variant",
        "autoscaleEnabled",
        "replicaCount",
        "env",
        "service",
        "networkGateway",
        "podAnnotations",
        "podLabels",
        "resources",
        "xdsAddress",
        "caAddress",
        "istioNamespace",
        "multiCluster",
        "network",
    }
)
# MeshConfig fields a bare mesh config document (the `istio` ConfigMap's `mesh`) sets.
_MESH_CONFIG_KEYS = frozenset(
    {
        "defaultConfig",
        "trustDomain",
        "trustDomainAliases",
        "rootNamespace",
        "outboundTrafficPolicy",
        "enableAutoMtls",
        "extensionProviders",
        "accessLogFile",
        "pathNormalization",
        "networks",
    }
)
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class KindInfo:
    """How trustmesh reads a kind it models; served versions come from :mod:`kinds`."""

    model: type[BaseModel]
    payload: str | None = "spec"  # None: the model reads the whole object
    namespaced: bool = True
    name_required: bool = True


KINDS: dict[tuple[str, str], KindInfo] = {
    ("security.istio.io", "PeerAuthentication"): KindInfo(m.PeerAuthenticationSpec),
    ("security.istio.io", "RequestAuthentication"): KindInfo(m.RequestAuthenticationSpec),
    ("security.istio.io", "AuthorizationPolicy"): KindInfo(m.AuthorizationPolicySpec),
    ("networking.istio.io", "DestinationRule"): KindInfo(m.DestinationRuleSpec),
    ("networking.istio.io", "ServiceEntry"): KindInfo(m.ServiceEntrySpec),
    ("networking.istio.io", "WorkloadEntry"): KindInfo(m.WorkloadEntrySpec),
    ("networking.istio.io", "WorkloadGroup"): KindInfo(m.WorkloadGroupSpec),
    ("networking.istio.io", "Sidecar"): KindInfo(m.SidecarSpec),
    ("networking.istio.io", "Gateway"): KindInfo(m.HostsSpec),
    ("networking.istio.io", "VirtualService"): KindInfo(m.HostsSpec),
    ("networking.istio.io", "EnvoyFilter"): KindInfo(EnvoyFilterSpec),
    ("", "Namespace"): KindInfo(m.Empty, None, namespaced=False),
    ("", "ServiceAccount"): KindInfo(m.Empty, None),
    ("", "Pod"): KindInfo(m.PodObject, None),
    ("", "Service"): KindInfo(m.ServiceSpec),
    ("", "ConfigMap"): KindInfo(m.ConfigMapObject, None),
    # credentialName of Gateway servers (trustmesh.api.gateway reads tls.crt / tls.key)
    ("", "Secret"): KindInfo(SecretObject, None, name_required=False),  # generateName
    ("apps", "Deployment"): KindInfo(m.WorkloadControllerSpec),
    ("apps", "StatefulSet"): KindInfo(m.WorkloadControllerSpec),
    ("apps", "DaemonSet"): KindInfo(m.WorkloadControllerSpec),
    # istioctl reads IstioOperator files (Istio's own profiles have no metadata at all).
    ("install.istio.io", "IstioOperator"): KindInfo(m.IstioOperatorSpec, name_required=False),
}
assert all(kinds.is_served(group, kind) for group, kind in KINDS)


@dataclass(slots=True)
class LoadResult:
    """Everything read from the input, in input order, and every problem found."""

    resources: list[Resource[Any]] = field(default_factory=list)
    unknown: list[UnknownResource] = field(default_factory=list)
    test_documents: list[tuple[YamlDocument, FieldPath]] = field(default_factory=list)
    helm_values: list[YamlDocument] = field(default_factory=list)
    diagnostics: list[Diagnostic] = field(default_factory=list)
    # Earlier documents of an object defined again later (kept only to be validated).
    replaced: list[Resource[Any]] = field(default_factory=list)

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.is_error]

    def kept_count(self) -> int:
        """How many raw documents or objects are kept as they were written."""
        return len(self.unknown) + len(self.test_documents) + len(self.helm_values)


class SourceCache:
    """What each source file loaded to, by name and content: a control plane that reloads
    after one file changed parses only that file again. Results are immutable values, so
    sharing them between loads is safe; entries for content no longer seen are dropped."""

    def __init__(self) -> None:
        # Keyed by the bytes themselves: a store's mirror hands the same bytes objects
        # again for unchanged files, whose hash Python keeps (no digest of 5,000 files
        # per reload) and whose equality is then identity.
        self._entries: dict[tuple[str, bytes, str], LoadResult] = {}
        self._used: set[tuple[str, bytes, str]] = set()
        # A file's resources numbered from an offset (their order among all sources):
        # the same objects again while neither the file nor what precedes it changes.
        self._placed: dict[tuple[tuple[str, bytes, str], int], list[Resource[Any]]] = {}

    def load(self, name: str, data: bytes, default_namespace: str) -> LoadResult:
        return self._load(self._key(name, data, default_namespace), name, data, default_namespace)

    def load_at(
        self, name: str, data: bytes, default_namespace: str, offset: int
    ) -> tuple[LoadResult, list[Resource[Any]]]:
        """:meth:`load`, and its resources with ``order`` counted from ``offset``."""
        key = self._key(name, data, default_namespace)
        one = self._load(key, name, data, default_namespace)
        placed = self._placed.get((key, offset))
        if placed is None:
            placed = self._placed[(key, offset)] = _placed(one.resources, offset)
        return one, placed

    def _key(self, name: str, data: bytes, default_namespace: str) -> tuple[str, bytes, str]:
        return (name, bytes(data), default_namespace)

    def _load(
        self, key: tuple[str, bytes, str], name: str, data: bytes, default_namespace: str
    ) -> LoadResult:
        self._used.add(key)
        found = self._entries.get(key)
        if found is None:
            found = self._entries[key] = _load_source(name, data, default_namespace)
        return found

    def forget_unused(self) -> None:
        """Drop what the loads since the last call did not ask for."""
        self._entries = {k: v for k, v in self._entries.items() if k in self._used}
        self._placed = {k: v for k, v in self._placed.items() if k[0] in self._used}
        self._used = set()


def _placed(resources: Sequence[Resource[Any]], offset: int) -> list[Resource[Any]]:
    return [
        r if r.order == offset + i else dataclasses.replace(r, order=offset + i)
        for i, r in enumerate(resources)
    ]


Parse = Callable[[str, str], Iterable[Item]]


def load_sources(
    sources: Iterable[tuple[str, bytes]],
    default_namespace: str = "default",
    cache: SourceCache | None = None,
    parse: Parse = iter_yaml,
    progress: Progress | None = None,
) -> LoadResult:
    """Parse and type every document of every source. Never raises on bad input.

    An object defined twice is kept once, as ``kubectl apply`` leaves it (see
    :mod:`trustmesh.api.applied`). ``parse`` reads one source's text (a caller may read
    large files in parallel; the result must be :func:`iter_yaml`'s). ``progress`` is
    told how many characters of input were read so far, now and then."""
    result = LoadResult()
    done = 0
    for name, data in sources:
        offset = len(result.resources)  # "oldest wins" counts positions over all sources
        if cache is None:
            report = None if progress is None else _Reporter(progress, done)
            one = _load_source(name, data, default_namespace, parse, report)
            result.resources += _placed(one.resources, offset)
        else:
            one, placed = cache.load_at(name, data, default_namespace, offset)
            result.resources += placed
        result.unknown += one.unknown
        result.test_documents += one.test_documents
        result.helm_values += one.helm_values
        result.diagnostics += one.diagnostics
        done += len(data)
        if progress is not None:
            progress(done)
    result.resources, result.replaced, problems = last_applied(result.resources)
    result.diagnostics += problems
    result.unknown, _, problems = last_applied_unknown(result.unknown)
    result.diagnostics += problems
    result.diagnostics.sort(key=Diagnostic.sort_key)
    return result


Progress = Callable[[int], None]


class _Reporter:
    """Tells ``progress`` where the reading is, every few hundred documents."""

    __slots__ = ("base", "count", "progress")
    EVERY = 256

    def __init__(self, progress: Progress, base: int) -> None:
        self.progress, self.base, self.count = progress, base, 0

    def document(self, document: YamlDocument) -> None:
        self.count += 1
        if self.count % self.EVERY == 0:
            self.progress(self.base + document.origin.end)


def _load_source(
    name: str,
    data: bytes,
    default_namespace: str,
    parse: Parse = iter_yaml,
    report: _Reporter | None = None,
) -> LoadResult:
    result = LoadResult()
    text, problems = decode_text(data, name)
    result.diagnostics.extend(problems)
    if text is None:
        return result
    for item in parse(text, name):
        if isinstance(item, Diagnostic):
            result.diagnostics.append(item)
        elif isinstance(item, YamlDocument):
            _load_document(item, default_namespace, result)
            if report is not None:
                report.document(item)
        else:  # a syntax error: the stream is read again part by part
            result = LoadResult(diagnostics=list(problems))
    return result


def _load_document(document: YamlDocument, default_namespace: str, result: LoadResult) -> None:
    typed, kept = len(result.resources), result.kept_count()
    _load_object(document, document.body, (), default_namespace, result)
    document.drop_tree()  # positions found while loading; later lookups compose again
    added = result.resources[typed:]
    if added and kept == result.kept_count() and all(_fully_typed(r) for r in added):
        document.release_body()  # its models hold everything it said


def _fully_typed(resource: Resource[Any]) -> bool:
    """The model reads every field (unknown ones are errors), so the raw value adds
    nothing; loosely modelled kinds (Pods, Services…) keep theirs for the analyzer."""
    return isinstance(resource.spec, m.Strict)


def _load_object(
    document: YamlDocument, body: Any, base: FieldPath, default_ns: str, result: LoadResult
) -> None:
    if not isinstance(body, dict):
        result.diagnostics.append(
            error(
                "not-an-object",
                document.location(base),
                f"expected a Kubernetes object, got {_kind_of(body)}",
            )
        )
        return
    api_version, kind = body.get("apiVersion"), body.get("kind")
    if not base and _is_helm_values(body):
        result.helm_values.append(document)
        return
    if not isinstance(api_version, str) or not api_version:
        message = "apiVersion is required"
        if not base and not body.keys().isdisjoint(_MESH_CONFIG_KEYS):
            message += " (a MeshConfig file? pass it with --mesh-config)"
        result.diagnostics.append(
            error("missing-field", document.location((*base, "apiVersion")), message)
        )
        return
    if not isinstance(kind, str) or not kind:
        result.diagnostics.append(
            error("missing-field", document.location((*base, "kind")), "kind is required")
        )
        return
    if kind == "List" or (kind.endswith("List") and "items" in body):
        # kubectl flattens v1 List and any <Kind>List (a `kubectl get -o yaml` dump).
        items = body.get("items")
        if items is None:
            return
        if not isinstance(items, list):
            result.diagnostics.append(
                error(
                    "invalid-field",
                    document.location((*base, "items")),
                    f"expected a list of objects, got {_kind_of(items)}",
                )
            )
            return
        for index, item in enumerate(items):
            _load_object(document, item, (*base, "items", index), default_ns, result)
        return
    group, _, version = api_version.rpartition("/")
    if group == TEST_GROUP:
        result.test_documents.append((document, base))
        return
    refusal = kinds.check(api_version, kind)
    if refusal is not None:
        where_field = document.location((*base, refusal.field))
        if refusal.is_error:
            result.diagnostics.append(error(refusal.code, where_field, refusal.message))
            return
        result.diagnostics.append(warning(refusal.code, where_field, refusal.message))
    info = KINDS.get((group, kind))
    metadata = body.get("metadata")
    if info is None:
        name, namespace = _name_and_namespace(metadata)
        where = document.location(base)
        result.unknown.append(
            UnknownResource(
                api_version, kind, name, namespace or default_ns, where, body, document, base
            )
        )
        return
    if metadata is None and not info.name_required:
        metadata = {}
    meta, meta_problems = _validate(m.ObjectMeta, metadata, document, (*base, "metadata"))
    if meta is not None and not meta.name and info.name_required:
        meta, meta_problems = (
            None,
            [error("missing-field", document.location((*base, "metadata", "name")), "is required")],
        )
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


def _is_helm_values(body: dict[str, Any]) -> bool:
    """A Helm values document: no Kubernetes object fields, some of Istio's value keys."""
    if "apiVersion" in body or "metadata" in body or "spec" in body:
        return False
    return not body.keys().isdisjoint(HELM_VALUE_KEYS)


def _name_and_namespace(metadata: Any) -> tuple[str, str | None]:
    if not isinstance(metadata, dict):
        return "?", None
    name, namespace = metadata.get("name"), metadata.get("namespace")
    return (
        name if isinstance(name, str) and name else "?",
        namespace if isinstance(namespace, str) and namespace else None,
    )


@dataclass(frozen=True, slots=True)
class IgnoredKind:
    """Resources of one kind and apiVersion that trustmesh kept but does not read."""

    api_version: str
    kind: str
    locations: tuple[Location, ...]
    known: bool  # served by Istio or Kubernetes (not modelled) vs. a kind unknown here

    @property
    def count(self) -> int:
        return len(self.locations)

    @property
    def reason(self) -> str:
        return "not modelled by trustmesh" if self.known else "unknown kind, not checked"

    def as_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "apiVersion": self.api_version,
            "count": self.count,
            "reason": self.reason,
            "locations": [{"file": loc.file, "line": loc.line} for loc in self.locations],
        }


def ignored_kinds(unknown: Iterable[UnknownResource]) -> list[IgnoredKind]:
    """The kept-but-ignored resources grouped by kind and apiVersion, unknown kinds first."""
    groups: dict[tuple[str, str], list[Location]] = {}
    for u in unknown:
        groups.setdefault((u.api_version, u.kind), []).append(u.location)
    out = [
        IgnoredKind(
            api_version,
            kind,
            tuple(locations),
            kinds.is_served(api_version.rpartition("/")[0], kind),
        )
        for (api_version, kind), locations in groups.items()
    ]
    return sorted(out, key=lambda i: (i.known, i.kind, i.api_version))


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
        problems: dict[FieldPath, Diagnostic] = {}
        for err in exc.errors():
            loc, problem = _pydantic_problem(model, err, document, path)
            problems.setdefault(loc, problem)  # a union reports once per member type
        return None, list(problems.values())


def _pydantic_problem(
    model: type[BaseModel], err: Any, document: YamlDocument, base: FieldPath
) -> tuple[FieldPath, Diagnostic]:
    """One pydantic error in YAML terms: what was expected where, and what was given."""
    raw: tuple[Any, ...] = err["loc"]
    is_key = "[key]" in raw
    loc: FieldPath = tuple(p for p in raw if isinstance(p, str | int) and p != "[key]")
    kind = err["type"]
    if kind == "extra_forbidden":
        names = expected.field_names(model, loc[:-1])
        unknown = str(loc[-1]) if loc else ""
        message = f"unknown field {unknown!r}"
        close = expected.closest_field(unknown, names)
        if close is not None:
            message += f"; did you mean {close}?"
        return loc, error("unknown-field", document.location((*base, *loc)), message)
    # Pydantic appends the tried member of a union to the location ("int", "str"): not
    # a field. Drop trailing parts until the location names a field of the model.
    while loc and isinstance(loc[-1], str) and expected.expected_at(model, loc) is None:
        loc = loc[:-1]
    location = document.location((*base, *loc))
    if kind == "missing":
        return loc, error("missing-field", location, "is required")
    given = err.get("input")
    if kind == "value_error":
        text = str(err.get("msg", "")).removeprefix("Value error, ")
        return loc, error("invalid-field", location, text)
    if kind == "string_too_short" and isinstance(given, str) and given == "":
        return loc, error("invalid-field", location, "must not be empty")
    wanted = expected.expected_at(model, loc, key=is_key)
    shown = expected.yaml_short(given)
    if isinstance(given, dict | list):
        shown = f"{expected.kind_of(given)} {shown}"
    if wanted is None:
        return loc, error("invalid-field", location, f"invalid value {shown}")
    what = "key" if is_key else ""
    return loc, error(
        "invalid-field", location, f"expected {wanted}{' as ' + what if what else ''}, got {shown}"
    )


def _kind_of(value: Any) -> str:
    return expected.kind_of(value)


__all__ = [
    "KINDS",
    "IgnoredKind",
    "LoadResult",
    "Location",
    "ignored_kinds",
    "load_sources",
    "validate_model",
]
