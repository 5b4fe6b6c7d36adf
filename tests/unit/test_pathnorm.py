"""Tests for trustmesh.policy.pathnorm.

Expected values come from Envoy's own tests (test/common/http/path_utility_test.cc)
and from the behaviour observed on Envoy 1.40 with Istio-generated config.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trustmesh.policy.pathnorm import (
    NormalizedPath,
    PathNormalization,
    PathRejected,
    _canonicalize,
    _merge_slashes,
    _strip_dot_segment_params,
    normalize_path,
)

NONE = PathNormalization.NONE
BASE = PathNormalization.BASE
MERGE = PathNormalization.MERGE_SLASHES
DECODE = PathNormalization.DECODE_AND_MERGE_SLASHES
NORMALIZING = [BASE, MERGE, DECODE]
ALL_MODES = [NONE, *NORMALIZING]


def rbac_path(raw: str, mode: PathNormalization) -> str:
    return normalize_path(raw, mode).path


# --- from_mesh ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, BASE),
        ("", BASE),
        ("DEFAULT", BASE),
        ("NONE", NONE),
        ("BASE", BASE),
        ("MERGE_SLASHES", MERGE),
        ("DECODE_AND_MERGE_SLASHES", DECODE),
    ],
)
def test_from_mesh(value: str | None, expected: PathNormalization) -> None:
    assert PathNormalization.from_mesh(value) is expected


@pytest.mark.parametrize("value", ["base", "MERGE", "decode_and_merge_slashes", " BASE"])
def test_from_mesh_rejects_unknown(value: str) -> None:
    with pytest.raises(ValueError, match="pathNormalization"):
        PathNormalization.from_mesh(value)


# --- NormalizedPath / PathRejected -------------------------------------------------


def test_normalized_path_full_and_frozen() -> None:
    result = normalize_path("/anything?x=1", BASE)
    assert result == NormalizedPath("/anything", "?x=1")
    assert result.full == "/anything?x=1"
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.path = "/other"  # type: ignore[misc]


def test_path_rejected_is_value_error_with_reason() -> None:
    with pytest.raises(ValueError) as info:
        normalize_path("/a%00b", BASE)
    assert isinstance(info.value, PathRejected)
    assert info.value.reason == "path contains %00 (an encoded NUL)"
    assert info.value.status == 400


# --- query handling ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ALL_MODES)
def test_query_is_split_off_and_preserved(mode: PathNormalization) -> None:
    result = normalize_path("/anything?x=1", mode)
    assert result.path == "/anything"
    assert result.query == "?x=1"


@pytest.mark.parametrize("mode", NORMALIZING)
def test_query_is_never_rewritten(mode: PathNormalization) -> None:
    query = "?next=/a/../b//c%2Fd%2e%2e\\e%41 &y=%00"
    result = normalize_path("/a/../b" + query, mode)
    assert result.path == "/b"
    assert result.query == query


def test_empty_query_is_kept() -> None:
    assert normalize_path("/a?", BASE) == NormalizedPath("/a", "?")
    assert normalize_path("/a//b?", MERGE) == NormalizedPath("/a/b", "?")


def test_only_first_question_mark_splits() -> None:
    assert normalize_path("/a/./b??x?y", BASE) == NormalizedPath("/a/b", "??x?y")


# --- rejections --------------------------------------------------------------------


@pytest.mark.parametrize("mode", NORMALIZING)
@pytest.mark.parametrize(
    "raw", ["/%00", "/a%00b", "/xyz/.%00../abc", "/xyz/%00.%00./abc", "/xyz/AAAAA%%0000/abc"]
)
def test_percent_00_is_rejected(raw: str, mode: PathNormalization) -> None:
    with pytest.raises(PathRejected, match="%00"):
        normalize_path(raw, mode)


def test_percent_00_passes_without_normalization() -> None:
    # The rejection comes from the canonicalizer, which NONE never runs.
    assert rbac_path("/a%00b", NONE) == "/a%00b"


def test_percent_00_in_query_is_not_rejected() -> None:
    assert normalize_path("/a?x=%00", BASE).query == "?x=%00"


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("raw", ["/admin#frag", "/public#/../admin", "/a?x=1#frag", "/#"])
def test_fragment_is_rejected_in_every_mode(raw: str, mode: PathNormalization) -> None:
    with pytest.raises(PathRejected, match="fragment") as info:
        normalize_path(raw, mode)
    assert info.value.status == 400


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("raw", ["/a\x00b", "/a\rb", "/a\nb"])
def test_raw_nul_cr_lf_are_rejected(raw: str, mode: PathNormalization) -> None:
    with pytest.raises(PathRejected) as info:
        normalize_path(raw, mode)
    assert info.value.status == 400


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("raw", ["", "*", "admin", "http://host/admin", "?x=1", "\\admin"])
def test_non_origin_form_gets_404(raw: str, mode: PathNormalization) -> None:
    with pytest.raises(PathRejected) as info:
        normalize_path(raw, mode)
    assert info.value.status == 404


# --- NONE --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    ["/a/../b", "/a/./b", "//x", "/a%2Fb", "/%61", "/a\\b", "/a%2e%2e/b", "/a b", "/é"],
)
def test_none_leaves_path_untouched(raw: str) -> None:
    assert rbac_path(raw, NONE) == raw


# --- BASE (Istio default): normalize_path only -------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/a/../b", "/b"),
        ("/a/b/../c", "/a/c"),
        ("/a/b/./c", "/a/b/c"),
        ("/a/b/../../../../c", "/c"),  # ".." above the root stops at the root
        ("/..", "/"),
        ("/../../a", "/a"),
        ("/a/..", "/"),
        ("/a/.", "/a/"),
        ("/a/b/..", "/a/"),
        ("/.", "/"),
        ("/a/%2e%2e/b", "/b"),
        ("/a/%2E%2E/b", "/b"),
        ("/a/%2e%2E/b", "/b"),
        ("/a/.%2e/b", "/b"),
        ("/a/%2e./b", "/b"),
        ("/a/%2e/b", "/a/b"),
        ("/a/%2E/b", "/a/b"),
        ("/a%2eb", "/a.b"),  # an escaped dot inside a name is still written as '.'
        ("/.well-known/x", "/.well-known/x"),
        ("/a/..b/c", "/a/..b/c"),
        ("/a/...", "/a/..."),
    ],
)
def test_base_resolves_dot_segments(raw: str, expected: str) -> None:
    assert rbac_path(raw, BASE) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/%61", "/a"),
        ("/%41%5A%7a", "/AZz"),
        ("/%30%39", "/09"),
        ("/%2D%5f%7E", "/-_~"),
        # Only unreserved characters are decoded; everything else keeps its escape.
        ("/%3A%40%21%3b", "/%3A%40%21%3b"),
        ("/%20", "/%20"),
        ("/%25", "/%25"),
        ("/%25%32%66", "/%252f"),  # no double decoding
    ],
)
def test_base_decodes_unreserved_escapes_only(raw: str, expected: str) -> None:
    assert rbac_path(raw, BASE) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/%c0%af", "/%c0%af"),
        ("/%5c%25", "/%5c%25"),
        ("/a/%2F%2f/c", "/a/%2F%2f/c"),
        ("/%e2%82%ac", "/%e2%82%ac"),
        ("/%Ab", "/%Ab"),
    ],
)
def test_base_keeps_hex_case_of_kept_escapes(raw: str, expected: str) -> None:
    assert rbac_path(raw, BASE) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/a b", "/a%20b"),
        ('/a"b', "/a%22b"),
        ("/<script>", "/%3Cscript%3E"),
        ("/a`b^c", "/a%60b%5Ec"),
        ("/{a|b}", "/%7Ba%7Cb%7D"),
        ("/a\tb\x7f", "/a%09b%7F"),
        ("/é", "/%C3%A9"),
        ("/日本", "/%E6%97%A5%E6%9C%AC"),
        # Copied as they are.
        ("/a!$&'()*+,;=:@[]b", "/a!$&'()*+,;=:@[]b"),
    ],
)
def test_base_percent_encodes_unsafe_characters(raw: str, expected: str) -> None:
    assert rbac_path(raw, BASE) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/a\\b", "/a/b"),
        ("/a\\\\b", "/a//b"),
        ("/a/..\\c", "/c"),
        ("/public\\..\\private", "/private"),
        ("/a\\.\\b", "/a/b"),
    ],
)
def test_base_turns_backslash_into_slash(raw: str, expected: str) -> None:
    assert rbac_path(raw, BASE) == expected


@pytest.mark.parametrize(
    "raw", ["//x", "/a//b", "/a/b//", "/a%2Fb", "/a%2fb", "/a%5Cb", "/a%5cb", "/a%2F..%2Fb"]
)
def test_base_keeps_double_and_escaped_slashes(raw: str) -> None:
    assert rbac_path(raw, BASE) == raw


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/%zz", "/%zz"),
        ("/100%", "/100%"),
        ("/a%2", "/a%2"),
        ("/a%%b", "/a%%b"),
        # Decoding must not let a stray '%' form a new escape ("%%30%30" is not "%00").
        ("/%%30%30", "/%2500"),
        ("/%%300", "/%2500"),
        ("/%3%30", "/%2530"),
        ("/%%30", "/%0"),
    ],
)
def test_base_invalid_escapes_are_kept_permissively(raw: str, expected: str) -> None:
    assert rbac_path(raw, BASE) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/xyz/..;foo=bar/abc", "/abc"),
        ("/..;foo=bar/abc", "/abc"),
        ("/xyz/..;foo=bar", "/"),
        ("/xyz/.;foo=bar/abc", "/xyz/abc"),
        ("/.;foo=bar/abc", "/abc"),
        ("/xyz/.;foo=bar", "/xyz/"),
        ("/xyz/..;foo=bar/.;v1=2,v2=3/abc", "/abc"),
        ("/.;aaa/..;foo=bar/abc/.;mmm", "/abc/"),
        ("/xyz/..;foo=bar/.;fff=zzz/remain;blah-bluh", "/remain;blah-bluh"),
        ("/xyz/...;foo/abc", "/xyz/...;foo/abc"),
        ("/xyz/a;b/abc", "/xyz/a;b/abc"),  # ordinary parameters stay
    ],
)
def test_base_strips_parameters_from_dot_segments(raw: str, expected: str) -> None:
    assert rbac_path(raw, BASE) == expected


def test_already_normal_paths_are_unchanged() -> None:
    for raw in ["/", "/xyz", "/x/y/z", "/A/B/C", "/api/v1/items", "/a.b/c.d", "/a-b_c~d"]:
        assert rbac_path(raw, BASE) == raw


# --- MERGE_SLASHES -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("//x", "/x"),
        ("//a/b/c", "/a/b/c"),
        ("/a//b/c", "/a/b/c"),
        ("/a////b/c", "/a/b/c"),
        ("/a/b/c//", "/a/b/c/"),
        ("/a//b/c/", "/a/b/c/"),
        ("/a\\\\b", "/a/b"),  # backslashes become slashes first, then get merged
        ("/a/.//b", "/a/b"),
        ("/a//../b", "/a/b"),  # ".." only climbs the empty segment, as in Envoy
        # Envoy rebuilds "/" + segments + "/"; with no segments "//" stays "//".
        ("//", "//"),
        ("///", "//"),
    ],
)
def test_merge_slashes(raw: str, expected: str) -> None:
    assert rbac_path(raw, MERGE) == expected


@pytest.mark.parametrize("raw", ["/a%2Fb", "/a%2fb", "/a%5Cb", "/a%2F%2Fb"])
def test_merge_slashes_keeps_escaped_slashes(raw: str) -> None:
    assert rbac_path(raw, MERGE) == raw


def test_merge_slashes_also_normalizes() -> None:
    assert rbac_path("//a/./b/../c%61", MERGE) == "/a/ca"


# --- DECODE_AND_MERGE_SLASHES ------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/a%2Fb", "/a/b"),
        ("/a%2fb", "/a/b"),
        ("/a%5Cb", "/a/b"),
        ("/a%5cb", "/a/b"),
        ("/a%2F%2fb", "/a/b"),
        ("/a%2F..%2Fb", "/b"),  # decoded before canonicalization, so ".." is resolved
        ("/x/%2E%2e/z%2f%2Fabc%5C../def", "/z/def"),
        ("/a%5C..%5Cb", "/b"),
        ("/%252F", "/%252F"),  # only one level of decoding
        ("/%2", "/%2"),
        ("/a%2Fb//c", "/a/b/c"),
    ],
)
def test_decode_and_merge_slashes(raw: str, expected: str) -> None:
    assert rbac_path(raw, DECODE) == expected


# --- the DENY-bypass cases ---------------------------------------------------------

BYPASS_CASES: list[tuple[str, dict[PathNormalization, str]]] = [
    (
        "//admin/secret",
        {
            NONE: "//admin/secret",
            BASE: "//admin/secret",
            MERGE: "/admin/secret",
            DECODE: "/admin/secret",
        },
    ),
    (
        "/admin%2Fsecret",
        {
            NONE: "/admin%2Fsecret",
            BASE: "/admin%2Fsecret",
            MERGE: "/admin%2Fsecret",
            DECODE: "/admin/secret",
        },
    ),
    (
        "/admin%2fsecret",
        {
            NONE: "/admin%2fsecret",
            BASE: "/admin%2fsecret",
            MERGE: "/admin%2fsecret",
            DECODE: "/admin/secret",
        },
    ),
    (
        "/public/../private",
        {NONE: "/public/../private", BASE: "/private", MERGE: "/private", DECODE: "/private"},
    ),
    (
        "/public/%2e%2e/private",
        {NONE: "/public/%2e%2e/private", BASE: "/private", MERGE: "/private", DECODE: "/private"},
    ),
]


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize(("raw", "expected"), BYPASS_CASES)
def test_bypass_cases(
    raw: str, expected: dict[PathNormalization, str], mode: PathNormalization
) -> None:
    assert rbac_path(raw, mode) == expected[mode]


@pytest.mark.parametrize("mode", NORMALIZING)
def test_bypass_percent_00(mode: PathNormalization) -> None:
    with pytest.raises(PathRejected):
        normalize_path("/admin%00/secret", mode)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_bypass_fragment(mode: PathNormalization) -> None:
    with pytest.raises(PathRejected):
        normalize_path("/public#/../admin/secret", mode)


# --- fast path agrees with the full canonicalizer ----------------------------------

_SAFE_CHARS = "abcXYZ019-._~!$&'()*+,;=:@[]/"


@given(st.text(alphabet=_SAFE_CHARS, max_size=40))
def test_fast_path_matches_canonicalizer(tail: str) -> None:
    raw = "/" + tail
    canonical = _canonicalize(_strip_dot_segment_params(raw))
    assert canonical is not None
    assert normalize_path(raw, BASE).path == canonical
    assert normalize_path(raw, MERGE).path == _merge_slashes(canonical)
    assert normalize_path(raw, DECODE).path == _merge_slashes(canonical)


# --- properties --------------------------------------------------------------------

_PATH_ATOMS = st.sampled_from(
    [
        "/", "//", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "\\",
        "%", "%3", "%30", "%41", "%61", "%7e", "%c3%a9", "%zz", ";", ";x=1",
        "a", "B", "z9", "0", "%00", "-", "_", "~", " ", '"', "<", ">", "é", ":", "@", "?", "&",
    ]
)  # fmt: skip
_RAW_PATHS = st.lists(_PATH_ATOMS, max_size=25).map(lambda parts: "/" + "".join(parts))


def _rbac_path_or_none(raw: str, mode: PathNormalization) -> str | None:
    try:
        return rbac_path(raw, mode)
    except PathRejected:
        return None


def _has_dot_segment_with_params(path: str) -> bool:
    return any(seg.startswith((".;", "..;")) for seg in path.split("/"))


@given(_RAW_PATHS)
def test_base_is_idempotent_without_percent_25(raw: str) -> None:
    if "%25" in raw.split("?", 1)[0]:
        return
    once = _rbac_path_or_none(raw, BASE)
    # See test_escaped_dot_segment_with_params_survives_one_pass for the exception.
    if once is not None and not _has_dot_segment_with_params(once):
        assert rbac_path(once, BASE) == once


@given(_RAW_PATHS)
def test_merge_modes_are_idempotent(raw: str) -> None:
    if "%25" in raw.split("?", 1)[0]:
        return
    for mode in (MERGE, DECODE):
        once = _rbac_path_or_none(raw, mode)
        if once is not None and not _has_dot_segment_with_params(once):
            assert rbac_path(once, mode) == once


@pytest.mark.parametrize("mode", NORMALIZING)
def test_escaped_dot_segment_with_params_survives_one_pass(mode: PathNormalization) -> None:
    # Envoy strips ";params" from dot segments only when the dots are literal, and
    # does so before "%2e" is decoded; so one pass yields "..;x" and only a second
    # pass (e.g. by a Tomcat backend) climbs.  Reproduced as Envoy does it.
    once = rbac_path("/public/%2e%2e;x/admin", mode)
    assert once == "/public/..;x/admin"
    assert rbac_path(once, mode) == "/admin"
    assert rbac_path("/%2e;", mode) == "/.;"


@given(_RAW_PATHS)
def test_result_is_rooted_and_free_of_dot_segments(raw: str) -> None:
    for mode in NORMALIZING:
        path = _rbac_path_or_none(raw, mode)
        if path is None:
            assert "%00" in raw
            continue
        assert path.startswith("/")
        assert "?" not in path
        segments = path.split("/")
        assert "." not in segments
        assert ".." not in segments


@given(_RAW_PATHS)
def test_full_is_path_plus_untouched_query(raw: str) -> None:
    for mode in ALL_MODES:
        try:
            result = normalize_path(raw, mode)
        except PathRejected:
            continue
        q = raw.find("?")
        assert result.query == ("" if q < 0 else raw[q:])
        assert result.full == result.path + result.query


@given(_RAW_PATHS)
def test_decode_mode_leaves_no_escaped_or_double_slash(raw: str) -> None:
    path = _rbac_path_or_none(raw.split("?", 1)[0], DECODE)
    if path is None:
        return
    lowered = path.lower()
    assert "%2f" not in lowered
    assert "%5c" not in lowered
    assert "\\" not in path
    assert "//" not in path or path == "//"
