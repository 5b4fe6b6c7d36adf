"""What is left of a compiled rule once the connection is known.

For one source → destination:port the connection attributes are fixed: the peer principal
mTLS gives (or none), the addresses, the port, the SNI. Every check of a compiled rule
(:class:`trustmesh.policy.authz.Check`) reads one attribute, named by its label; checks on
connection attributes are decided here with the rule's own test, and checks on what a
client chooses per request (method, path, host, headers, its JWT, X-Forwarded-For, and the
source address when the inputs do not give it) stay as :class:`Atom` values. A rule then
becomes an OR of AND-clauses of atoms (:class:`Clause`): none (it never matches this
connection), one empty clause (it matches every request), or the conditions under which
it matches. Pure: reads the compiled rules and the written rule they come from.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from itertools import product

from trustmesh.api import models as m
from trustmesh.graph.model import Atom, Clause
from trustmesh.policy.authz import Check, CompiledRule
from trustmesh.policy.request import Attributes

# More clauses than this for one rule (a product of many from/to entries) are cut; the
# caller says so.
MAX_CLAUSES = 64

_FIELDS = {  # compiled label (without "not") → (attribute, written field)
    "principals": ("peer principal", "principals"),
    "namespaces": ("peer namespace", "namespaces"),
    "serviceAccounts": ("peer service account", "serviceAccounts"),
    "trustDomains": ("peer trust domain", "trustDomains"),
    "ipBlocks": ("source ip", "ipBlocks"),
    "remoteIpBlocks": ("remote ip (X-Forwarded-For)", "remoteIpBlocks"),
    "requestPrincipals": ("request principal (JWT iss/sub)", "requestPrincipals"),
    "ports": ("port", "ports"),
    "hosts": ("host", "hosts"),
    "methods": ("method", "methods"),
    "paths": ("path", "paths"),
}
# Attributes a client chooses per request; everything else is fixed by the connection.
_REQUEST_LABELS = frozenset({"hosts", "methods", "paths", "requestPrincipals", "remoteIpBlocks"})
_WHEN = re.compile(r"^when\[(.+)\]\.(values|notValues)")
_CLAIM = re.compile(r"\[([^\[\]]+)\]")


class Residual:
    """Turns the rules of one workload into clauses for one fixed connection ``base``."""

    def __init__(self, base: Attributes) -> None:
        self.base = base
        self.truncated = False

    def clauses(self, rules: Iterable[CompiledRule]) -> list[Clause]:
        """The clauses under which any of ``rules`` matches, in rule order."""
        out: list[Clause] = []
        for rule in rules:
            out.extend(Clause(rule.name, atoms) for atoms in self.rule(rule))
        return out

    def rule(self, rule: CompiledRule) -> list[tuple[Atom, ...]]:
        written: m.Rule = (rule.policy.spec.rules or ())[rule.rule_index]
        parts: list[list[tuple[Atom, ...]]] = []
        for part, clauses in (("from", rule.sources), ("to", rule.operations)):
            if clauses is None:
                continue
            options = [
                atoms
                for index, clause in enumerate(clauses)
                if (atoms := self._clause(clause, written, part, index)) is not None
            ]
            if not options:
                return []
            parts.append(options)
        conditions = self._clause(rule.conditions, written, "when", 0)
        if conditions is None:
            return []
        parts.append([conditions])
        combined: list[tuple[Atom, ...]] = []
        for picked in product(*parts):
            atoms = tuple(dict.fromkeys(a for group in picked for a in group))
            combined.append(atoms)
            if len(combined) >= MAX_CLAUSES:
                self.truncated = True
                break
        return absorb(combined)

    def _clause(
        self, checks: Sequence[Check], written: m.Rule, part: str, index: int
    ) -> tuple[Atom, ...] | None:
        """The atoms of one from/to entry (or of the when list); None: it fails here."""
        atoms: list[Atom] = []
        when_seen: dict[str, int] = {}
        for check in checks:
            atom = self._atom(check, written, part, index, when_seen)
            if atom is not None:
                atoms.append(atom)
            elif not check.test(self.base):
                return None
        return tuple(atoms)

    def _atom(
        self, check: Check, written: m.Rule, part: str, index: int, when_seen: dict[str, int]
    ) -> Atom | None:
        """The atom ``check`` leaves when it reads a request attribute; None when the
        connection decides it."""
        label = check.label
        if part == "when":
            found = _WHEN.match(label)
            if found is None:
                return None
            key, which = found.group(1), found.group(2)
            if not self._per_request_key(key):
                return None
            # The n-th check with this key and kind is the n-th such condition written.
            seen = when_seen.get(label, 0)
            when_seen[label] = seen + 1
            matching = [c for c in written.when if c.key == key]
            values: list[str] = []
            count = 0
            for condition in matching:
                chosen = condition.values if which == "values" else condition.not_values
                if chosen:
                    if count == seen:
                        values = list(chosen)
                        break
                    count += 1
            return Atom(
                _when_attribute(key),
                f"when[{key}].{which}",
                tuple(values),
                which == "notValues",
                check.test,
            )
        negated = label.startswith("not") and label[3:4].isupper()
        name = label[3].lower() + label[4:] if negated else label
        if name not in _REQUEST_LABELS and not (name == "ipBlocks" and self.base.source_ip is None):
            return None
        attribute, written_field = _FIELDS[name]
        field_name = (
            f"not{written_field[0].upper()}{written_field[1:]}" if negated else written_field
        )
        if part == "from":
            entry: object = written.from_[index].source
            where = f"from[{index}].source.{field_name}"
        else:
            entry = written.to[index].operation
            where = f"to[{index}].operation.{field_name}"
        snake = re.sub(r"([A-Z])", lambda c: "_" + c.group(1).lower(), field_name)
        raw = getattr(entry, snake, ())
        return Atom(attribute, where, tuple(str(v) for v in raw), negated, check.test)

    def _per_request_key(self, key: str) -> bool:
        if key.startswith("request.") or key == "remote.ip":
            return True
        return key == "source.ip" and self.base.source_ip is None


def _when_attribute(key: str) -> str:
    if key.startswith("request.headers["):
        return f"header {key[len('request.headers[') : -1].lower()}"
    if key == "request.auth.principal":
        return "request principal (JWT iss/sub)"
    if key == "request.auth.audiences":
        return "JWT audience"
    if key == "request.auth.presenter":
        return "JWT presenter (azp)"
    if key.startswith("request.auth.claims"):
        return "JWT claim " + ".".join(_CLAIM.findall(key[len("request.auth.claims") :]))
    if key == "remote.ip":
        return "remote ip (X-Forwarded-For)"
    if key == "source.ip":
        return "source ip"
    return key


def absorb(clauses: list[tuple[Atom, ...]]) -> list[tuple[Atom, ...]]:
    """Drop duplicates and clauses that a smaller one already covers (A or (A and B) = A)."""
    unique = list(dict.fromkeys(tuple(sorted(set(c), key=_atom_key)) for c in clauses))
    unique.sort(key=len)
    kept: list[tuple[Atom, ...]] = []
    for clause in unique:
        atoms = set(clause)
        if not any(set(k) <= atoms for k in kept):
            kept.append(clause)
    return kept


def _atom_key(atom: Atom) -> tuple[str, str, bool, tuple[str, ...]]:
    return (atom.attribute, atom.location, atom.negated, atom.values)
