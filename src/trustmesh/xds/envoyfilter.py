"""EnvoyFilter (``networking.istio.io/v1alpha3``) applied to a sidecar's translated config.

A pure post-processing pass over :class:`~trustmesh.xds.translate.ProxyResources`, with
Istio's semantics (``pilot/pkg/networking/core/envoyfilter/``):

* which filters apply: those of the config root namespace and of the workload's namespace
  whose ``workloadSelector`` labels the workload carries (none: every workload there); a
  filter with ``targetRefs`` attaches to gateways / waypoints, never to a sidecar;
* in which order: ``priority`` (lower first), then the root namespace's first, then
  creation time, then name — patch by patch in that order;
* ``match.context``: SIDECAR_INBOUND patches the inbound listener, its routes and the
  ``inbound|`` clusters, SIDECAR_OUTBOUND the rest, ANY both; GATEWAY and WAYPOINT are
  valid and match no sidecar;
* ``listener.portNumber`` selects a listener by port, and on ``virtualInbound`` the filter
  chains for that destination port; ``filterChain.filter.name`` the network filter (HTTP
  filters live in ``envoy.filters.network.http_connection_manager``), ``subFilter.name``
  the HTTP filter; INSERT_BEFORE without a sub-filter inserts first, INSERT_AFTER last.

What Envoy actually gets is patched: trustmesh's HTTP policy filters are ECDS slots
(``trustmesh.authz.allow``, …) — a sub-filter name matches a slot by its own name or by
Istio's filter name for its type (``envoy.filters.http.rbac``, ``…jwt_authn``,
``…ext_authz``), and a MERGE on a slot merges into the extension config it is served;
inbound route configurations come over RDS and are patched there.

A patch Envoy would reject never reaches it. :func:`envoy_filter_diagnostics` checks every
patch value against Envoy's protos when the configuration is loaded (unknown ``@type``,
unknown field, bad value: the EnvoyFilter's file, line and field); :func:`apply_envoy_filters`
parses every resource a patch touched and raises :class:`EnvoyFilterRejected` (a
``ValueError``: the control plane keeps the proxy on its last configuration and reports it)
if a patch made one invalid.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from google.protobuf import any_pb2, descriptor, descriptor_pool, json_format

from trustmesh.api import traffic as t
from trustmesh.api.diagnostics import Diagnostic, Location, error, warning
from trustmesh.api.resources import Resource
from trustmesh.api.snapshot import ConfigSnapshot, Workload
from trustmesh.envoy_json import HCM_TYPE
from trustmesh.xds.cache import _ensure_types  # loads the *_pb2 module of an @type

if TYPE_CHECKING:
    from trustmesh.policy.compose import MeshPolicy
    from trustmesh.xds.translate import ProxyResources

__all__ = ["EnvoyFilterRejected", "apply_envoy_filters", "envoy_filter_diagnostics"]

_HCM_NAME = "envoy.filters.network.http_connection_manager"
# Accepted by Istio's validation with a warning, rejected by Envoy: a warning when the
# configuration loads, a refused proxy configuration when the patch applies.
_REFUSED_ON_APPLY = "envoy-would-reject"
_T = "type.googleapis.com/"
# The message each applyTo's patch value is (Istio's envoyfilter conversion).
_VALUE_TYPES: dict[t.ApplyTo, str] = {
    t.ApplyTo.LISTENER: "envoy.config.listener.v3.Listener",
    t.ApplyTo.NETWORK_FILTER: "envoy.config.listener.v3.Filter",
    t.ApplyTo.HTTP_FILTER: "envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter",
    t.ApplyTo.HTTP_ROUTE: "envoy.config.route.v3.Route",
    t.ApplyTo.CLUSTER: "envoy.config.cluster.v3.Cluster",
}
_SUPPORTED_OPERATIONS: dict[t.ApplyTo, frozenset[t.Operation]] = {
    t.ApplyTo.LISTENER: frozenset({t.Operation.MERGE, t.Operation.ADD, t.Operation.REMOVE}),
    t.ApplyTo.CLUSTER: frozenset({t.Operation.MERGE, t.Operation.ADD, t.Operation.REMOVE}),
    t.ApplyTo.NETWORK_FILTER: frozenset(t.Operation) - {t.Operation.INVALID},
    t.ApplyTo.HTTP_FILTER: frozenset(t.Operation) - {t.Operation.INVALID},
    t.ApplyTo.HTTP_ROUTE: frozenset(
        {
            t.Operation.ADD,
            t.Operation.MERGE,
            t.Operation.REMOVE,
            t.Operation.INSERT_BEFORE,
            t.Operation.INSERT_AFTER,
            t.Operation.INSERT_FIRST,
        }
    ),
}
# Istio's name for the filter an ECDS policy slot stands for (by slot name prefix); the
# request guards are trustmesh's own and answer to their slot names only.
_ISTIO_FILTER_NAMES = (
    ("trustmesh.authz.custom.", "envoy.filters.http.ext_authz"),
    ("trustmesh.authz.", "envoy.filters.http.rbac"),
    ("trustmesh.authn.jwt", "envoy.filters.http.jwt_authn"),
)
_TYPED_STRUCTS = frozenset({"udpa.type.v1.TypedStruct", "xds.type.v3.TypedStruct"})
# Well-known types with their own JSON form: ParseDict checks their values.
_OPAQUE = frozenset(
    {
        "google.protobuf.Duration",
        "google.protobuf.Timestamp",
        "google.protobuf.Struct",
        "google.protobuf.Value",
        "google.protobuf.ListValue",
        "google.protobuf.FieldMask",
        "google.protobuf.BoolValue",
        "google.protobuf.UInt32Value",
        "google.protobuf.UInt64Value",
        "google.protobuf.Int32Value",
        "google.protobuf.Int64Value",
        "google.protobuf.DoubleValue",
        "google.protobuf.FloatValue",
        "google.protobuf.StringValue",
        "google.protobuf.BytesValue",
    }
)


class EnvoyFilterRejected(ValueError):
    """A patch would give Envoy a configuration it rejects; nothing was pushed."""

    def __init__(self, diagnostics: Sequence[Diagnostic]) -> None:
        self.diagnostics = tuple(diagnostics)
        super().__init__("; ".join(str(d) for d in self.diagnostics))


@dataclasses.dataclass(frozen=True, slots=True)
class _Patch:
    """One configPatch of one EnvoyFilter, and where it was written."""

    resource: Resource[Any]
    index: int
    apply_to: t.ApplyTo
    match: t.PatchMatch
    operation: t.Operation
    value: dict[str, Any]

    def location(self, *path: str | int) -> Location:
        return self.resource.location("configPatches", self.index, *path)

    def value_location(self, path: Sequence[str | int] = ()) -> Location:
        return self.location("patch", "value", *path)

    def context_matches(self, inbound: bool) -> bool:
        wanted = t.PatchContext.SIDECAR_INBOUND if inbound else t.PatchContext.SIDECAR_OUTBOUND
        return self.match.context in (t.PatchContext.ANY, wanted)

    @property
    def listener(self) -> t.ListenerMatch | None:
        return self.match.listener

    @property
    def network_filter(self) -> str | None:
        chain = self.listener.filter_chain if self.listener else None
        return chain.filter.name if chain and chain.filter else None

    @property
    def sub_filter(self) -> str | None:
        chain = self.listener.filter_chain if self.listener else None
        if chain and chain.filter and chain.filter.sub_filter:
            return chain.filter.sub_filter.name
        return None


# ---------------------------------------------------------------------------- checking


def envoy_filter_diagnostics(snapshot: ConfigSnapshot) -> list[Diagnostic]:
    """Every EnvoyFilter patch trustmesh cannot apply or Envoy would reject (pure)."""
    problems: list[Diagnostic] = []
    for resource in snapshot.of_kind("EnvoyFilter"):
        for index, patch in enumerate(resource.spec.config_patches):
            problems += _patch_problems(resource, index, patch)
    return problems


def _patch_problems(resource: Resource[Any], index: int, patch: t.ConfigPatch) -> list[Diagnostic]:
    def at(*path: str | int) -> Location:
        return resource.location("configPatches", index, *path)

    if patch.apply_to is t.ApplyTo.INVALID:
        return [error("missing-field", at("applyTo"), "is required")]
    supported = _SUPPORTED_OPERATIONS.get(patch.apply_to)
    if supported is None:
        return [
            warning(
                "unsupported-field",
                at("applyTo"),
                f"{patch.apply_to.value} is not applied by trustmesh (it applies LISTENER, "
                "NETWORK_FILTER, HTTP_FILTER, HTTP_ROUTE and CLUSTER patches)",
            )
        ]
    if patch.patch is None or patch.patch.operation is t.Operation.INVALID:
        return [error("missing-field", at("patch", "operation"), "is required")]
    operation = patch.patch.operation
    if operation not in supported:
        return [
            warning(
                "ignored-field",
                at("patch", "operation"),
                f"{operation.value} on {patch.apply_to.value} is ignored (as istiod ignores it)",
            )
        ]
    if operation is t.Operation.REMOVE:
        return []
    if not patch.patch.value:
        return [error("missing-field", at("patch", "value"), f"is required for {operation.value}")]
    value = patch.patch.value
    filters = (t.ApplyTo.HTTP_FILTER, t.ApplyTo.NETWORK_FILTER)
    if (
        patch.apply_to in filters
        and operation is not t.Operation.MERGE
        and "typed_config" not in value
        and "config_discovery" not in value
    ):
        return [
            warning(
                _REFUSED_ON_APPLY,
                at("patch", "value"),
                "a filter without typed_config: Istio accepts it (deprecated), but Envoy finds "
                "a filter's implementation by its config type and rejects it; a proxy it "
                "applies to keeps its last configuration",
            )
        ]
    found = proto_problem(_VALUE_TYPES[patch.apply_to], value)
    if found is None:
        return []
    path, text = found
    if text.startswith("unknown field"):
        # Istio warns (its lenient parse drops the field); Envoy would get it here.
        text += "; a proxy it applies to keeps its last configuration"
        return [warning(_REFUSED_ON_APPLY, at("patch", "value", *path), text)]
    return [error("invalid-envoy-config", at("patch", "value", *path), text)]


def proto_problem(
    full_name: str, value: dict[str, Any]
) -> tuple[tuple[str | int, ...], str] | None:
    """Why Envoy would refuse ``value`` as a ``full_name`` message: (field path, reason)."""
    _ensure_types({"@type": _T + full_name})
    pool = descriptor_pool.Default()
    try:
        message = pool.FindMessageTypeByName(full_name)
    except KeyError:
        return (), f"unknown message type {full_name}"
    found = _walk_problem(message, value, ())
    if found is not None:
        return found
    try:
        _parse({"@type": _T + full_name, **value})
    except json_format.ParseError as exc:
        return _parse_error_path(str(exc)), _proto_error_text(str(exc))
    return None


def _parse_error_path(text: str) -> tuple[str | int, ...]:
    """The field a ParseDict error names (``… at Any.token_bucket.fill_interval.``)."""
    found = re.search(r" at Any\.([\w.\[\]]+?)\.?$", text)
    if found is None:
        return ()
    path: list[str | int] = []
    for part in filter(None, found.group(1).split(".")):
        name, _, index = part.partition("[")
        path.append(name)
        if index.rstrip("]").isdigit():
            path.append(int(index.rstrip("]")))
    return tuple(path)


def _parse(resource: dict[str, Any]) -> None:
    """ParseDict into Envoy's protos, the contents of TypedStructs included."""
    _ensure_types(resource)
    json_format.ParseDict(resource, any_pb2.Any())


