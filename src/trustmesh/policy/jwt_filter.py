"""Envoy's jwt_authn filter over one request, in the shape Istio configures it (pure).

Istio (``policy_applier.go``, built by :mod:`trustmesh.xds.jwt`) names the providers
``origins-0…`` in issuer order and requires ``requires_any[origins-0, allow_missing]`` for
one provider, ``requires_any[origins-0, …, requires_all[requires_any[origins-i,
allow_missing]…]]`` for several. This module runs that requirement the way Envoy 1.40 does
(``extractor.cc``, ``verifier.cc``, ``authenticator.cc``), step by step, because the
answer depends on the steps: every fact below was measured with the real binary (the
``jwt-extraction`` cases of ``tests/xds/test_rbac_differential.py``, built in
``tests/xds/jwt_cases.py``).

Where a provider finds tokens (its own locations only — another provider's are not its):

* header locations, ordered by ``name + prefix``: every value of the header (a repeated
  header Envoy joins, such as ``authorization``, is ONE value ``a,b``). With a prefix the
  FIRST occurrence of the prefix ANYWHERE in the value counts, case-sensitively
  (``x Bearer <jwt>`` and ``xBearer <jwt>`` carry a token, ``bearer <jwt>`` does not); the
  token starts at the next base64url or ``.`` character after it and runs to the end of
  the value (``Bearer <jwt> x`` is the token ``<jwt> x``; whether that verifies is
  :mod:`trustmesh.policy.jwt`'s business). No such character: the whole value is the
  token. Without a prefix the whole value is;
* query parameters (``access_token`` by default), ordered by name: the first value of
  the parameter, split at ``&`` and the first ``=``, percent-decoded (``+`` stays ``+``);
* cookies, ordered by name: over every ``Cookie`` line, ``;``-separated, leading spaces
  skipped, the first cookie of that name wins, one pair of surrounding quotes dropped.

A provider checks its tokens last-found first and stops at the first failure: every token
it finds must verify. Each verified token's payload becomes the request's identity (the
last one checked wins), its claim / payload headers are added, and — unless
``forwardOriginalToken`` — its header (every line) or query parameter is REMOVED from the
request before the next provider looks: so a token one provider accepted is no longer
there for the next one, which changes the combined answer. Before looking, a provider
removes the headers it writes itself (its ``outputClaimToHeaders`` / payload header); the
filter removes those of every provider once at the start, for every request (a client
cannot send them).

The answer is the first provider that accepts all its tokens; else, when no provider
finds any token (looking again, after the removals), the request passes without an
identity; else the failure Envoy reports — ``Audiences in Jwt are not allowed`` is 403,
every other failure 401. A CORS preflight (``OPTIONS`` with ``Origin`` and
``Access-Control-Request-Method``) is not checked at all (``bypass_cors_preflight``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from trustmesh.policy.jwt import (
    Check,
    JwtProvider,
    JwtStatus,
    check_token,
    claim_header_value,
    normalized_claims,
)

# extractJWT(): after the prefix, the token starts at the first of these characters.
_TOKEN_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
_HEX: Final = frozenset("0123456789abcdefABCDEF")


@dataclass(frozen=True, slots=True)
class JwtOutcome:
    """What the filter decided, and the request as the next filter (RBAC) sees it."""

    status: JwtStatus
    message: str
    headers: dict[str, tuple[str, ...]]
    query: str
    issuer: str | None = None
    subject: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict)
    added: tuple[tuple[str, str], ...] = ()  # header lines the filter wrote (to the app)
    steps: tuple[str, ...] = ()  # what each provider found and decided, for traces

    @property
    def http_status(self) -> int | None:
        return {JwtStatus.UNAUTHENTICATED: 401, JwtStatus.AUDIENCE: 403}.get(self.status)


@dataclass(frozen=True, slots=True)
class FoundToken:
    """A token one provider extracted, and where from (removed there once verified)."""

    value: str
    where: str
    header: str | None = None
    param: str | None = None


def run_jwt_filter(
    providers: Sequence[JwtProvider],
    headers: Mapping[str, tuple[str, ...]],
    query: str,
    method: str | None,
    now: float,
) -> JwtOutcome:
    """The jwt_authn filter with Istio's requirement for ``providers`` (issuer order)."""
    state = _State({name: list(values) for name, values in headers.items()}, query)
    if not providers:
        return state.outcome(JwtStatus.MISSING, "no RequestAuthentication applies")
    for provider in providers:  # the filter's own headers, before anything else
        for name in provider.sanitized_headers():
            state.remove_header(name)
    if (
        method == "OPTIONS"
        and _first(headers, "origin")
        and _first(headers, "access-control-request-method")
    ):
        return state.outcome(JwtStatus.MISSING, "CORS preflight: not checked (Istio bypasses it)")
    failures: list[tuple[Check | None, str]] = []
    for index, provider in enumerate(providers):
        outcome, message = _verify_provider(provider, index, state, now)
        if outcome is Check.OK:
            return state.passed()
        failures.append((outcome, message))
    if len(providers) > 1:
        # requires_all[requires_any[origins-i, allow_missing]…]: each provider looks
        # again (tokens verified above are gone); none may fail but by finding nothing.
        every: tuple[Check | None, str] = (Check.OK, "")
        for index, provider in enumerate(providers):
            outcome, message = _verify_provider(provider, index, state, now)
            if outcome not in (Check.OK, None):
                every = (outcome, message)
                break
        if every[0] is Check.OK:
            return state.passed()
        failures.append(every)
    outcome, message = _reported(failures)
    if outcome is None:
        return state.passed()
    status = JwtStatus.AUDIENCE if outcome is Check.AUDIENCE else JwtStatus.UNAUTHENTICATED
    return state.outcome(status, message)


