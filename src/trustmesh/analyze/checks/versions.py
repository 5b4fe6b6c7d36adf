"""Istio versions and API versions, checks 33–34: security bulletins, end of life, APIs
that Istio no longer reads.

The bulletin data ships with trustmesh (``analyze/data/istio_bulletins.json``, see its
``data_date`` and ``source``). A version inside a bulletin's range is reported as
exploitable only when the bulletin's configuration condition holds in the inputs (e.g. an
AuthorizationPolicy using ``hosts`` for a hosts-matching bug); a condition that depends on
the environment (who can reach istiod's node, DNS control) cannot be decided from YAML and
is reported as "may be affected"; bulletins whose condition is absent are summarised in
one INFO finding. Conditions use three-valued logic: True, False, None (undecidable).
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from trustmesh.analyze.checks.install_util import (
    cni_enabled,
    dig,
    is_true,
    mesh_setting,
    owner_key,
    pilot_env,
    plural,
    pod_templates,
    raw_body,
    setting,
)
from trustmesh.analyze.checks.raw_objects import raw_objects
from trustmesh.analyze.context import AnalysisContext, Setting
from trustmesh.analyze.findings import Issue, Severity
from trustmesh.analyze.registry import rule
from trustmesh.api.resources import UnknownResource

FAMILY = "install"
Version = tuple[int, int, int]
_VERSION = re.compile(r"^v?(\d+)\.(\d+)(?:\.(\d+))?")
_ISTIOD_PORTS = frozenset({15010, 15012, 15017})


@cache
def bulletin_data() -> Mapping[str, Any]:
    text = resources.files("trustmesh.analyze").joinpath("data/istio_bulletins.json").read_text()
    data: Mapping[str, Any] = json.loads(text)
    return data


def parse_version(text: str) -> tuple[int, int, int | None] | None:
    """``1.22.3``, ``v1.22.3``, ``1.22.3-distroless``, ``1.22`` (patch unknown)."""
    match = _VERSION.match(text.strip())
    if not match:
        return None
    patch = match.group(3)
    return int(match.group(1)), int(match.group(2)), int(patch) if patch is not None else None


def _v(text: str) -> Version:
    parsed = parse_version(text)
    assert parsed is not None and parsed[2] is not None, text
    return parsed[0], parsed[1], parsed[2]


def in_range(version: Version, span: Mapping[str, str]) -> bool:
    if "before" in span:
        return version < _v(span["before"])
    return _v(span["from"]) <= version <= _v(span["through"])


def _touches_minor(minor: tuple[int, int], span: Mapping[str, str]) -> bool:
    if "before" in span:
        return (*minor, 0) < _v(span["before"])
    return _v(span["from"])[:2] <= minor <= _v(span["through"])[:2]


# --- where the version comes from -------------------------------------------------------


def installed_version(ctx: AnalysisContext) -> Setting | None:
    """``--istio-version`` or the install tag; else the tag of a deployed istiod image."""
    if ctx.istio_version is not None:
        return ctx.istio_version
    for pod in pod_templates(ctx):
        for field, index, container in pod.containers():
            image = str(container.get("image", ""))
            if "/pilot:" in image:
                tag = image.rpartition(":")[2].removesuffix("-distroless")
                return Setting(tag, pod.at(field, index, "image"))
    return None


# --- configuration facts used by bulletin conditions --------------------------------------


def _unknown(ctx: AnalysisContext) -> Sequence[UnknownResource]:
    # Kinds the loader does not type (Gateway API, rbac.istio.io…): never
    # enforced by trustmesh, but their presence decides bulletin conditions and check 34.
    return ctx.unknown_resources


def _where(kind: str, namespace: str, name: str, location: Any) -> str:
    return f"{kind} {namespace}/{name} ({location.file}:{location.line})"


class Facts:
    """Evidence for each condition name: a non-empty list means the condition holds."""

    def __init__(self, ctx: AnalysisContext, version: Version) -> None:
        self.ctx, self.version = ctx, version
        self._cache: dict[str, list[str]] = {}

    def get(self, name: str) -> list[str]:
        if name not in self._cache:
            method = getattr(self, "fact_" + name, None)
            if method is None:
                raise ValueError(f"unknown bulletin condition {name!r}")
            self._cache[name] = list(method())
        return self._cache[name]

    def fact_always(self) -> Iterator[str]:
        yield "every installation of an affected release"

    def _gateway_objects(self, egress_only: bool) -> Iterator[str]:
        for r in self.ctx.resources("Gateway"):
            selector = dig(raw_body(r), "spec", "selector") or {}
            if not egress_only or "egress" in str(selector.get("istio", "")):
                yield _where("Gateway", r.namespace, r.name, r.meta_location())
        for pod in pod_templates(self.ctx):
            role = str(pod.labels.get("istio", ""))
            if role == "egressgateway" or (not egress_only and role == "ingressgateway"):
                yield _where(
                    pod.resource.kind,
                    pod.resource.namespace,
                    pod.resource.name,
                    pod.meta_at("labels", "istio"),
                )
        kinds = ("egressGateways",) if egress_only else ("ingressGateways", "egressGateways")
        for kind in kinds:
            for index, item in enumerate(_gateway_components(self.ctx, kind)):
                if is_true(item.get("enabled")):
                    yield f"IstioOperator components.{kind}[{index}] is enabled"
        ingress = _gateway_components(self.ctx, "ingressGateways")
        # the default profile's ingress gateway, unless every listed one is switched off
        disabled = bool(ingress) and not any(is_true(i.get("enabled")) for i in ingress)
        profile = setting(self.ctx, "profile")
        wanted = {"demo"} if egress_only else ({"demo"} if disabled else {"default", "demo"})
        has_operator = bool(self.ctx.resources("IstioOperator"))
        name = profile.value if profile is not None else ("default" if has_operator else None)
        if name in wanted:
            yield f"IstioOperator profile {name} installs a gateway"

    def fact_gateway(self) -> Iterator[str]:
        yield from self._gateway_objects(egress_only=False)
        yield from self.fact_k8s_gateway_api()

    def fact_egress_gateway(self) -> Iterator[str]:
        yield from self._gateway_objects(egress_only=True)

    def fact_k8s_gateway_api(self) -> Iterator[str]:
        for u in _unknown(self.ctx):
            if u.kind == "Gateway" and u.api_version.startswith("gateway.networking.k8s.io/"):
                yield _where("Gateway (Gateway API)", u.namespace, u.name, u.location)

    def fact_istiod_exposed(self) -> Iterator[str]:
        for service in self.ctx.resources("Service"):
            spec = dig(raw_body(service), "spec") or {}
            if str(spec.get("type", "ClusterIP")) not in {"LoadBalancer", "NodePort"}:
                continue
            for port in service.spec.ports:
                if {port.port, port.target_port} & _ISTIOD_PORTS:
                    yield _where(
                        f"{spec.get('type')} Service",
                        service.namespace,
                        service.name,
                        service.meta_location(),
                    )
                    break
        for gateway in self.ctx.resources("Gateway"):
            servers = dig(raw_body(gateway), "spec", "servers")
            for server in servers if isinstance(servers, list) else ():
                if dig(server, "port", "number") in _ISTIOD_PORTS:
                    yield _where(
                        "Gateway", gateway.namespace, gateway.name, gateway.meta_location()
                    )
        for found in (
            setting(self.ctx, "values", "global", "externalIstiod"),
            pilot_env(self.ctx, "EXTERNAL_ISTIOD"),
        ):
            if found is not None and is_true(found.value):
                yield "external istiod install (serves remote clusters)"

    def fact_authz_hosts(self) -> Iterator[str]:
        for r in self.ctx.resources("AuthorizationPolicy"):
            ops = [t.operation for rule_ in r.spec.rules or () for t in rule_.to]
            if any(op.hosts or op.not_hosts for op in ops):
                yield _where("AuthorizationPolicy", r.namespace, r.name, r.meta_location())

    def fact_authz_service_account_dots(self) -> Iterator[str]:
        for r in self.ctx.resources("AuthorizationPolicy"):
            sources = [f.source for rule_ in r.spec.rules or () for f in rule_.from_]
            names = [n for s in sources for n in (*s.service_accounts, *s.not_service_accounts)]
            if any("." in n for n in names):
                yield _where("AuthorizationPolicy", r.namespace, r.name, r.meta_location())

    def fact_request_authentication_jwks_uri(self) -> Iterator[str]:
        for r in self.ctx.resources("RequestAuthentication"):
            if any(j.jwks_uri for j in r.spec.jwt_rules):
                yield _where("RequestAuthentication", r.namespace, r.name, r.meta_location())

    def fact_cni_enabled(self) -> Iterator[str]:
        enabled, evidence = cni_enabled(self.ctx)
        if enabled:
            loc = evidence.location if evidence else None
            yield "Istio CNI is installed" + (f" ({loc.file}:{loc.line})" if loc else "")

    def _mesh_text(self, *path: str) -> Iterator[tuple[str, str]]:
        found = mesh_setting(self.ctx, *path)
        if found is not None and found.location is not None:
            yield (
                json.dumps(found.value),
                f"meshConfig.{'.'.join(path)} ({found.location.file}:{found.location.line})",
            )

    def fact_proxy_protocol(self) -> Iterator[str]:
        for _, where in self._mesh_text("defaultConfig", "gatewayTopology", "proxyProtocol"):
            yield where
        for pod in pod_templates(self.ctx):
            if "proxyProtocol" in str(pod.annotations.get("proxy.istio.io/config", "")):
                yield _where(
                    pod.resource.kind,
                    pod.resource.namespace,
                    pod.resource.name,
                    pod.meta_at("annotations", "proxy.istio.io/config"),
                )
        yield from self._envoy_filters("proxy_protocol")

    def fact_access_log_peer_ip_san(self) -> Iterator[str]:
        for path in (("accessLogFormat",), ("extensionProviders",)):
            for text, where in self._mesh_text(*path):
                if "%DOWNSTREAM_PEER_IP_SAN%" in text:
                    yield where

    def fact_json_access_log(self) -> Iterator[str]:
        for text, where in self._mesh_text("accessLogEncoding"):
            if "JSON" in text.upper():
                yield where
        for name in self._providers(("envoyFileAccessLog", "logFormat", "labels")):
            yield f"extension provider {name} writes JSON access logs"

    def fact_datadog_tracer(self) -> Iterator[str]:
        for name in self._providers(("datadog",)):
            yield f"extension provider {name} is a Datadog tracer"
        for text, where in self._mesh_text("defaultConfig", "tracing"):
            if '"datadog"' in text:
                yield where
        tracer = setting(self.ctx, "values", "global", "proxy", "tracer")
        if tracer is not None and tracer.value == "datadog":
            yield "global.proxy.tracer is datadog"

    def _providers(self, path: tuple[str, ...]) -> Iterator[str]:
        """Names of meshConfig.extensionProviders that set ``path``."""
        providers = mesh_setting(self.ctx, "extensionProviders")
        for provider in providers.value if providers and isinstance(providers.value, list) else ():
            if dig(provider, *path) is not None:
                yield str(dig(provider, "name"))

    def _envoy_filters(self, needle: str) -> Iterator[str]:
        for u in raw_objects(self.ctx, "EnvoyFilter"):  # typed since EnvoyFilters apply
            if needle in json.dumps(u.body, default=str).lower():
                yield _where("EnvoyFilter", u.namespace, u.name, u.origin)


def _gateway_components(ctx: AnalysisContext, kind: str) -> list[Mapping[str, Any]]:
    listed = setting(ctx, "components", kind)
    value = listed.value if listed is not None else None
    return [i for i in value if isinstance(i, Mapping)] if isinstance(value, list) else []


def evaluate(condition: Any, facts: Facts) -> tuple[bool | None, list[str]]:
    """A bulletin condition → (holds, evidence or the environment it depends on)."""
    if isinstance(condition, str):
        found = facts.get(condition)
        return bool(found), found
    if "environment" in condition:
        return None, [str(condition["environment"])]
    if "version_at_least" in condition:
        minimum = str(condition["version_at_least"])
        return facts.version >= _v(minimum), [f"installed version is at least {minimum}"]
    if "envoy_filter" in condition:
        found = list(facts._envoy_filters(str(condition["envoy_filter"]).lower()))
        return bool(found), found
    parts = [evaluate(c, facts) for c in condition.get("any") or condition.get("all") or ()]
    values = [v for v, _ in parts]
    if "any" in condition:
        wanted: bool | None = True if True in values else (None if None in values else False)
    else:
        wanted = False if False in values else (None if None in values else True)
    return wanted, [e for v, evidence in parts if v is wanted for e in evidence]


# --- 33: security bulletins and end of life -----------------------------------------------


@dataclass(frozen=True, slots=True)
class Match:
    bulletin: Mapping[str, Any]
    span: Mapping[str, str]
    holds: bool | None
    evidence: tuple[str, ...]

    @property
    def fixed(self) -> str | None:
        return self.span.get("fixed")


def _supported_minors(today: datetime.date) -> list[str]:
    return [
        r["minor"]
        for r in bulletin_data()["releases"]
        if r["eol"] is None or datetime.date.fromisoformat(r["eol"]) >= today
    ]


def _upgrade_text(fixed: str | None, today: datetime.date) -> str:
    supported = ", ".join(_supported_minors(today)[::-1]) or "a supported release"
    if fixed is None:
        return f"upgrade to a supported minor release ({supported}) at its latest patch"
    return f"upgrade to Istio {fixed} or later (supported minors as of the data: {supported})"


def _matches(version: Version, facts: Facts) -> Iterator[Match]:
    for bulletin in bulletin_data()["bulletins"]:
        span = next((s for s in bulletin["affected"] if in_range(version, s)), None)
        if span is not None:
            holds, evidence = evaluate(bulletin["condition"], facts)
            yield Match(bulletin, span, holds, tuple(evidence))


def _cves(bulletin: Mapping[str, Any]) -> str:
    cves: list[str] = bulletin["cves"]
    score = bulletin["cvss"]
    shown = plural(cves, 3) if cves else "no CVE"
    return f"{shown}; CVSS {score}" if score is not None else shown


@rule(
    "TM-INST-013",
    title="Istio version affected by a published security bulletin",
    severity=Severity.ERROR,
    family=FAMILY,
    rationale="The installed release is inside the affected range of an Istio security "
    "bulletin. Findings are ERROR only when the bulletin's vulnerable configuration is present "
    "in the inputs (or the bulletin affects every installation), WARNING when it depends on the "
    "environment, INFO when the configuration it needs is absent.",
)
def security_bulletins(ctx: AnalysisContext) -> Iterator[Issue]:
    given = installed_version(ctx)
    parsed = parse_version(str(given.value)) if given else None
    if given is None or parsed is None:
        return
    location, today = given.location, ctx.today
    resource = owner_key(ctx, location)
    if parsed[2] is None:
        yield from _unknown_patch(parsed[0], parsed[1], given, resource)
        return
    version = (parsed[0], parsed[1], parsed[2])
    shown = ".".join(map(str, version))
    absent: list[Match] = []
    for match in _matches(version, Facts(ctx, version)):
        bulletin = match.bulletin
        if match.holds is False:
            absent.append(match)
            continue
        if match.holds is None:
            why = f"Whether it is exploitable depends on: {plural(match.evidence)}."
            severity = Severity.WARNING
        else:
            why = (
                "It affects every installation."
                if bulletin["condition"] == "always"
                else f"The vulnerable configuration is present: {plural(match.evidence, 3)}."
            )
            cvss = bulletin["cvss"]
            severity = Severity.ERROR if cvss is None or cvss >= 7.0 else Severity.WARNING
        yield Issue(
            message=f"Istio {shown} is affected by {bulletin['id']} ({_cves(bulletin)}): "
            f"{bulletin['summary']} {why}",
            location=location,
            resource=resource,
            severity=severity,
            fix=f"# {_upgrade_text(match.fixed, today)}\n# {bulletin['url']}\n",
            properties={
                "bulletin": bulletin["id"],
                "cves": list(bulletin["cves"]),
                "exploitable": match.holds,
                "fixed": match.fixed,
            },
        )
    if absent:
        listed = "; ".join(
            f"{m.bulletin['id']} (needs {_describe(m.bulletin['condition'])})" for m in absent
        )
        fixed = max((m.fixed for m in absent if m.fixed), key=_v, default=None)
        yield Issue(
            message=f"Istio {shown} is in the affected range of {len(absent)} more bulletin(s) "
            f"whose vulnerable configuration is not present in the inputs: {listed}",
            location=location,
            resource=resource,
            severity=Severity.INFO,
            fix=f"# {_upgrade_text(fixed, today)}\n",
            properties={"bulletins": [m.bulletin["id"] for m in absent], "exploitable": False},
        )


def _describe(condition: Any) -> str:
    """A bulletin condition in words, for the summary of conditions not present."""
    conditions: Mapping[str, str] = bulletin_data()["format"]["conditions"]
    if isinstance(condition, str):
        return conditions.get(condition, condition)
    if "version_at_least" in condition:
        return f"version {condition['version_at_least']} or later"
    if "envoy_filter" in condition:
        return f"an EnvoyFilter configuring {condition['envoy_filter']}"
    if "environment" in condition:
        return str(condition["environment"])
    joiner = " or " if "any" in condition else " and "
    return joiner.join(_describe(c) for c in condition.get("any") or condition.get("all"))


def _unknown_patch(major: int, minor: int, given: Setting, resource: str) -> Iterator[Issue]:
    touching = [
        b["id"]
        for b in bulletin_data()["bulletins"]
        if any(_touches_minor((major, minor), s) for s in b["affected"])
    ]
    if touching:
        yield Issue(
            message=f"Istio {major}.{minor} is given without a patch number; {len(touching)} "
            f"bulletin(s) affect some {major}.{minor} patches: {plural(touching, 8)}",
            location=given.location,
            resource=resource,
            severity=Severity.INFO,
            fix="# pass the full version: trustmesh analyze --istio-version X.Y.Z\n",
        )


@rule(
    "TM-INST-014",
    title="Istio version past end of life",
    severity=Severity.WARNING,
    family=FAMILY,
    rationale="Minor releases get security fixes until six weeks after the N+2 release; past "
    "that date new vulnerabilities are not fixed for them at all, so the next bulletin may "
    "have no patch for the installed version.",
)
def end_of_life(ctx: AnalysisContext) -> Iterator[Issue]:
    given = installed_version(ctx)
    parsed = parse_version(str(given.value)) if given else None
    if given is None or parsed is None:
        return
    releases = bulletin_data()["releases"]
    known = {tuple(map(int, r["minor"].split("."))): r for r in releases}
    minor = parsed[:2]
    today = ctx.today
    release = known.get(minor)
    oldest = min(known)
    if release is not None and release["eol"] is not None:
        eol = datetime.date.fromisoformat(release["eol"])
        if eol >= today:
            return
        when = f"reached end of life on {eol.isoformat()}"
    elif release is None and minor < oldest:
        when = f"is older than {oldest[0]}.{oldest[1]} and long past end of life"
    else:
        return
    supported = ", ".join(_supported_minors(today)[::-1])
    yield Issue(
        message=f"Istio {given.value} {when}: it no longer receives security fixes "
        f"(supported as of {bulletin_data()['data_date']}: {supported})",
        location=given.location,
        resource=owner_key(ctx, given.location),
        fix=f"# {_upgrade_text(None, today)}\n",
    )


# --- 34: removed and deprecated APIs --------------------------------------------------------

# group → (removed in, replacement, how to translate)
_REMOVED = {
    "rbac.istio.io": (
        "1.6",
        "AuthorizationPolicy (security.istio.io/v1)",
        "ServiceRole rules become `to.operation` entries, ServiceRoleBinding subjects become "
        "`from.source` entries, ClusterRbacConfig ON becomes an allow-nothing policy",
    ),
    "authentication.istio.io": (
        "1.6",
        "PeerAuthentication and RequestAuthentication",
        "`peers: [mtls]` becomes PeerAuthentication mtls.mode, `origins` become "
        "RequestAuthentication jwtRules plus an AuthorizationPolicy requiring requestPrincipals",
    ),
    "config.istio.io": (
        "1.8 (Mixer)",
        "AuthorizationPolicy (CUSTOM), Telemetry or WasmPlugin",
        "Mixer adapters have no direct equivalent; checks move to an ext_authz CUSTOM provider",
    ),
}
_DEPRECATED = {
    "networking.istio.io/v1alpha3": "networking.istio.io/v1",
    "telemetry.istio.io/v1alpha1": "telemetry.istio.io/v1",
}


@rule(
    "TM-INST-015",
    title="Removed Istio API: the resource is ignored",
    severity=Severity.ERROR,
    family=FAMILY,
    rationale="rbac.istio.io, authentication.istio.io and Mixer's config.istio.io were removed "
    "from Istio; current releases do not read them, so the access control they describe is "
    "silently not enforced.",
)
def removed_api(ctx: AnalysisContext) -> Iterator[Issue]:
    for u in _unknown(ctx):
        group = u.api_version.rpartition("/")[0]
        if group not in _REMOVED:
            continue
        removed, replacement, how = _REMOVED[group]
        yield Issue(
            message=f"{u.kind} {u.namespace}/{u.name} uses {u.api_version}, removed in Istio "
            f"{removed}: Istio ignores it, nothing it describes is enforced; rewrite it as "
            f"{replacement}",
            location=u.location,
            resource=f"{u.kind}/{u.namespace}/{u.name}",
            fix=f"# rewrite {u.kind} {u.namespace}/{u.name} as {replacement}:\n# {how}\n",
        )


@rule(
    "TM-INST-016",
    title="Deprecated Istio API version",
    severity=Severity.INFO,
    family=FAMILY,
    rationale="Alpha API versions are kept for compatibility and may be removed; the v1 "
    "versions have the same schema, so switching is a one-line change.",
)
def deprecated_api(ctx: AnalysisContext) -> Iterator[Issue]:
    for r in ctx.snapshot.resources:
        api = f"{r.group}/{r.version}"
        if api in _DEPRECATED and r.kind != "EnvoyFilter":  # it has no other version
            location = r.document.location((*r.base_path, "apiVersion"))
            yield Issue(
                message=f"{r.kind} {r.namespace}/{r.name} uses {api}; use {_DEPRECATED[api]}",
                location=location,
                resource=r.key,
                fix=f"apiVersion: {_DEPRECATED[api]}\n",
            )
    for u in _unknown(ctx):
        if u.api_version in _DEPRECATED and u.kind != "EnvoyFilter":
            yield Issue(
                message=f"{u.kind} {u.namespace}/{u.name} uses {u.api_version}; use "
                f"{_DEPRECATED[u.api_version]}",
                location=u.location,
                resource=f"{u.kind}/{u.namespace}/{u.name}",
                fix=f"apiVersion: {_DEPRECATED[u.api_version]}\n",
            )