def _proto_error_text(text: str) -> str:
    """ParseDict's reason without its nesting ("Failed to parse x field: …") and path."""
    reason = re.sub(r"^(?:Failed to parse \w+ field: )+", "", text)
    reason = re.sub(r" at Any\.[\w.\[\]]*\.?$", "", reason)
    return f"Envoy would reject it: {reason}"


def _resolve(type_url: str) -> descriptor.Descriptor | None:
    _ensure_types({"@type": type_url})
    try:
        return descriptor_pool.Default().FindMessageTypeByName(type_url.rpartition("/")[2])
    except KeyError:
        return None


def _walk_problem(
    message: descriptor.Descriptor, value: Any, path: tuple[str | int, ...]
) -> tuple[tuple[str | int, ...], str] | None:
    """The first unknown field or type in ``value`` read as ``message``, with its path."""
    if message.full_name in _OPAQUE or not isinstance(value, dict):
        return None
    if message.full_name == "google.protobuf.Any":
        type_url = value.get("@type")
        if not isinstance(type_url, str):
            return (*path, "@type"), "an Any needs an @type"
        inner = _resolve(type_url)
        if inner is None:
            return (*path, "@type"), f"unknown type {type_url!r}: Envoy has no such extension"
        body = {k: v for k, v in value.items() if k != "@type"}
        if inner.full_name in _TYPED_STRUCTS:
            struct_type = body.get("type_url", body.get("typeUrl"))
            if not isinstance(struct_type, str):
                return (*path, "type_url"), "a TypedStruct needs a type_url"
            wrapped = _resolve(struct_type)
            if wrapped is None:
                return (*path, "type_url"), f"unknown type {struct_type!r}"
            found = _walk_problem(wrapped, body.get("value", {}), (*path, "value"))
            if found is None:
                try:
                    _parse({"@type": _T + wrapped.full_name, **dict(body.get("value") or {})})
                except json_format.ParseError as exc:
                    inner_path = _parse_error_path(str(exc))
                    return (*path, "value", *inner_path), _proto_error_text(str(exc))
            return found
        return _walk_problem(inner, body, path)
    fields = {f.name: f for f in message.fields} | {f.json_name: f for f in message.fields}
    for key, item in value.items():
        field = fields.get(key)
        if field is None:
            return (*path, key), f"unknown field {key!r} in {message.full_name}"
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            if value_field.message_type is not None and isinstance(item, dict):
                for map_key, map_value in item.items():
                    found = _walk_problem(
                        value_field.message_type, map_value, (*path, key, str(map_key))
                    )
                    if found is not None:
                        return found
            continue
        if field.is_repeated and isinstance(item, list):
            for i, element in enumerate(item):
                found = _walk_problem(field.message_type, element, (*path, key, i))
                if found is not None:
                    return found
            continue
        found = _walk_problem(field.message_type, item, (*path, key))
        if found is not None:
            return found
    return None


