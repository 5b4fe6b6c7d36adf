"""Validation problems in the words of the YAML a user writes, not of the library.

Pydantic says "Input should be a valid tuple (got None)"; a user wrote YAML and needs to
hear "expected a list of strings, got 5". The expectation is read from the model field at
the error's location (its type, bounds and enum values), the offending value is shown as
short YAML, and an unknown field gets the closest known field name.
"""

from __future__ import annotations

import enum
import json
import types
import typing
from collections.abc import Sequence
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from trustmesh.api.kinds import distance

FieldPath = tuple[str | int, ...]

_SHORT = 60


def expected_at(model: type[BaseModel], path: FieldPath, *, key: bool = False) -> str | None:
    """What YAML the model accepts at ``path`` (``key``: for a mapping key there)."""
    found = _resolve(model, path, key)
    if found is None:
        return None
    annotation, info = found
    return describe(annotation, info)


def field_names(model: type[BaseModel], path: FieldPath) -> list[str]:
    """The YAML field names of the mapping at ``path`` (empty if it is not a model)."""
    found = _resolve(model, path, False)
    if found is None:
        return []
    target = _model_in(found[0])
    if target is None:
        return []
    return [info.alias or name for name, info in target.model_fields.items()]


def closest_field(unknown: str, names: Sequence[str]) -> str | None:
    if not names:
        return None
    wanted = unknown.lower()
    best = min(names, key=lambda n: (distance(wanted, n.lower()), n))
    if distance(wanted, best.lower()) <= max(2, len(unknown) // 3):
        return best
    # A field written with another API's prefix or suffix (matchLabels for labels).
    within = [n for n in names if len(n) >= 4 and (n.lower() in wanted or wanted in n.lower())]
    return max(within, key=len) if within else None


def _resolve(model: type[BaseModel], path: FieldPath, key: bool) -> tuple[Any, Any] | None:
    annotation: Any = model
    info: FieldInfo | None = None
    for position, part in enumerate(path):
        annotation = _strip_optional(annotation)
        last = position == len(path) - 1
        target = _model_in(annotation)
        if target is not None and isinstance(part, str):
            found = _field(target, part)
            if found is None:
                return None
            info = found
            annotation = found.annotation
            continue
        origin = typing.get_origin(annotation)
        args = typing.get_args(annotation)
        if origin in (tuple, list) and isinstance(part, int) and args:
            annotation, info = args[0], None
        elif origin is dict and args:
            annotation, info = (args[0] if key and last else args[1]), None
        else:
            return None
    return annotation, info


def _field(model: type[BaseModel], name: str) -> FieldInfo | None:
    for field_name, info in model.model_fields.items():
        if name in (info.alias, field_name):
            return info
    return None


def _model_in(annotation: Any) -> type[BaseModel] | None:
    annotation = _strip_optional(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _strip_optional(annotation: Any) -> Any:
    if _is_union(annotation):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def describe(annotation: Any, info: Any = None) -> str:
    """``tuple[str, ...]`` → "a list of strings"; ``Action`` → "one of ALLOW, DENY, …"."""
    metadata = list(getattr(info, "metadata", ()) or ())
    if typing.get_origin(annotation) is typing.Annotated:
        annotation, *extra = typing.get_args(annotation)
        metadata += [m for e in extra for m in (getattr(e, "metadata", None) or [e])]
    annotation = _strip_optional(annotation)
    if _is_union(annotation):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return " or ".join(describe(member) for member in members)
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "an integer" + _bounds(metadata)
    if annotation is float:
        return "a number"
    if annotation is str:
        return "a string"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(str(member.value) for member in annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(str(v) for v in typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "a mapping"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (tuple, list):
        item = args[0] if args else Any
        minimum = _min_length(metadata)
        if minimum == 1:
            return f"a non-empty list of {_plural(item)}"
        count = f"at least {minimum} " if minimum else ""
        return f"a list of {count}{_plural(item)}"
    if origin is dict:
        if not args or args[1] is object:
            return "a mapping"
        return f"a mapping of {_plural(args[0])} to {_plural(args[1])}"
    return "a value"


def _plural(annotation: Any) -> str:
    annotation = _strip_optional(annotation)
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if annotation is str:
        return "strings"
    if annotation is int:
        return "integers"
    if annotation is bool:
        return "booleans"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mappings"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "values (" + ", ".join(str(member.value) for member in annotation) + ")"
    return "values"


def _bounds(metadata: Sequence[Any]) -> str:
    low = high = None
    for item in metadata:
        if isinstance(item, annotated_types.Ge):
            low = item.ge
        elif isinstance(item, annotated_types.Gt):
            low = item.gt + 1  # type: ignore[operator]
        elif isinstance(item, annotated_types.Le):
            high = item.le
        elif isinstance(item, annotated_types.Lt):
            high = item.lt - 1  # type: ignore[operator]
    if low is not None and high is not None:
        return f" {low}-{high}"
    if low is not None:
        return f" ≥ {low}"
    if high is not None:
        return f" ≤ {high}"
    return ""


def _min_length(metadata: Sequence[Any]) -> int:
    for item in metadata:
        if isinstance(item, annotated_types.MinLen) and item.min_length > 0:
            return int(item.min_length)
    return 0


def yaml_short(value: Any) -> str:
    """A value as a user would write it in YAML (flow style), cut to one short line."""
    text = _flow(value)
    return text if len(text) <= _SHORT else text[: _SHORT - 3] + "..."


def _flow(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        if value == "" or value != value.strip() or any(c in value for c in ":#{}[],&*!|>'\"%@`"):
            return json.dumps(value, ensure_ascii=False)
        if value.lower() in ("null", "true", "false", "yes", "no", "~") or _numeric(value):
            return json.dumps(value)
        return value
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_flow(k)}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return json.dumps(str(value))


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def kind_of(value: Any) -> str:
    """What the user gave, in YAML terms: "a list", "a string", "null", …"""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return "a value"
