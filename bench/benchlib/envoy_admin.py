"""What an Envoy runs per request, read from its admin interface: a summary of
``/config_dump`` (HTTP filters, access logs, path normalization, XFCC) listener by
listener, a listener's access_log entries, and non-zero ``/stats`` counters."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from benchlib.envoy_pair import HCM
from trustmesh.agent.envoy import EnvoyProcess


def _walk(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        yield value
        for item in value.values():
            yield from _walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item)


def _listeners(dump: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for config in dump["configs"]:
        for entry in config.get("static_listeners", []):
            yield entry["listener"]
        for entry in config.get("dynamic_listeners", []):
            if "active_state" in entry:
                yield entry["active_state"]["listener"]


def _short(type_url: str) -> str:
    return type_url.rpartition(".")[2]


def per_request_features(dump: dict[str, Any]) -> dict[str, Any]:
    """What an HTTP request meets in this Envoy, listener by listener, from /config_dump:
    the things that cost per request rather than per connection."""
    out: dict[str, Any] = {}
    for listener in _listeners(dump):
        for node in _walk(listener.get("filter_chains", [])):
            if node.get("@type") != HCM:
                continue
            features: dict[str, Any] = {
                "http_filters": [f["name"] for f in node.get("http_filters", [])],
                "access_logs": [_access_log_summary(a) for a in node.get("access_log", [])],
            }
            for key in (
                "codec_type",
                "normalize_path",
                "merge_slashes",
                "path_with_escaped_slashes_action",
                "forward_client_cert_details",
                "set_current_client_cert_details",
                "use_remote_address",
                "generate_request_id",
            ):
                if key in node:
                    features[key] = node[key]
            routes = [
                r
                for v in node.get("route_config", {}).get("virtual_hosts", [])
                for r in v["routes"]
            ]
            features["virtual_hosts"] = len(node.get("route_config", {}).get("virtual_hosts", []))
            features["routes"] = len(routes)
            out[listener["name"]] = features  # chains of one listener share the same HCM
    ecds = {
        e["ecds_filter"]["name"]: _ecds_summary(e["ecds_filter"]["typed_config"])
        for config in dump["configs"]
        for e in config.get("ecds_filters", [])
    }
    if ecds:
        out["ecds_filters"] = ecds
    return out


def _access_log_summary(entry: dict[str, Any]) -> str:
    """E.g. ``StdoutAccessLog, json 19 fields, unfiltered``: what each request pays."""
    config = entry["typed_config"]
    log_format = config.get("log_format", {})
    if "json_format" in log_format:
        shape = f"json {len(log_format['json_format'])} fields"
    else:
        shape = "text" if log_format else "default format"
    when = "filtered" if "filter" in entry else "every request"
    return f"{_short(config['@type'])}, {shape}, {when}"


def _ecds_summary(config: dict[str, Any]) -> str:
    kind = _short(config["@type"])
    if kind == "RBAC":
        if "rules" not in config:
            return "RBAC (no rules: pass-through)"
        rules = config["rules"]
        return f"RBAC {rules.get('action', 'ALLOW')} {len(rules.get('policies', {}))} policies"
    if kind == "JwtAuthentication":
        return "jwt_authn " + ("with providers" if config.get("providers") else "(no providers)")
    return kind


async def stats(envoy: EnvoyProcess, pattern: str) -> dict[str, int]:
    """Non-zero counters matching ``pattern`` (a regex for admin /stats)."""
    body = (await envoy.admin_get(f"/stats?usedonly&filter={pattern}")).body.decode()
    out = {}
    for line in body.splitlines():
        key, _, value = line.partition(": ")
        if value.isdigit() and int(value):
            out[key] = int(value)
    return out


async def config_dump(envoy: EnvoyProcess) -> dict[str, Any]:
    return json.loads((await envoy.admin_get("/config_dump", timeout=10)).body)  # type: ignore[no-any-return]


def access_logs_of(dump: dict[str, Any], listener_name: str) -> list[dict[str, Any]]:
    """The access_log entries of a listener's HTTP connection manager."""
    for listener in _listeners(dump):
        if listener["name"] == listener_name:
            for node in _walk(listener["filter_chains"]):
                if node.get("@type") == HCM:
                    return list(node.get("access_log", []))
    raise LookupError(f"no HTTP listener {listener_name!r}")
