"""What is left of a compiled rule once the connection is known.

For one source → destination:port the connection attributes are fixed: the peer principal
mTLS gives (or none), the addresses, the port, the SNI. Every check of a compiled rule
(:class:`trustmesh.policy.authz.Check`) holds its field of the rule tree: a field whose
matchers read only the connection is decided here with the rule's own test, one whose
matchers read what a client chooses per request (method, path, host, headers, its JWT,
X-Forwarded-For, and the source address when the inputs do not give it) stays as an
:class:`Atom`. A rule then becomes an OR of AND-clauses of atoms (:class:`Clause`): none
(it never matches this connection), one empty clause (it matches every request), or the
conditions under which it matches. Pure: reads the compiled rules and their trees (no written rule).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import product

from trustmesh.api.conditions import ConditionKey, KeyKind
from trustmesh.graph.model import Atom, Clause
from trustmesh.policy import rule_tree as rt
from trustmesh.policy.authz import Check, CompiledRule
from trustmesh.policy.request import Attributes

# More clauses than this for one rule (a product of many from/to entries) are cut; the
# caller says so.
MAX_CLAUSES = 64

_ATTRIBUTES = {  # a from/to field, as written without "not" → the attribute it reads
    "ipBlocks": "source ip",
    "remoteIpBlocks": "remote ip (X-Forwarded-For)",
    "requestPrincipals": "request principal (JWT iss/sub)",
    "hosts": "host",
    "methods": "method",
    "paths": "path",
}
# Matchers of what a client chooses per request; every other leaf is fixed by the
# connection (a source address only when the inputs give it).
_PER_REQUEST = (
    rt.Host,
    rt.Method,
    rt.Path,
    rt.PathTemplate,
    rt.RequestHeader,
    rt.RequestPrincipal,
    rt.JwtClaim,
    rt.RemoteIp,
)


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
        parts: list[list[tuple[Atom, ...]]] = []
        for part, clauses in (("from", rule.sources), ("to", rule.operations)):
            if clauses is None:
                continue
            options = [
                atoms
                for index, clause in enumerate(clauses)
                if (atoms := self._clause(clause, part, index)) is not None
            ]
            if not options:
                return []
            parts.append(options)
        conditions = self._clause(rule.conditions, "when", 0)
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

    def _clause(self, checks: Sequence[Check], part: str, index: int) -> tuple[Atom, ...] | None:
        """The atoms of one from/to entry (or of the when list); None: it fails here."""
        atoms: list[Atom] = []
        for check in checks:
            atom = self._atom(check, part, index)
            if atom is not None:
                atoms.append(atom)
            elif not check.test(self.base):
                return None
        return tuple(atoms)

    def _atom(self, check: Check, part: str, index: int) -> Atom | None:
        """The atom ``check`` leaves when its matcher reads a request attribute; None when
        the connection decides it."""
        tree_field = check.tree_field
        if tree_field is None or not self._per_request(tree_field.matcher):
            return None
        negated, written = tree_field.negated, tree_field.written
        condition = tree_field.condition
        if condition is not None:
            where = f"when[{condition.key}].{'notValues' if negated else 'values'}"
            return Atom(_when_attribute(condition), where, written, negated, check.test)
        name = tree_field.name
        field_name = f"not{name[0].upper()}{name[1:]}" if negated else name
        entry = "source" if part == "from" else "operation"
        where = f"{part}[{index}].{entry}.{field_name}"
        return Atom(_ATTRIBUTES[name], where, written, negated, check.test)

    def _per_request(self, matcher: rt.Matcher) -> bool:
        unknown_source = self.base.source_ip is None
        return any(
            isinstance(leaf, _PER_REQUEST) or (unknown_source and isinstance(leaf, rt.SourceIp))
            for leaf in rt.leaves(matcher)
        )


def _when_attribute(condition: ConditionKey) -> str:
    match condition.kind:
        case KeyKind.REQUEST_HEADER:
            return f"header {condition.names[0].lower()}"
        case KeyKind.REQUEST_PRINCIPAL:
            return "request principal (JWT iss/sub)"
        case KeyKind.REQUEST_AUDIENCES:
            return "JWT audience"
        case KeyKind.REQUEST_PRESENTER:
            return "JWT presenter (azp)"
        case KeyKind.REQUEST_CLAIM:
            return "JWT claim " + ".".join(condition.names)
        case KeyKind.REMOTE_IP:
            return "remote ip (X-Forwarded-For)"
        case KeyKind.SOURCE_IP:
            return "source ip"
    return condition.key


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
