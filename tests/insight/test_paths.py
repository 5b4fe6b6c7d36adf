"""Path generalization: ids become one-segment templates, nothing else widens."""

from __future__ import annotations

import pytest

from trustmesh.insight.paths import UnwritablePath, generalize_path, is_identifier
from trustmesh.policy.matchers import path_template_regex
from trustmesh.policy.pathnorm import PathNormalization

BASE = PathNormalization.BASE


@pytest.mark.parametrize(
    ("recorded", "expected"),
    [
        ("/api/v1/items/123", "/api/v1/items/{*}"),
        ("/api/v2/items", "/api/v2/items"),  # a version is a name, not an id
        ("/api/items/7?x=1&y=2", "/api/items/{*}"),  # paths never see the query
        ("/api/items?id=7", "/api/items"),
        ("/", "/"),
        ("/api/items/", "/api/items/"),  # a trailing slash is another path to RBAC
        ("/api/items/123/", "/api/items/123/"),  # no template with an empty segment
        ("/o/5f1b2c3d4e5f6a7b8c9d0e1f", "/o/{*}"),  # an object id
        ("/o/123e4567-e89b-12d3-a456-426614174000/x", "/o/{*}/x"),  # a UUID
        ("/o/deadbeef", "/o/deadbeef"),  # hex letters only: a word
        ("/o/cafe", "/o/cafe"),
        ("/o/a1b2", "/o/a1b2"),  # too short for a hash
        ("/api/%61bc/5", "/api/abc/{*}"),  # unreserved escapes decoded as Envoy does
        ("/a%2Fb/12", "/a%2Fb/12"),  # BASE keeps %2F: an escape, so no template at all
        ("/a/../b/9", "/b/{*}"),  # dot segments resolved first
        ("/users/42/orders/7", "/users/{*}/orders/{*}"),
        ("/a/{b}/1", "/a/%7Bb%7D/1"),  # Envoy escapes braces: exact, never template syntax
    ],
)
def test_generalize(recorded: str, expected: str) -> None:
    assert generalize_path(recorded, BASE) == expected


def test_decode_and_merge_slashes_decodes_the_escaped_slash_first() -> None:
    mode = PathNormalization.DECODE_AND_MERGE_SLASHES
    assert generalize_path("/a%2Fb/12", mode) == "/a/b/{*}"
    assert generalize_path("//x//12", mode) == "/x/{*}"


@pytest.mark.parametrize("recorded", ["/a/*", "/a/b*", "/x%00", "/a#frag"])
def test_paths_that_cannot_be_written_exactly_are_refused(recorded: str) -> None:
    with pytest.raises(UnwritablePath):
        generalize_path(recorded, BASE)


def test_a_template_allows_the_shape_and_not_more() -> None:
    template = path_template_regex(generalize_path("/api/items/123", BASE))
    assert template.fullmatch("/api/items/999")
    assert not template.fullmatch("/api/items/1/delete")
    assert not template.fullmatch("/api/items/")
    assert not template.fullmatch("/api/other/1")


def test_identifiers() -> None:
    assert is_identifier("0") and is_identifier("0123456789abcdef")
    assert not is_identifier("v1") and not is_identifier("items") and not is_identifier("")


def test_exact_paths_only_normalize() -> None:
    assert generalize_path("/api/items/123?x=1", BASE, templates=False) == "/api/items/123"
    assert generalize_path("/a/./%61/1", BASE, templates=False) == "/a/a/1"