# ---------------------------------------------------------------------------- selecting


def _applicable(mesh: MeshPolicy, workload: Workload) -> tuple[list[_Patch], list[Diagnostic]]:
    """The patches that apply to ``workload``'s sidecar, in Istio's order, and the errors
    of those Envoy would reject (those istiod ignores are left out: warnings)."""
    root = mesh.snapshot.mesh.root_namespace
    chosen: list[Resource[Any]] = []
    for resource in mesh.snapshot.of_kind("EnvoyFilter"):
        spec: t.EnvoyFilterSpec = resource.spec
        if resource.namespace not in (root, workload.namespace) or spec.target_refs:
            continue
        selector = spec.workload_selector
        if selector is not None and any(
            workload.labels.get(k) != v for k, v in selector.labels.items()
        ):
            continue
        chosen.append(resource)
    chosen.sort(
        key=lambda r: (
            r.spec.priority,
            r.namespace != root,
            r.creation_timestamp or "",
            f"{r.name}.{r.namespace}",
        )
    )
    patches, errors = [], []
    for resource in chosen:
        for index, patch in enumerate(resource.spec.config_patches):
            problems = _patch_problems(resource, index, patch)
            errors += [p for p in problems if p.is_error or p.code == _REFUSED_ON_APPLY]
            if patch.patch is None or problems:
                continue
            patches.append(
                _Patch(
                    resource,
                    index,
                    patch.apply_to,
                    patch.match or t.PatchMatch(),
                    patch.patch.operation,
                    patch.patch.value,
                )
            )
    return patches, errors


