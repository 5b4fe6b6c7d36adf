"""trustmesh's request-smuggling guards as Envoy configuration (pure).

:mod:`trustmesh.policy.headers` says what Envoy 1.40 does with repeated header lines and
Host, and what trustmesh refuses; this module builds it for the inbound HTTP chain, where
the guards run before every policy filter (CUSTOM, jwt_authn, RBAC):

* :data:`HOST_HCM_FIELDS` — ``strip_trailing_host_dot`` on the connection manager, so
  ``internal.foo.`` reaches RBAC and the application as ``internal.foo``;
* :func:`host_guard_config` — an RBAC DENY policy ``trustmesh-ambiguous-host`` on every
  ``:authority`` that is not one plain ``host[:port]``, where an applicable policy's
  decision depends on Host (``hosts``, a Host condition, CUSTOM: ``reads_host``). Envoy
  offers no setting that refuses a duplicate Host (its HTTP/1 codec joins the lines) or
  userinfo in Host, so this is a deny rule, logged under its own policy name. Where no
  policy reads Host an ambiguous one cannot change a decision, and the filter (about 5k
  instructions per request) is left out; under ECDS it has its own slot
  (:data:`HOST_GUARD_FILTER`), a no-op RBAC filter when nothing needs guarding;
* :func:`header_guard_config` — a Lua filter answering 400 when a header named by an
  applicable policy's ``request.headers[...]`` condition arrives more than once. Nothing
  declarative can count lines: header matchers test each line on its own (any line
  matching wins), ``%REQ()%`` reads the first line, CEL the comma-joined value, which a
  single line may contain as well (``User-Agent: … (KHTML, like Gecko)``). Lua's
  ``getNumValues`` is exact. It depends on the policies, so under ECDS it has its own slot
  (:data:`HEADER_GUARD_SLOT`, a no-op RBAC filter when nothing needs guarding).
"""

from __future__ import annotations

from typing import Any, Final

from trustmesh.api import models as m
from trustmesh.policy.compose import MeshPolicy, WorkloadPolicy
from trustmesh.policy.headers import HOST_GUARD_POLICY, PLAIN_AUTHORITY
from trustmesh.xds.rbac import HTTP_RBAC_TYPE

__all__ = [
    "GUARD_STAT_PREFIX",
    "HEADER_GUARD_SLOT",
    "HEADER_GUARD_TYPES",
    "HOST_GUARD_FILTER",
    "HOST_HCM_FIELDS",
    "LUA_TYPE",
    "guarded_headers",
    "header_guard_config",
    "host_guard_config",
    "host_guard_filter",
    "request_guard_filters",
]

Json = dict[str, Any]

LUA_TYPE: Final = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"
HOST_GUARD_FILTER: Final = "trustmesh.guard.host"
HEADER_GUARD_SLOT: Final = "trustmesh.guard.headers"
# What the header guard slot may hold: the Lua guard, or an RBAC filter without rules.
HEADER_GUARD_TYPES: Final = (LUA_TYPE, HTTP_RBAC_TYPE)
GUARD_STAT_PREFIX: Final = "trustmesh_guard_"
HOST_HCM_FIELDS: Final[dict[str, Any]] = {"strip_trailing_host_dot": True}

_LUA_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")


def host_guard_filter() -> Json:
    """The RBAC filter denying any ``:authority`` that is not one plain ``host[:port]``."""
    plain = {
        "header": {"name": ":authority", "string_match": {"safe_regex": {"regex": PLAIN_AUTHORITY}}}
    }
    policy = {"permissions": [{"any": True}], "principals": [{"not_id": plain}]}
    rules = {"action": "DENY", "policies": {HOST_GUARD_POLICY: policy}}
    # Its own stat prefix: Envoy's plain ``http.<prefix>.rbac.allowed`` / ``denied`` then
    # count the authorization filters only, as in Istio (which has no such guard).
    typed = {"@type": HTTP_RBAC_TYPE, "rules": rules, "rules_stat_prefix": GUARD_STAT_PREFIX}
    return {"name": HOST_GUARD_FILTER, "typed_config": typed}


def guarded_headers(wp: WorkloadPolicy, mesh: MeshPolicy) -> tuple[str, ...]:
    """The headers a request to ``wp`` may not repeat (none under ``FORWARD``), sorted."""
    if mesh.snapshot.mesh.repeated_policy_headers is m.RepeatedPolicyHeaders.FORWARD:
        return ()
    return tuple(sorted(wp.authz.condition_headers))


def header_guard_config(wp: WorkloadPolicy, mesh: MeshPolicy) -> Json:
    """The typed config of the header guard slot: the Lua guard, or a no-op RBAC filter."""
    names = guarded_headers(wp, mesh)
    if not names:
        return {"@type": HTTP_RBAC_TYPE}
    return {"@type": LUA_TYPE, "default_source_code": {"inline_string": _lua_guard(names)}}


def host_guard_config(wp: WorkloadPolicy) -> Json:
    """The typed config of the host guard slot: the guard, or a no-op RBAC filter."""
    if not wp.authz.reads_host:
        return {"@type": HTTP_RBAC_TYPE}
    config: Json = host_guard_filter()["typed_config"]
    return config


def request_guard_filters(wp: WorkloadPolicy, mesh: MeshPolicy) -> list[Json]:
    """Both guards as inline HTTP filters, in order, each only if needed."""
    filters = [host_guard_filter()] if wp.authz.reads_host else []
    config = header_guard_config(wp, mesh)
    if config["@type"] == LUA_TYPE:
        filters.append({"name": HEADER_GUARD_SLOT, "typed_config": config})
    return filters


def _lua_guard(names: tuple[str, ...]) -> str:
    listed = ", ".join(_lua_string(name) for name in names)
    return f"""-- trustmesh: refuse a request that repeats a header an AuthorizationPolicy
-- condition reads (meshConfig.repeatedPolicyHeaders: REJECT).
local names = {{{listed}}}
function envoy_on_request(handle)
  local headers = handle:headers()
  for _, name in ipairs(names) do
    if headers:getNumValues(name) > 1 then
      handle:respond({{[":status"] = "400", ["content-type"] = "text/plain"}},
        "repeated header " .. name .. ": refused, an authorization policy reads it\\n")
      return
    end
  end
end
"""


def _lua_string(text: str) -> str:
    """A Lua string literal for ``text``: anything but plain name characters as ``\\ddd``
    byte escapes (three digits, so a following digit cannot join the escape)."""
    out = []
    for char in text:
        if char in _LUA_NAME_CHARS:
            out.append(char)
        else:
            out.extend(f"\\{byte:03d}" for byte in char.encode())
    return '"' + "".join(out) + '"'
