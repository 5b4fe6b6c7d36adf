"""YAML text → plain documents that remember where every value came from.

Why not ``yaml.safe_load_all``: it loses line numbers, silently keeps the last of two
duplicate keys, expands aliases without bound ("billion laughs"), and one syntax error
drops every later document of the stream.

Here libyaml composes the stream; each document's node tree is turned into plain values
(with depth, size and duplicate-key checks) and then dropped: a tree costs ~20 times the
memory of its values, and lines are asked for rarely (an error, a finding). A document
keeps where its text is, and the first line lookup composes that text again. When the
stream has a syntax error, it is split at ``---`` lines the way kubectl splits it and each
part is composed on its own, so one broken document does not take the others down.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from trustmesh.api.diagnostics import Diagnostic, Location, error, field_path

try:  # libyaml ships in PyYAML's wheels; the pure-Python parser is a slow fallback
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]

MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_DEPTH = 100
MAX_NODES_PER_DOCUMENT = 2_000_000

_STR_TAG = "tag:yaml.org,2002:str"
# What the composer marks an untagged node with: its type comes from its text (plain
# scalars) or is a string (quoted and block scalars). Never a tag a document can write.
_UNTAGGED = "tag:trustmesh.dev,untagged"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_SEPARATOR = re.compile(r"^---(?:[ \t][^\n]*)?$", re.MULTILINE)
_CONSTRUCTOR = yaml.constructor.SafeConstructor()
# YAML 1.1's implicit types for plain scalars, looked up by first character.
_IMPLICIT: dict[str, tuple[tuple[str, re.Pattern[str]], ...]] = {
    first: tuple(entries) for first, entries in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


class _FastLoader(_Loader):
    """libyaml without the Python callbacks trustmesh does not need.

    PyYAML's C composer calls back into Python to resolve every node's tag and to track
    path resolvers (which trustmesh never registers): half of the load time of a large
    dump. Built-in callables that return a constant stand in; plain scalars get their
    YAML 1.1 type from their text in :func:`_scalar`, which sees the scalar's style.
    """

    resolve = _UNTAGGED.format  # (kind, value, implicit) → _UNTAGGED; no Python frame
    descend_resolver: Any = {}.get  # (parent, index) → ignored
    ascend_resolver = tuple  # type: ignore[assignment]  # () → ignored


FieldPath = tuple[str | int, ...]


class _Origin:
    """Where a document's text is: enough to compose its node tree again on demand, and
    the document's value (which may be dropped and built again from the text)."""

    __slots__ = ("body", "end", "line", "node", "start", "text")

    def __init__(self, text: str, start: int, end: int, line: int, body: Any) -> None:
        self.text = text  # the whole (shared) source text
        self.start = start  # first character of the line the document's root starts on
        self.end = end
        self.line = line  # 0-based line of ``start``
        self.node: yaml.Node | None = None
        self.body = body

    def compose(self) -> yaml.Node | None:
        if self.node is None:
            try:
                self.node = yaml.compose(self.text[self.start : self.end], Loader=_FastLoader)
            except yaml.YAMLError:
                return None
        return self.node

    def rebuildable(self) -> bool:
        """The text alone gives the value back: no tag that a ``%TAG`` directive outside
        the document's own text could have defined."""
        return self.text.find("!", self.start, self.end) == -1


@dataclass(frozen=True, slots=True)
class YamlDocument:
    """One document of a YAML stream: its plain value, and where its text is."""

    file: str
    index: int
    line: int  # 1-based line of the document's root value
    origin: _Origin = field(repr=False, compare=False)

    @property
    def body(self) -> Any:
        """The document's value (dicts, lists, scalars) as parsed."""
        origin = self.origin
        if origin.body is None:
            node = origin.compose()
            origin.body = _build_document(node) if node is not None else {}
            origin.node = None
        return origin.body

    def drop_tree(self) -> None:
        """Forget the node tree a line lookup composed (it is composed again if needed)."""
        self.origin.node = None

    def release_body(self) -> None:
        """Drop the value until asked for again (a large input's typed resources keep
        only their models); kept when the text alone would not give it back."""
        if self.origin.rebuildable():
            self.origin.body = None

    def line_of(self, path: FieldPath) -> int:
        """1-based line of the value at ``path``, or of its deepest existing parent."""
        if not path:
            return self.line
        node = self.origin.compose()
        if node is None or node.start_mark.line + self.origin.line + 1 != self.line:
            return self.line
        for part in path:
            child = _child(node, part)
            if child is None:
                break
            node = child
        return int(node.start_mark.line) + 1 + self.origin.line

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