def find_tokens(
    provider: JwtProvider, headers: Mapping[str, Sequence[str]], query: str
) -> list[FoundToken]:
    """Envoy's extractor for one provider: header locations (ordered by name + prefix),
    then query parameters, then cookies (each ordered by name)."""
    found: list[FoundToken] = []
    locations = {name + prefix: (name, prefix) for name, prefix in provider.locations()}
    for key in sorted(locations):
        name, prefix = locations[key]
        for value in headers.get(name, ()):
            if prefix:
                at = value.find(prefix)
                if at < 0:
                    continue
                value = after_prefix(value, at + len(prefix))
            found.append(FoundToken(value, f"header {name}", header=name))
    params = sorted(set(provider.params()))
    if params and query:
        values = parse_query(query)
        found += [
            FoundToken(values[p][0], f"query parameter {p}", param=p) for p in params if p in values
        ]
    if provider.from_cookies:
        wanted = set(provider.from_cookies)
        cookies = parse_cookies(headers.get("cookie", ()), wanted)
        found += [FoundToken(cookies[c], f"cookie {c}") for c in sorted(wanted) if c in cookies]
    return found


def after_prefix(value: str, start: int) -> str:
    """extractJWT(): from the first base64url or ``.`` character at ``start`` on to the
    end of the value; the whole value when there is none."""
    for index in range(start, len(value)):
        if value[index] in _TOKEN_CHARS:
            return value[index:]
    return value


def parse_query(query: str) -> dict[str, list[str]]:
    """``QueryParamsMulti::parseAndDecodeQueryString``: name → values in order."""
    params: dict[str, list[str]] = {}
    for part in query.removeprefix("?").split("&") if query else ():
        if not part:
            continue
        name, sep, value = part.partition("=")
        params.setdefault(percent_decode(name), []).append(percent_decode(value) if sep else "")
    return params


def percent_decode(text: str) -> str:
    """``PercentEncoding::decode``: every ``%XX`` with two hex digits (``+`` is kept)."""
    out: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char == "%" and index + 2 < len(text):
            high, low = text[index + 1], text[index + 2]
            if high in _HEX and low in _HEX:
                out.append(chr(int(high + low, 16)))
                index += 3
                continue
        out.append(char)
        index += 1
    return "".join(out)


