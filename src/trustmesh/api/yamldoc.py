"""YAML text → plain documents that remember where every value came from.

Why not ``yaml.safe_load_all``: it loses line numbers, silently keeps the last of two
duplicate keys, expands aliases without bound ("billion laughs"), and one syntax error
drops every later document of the stream. Here the stream is split at ``---`` lines the
way kubectl splits it, each document is composed by libyaml on its own, and the node
tree is kept so that an error found later (by validation) can name its line.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import yaml

from trustmesh.api.diagnostics import Diagnostic, Location, error, field_path

try:  # libyaml ships in PyYAML's wheels; the pure-Python parser is a slow fallback
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]


class _FastLoader(_Loader):
    """libyaml with a cheaper tag resolver.

    PyYAML's composer calls back into Python to resolve every scalar's tag and to
    track path resolvers (which trustmesh never registers): half of the load time of
    a large dump. Same implicit-tag table, looked up by first character only.
    """

    _IMPLICIT: ClassVar[dict[str, tuple[tuple[str, re.Pattern[str]], ...]]] = {
        first: tuple(entries) for first, entries in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def descend_resolver(self, current_node: Any, current_index: Any) -> None:
        return None

    def ascend_resolver(self) -> None:
        return None

    def resolve(self, kind: Any, value: Any, implicit: Any) -> str:
        if kind is yaml.ScalarNode:
            if implicit[0]:
                for tag, regexp in self._IMPLICIT.get(value[:1], ()):
                    if regexp.match(value):
                        return str(tag)
            return _STR_TAG
        return _SEQ_TAG if kind is yaml.SequenceNode else _MAP_TAG


MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_DEPTH = 100
MAX_NODES_PER_DOCUMENT = 2_000_000

_SEPARATOR = re.compile(r"^---(?:[ \t].*)?$")
_STR_TAG = "tag:yaml.org,2002:str"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MAP_TAG = "tag:yaml.org,2002:map"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_SCALAR_CONSTRUCTOR = yaml.constructor.SafeConstructor()

FieldPath = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class YamlDocument:
    """One document of a YAML stream: its plain value and its node tree for positions."""

    file: str
    index: int
    line: int
    body: Any
    node: yaml.Node = field(repr=False, compare=False)
    line_offset: int = field(repr=False, default=0)

    def line_of(self, path: FieldPath) -> int:
        """1-based line of the value at ``path``, or of its deepest existing parent."""
        node: yaml.Node = self.node
        for part in path:
            child = _child(node, part)
            if child is None:
                break
            node = child
        return node.start_mark.line + 1 + self.line_offset

    def location(self, path: FieldPath) -> Location:
        return Location(self.file, self.line_of(path), field_path(path))


def _child(node: yaml.Node, part: str | int) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode) and isinstance(part, str):
        for key, value in node.value:
            if key.value == part:
                return value  # type: ignore[no-any-return]
    if (
        isinstance(node, yaml.SequenceNode)
        and isinstance(part, int)
        and 0 <= part < len(node.value)
    ):
        return node.value[part]  # type: ignore[no-any-return]
    return None


def decode_text(data: bytes, file: str) -> tuple[str | None, list[Diagnostic]]:
    """Strict UTF-8 (BOM allowed): an undecodable byte is an error with its line."""
    if len(data) > MAX_FILE_BYTES:
        return None, [
            error(
                "file-too-large",
                Location(file),
                f"{len(data)} bytes is over the {MAX_FILE_BYTES}-byte limit",
            )
        ]
    try:
        return data.decode("utf-8-sig"), []
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        return None, [
            error(
                "invalid-utf8",
                Location(file, line),
                f"invalid UTF-8 at byte {exc.start} ({exc.reason}); the file was not loaded",
            )
        ]


def _split_documents(text: str) -> Iterator[tuple[int, str]]:
    """Yield (0-based first line, text) per document, splitting on ``---`` lines."""
    start = 0
    chunk: list[str] = []
    for number, line in enumerate(text.splitlines()):
        if _SEPARATOR.match(line):
            yield start, "\n".join(chunk)
            start, chunk = number, [line]
        else:
            chunk.append(line)
    yield start, "\n".join(chunk)


def parse_yaml(text: str, file: str) -> tuple[list[YamlDocument], list[Diagnostic]]:
    """Parse a YAML stream; every document that parses is returned, every problem reported."""
    documents: list[YamlDocument] = []
    problems: list[Diagnostic] = []
    for offset, chunk in _split_documents(text):
        try:
            nodes = list(yaml.compose_all(chunk, Loader=_FastLoader))
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            # A problem found at the end of the document belongs to its last line.
            last = chunk.count("\n")
            line = min(mark.line, last) + 1 + offset if mark else offset + 1
            what = exc.problem or "malformed YAML"
            if exc.context and exc.context_mark:
                what = f"{exc.context} (line {exc.context_mark.line + 1 + offset}): {what}"
            problems.append(error("yaml-syntax", Location(file, line), f"malformed YAML: {what}"))
            continue
        except yaml.YAMLError as exc:  # e.g. a control character the reader refuses
            problems.append(error("yaml-syntax", Location(file, offset + 1), f"bad YAML: {exc}"))
            continue
        for node in nodes:
            if node is None:
                continue
            try:
                body = _Builder().build(node, 0)
            except _NodeError as exc:
                path = _path_to(node, exc.node)
                location = Location(file, exc.line + offset, field_path(path))
                problems.append(error("yaml-structure", location, exc.message))
                continue
            except RecursionError:
                location = Location(file, node.start_mark.line + 1 + offset)
                problems.append(error("yaml-structure", location, "document nested too deeply"))
                continue
            if body is None:
                continue
            line = node.start_mark.line + 1 + offset
            documents.append(YamlDocument(file, len(documents), line, body, node, offset))
    return documents, problems


class _Builder:
    """Node tree → dict/list/scalars with depth, size and duplicate-key checks.

    Field paths are worked out only when something is wrong (``_path_to``): building
    them for every value would cost more than the rest of the walk.
    """

    def __init__(self) -> None:
        self.nodes = 0

    def build(self, node: yaml.Node, depth: int) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES_PER_DOCUMENT:
            raise _NodeError(node, f"document has more than {MAX_NODES_PER_DOCUMENT} values")
        if depth > MAX_DEPTH:
            raise _NodeError(node, f"nesting deeper than {MAX_DEPTH} levels")
        kind = type(node)
        if kind is yaml.ScalarNode:
            tag = node.tag
            # Kubernetes reads YAML through JSON: timestamps stay strings.
            if tag in (_STR_TAG, _TIMESTAMP_TAG):
                return node.value
            try:
                return _SCALAR_CONSTRUCTOR.construct_object(node)
            except yaml.YAMLError as exc:
                raise _NodeError(node, f"bad scalar: {exc}") from None
        if kind is yaml.SequenceNode:
            depth += 1
            return [self.build(item, depth) for item in node.value]
        if kind is yaml.MappingNode:
            out: dict[str, Any] = {}
            depth += 1
            for key_node, value_node in node.value:
                if type(key_node) is not yaml.ScalarNode:
                    raise _NodeError(key_node, "mapping keys must be scalars")
                key = str(key_node.value)
                if key in out:
                    raise _NodeError(value_node, f"duplicate key {key!r}", key_node)
                out[key] = self.build(value_node, depth)
            return out
        raise _NodeError(node, f"unsupported YAML node {kind.__name__}")


class _NodeError(Exception):
    def __init__(self, node: yaml.Node, message: str, mark_node: yaml.Node | None = None):
        super().__init__(message)
        self.node = node
        self.message = message
        self.line = (mark_node or node).start_mark.line + 1


def _path_to(root: yaml.Node, target: yaml.Node) -> FieldPath:
    """The field path of ``target`` inside ``root`` (first occurrence), for messages."""
    stack: list[tuple[yaml.Node, FieldPath]] = [(root, ())]
    seen: set[int] = set()
    while stack:
        node, path = stack.pop()
        if node is target:
            return path
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            stack.extend((v, (*path, str(k.value))) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((v, (*path, i)) for i, v in enumerate(node.value))
    return ()