# ---------------------------------------------------------------------------- applying


def apply_envoy_filters(
    mesh: MeshPolicy, resources: ProxyResources, workload_ref: str
) -> ProxyResources:
    """``resources`` with the EnvoyFilters of ``workload_ref``'s sidecar applied (a copy;
    the same object when none applies). Raises :class:`EnvoyFilterRejected`."""
    wp = mesh.for_workload(workload_ref)
    if wp is None or not any(True for _ in mesh.snapshot.of_kind("EnvoyFilter")):
        return resources
    patches, errors = _applicable(mesh, wp.workload)
    if errors:  # also checked when the configuration loads; never skipped silently
        raise EnvoyFilterRejected(errors)
    if not patches:
        return resources
    # Clusters and routes are shared between proxies: patch copies.
    state = _State(
        listeners=copy.deepcopy(list(resources.listeners)),
        clusters=copy.deepcopy(list(resources.clusters)),
        routes=copy.deepcopy(list(resources.routes)),
        extension_configs=copy.deepcopy(list(resources.extension_configs)),
    )
    problems: list[Diagnostic] = []
    for patch in patches:
        touched = _APPLY[patch.apply_to](state, patch)
        for resource in touched:
            try:
                _parse(resource)
            except json_format.ParseError as exc:
                problems.append(
                    error(
                        "invalid-envoy-config",
                        patch.value_location(),
                        f"applied to {resource.get('name', '?')!s} for {workload_ref}: "
                        + _proto_error_text(str(exc)),
                    )
                )
                break
    if problems:
        raise EnvoyFilterRejected(problems)
    return dataclasses.replace(
        resources,
        listeners=tuple(state.listeners),
        clusters=tuple(sorted(state.clusters, key=lambda c: str(c.get("name", "")))),
        routes=tuple(state.routes),
        extension_configs=tuple(state.extension_configs),
    )


