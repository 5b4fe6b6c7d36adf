"""The YAML reader: one pass over the stream, exact lines found again on demand, and the
kubectl-style fallback when a document is broken."""

from __future__ import annotations

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.api.loader import load_sources
from trustmesh.api.yamldoc import Restart, YamlDocument, iter_yaml, parse_yaml

POLICY = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: p{i}
  namespace: foo
spec:
{pad}  rules:
  - from:
    - source:
        principals: [cluster.local/ns/foo/sa/a{i}]
    to:
    - operation:
        paths: ["/x/{i}"]
"""
PATH = ("spec", "rules", 0, "to", 0, "operation", "paths", 0)


def stream(count: int, pad: int = 0) -> str:
    parts = []
    for i in range(count):
        padding = "  # comment\n" * ((i * pad) % 3)
        parts.append(POLICY.format(i=i, pad=padding))
    return "---\n".join(parts)


def oracle_lines(text: str) -> list[int]:
    """Line of PATH in each document, composing each ``---`` part on its own."""
    out = []
    offset = 0
    for part in text.split("---\n"):
        node = yaml.compose(part, Loader=yaml.SafeLoader)
        for key in PATH:
            if isinstance(key, int):
                node = node.value[key]
            else:
                node = next(v for k, v in node.value if k.value == key)
        out.append(node.start_mark.line + 1 + offset)
        offset += part.count("\n") + 1
    return out


@settings(max_examples=25, deadline=None)
@given(count=st.integers(1, 12), pad=st.integers(0, 2))
def test_lines_found_later_are_the_lines_of_the_text(count: int, pad: int) -> None:
    text = stream(count, pad)
    documents, problems = parse_yaml(text, "s.yaml")
    assert problems == []
    assert [d.line_of(PATH) for d in documents] == oracle_lines(text)


def test_a_broken_document_falls_back_to_parts_with_the_same_lines() -> None:
    text = stream(5)
    broken = text.replace("name: p2\n", "name: [p2\n")
    items = list(iter_yaml(broken, "s.yaml"))
    assert any(isinstance(i, Restart) for i in items)
    documents, problems = parse_yaml(broken, "s.yaml")
    assert [d.body["metadata"]["name"] for d in documents] == ["p0", "p1", "p3", "p4"]
    [problem] = problems
    assert problem.code == "yaml-syntax"
    name_line = text.splitlines().index("  name: p2") + 1
    # libyaml finds the unclosed sequence at the next token, naming where it opened.
    assert problem.location.line == name_line + 1
    assert f"flow sequence (line {name_line})" in problem.message
    expected = oracle_lines(text)
    assert [d.line_of(PATH) for d in documents] == [expected[i] for i in (0, 1, 3, 4)]


def test_crlf_and_cr_line_breaks_count_like_lf() -> None:
    text = stream(3)
    for newline in ("\r\n", "\r"):
        documents, _ = parse_yaml(text.replace("\n", newline), "s.yaml")
        assert [d.line_of(PATH) for d in documents] == oracle_lines(text)


def test_released_values_come_back_equal_from_the_text() -> None:
    text = stream(3)
    loaded = load_sources([("s.yaml", text.encode())])
    documents = [r.document for r in loaded.resources]
    assert all(d.origin.body is None for d in documents)  # large inputs keep models only
    fresh, _ = parse_yaml(text, "s.yaml")
    assert [d.body for d in documents] == [d.body for d in fresh]
    assert [d.line_of(PATH) for d in documents] == oracle_lines(text)


def test_loosely_modelled_and_tagged_documents_keep_their_value() -> None:
    service = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {type: NodePort}\n"
    tagged = POLICY.format(i=9, pad="").replace("name: p9", "name: !!str p9")
    loaded = load_sources([("s.yaml", f"{service}---\n{tagged}".encode())])
    service_doc, tagged_doc = (r.document for r in loaded.resources)
    assert service_doc.origin.body is not None  # the analyzer reads fields not modelled
    assert tagged_doc.origin.body is not None  # a %TAG outside its text could matter
    assert tagged_doc.body["metadata"]["name"] == "p9"


def test_nulls_are_absent_but_still_count_as_keys() -> None:
    [document], problems = parse_yaml("a: null\nb: ~\nc:\nd: [null, 1]\n", "n.yaml")
    assert problems == []
    assert document.body == {"d": [None, 1]}
    _, problems = parse_yaml("a: null\na: 1\n", "n.yaml")
    assert [(p.code, p.location.line) for p in problems] == [("yaml-structure", 2)]


def test_scalars_keep_yaml_1_1_types_as_kubernetes_reads_them() -> None:
    text = (
        "a: yes\nb: 'yes'\nc: 0x1F\nd: 1.5\ne: 2026-01-01\nf: !!str 5\ng: 010\n"
        "h: |\n  true\ni: -.inf\nj: ''\n"
    )
    [document], _ = parse_yaml(text, "t.yaml")
    body = document.body
    assert body["a"] is True and body["b"] == "yes"
    assert body["c"] == 31 and body["d"] == 1.5 and body["g"] == 8
    assert body["e"] == "2026-01-01"  # timestamps stay text, as through JSON
    assert body["f"] == "5" and body["h"] == "true\n" and body["j"] == ""
    assert body["i"] == float("-inf")


def test_document_identity_and_positions_survive_a_root_on_the_separator_line() -> None:
    text = "--- {apiVersion: v1, kind: Namespace, metadata: {name: a}}\n--- |\n  text\n"
    documents, problems = parse_yaml(text, "r.yaml")
    assert problems == []
    assert isinstance(documents[0], YamlDocument)
    assert [d.line for d in documents] == [1, 2]
    assert documents[0].line_of(("metadata", "name")) == 1


def test_a_block_scalar_keeps_its_line_break_in_both_reading_modes() -> None:
    text = "a: |\n  text\n---\nb: 1\n"
    [first, _], _ = parse_yaml(text, "b.yaml")
    [first_again, *_], problems = parse_yaml(text + "---\nc: [\n", "b.yaml")
    assert problems  # the broken third document made the reader fall back to parts
    assert first.body == first_again.body == {"a": "text\n"}
