"""Bad input: every problem is reported with file:line and field, nothing is lost."""

from __future__ import annotations

import io

import pytest

from trustmesh.api.diagnostics import Diagnostic
from trustmesh.api.loader import load_sources
from trustmesh.api.yamldoc import MAX_DEPTH, MAX_FILE_BYTES
from trustmesh.config import load_config

AP = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: {name}
  namespace: foo
spec:
  rules:
  - to:
    - operation:
        methods: [GET]
"""


def load(text: str | bytes, name: str = "policies.yaml"):  # type: ignore[no-untyped-def]
    data = text.encode() if isinstance(text, str) else text
    return load_sources([(name, data)])


def only_error(diagnostics: list[Diagnostic]) -> Diagnostic:
    errors = [d for d in diagnostics if d.is_error]
    assert len(errors) == 1, [str(d) for d in diagnostics]
    return errors[0]


def test_wrong_type_names_file_line_and_field_path() -> None:
    text = AP.format(name="x").replace("methods: [GET]", "methods: [GET]\n        paths: [/a, 5]")
    problem = only_error(load(text).diagnostics)
    assert problem.location.file == "policies.yaml"
    assert problem.location.line == 11
    assert problem.location.field == "spec.rules[0].to[0].operation.paths[1]"
    assert problem.message == "expected a string, got 5"
    assert str(problem).startswith("policies.yaml:11 spec.rules[0].to[0].operation.paths[1]: error")


def test_unknown_field_is_an_error_at_its_line() -> None:
    text = AP.format(name="x").replace("methods: [GET]", "methods: [GET]\n        verbs: [GET]")
    problem = only_error(load(text).diagnostics)
    assert (problem.code, problem.location.line) == ("unknown-field", 11)
    assert problem.location.field == "spec.rules[0].to[0].operation.verbs"


def test_malformed_yaml_does_not_take_other_documents_down() -> None:
    text = AP.format(name="a") + "---\nkind: [unclosed\n---\n" + AP.format(name="b")
    result = load(text)
    assert [r.name for r in result.resources] == ["a", "b"]
    problem = only_error(result.diagnostics)
    assert problem.code == "yaml-syntax"
    assert problem.location.line in (12, 13)


def test_all_errors_are_collected_not_just_the_first() -> None:
    text = (
        AP.format(name="a").replace("[GET]", "GET")
        + "---\n"
        + AP.format(name="b").replace("rules:", "action: NOPE\n  rules:")
    )
    result = load(text)
    codes = sorted(d.location.field for d in result.diagnostics)
    assert codes == ["spec.action", "spec.rules[0].to[0].operation.methods"]
    assert result.resources == []


def test_invalid_utf8_is_reported_with_its_line() -> None:
    data = AP.format(name="a").encode() + b"# caf\xe9\n"
    problem = only_error(load(data).diagnostics)
    assert problem.code == "invalid-utf8"
    assert problem.location.line == 11


def test_duplicate_keys_are_an_error_not_last_wins() -> None:
    text = AP.format(name="a").replace("  namespace: foo\n", "  namespace: foo\n  namespace: bar\n")
    problem = only_error(load(text).diagnostics)
    assert problem.code == "yaml-structure"
    assert "duplicate key 'namespace'" in problem.message
    assert problem.location.line == 6


def test_deep_nesting_is_refused_cleanly() -> None:
    deep = "a: " + "[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5)
    problem = only_error(load(deep).diagnostics)
    assert "nesting deeper" in problem.message


def test_alias_bomb_is_refused_cleanly() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 8):
        prev = f"*a{i - 1}"
        lines.append(f"a{i}: &a{i} [{', '.join([prev] * 10)}]")
    problem = only_error(load("\n".join(lines)).diagnostics)
    assert "more than" in problem.message


def test_oversized_file_is_refused() -> None:
    problem = only_error(load(b"#" * (MAX_FILE_BYTES + 1)).diagnostics)
    assert problem.code == "file-too-large"


def test_document_that_is_not_an_object() -> None:
    problem = only_error(load("- just\n- a list\n").diagnostics)
    assert problem.code == "not-an-object"


def test_missing_kind_and_bad_version() -> None:
    result = load(
        "apiVersion: v1\nmetadata: {name: x}\n---\n" + AP.format(name="y").replace("/v1", "/v9")
    )
    fields = sorted((d.code, d.location.line) for d in result.diagnostics)
    assert fields == [("missing-field", 1), ("unsupported-version", 4)]


def test_kind_list_items_keep_their_positions() -> None:
    item = AP.format(name="a").replace("\n", "\n  ").rstrip()
    text = "apiVersion: v1\nkind: List\nitems:\n- " + item.replace("methods: [GET]", "methods: 5")
    problem = only_error(load(text).diagnostics)
    assert problem.location.field == "items[0].spec.rules[0].to[0].operation.methods"
    assert problem.location.line == 13


def test_unknown_kinds_are_kept_and_ignored() -> None:
    result = load("apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\n")
    assert result.diagnostics == []
    assert [(u.kind, u.name) for u in result.unknown] == [("Widget", "w")]


def test_directories_stdin_and_missing_paths(tmp_path) -> None:  # type: ignore[no-untyped-def]
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    (nested / "p.yaml").write_text(AP.format(name="from-dir"))
    (tmp_path / "notes.txt").write_text("not yaml")
    stdin = io.BytesIO(AP.format(name="from-stdin").encode())
    loaded = load_config([str(tmp_path), "-", str(tmp_path / "missing.yaml")], stdin=stdin)
    names = sorted(r.name for r in loaded.snapshot.resources)
    assert names == ["from-dir", "from-stdin"]
    assert [d.code for d in loaded.errors] == ["unreadable"]
    assert loaded.mesh is None  # errors: nothing is decided on a partial config


@pytest.mark.parametrize(
    "text",
    [
        "\t- bad indent",
        "a: b: c",
        "{",
        "? [a]\n: b",
        "a: !!python/object:os.system x",
        "\x00",
    ],
)
def test_garbage_never_raises(text: str) -> None:
    result = load(text)
    assert result.resources == []
    assert any(d.is_error for d in result.diagnostics)
    assert all(d.location.file == "policies.yaml" for d in result.diagnostics)


def test_a_source_cache_reparses_only_changed_files_and_keeps_input_order() -> None:
    from trustmesh.api.loader import SourceCache

    def policy(name: str) -> bytes:
        return (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            f"metadata: {{name: {name}, namespace: foo}}\nspec: {{}}\n"
        ).encode()

    cache = SourceCache()
    first = load_sources(
        [("a.yaml", policy("a") + b"---\n" + policy("b")), ("c.yaml", policy("c"))], cache=cache
    )
    again = load_sources(
        [("a.yaml", policy("a") + b"---\n" + policy("b")), ("c.yaml", policy("d"))], cache=cache
    )
    assert [r.name for r in first.resources] == ["a", "b", "c"]
    assert [r.name for r in again.resources] == ["a", "b", "d"]
    assert [r.order for r in again.resources] == [0, 1, 2]  # "oldest wins" still sees input order
    assert again.resources[0] is first.resources[0]  # a.yaml was not parsed again
    uncached = load_sources(
        [("c.yaml", policy("d")), ("a.yaml", policy("a") + b"---\n" + policy("b"))]
    )
    cached = load_sources(
        [("c.yaml", policy("d")), ("a.yaml", policy("a") + b"---\n" + policy("b"))], cache=cache
    )
    assert [(r.name, r.order) for r in cached.resources] == [
        (r.name, r.order) for r in uncached.resources
    ]