@dataclasses.dataclass(slots=True)
class _State:
    listeners: list[dict[str, Any]]
    clusters: list[dict[str, Any]]
    routes: list[dict[str, Any]]
    extension_configs: list[dict[str, Any]]


def _is_inbound_listener(listener: dict[str, Any]) -> bool:
    return (
        listener.get("traffic_direction") == "INBOUND" or listener.get("name") == "virtualInbound"
    )


def _listener_port(listener: dict[str, Any]) -> int:
    return int(listener.get("address", {}).get("socket_address", {}).get("port_value", 0))


def _chain_port(chain: dict[str, Any]) -> int | None:
    port = chain.get("filter_chain_match", {}).get("destination_port")
    if port is not None:
        return int(port)
    name = str(chain.get("name", ""))
    parts = name.split("|")
    if len(parts) >= 2 and parts[0] == "inbound" and parts[1].isdigit():
        return int(parts[1])
    return None


def _listener_matches(listener: dict[str, Any], patch: _Patch) -> bool:
    if not patch.context_matches(_is_inbound_listener(listener)):
        return False
    match = patch.listener
    if match is None:
        return True
    if match.name and match.name != listener.get("name"):
        return False
    virtual = listener.get("name") in ("virtualInbound", "virtualOutbound")
    if virtual and patch.apply_to is not t.ApplyTo.LISTENER:
        return True  # the port selects filter chains (below)
    if match.port_number:
        ports = {_listener_port(listener)} | {
            int(a["address"]["socket_address"]["port_value"])
            for a in listener.get("additional_addresses", [])
        }
        return match.port_number in ports
    return True


def _chain_matches(listener: dict[str, Any], chain: dict[str, Any], patch: _Patch) -> bool:
    match = patch.listener
    if match is None:
        return True
    if match.port_number:
        port = _chain_port(chain)
        if port is not None and port != match.port_number:
            return False
    wanted = match.filter_chain
    if wanted is None:
        return True
    chain_match = chain.get("filter_chain_match", {})
    if wanted.name and wanted.name != chain.get("name"):
        return False
    if wanted.sni and wanted.sni not in chain_match.get("server_names", []):
        return False
    if wanted.transport_protocol and wanted.transport_protocol != chain_match.get(
        "transport_protocol"
    ):
        return False
    if wanted.application_protocols:
        have = chain_match.get("application_protocols", [])
        if any(p not in have for p in wanted.application_protocols.split(",")):
            return False
    port = wanted.destination_port
    return not port or port == chain_match.get("destination_port")


def _chains(state: _State, patch: _Patch) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for listener in state.listeners:
        if not _listener_matches(listener, patch):
            continue
        chains = list(listener.get("filter_chains", []))
        if "default_filter_chain" in listener:
            chains.append(listener["default_filter_chain"])
        for chain in chains:
            if _chain_matches(listener, chain, patch):
                yield listener, chain