class Restart:
    """Yielded by :func:`iter_yaml` when the stream turned out to have a syntax error:
    forget what came before; the documents come again, part by part."""


def parse_yaml(text: str, file: str) -> tuple[list[YamlDocument], list[Diagnostic]]:
    """Parse a YAML stream; every document that parses is returned, every problem reported."""
    documents: list[YamlDocument] = []
    problems: list[Diagnostic] = []
    for item in iter_yaml(text, file):
        if isinstance(item, YamlDocument):
            documents.append(item)
        elif isinstance(item, Diagnostic):
            problems.append(item)
        else:
            documents.clear()
            problems.clear()
    return documents, problems


def iter_yaml(text: str, file: str) -> Iterator[YamlDocument | Diagnostic | Restart]:
    """:func:`parse_yaml` one document at a time, so a caller can turn each into what it
    needs and let its value go before the next is built (a large file's peak memory)."""
    if "\r" in text:  # line breaks as libyaml counts them, so lines agree everywhere
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    counter = itertools.count()
    try:
        yield from _parse_part(text, 0, len(text), 0, file, counter)
        return
    except yaml.YAMLError:
        pass
    yield Restart()
    counter = itertools.count()
    for start, end, line in _split_documents(text):
        try:
            yield from _parse_part(text, start, end, line, file, counter)
        except yaml.MarkedYAMLError as exc:
            yield _syntax_problem(exc, text, start, end, line, file)
        except yaml.YAMLError as exc:  # e.g. a control character the reader refuses
            yield error("yaml-syntax", Location(file, line + 1), f"bad YAML: {exc}")


def _parse_part(
    text: str, start: int, end: int, line: int, file: str, counter: Iterator[int]
) -> Iterator[YamlDocument | Diagnostic]:
    """Compose ``text[start:end]`` (whose first line is ``line``) document by document."""
    loader = _FastLoader(text[start:end] if start or end != len(text) else text)
    shared: dict[str, str] = {}
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            first = node.start_mark.line + line
            try:
                body = _build_document(node, shared)
            except _NodeError as exc:
                location = Location(file, exc.line + line, field_path(_path_to(node, exc.node)))
                yield error("yaml-structure", location, exc.message)
                continue
            except RecursionError:
                location = Location(file, first + 1)
                yield error("yaml-structure", location, "document nested too deeply")
                continue
            if body is None:
                continue
            line_start = text.rfind("\n", start, start + node.start_mark.index) + 1 or start
            origin = _Origin(text, line_start, start + node.end_mark.index, first, body)
            del node, body  # the tree goes now; the consumer decides about the value
            yield YamlDocument(file, next(counter), first + 1, origin)
    finally:
        loader.dispose()


def _syntax_problem(
    exc: yaml.MarkedYAMLError, text: str, start: int, end: int, line: int, file: str
) -> Diagnostic:
    mark = exc.problem_mark or exc.context_mark
    # A problem found at the end of the document belongs to its last line.
    last = text.count("\n", start, end)
    if end > start and text[end - 1] == "\n":
        last -= 1
    at = min(mark.line, max(last, 0)) + 1 + line if mark else line + 1
    what = exc.problem or "malformed YAML"
    if exc.context and exc.context_mark:
        what = f"{exc.context} (line {exc.context_mark.line + 1 + line}): {what}"
    return error("yaml-syntax", Location(file, at), f"malformed YAML: {what}")


def _split_documents(text: str) -> Iterator[tuple[int, int, int]]:
    """(start, end, 0-based first line) per part, splitting at ``---`` lines as kubectl."""
    starts = [0, *(m.start() for m in _SEPARATOR.finditer(text) if m.start())]
    lines = [0]
    for previous, current in itertools.pairwise(starts):
        lines.append(lines[-1] + text.count("\n", previous, current))
    ends = [*starts[1:], len(text)]
    # Each part keeps its last line break, as kubectl's reader does (a block scalar
    # before a separator ends with "\n").
    yield from zip(starts, ends, lines, strict=True)


Item = YamlDocument | Diagnostic | Restart
WireItem = tuple[Any, ...] | Diagnostic


def to_wire(item: YamlDocument | Diagnostic) -> WireItem:
    """A parsed item as plain data to send to another process, without the source text
    (the receiver has it: :func:`from_wire`)."""
    if isinstance(item, Diagnostic):
        return item
    origin = item.origin
    body = origin.body if origin.body is not None else item.body
    return (item.file, item.line, origin.start, origin.end, origin.line, body)


def from_wire(text: str, wire: WireItem, index: int) -> YamlDocument | Diagnostic:
    """The item :func:`to_wire` made, its positions in ``text`` (the same text)."""
    if isinstance(wire, Diagnostic):
        return wire
    file, line, start, end, origin_line, body = wire
    return YamlDocument(file, index, line, _Origin(text, start, end, origin_line, body))


