"""Errors and warnings as data: a stable code, a location and a message.

Nothing in trustmesh reports a configuration problem by raising: loaders and validators
return :class:`Diagnostic` values, collected (never first-only) and sorted by location,
so one bad document never hides the problems of another.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Severity(enum.Enum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, slots=True, order=True)
class Location:
    """Where a value came from: file, 1-based line and the field path inside the document.

    ``field`` uses the form users see in ``kubectl explain``:
    ``spec.rules[0].from[0].source.principals[1]``.
    """

    file: str
    line: int = 0
    field: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where} {self.field}" if self.field else where


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One problem found in the input. ``code`` is stable and safe to match on."""

    severity: Severity
    code: str
    location: Location
    message: str

    @property
    def is_error(self) -> bool:
        return self.severity is Severity.ERROR

    def sort_key(self) -> tuple[str, int, str, str]:
        loc = self.location
        return (loc.file, loc.line, loc.field, self.code)

    def __str__(self) -> str:
        return f"{self.location}: {self.severity.value}[{self.code}]: {self.message}"

    def as_dict(self) -> dict[str, object]:
        return {
            "severity": self.severity.value,
            "code": self.code,
            "file": self.location.file,
            "line": self.location.line,
            "field": self.location.field,
            "message": self.message,
        }


def error(code: str, location: Location, message: str) -> Diagnostic:
    return Diagnostic(Severity.ERROR, code, location, message)


def warning(code: str, location: Location, message: str) -> Diagnostic:
    return Diagnostic(Severity.WARNING, code, location, message)


def field_path(parts: tuple[str | int, ...]) -> str:
    """``("spec", "rules", 0, "from")`` → ``spec.rules[0].from``."""
    out: list[str] = []
    for part in parts:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif out:
            out.append(f".{part}")
        else:
            out.append(part)
    return "".join(out)
