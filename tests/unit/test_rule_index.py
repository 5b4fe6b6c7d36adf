"""The rule index may only skip rules that cannot match: indexed == linear scan."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.policy.authz import RuleSet
from trustmesh.policy.request import Attributes

from .meshutil import compile_text, policy

PATHS = ["/a", "/a/b", "/api", "/api/v1", "/api/v1/items", "/b", "/static/x.js", "/"]
PRINCIPALS = [f"cluster.local/ns/{ns}/sa/{sa}" for ns in ("foo", "bar") for sa in ("a", "b")]
PORTS = [8000, 9000, 9001]


def _random_rules(seed: int, count: int) -> str:
    rng = random.Random(seed)
    rules = []
    for _ in range(count):
        shape = rng.choice(["exact", "prefix", "suffix", "principal", "port", "mixed", "not"])
        path = rng.choice(PATHS)
        if shape == "exact":
            rules.append(f"- to: [{{operation: {{paths: [{path}]}}}}]")
        elif shape == "prefix":
            rules.append(f'- to: [{{operation: {{paths: ["{path}*"], methods: [GET]}}}}]')
        elif shape == "suffix":
            rules.append(f'- to: [{{operation: {{paths: ["*{path[-2:]}"]}}}}]')
        elif shape == "principal":
            principal = rng.choice(PRINCIPALS)
            rules.append(f"- from: [{{source: {{principals: [{principal}]}}}}]")
        elif shape == "port":
            rules.append(f'- to: [{{operation: {{ports: ["{rng.choice(PORTS)}"]}}}}]')
        elif shape == "mixed":
            principal = rng.choice(PRINCIPALS)
            rules.append(
                f"- from: [{{source: {{principals: [{principal}]}}}}]\n"
                f'  to: [{{operation: {{paths: [{path}]}}}}, {{operation: {{ports: ["9000"]}}}}]'
            )
        else:
            rules.append(f"- to: [{{operation: {{notPaths: [{path}]}}}}]")
    return "\n".join(rules)


def _rule_sets() -> list[RuleSet]:
    text = "".join(
        policy(
            f"p{i}",
            "foo",
            "selector: {matchLabels: {app: httpbin}}\nrules:\n" + _random_rules(i, 30),
        )
        for i in range(8)
    )
    authz = compile_text(text).workloads["foo/httpbin"].authz
    return [authz.allow.http, authz.allow.tcp]


RULE_SETS = _rule_sets()


@settings(max_examples=400, deadline=None)
@given(
    path=st.one_of(st.sampled_from(PATHS), st.text(alphabet="/abcipv1.js", max_size=12)),
    principal=st.one_of(st.none(), st.sampled_from(PRINCIPALS)),
    port=st.sampled_from(PORTS),
    method=st.sampled_from(["GET", "POST"]),
)
def test_indexed_first_match_equals_linear_scan(
    path: str, principal: str | None, port: int, method: str
) -> None:
    assert len(RULE_SETS[0]) == 240
    for rule_set in RULE_SETS:
        attrs = Attributes(
            principal=principal, destination_port=port, is_http=True, method=method, path=path
        )
        linear = next((rule for rule, matched, _ in rule_set.explain(attrs) if matched), None)
        assert rule_set.first_match(attrs) == linear