def _insert(
    items: list[dict[str, Any]],
    value: dict[str, Any],
    operation: t.Operation,
    is_target: Callable[[dict[str, Any]], bool] | None,
) -> list[dict[str, Any]]:
    """Istio's list operations; ``is_target`` None: no sub-match was given."""
    new = copy.deepcopy(value)
    if operation is t.Operation.ADD:
        return [*items, new]
    if operation is t.Operation.INSERT_FIRST:
        return [new, *items]
    if is_target is None:
        if operation is t.Operation.INSERT_BEFORE:
            return [new, *items]
        if operation is t.Operation.INSERT_AFTER:
            return [*items, new]
        return items  # REPLACE / REMOVE need something to replace or remove
    if operation is t.Operation.REMOVE:
        return [item for item in items if not is_target(item)]
    for i, item in enumerate(items):
        if not is_target(item):
            continue
        if operation is t.Operation.INSERT_BEFORE:
            return [*items[:i], new, *items[i:]]
        if operation is t.Operation.INSERT_AFTER:
            return [*items[: i + 1], new, *items[i + 1 :]]
        if operation is t.Operation.REPLACE:
            return [*items[:i], new, *items[i + 1 :]]
    return items


def merge(base: Any, patch: Any) -> Any:
    """proto ``Merge`` on proto3-JSON: messages field by field, lists appended, scalars
    replaced; an ``Any`` of another type replaced whole."""
    if isinstance(base, dict) and isinstance(patch, dict):
        if "@type" in patch and base.get("@type") != patch["@type"]:
            return copy.deepcopy(patch)
        out = dict(base)
        for key, value in patch.items():
            out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list):
        return [*base, *copy.deepcopy(patch)]
    return copy.deepcopy(patch)


def _apply_listener(state: _State, patch: _Patch) -> list[dict[str, Any]]:
    if patch.operation is t.Operation.ADD:
        if not patch.context_matches(False) and patch.match.context is not t.PatchContext.ANY:
            return []
        added = copy.deepcopy(patch.value)
        added.setdefault("@type", _T + _VALUE_TYPES[t.ApplyTo.LISTENER])
        state.listeners.append(added)
        return [added]
    touched = []
    kept = []
    for listener in state.listeners:
        if _listener_matches(listener, patch):
            if patch.operation is t.Operation.REMOVE:
                continue
            listener = merge(listener, patch.value)
            touched.append(listener)
        kept.append(listener)
    state.listeners[:] = kept
    return touched


def _apply_network_filter(state: _State, patch: _Patch) -> list[dict[str, Any]]:
    touched = []
    name = patch.network_filter
    for listener, chain in _chains(state, patch):
        filters = chain.get("filters", [])
        if patch.operation is t.Operation.MERGE:
            chain["filters"] = [
                merge(f, patch.value) if name is None or f.get("name") == name else f
                for f in filters
            ]
        else:
            target = None if name is None else (lambda f: f.get("name") == name)
            chain["filters"] = _insert(filters, patch.value, patch.operation, target)
        if chain["filters"] != filters:
            touched.append(listener)
    return touched


def _filter_names(http_filter: dict[str, Any]) -> set[str]:
    name = str(http_filter.get("name", ""))
    names = {name}
    if "config_discovery" in http_filter:
        names.update(istio for prefix, istio in _ISTIO_FILTER_NAMES if name.startswith(prefix))
    return names


def _apply_http_filter(state: _State, patch: _Patch) -> list[dict[str, Any]]:
    if patch.network_filter not in (None, _HCM_NAME):
        return []  # HTTP filters live in the HTTP connection manager only
    touched: list[dict[str, Any]] = []
    sub = patch.sub_filter
    by_slot = {str(e["name"]): e for e in state.extension_configs}
    for listener, chain in _chains(state, patch):
        for network_filter in chain.get("filters", []):
            manager = network_filter.get("typed_config", {})
            if network_filter.get("name") != _HCM_NAME or manager.get("@type") != HCM_TYPE:
                continue
            filters = manager.get("http_filters", [])
            target = None if sub is None else (lambda f: sub in _filter_names(f))
            if patch.operation is not t.Operation.MERGE:
                manager["http_filters"] = _insert(filters, patch.value, patch.operation, target)
                if manager["http_filters"] != filters:
                    touched.append(listener)
                continue
            for i, http_filter in enumerate(filters):
                if target is not None and not target(http_filter):
                    continue
                slot = by_slot.get(str(http_filter.get("name")))
                if "config_discovery" in http_filter and slot is not None:
                    # What Envoy runs is the extension config: merge there.
                    if "typed_config" in patch.value:
                        slot["typed_config"] = merge(
                            slot["typed_config"], patch.value["typed_config"]
                        )
                        touched.append(slot)
                    continue
                filters[i] = merge(http_filter, patch.value)
                touched.append(listener)
    return touched


