"""Pricing what trustmesh's gateway runs per request that the hand-written one does not.

From trustmesh's gateway ``/config_dump``: its HTTP connection manager (access log, the
edge settings), its routes (Istio's default retry policy) and its ECDS policy slots. Each
:data:`FEATURES` entry copies one of those onto the hand-written gateway's bootstrap, so
that callgrind prices it alone (``all``: every one at once, which should cost what
trustmesh's gateway costs).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

from benchlib.envoy_pair import HCM

Json = dict[str, Any]

# The connection manager settings trustmesh's gateway sets and a minimal one leaves out.
EDGE_FIELDS = (
    "forward_client_cert_details",
    "set_current_client_cert_details",
    "normalize_path",
    "path_with_escaped_slashes_action",
    "strip_trailing_host_dot",
    "server_name",
    "upgrade_configs",
    "xff_num_trusted_hops",
)


def _walk(value: Any) -> Iterator[Json]:
    if isinstance(value, dict):
        yield value
        for item in value.values():
            yield from _walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item)


def trustmesh_parts(dump: Json) -> Json:
    """The HCM, the ``/get`` route and the ECDS filter configs of trustmesh's gateway."""
    manager = next(n for n in _walk(dump["configs"]) if n.get("@type") == HCM)
    route = next(
        r
        for n in _walk(dump["configs"])
        if "virtual_hosts" in n
        for v in n["virtual_hosts"]
        for r in v.get("routes", [])
        if r.get("match", {}).get("prefix") == "/get"
    )
    ecds = {
        e["ecds_filter"]["name"]: e["ecds_filter"]["typed_config"]
        for config in dump["configs"]
        for e in config.get("ecds_filters", [])
    }
    return {"manager": manager, "route": route, "ecds": ecds}


def _manager(bootstrap: Json) -> Json:
    listener = bootstrap["static_resources"]["listeners"][0]
    config: Json = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return config


def _access_log(bootstrap: Json, parts: Json) -> None:
    _manager(bootstrap)["access_log"] = copy.deepcopy(parts["manager"]["access_log"])


def _edge_fields(bootstrap: Json, parts: Json) -> None:
    manager = _manager(bootstrap)
    for key in EDGE_FIELDS:
        if key in parts["manager"]:
            manager[key] = copy.deepcopy(parts["manager"][key])


def _retry_policy(bootstrap: Json, parts: Json) -> None:
    theirs = parts["route"]["route"]
    for host in _manager(bootstrap)["route_config"]["virtual_hosts"]:
        for route in host["routes"]:
            for key in ("retry_policy", "timeout", "cluster_not_found_response_code"):
                if key in theirs:
                    route["route"][key] = copy.deepcopy(theirs[key])


def _policy_slots(bootstrap: Json, parts: Json) -> None:
    """The slots as trustmesh's gateway has them (disabled, nothing switches them on), their
    configs inline instead of over ECDS."""
    slots = [
        {"name": f["name"], "disabled": True, "typed_config": parts["ecds"][f["name"]]}
        for f in parts["manager"]["http_filters"]
        if f.get("disabled") and f["name"] in parts["ecds"]
    ]
    manager = _manager(bootstrap)
    manager["http_filters"] = [*copy.deepcopy(slots), *manager["http_filters"]]


FEATURES: dict[str, Callable[[Json, Json], None]] = {
    "access_log": _access_log,
    "edge_fields": _edge_fields,
    "retry_policy": _retry_policy,
    "policy_slots": _policy_slots,
}


def with_features(bootstrap: Json, parts: Json, names: list[str]) -> Json:
    out = copy.deepcopy(bootstrap)
    for name in names:
        FEATURES[name](out, parts)
    return out