def parse_cookies(lines: Iterable[str], wanted: set[str]) -> dict[str, str]:
    """``Utility::parseCookies`` for the cookie names in ``wanted``."""
    cookies: dict[str, str] = {}
    for line in lines:
        for part in line.split(";"):
            if not part:
                continue
            equals = part.find("=")
            if equals < 0:
                continue
            start = len(part) - len(part.lstrip(" "))
            name = part[start:equals] if start <= equals else ""
            value = part[equals + 1 :]
            if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
                value = value[1:-1]
            if name in wanted:
                cookies.setdefault(name, value)
    return cookies


@dataclass(slots=True)
class _State:
    """The request while the filter works on it: headers, query, what it decided."""

    headers: dict[str, list[str]]
    query: str
    added: list[tuple[str, str]] = field(default_factory=list)
    payload: Mapping[str, Any] | None = None
    steps: list[str] = field(default_factory=list)

    def remove_header(self, name: str) -> None:
        if self.headers.pop(name, None) is not None or any(n == name for n, _ in self.added):
            self.added = [(n, v) for n, v in self.added if n != name]

    def add_header(self, name: str, value: str) -> None:
        self.headers.setdefault(name, []).append(value)
        self.added.append((name, value))

    def remove_param(self, name: str) -> None:
        """``JwtParamLocation::removeJwt``: the query rebuilt without the parameter, its
        other values decoded (Envoy re-emits them as decoded; their order is Envoy's
        map order, which no decision reads)."""
        params = parse_query(self.query)
        params.pop(name, None)
        pairs = [f"{key}={value}" for key in sorted(params) for value in params[key]]
        self.query = "?" + "&".join(pairs) if pairs else ""

    def passed(self) -> JwtOutcome:
        if self.payload is None:
            return self.outcome(JwtStatus.MISSING, "no token in any configured location")
        return self.outcome(JwtStatus.OK, "valid")

    def outcome(self, status: JwtStatus, message: str) -> JwtOutcome:
        payload = self.payload if status is JwtStatus.OK else None
        issuer = subject = None
        if payload is not None:
            issuer = str(payload.get("iss", ""))
            sub = payload.get("sub")
            subject = sub if isinstance(sub, str) else None
        return JwtOutcome(
            status=status,
            message=message,
            headers={name: tuple(values) for name, values in self.headers.items()},
            query=self.query,
            issuer=issuer,
            subject=subject,
            claims=normalized_claims(payload) if payload is not None else {},
            added=tuple(self.added) if status is JwtStatus.OK else (),
            steps=tuple(self.steps),
        )


def _verify_provider(
    provider: JwtProvider, index: int, state: _State, now: float
) -> tuple[Check | None, str]:
    """One ``provider_name`` requirement: None when it finds no token."""
    for name in provider.sanitized_headers():
        state.remove_header(name)
    tokens = find_tokens(provider, state.headers, state.query)
    label = f"origins-{index} ({provider.issuer})"
    if not tokens:
        state.steps.append(f"{label}: no token")
        return None, "Jwt is missing"
    for token in reversed(tokens):  # Envoy pops tokens from the back
        check = check_token(provider, token.value, now)
        state.steps.append(f"{label}: token in {token.where}: {check.message}")
        if check.outcome is not Check.OK:
            return check.outcome, check.message
        if provider.output_payload_to_header:
            state.add_header(provider.output_payload_to_header.lower(), check.payload_segment)
        for header, claim in provider.output_claim_to_headers:
            value = claim_header_value(check.payload, claim)
            if value is not None:
                state.add_header(header.lower(), value)
        if not provider.forward_original_token:
            if token.header is not None:
                state.remove_header(token.header)
            elif token.param is not None:
                state.remove_param(token.param)
        state.payload = check.payload
    return Check.OK, "valid"


def _reported(failures: list[tuple[Check | None, str]]) -> tuple[Check | None, str]:
    """The requires_any aggregate: the last failure that is neither "no token" nor
    "unknown issuer", else an unknown issuer, else "no token" (None)."""
    reported: tuple[Check | None, str] = (None, "Jwt is missing")
    for outcome, message in failures:
        if outcome not in (None, Check.UNKNOWN_ISSUER) or reported[0] is None:
            reported = (outcome, message)
    return reported


def _first(headers: Mapping[str, tuple[str, ...]], name: str) -> str:
    values = headers.get(name, ())
    return values[0] if values else ""