def split_point(text: str) -> int | None:
    """Where a stream can be cut in two halves read independently: the start of a ``---``
    line near the middle (a YAML document never spans one), or None."""
    found = _SEPARATOR.search(text, len(text) // 2)
    return found.start() if found else None


class _NodeError(Exception):
    def __init__(self, node: yaml.Node, message: str, mark_node: yaml.Node | None = None):
        super().__init__(message)
        self.node = node
        self.message = message
        self.line = (mark_node or node).start_mark.line + 1


# Keys and short values repeat across the documents of a large file (kinds, namespaces,
# principals, methods): one string object each instead of one per occurrence.
_SHARED_MAX = 64
_ScalarNode = yaml.ScalarNode
_SequenceNode = yaml.SequenceNode
_MappingNode = yaml.MappingNode


def _scalar(node: yaml.ScalarNode) -> Any:
    """A scalar's value as Kubernetes reads YAML (through JSON: timestamps stay text)."""
    value: str = node.value
    tag = node.tag
    if tag == _UNTAGGED:
        if node.style:  # quoted or block: a string
            return value
        for implicit, regexp in _IMPLICIT.get(value[:1], ()):
            if regexp.match(value):
                tag = implicit
                break
        else:
            return value
    if tag in (_STR_TAG, _TIMESTAMP_TAG):
        return value
    construct = _CONSTRUCTOR.yaml_constructors.get(tag)
    if construct is None:
        raise _NodeError(node, f"bad scalar: unsupported tag {tag}")
    try:
        return construct(_CONSTRUCTOR, node)
    except (yaml.YAMLError, ValueError, TypeError) as exc:
        raise _NodeError(node, f"bad scalar: {exc}") from None


def _build_document(root: yaml.Node, shared: dict[str, str] | None = None) -> Any:
    """Node tree → dict/list/scalars with depth, size and duplicate-key checks.

    Field paths are worked out only when something is wrong (``_path_to``): building
    them for every value would cost more than the rest of the walk. Scalars (most nodes)
    are converted inline rather than by a call per node.
    """
    count = 0
    if shared is None:
        shared = {}

    def build(node: yaml.Node, depth: int) -> Any:
        nonlocal count
        kind = type(node)
        if isinstance(node, _ScalarNode):
            count += 1
            return _scalar(node)
        if depth > MAX_DEPTH:
            raise _NodeError(node, f"nesting deeper than {MAX_DEPTH} levels")
        items = node.value
        count += len(items) + 1
        if count > MAX_NODES_PER_DOCUMENT:
            raise _NodeError(node, f"document has more than {MAX_NODES_PER_DOCUMENT} values")
        depth += 1
        if kind is _MappingNode:
            out: dict[str, Any] = {}
            nulls: set[str] | None = None
            for key_node, value_node in items:
                if type(key_node) is not _ScalarNode:
                    raise _NodeError(key_node, "mapping keys must be scalars")
                key = shared.setdefault(key_node.value, key_node.value)
                if key in out or (nulls is not None and key in nulls):
                    raise _NodeError(value_node, f"duplicate key {key!r}", key_node)
                if type(value_node) is not _ScalarNode:
                    value = build(value_node, depth)
                elif value_node.tag == _UNTAGGED and (
                    value_node.style or value_node.value[:1] not in _IMPLICIT
                ):
                    value = value_node.value  # the common case, without a call
                    if len(value) <= _SHARED_MAX:
                        value = shared.setdefault(value, value)
                else:
                    value = _scalar(value_node)
                if value is None:
                    # The API server treats a key set to null as absent: CRD schemas prune
                    # it (map entries too), built-in types decode it to the zero value.
                    nulls = nulls or set()
                    nulls.add(key)
                else:
                    out[key] = value
            return out
        if kind is _SequenceNode:
            return [
                (
                    (
                        item.value
                        if item.tag == _UNTAGGED and (item.style or item.value[:1] not in _IMPLICIT)
                        else _scalar(item)
                    )
                    if isinstance(item, _ScalarNode)
                    else build(item, depth)
                )
                for item in items
            ]
        raise _NodeError(node, f"unsupported YAML node {kind.__name__}")

    return build(root, 0)


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


__all__ = [
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "MAX_NODES_PER_DOCUMENT",
    "FieldPath",
    "Item",
    "Restart",
    "WireItem",
    "YamlDocument",
    "decode_text",
    "from_wire",
    "iter_yaml",
    "parse_yaml",
    "split_point",
    "to_wire",
]