def _route_config_port(route: dict[str, Any]) -> int | None:
    name = str(route.get("name", ""))
    if name.isdigit():
        return int(name)
    parts = name.split("|")
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None


def _apply_http_route(state: _State, patch: _Patch) -> list[dict[str, Any]]:
    match = patch.match.route_configuration
    touched = []
    for route_config in state.routes:
        inbound = str(route_config.get("name", "")).startswith("inbound|")
        if not patch.context_matches(inbound):
            continue
        if match is not None:
            if match.name and match.name != route_config.get("name"):
                continue
            if match.port_number and match.port_number != _route_config_port(route_config):
                continue
        vhost_match = match.vhost if match is not None else None
        for host in route_config.get("virtual_hosts", []):
            if (
                vhost_match is not None
                and vhost_match.name
                and vhost_match.name != host.get("name")
            ):
                continue
            route_match = vhost_match.route if vhost_match is not None else None
            routes = host.get("routes", [])

            def is_target(route: dict[str, Any], wanted: t.RouteMatch | None = route_match) -> bool:
                if wanted is None:
                    return True
                if wanted.name and wanted.name != route.get("name"):
                    return False
                action = wanted.action
                return action == "ANY" or (
                    {
                        "ROUTE": "route",
                        "REDIRECT": "redirect",
                        "DIRECT_RESPONSE": "direct_response",
                    }.get(action, action.lower())
                    in route
                )

            if patch.operation is t.Operation.MERGE:
                host["routes"] = [merge(r, patch.value) if is_target(r) else r for r in routes]
            else:
                host["routes"] = _insert(
                    routes, patch.value, patch.operation, is_target if route_match else None
                )
            if host["routes"] != routes:
                touched.append(route_config)
    return touched


def _cluster_parts(name: str) -> tuple[str, int, str, str]:
    parts = name.split("|")
    if len(parts) == 4 and parts[1].isdigit():
        return parts[0], int(parts[1]), parts[2], parts[3]
    return "", 0, "", ""


def _apply_cluster(state: _State, patch: _Patch) -> list[dict[str, Any]]:
    if patch.operation is t.Operation.ADD:
        added = copy.deepcopy(patch.value)
        added.setdefault("@type", _T + _VALUE_TYPES[t.ApplyTo.CLUSTER])
        state.clusters.append(added)
        return [added]
    wanted = patch.match.cluster
    touched = []
    kept = []
    for cluster in state.clusters:
        name = str(cluster.get("name", ""))
        direction, port, subset, host = _cluster_parts(name)
        selected = patch.context_matches(direction == "inbound")
        if selected and wanted is not None:
            selected = not (
                (wanted.name and wanted.name != name)
                or (wanted.port_number and wanted.port_number != port)
                or (wanted.service and wanted.service != host)
                or (wanted.subset and wanted.subset != subset)
            )
        if selected:
            if patch.operation is t.Operation.REMOVE:
                continue
            cluster = merge(cluster, patch.value)
            touched.append(cluster)
        kept.append(cluster)
    state.clusters[:] = kept
    return touched


_APPLY: dict[t.ApplyTo, Callable[[_State, _Patch], list[dict[str, Any]]]] = {
    t.ApplyTo.LISTENER: _apply_listener,
    t.ApplyTo.NETWORK_FILTER: _apply_network_filter,
    t.ApplyTo.HTTP_FILTER: _apply_http_filter,
    t.ApplyTo.HTTP_ROUTE: _apply_http_route,
    t.ApplyTo.CLUSTER: _apply_cluster,
}
