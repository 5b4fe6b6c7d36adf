"""Recorded traffic deduplicated into distinct requests (pure: lines in, a set out).

A million records are mostly the same few thousand requests at different times: only what
a decision depends on (source identity and address, destination, port, protocol, method,
path, host, JWT identity) makes a request distinct. Each line is parsed once and looked up
by that key; a key seen before costs a dictionary hit, and only a new key is validated
field by field (a bad line is a :class:`Problem` with its file:line, never dropped
silently: every bad line is counted, the first :data:`PROBLEM_LIMIT` are kept).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from trustmesh.insight.records import Problem, TrafficRecord, record_from_dict

__all__ = ["PROBLEM_LIMIT", "Observed", "TrafficSet"]

PROBLEM_LIMIT = 200
_KEY_FIELDS = (
    "schema",
    "mtls",
    "source_principal",
    "source_ip",
    "destination",
    "port",
    "protocol",
    "method",
    "path",
    "host",
    "request_principal",
)


@dataclass(slots=True)
class Observed:
    """One distinct request: the first record of it, how often and how it was decided."""

    record: TrafficRecord
    count: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)
    origins: list[str] = field(default_factory=list)  # the first few, for reports


@dataclass(slots=True)
class TrafficSet:
    """Distinct requests of one or more record files, with every problem found."""

    observed: dict[tuple[Any, ...], Observed] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    problem_count: int = 0
    records: int = 0
    _bad: dict[tuple[Any, ...], Problem] = field(default_factory=dict)

    def add_line(self, line: bytes, file: str, number: int) -> None:
        """One line of a ``traffic export`` file (blank lines are skipped)."""
        if not line.strip():
            return
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            self._problem(Problem(f"{file}:{number}", "", f"not JSON: {exc.msg}"))
            return
        if not isinstance(entry, dict):
            self._problem(Problem(f"{file}:{number}", "", "a record must be a JSON object"))
            return
        self.add_entry(entry, file, number)

    def add_entry(self, entry: dict[str, Any], file: str, number: int) -> None:
        get = entry.get
        # spelled out (the fields of _KEY_FIELDS), not a generator: this runs once per record
        key: tuple[Any, ...] = (
            get("schema"),
            get("mtls"),
            get("source_principal"),
            get("source_ip"),
            get("destination"),
            get("port"),
            get("protocol"),
            get("method"),
            get("path"),
            get("host"),
            get("request_principal"),
        )
        try:
            known = self.observed.get(key)
        except TypeError:  # a list or object where a string belongs: validate to say so
            known, key = None, ()
        if known is None:
            bad = self._bad.get(key) if key else None
            if bad is not None:
                self._problem(Problem(f"{file}:{number}", bad.field, bad.message))
                return
            record = record_from_dict(entry, f"{file}:{number}")
            if isinstance(record, Problem):
                if key:
                    self._bad[key] = record
                self._problem(record)
                return
            known = self.observed[key] = Observed(record)
        self.records += 1
        known.count += 1
        verdict = get("verdict")
        verdicts = known.verdicts
        name = verdict if isinstance(verdict, str) else "unknown"
        verdicts[name] = verdicts.get(name, 0) + 1
        if len(known.origins) < 3:
            origin = get("origin")
            known.origins.append(origin if isinstance(origin, str) else f"{file}:{number}")

    def _problem(self, problem: Problem) -> None:
        self.problem_count += 1
        if len(self.problems) < PROBLEM_LIMIT:
            self.problems.append(problem)

    @property
    def distinct(self) -> list[Observed]:
        return list(self.observed.values())
