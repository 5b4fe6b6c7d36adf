"""Generalizing recorded paths into AuthorizationPolicy ``paths`` values (pure).

A recorded path is first reduced to what RBAC matches: Envoy's normalization under the
mesh's ``pathNormalization`` (percent-encoded unreserved characters decoded, dot segments
resolved …) and without the query — a policy ``paths`` value never sees the query. Then
each segment that is an identifier — all digits, a UUID, or a hex string of 8+ characters
with a digit in it (hashes, object ids) — becomes the one-segment URI template ``{*}``
(a path with an empty segment — a trailing slash, ``//`` — stays exact: a URI template
cannot hold one):
``/api/v1/items/123?x=1`` → ``/api/v1/items/{*}``. Nothing else widens: words stay
exact, a trailing slash stays (``/a/`` and ``/a`` are different paths to RBAC), no prefix
(``/api/*``) or ``{**}`` is ever produced, so a rule allows exactly the observed paths and
the same shape with other identifiers. A path that still holds a ``%`` escape after
normalization is written exactly (RBAC compares it escaped; a template literal may not
hold one). A segment with a character that
would change a template's meaning (``{``, ``}``, ``*``) is never replaced, and a path
holding one of those stays an exact value only when it has no ``*`` (Istio reads ``*`` at
either end of a value as a wildcard): otherwise it cannot be written without widening and
is reported.
"""

from __future__ import annotations

import re

from trustmesh.policy.pathnorm import PathNormalization, PathRejected, normalize_path

__all__ = ["SEGMENT", "UnwritablePath", "generalize_path", "is_identifier"]

SEGMENT = "{*}"

_DIGITS = re.compile(r"[0-9]+")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_HEX = re.compile(r"[0-9a-fA-F]{8,}")


class UnwritablePath(ValueError):
    """A recorded path no ``paths`` value can allow without allowing more."""


def is_identifier(segment: str) -> bool:
    """Whether a path segment is a value (an id) rather than a name."""
    if _DIGITS.fullmatch(segment) or _UUID.fullmatch(segment):
        return True
    return bool(_HEX.fullmatch(segment)) and any(c.isdigit() for c in segment)


def generalize_path(
    recorded: str, normalization: PathNormalization, *, templates: bool = True
) -> str:
    """The ``paths`` value allowing ``recorded`` (see the module docstring); with
    ``templates`` off the normalized path itself (for Istio releases without ``{*}``).

    Raises :class:`UnwritablePath` for a path Envoy rejects before RBAC (nothing to
    allow) or one that cannot be written exactly.
    """
    try:
        normalized = normalize_path(recorded, normalization)
    except PathRejected as exc:
        raise UnwritablePath(f"Envoy refuses this path before any policy: {exc.reason}") from None
    path = normalized.path
    if not templates:
        return _exact(path)
    segments = path.split("/")
    out = [
        SEGMENT if i > 0 and seg and is_identifier(seg) and "%" not in seg else seg
        for i, seg in enumerate(segments)
    ]
    value = "/".join(out)
    if value == path:
        if "*" in path or "{" in path or "}" in path:
            raise UnwritablePath(
                f"{path!r} holds '*', '{{' or '}}', which a paths value reads as a wildcard"
            )
        return path
    if any(c in s for s in segments for c in "{}*%") or "" in segments[1:]:
        # A literal brace or star next to a template would be read as template syntax;
        # an empty segment (a trailing slash, "//") or a percent escape is not a literal
        # every URI-template parser takes: such a path is written exactly instead.
        return _exact(path)
    return value


def _exact(path: str) -> str:
    if "*" in path or "{" in path or "}" in path:
        raise UnwritablePath(
            f"{path!r} holds '*', '{{' or '}}', which a paths value reads as a wildcard"
        )
    return path
