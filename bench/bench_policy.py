"""Policy engine benchmarks; prints one JSON document.

1. decisions: one workload with 1,000 applicable AuthorizationPolicies; evaluate() per
   decision (median / p99 µs, decisions per second), side by side with the same
   decisions answered by a linear scan of every rule (what the index saves).
2. compile: 1,000 workloads × 1,000 policies: YAML load, validation, compile.

Usage: python bench/bench_policy.py [--decisions N] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from trustmesh.pipeline import compile_sources
from trustmesh.policy.evaluate import evaluate
from trustmesh.policy.request import HttpRequest, Request, Source

ROOT = Path(__file__).resolve().parents[1]
NOW = 1_790_000_000.0


def _ap(name: str, namespace: str, body: str) -> str:
    return (
        f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{body}\n---\n"
    )


def decision_policies(count: int, rng: random.Random) -> str:
    """``count`` policies selecting foo/httpbin: ALLOW/DENY over paths, principals, headers."""
    out = []
    for i in range(count):
        kind = i % 5
        action = "DENY" if i % 4 == 0 else "ALLOW"
        if kind == 0:
            rule = (
                f"  - to: [{{operation: {{paths: [/svc{i}/item, /svc{i}/list], methods: [GET]}}}}]"
            )
        elif kind == 1:
            rule = f'  - to: [{{operation: {{paths: ["/api/v{i}/*"]}}}}]'
        elif kind == 2:
            ns = rng.choice(["bar", "legacy", "team" + str(i)])
            rule = (
                f"  - from: [{{source: {{principals: [cluster.local/ns/{ns}/sa/client{i}]}}}}]\n"
                f"    to: [{{operation: {{methods: [POST]}}}}]"
            )
        elif kind == 3:
            rule = (
                f"  - to: [{{operation: {{paths: [/h{i}]}}}}]\n"
                f'    when: [{{key: "request.headers[x-tenant]", values: [t{i}]}}]'
            )
        else:
            rule = f'  - to: [{{operation: {{ports: ["{9000 + i}"]}}}}]'
        body = (
            f"  selector: {{matchLabels: {{app: httpbin}}}}\n  action: {action}\n  rules:\n{rule}"
        )
        out.append(_ap(f"p{i:04d}", "foo", body))
    return "".join(out)


def decision_requests(count: int, rng: random.Random) -> list[Request]:
    shapes: list[Callable[[int], HttpRequest]] = [
        lambda i: HttpRequest("GET", f"/svc{i}/item"),
        lambda i: HttpRequest("GET", f"/api/v{i}/things?page=2"),
        lambda i: HttpRequest("POST", f"/h{i}", headers=(("x-tenant", f"t{i}"),)),
        lambda i: HttpRequest("GET", "/not/matched/by/anything"),
        lambda i: HttpRequest("GET", f"/svc{i}/../svc{i}/list"),
    ]
    sources = [
        Source.workload("foo/sleep"),
        Source.workload("bar/sleep"),
        Source.principal("cluster.local/ns/bar/sa/client2"),
    ]
    return [
        Request(rng.choice(sources), "foo/httpbin", 8000, rng.choice(shapes)(rng.randrange(1000)))
        for _ in range(count)
    ]


def _percentiles(samples_ns: list[int]) -> dict[str, float]:
    samples = sorted(samples_ns)
    median = statistics.median(samples) / 1000
    p99 = samples[int(len(samples) * 0.99) - 1] / 1000
    total_s = sum(samples) / 1e9
    return {
        "median_us": round(median, 2),
        "p99_us": round(p99, 2),
        "decisions_per_s": round(len(samples) / total_s),
    }


def bench_decisions(n: int) -> dict[str, object]:
    rng = random.Random(7)
    sources = [
        ("workloads.yaml", (ROOT / "examples/mesh/workloads.yaml").read_bytes()),
        ("policies.yaml", decision_policies(1000, rng).encode()),
    ]
    mesh = compile_sources(sources).mesh
    assert mesh is not None
    target = mesh.workloads["foo/httpbin"]
    applicable = len(target.authz.allow.policies) + len(target.authz.deny.policies)
    requests = decision_requests(n, rng)
    outcomes: dict[str, int] = {}

    def timed(fn: Callable[[Request], object], count: int) -> list[int]:
        for request in requests[:200]:
            fn(request)  # warm-up
        gc.collect()
        gc.disable()
        try:
            samples = []
            clock = time.perf_counter_ns
            for request in requests[:count]:
                start = clock()
                fn(request)
                samples.append(clock() - start)
            return samples
        finally:
            gc.enable()

    def indexed(request: Request) -> object:
        return evaluate(mesh, request, now=NOW)

    def linear(request: Request) -> object:
        # The same decision, but every rule set is scanned rule by rule (no index):
        # what evaluation would cost without RuleSet's path/principal/port index.
        return evaluate(mesh, request, now=NOW, trace=True)

    for request in requests:
        verdict = evaluate(mesh, request, now=NOW).verdict.value
        outcomes[verdict] = outcomes.get(verdict, 0) + 1
    return {
        "applicable_policies": applicable,
        "rules": len(target.authz.allow.http) + len(target.authz.deny.http),
        "decisions": n,
        "verdicts": outcomes,
        "indexed": _percentiles(timed(indexed, n)),
        # Tracing explains every rule: 1/10 of the decisions keep the run short.
        "with_trace_full_scan": _percentiles(timed(linear, max(n // 10, 100))),
    }


def compile_corpus(workloads: int, policies: int) -> bytes:
    """10 namespaces; policies mix namespace-wide and per-app selectors."""
    namespaces = [f"ns{i}" for i in range(10)]
    docs = [
        f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels: "
        f"{{istio-injection: enabled}}\n---\n"
        for ns in namespaces
    ]
    for i in range(workloads):
        ns = namespaces[i % 10]
        docs.append(
            f"apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: app{i}, namespace: {ns}}}\n"
            f"spec:\n  template:\n    metadata:\n      labels: {{app: app{i}, tier: t{i % 7}}}\n"
            f"    spec:\n      serviceAccountName: sa{i}\n      containers:\n"
            f"      - name: main\n        ports: [{{containerPort: 8080}}]\n---\n"
        )
    for i in range(policies):
        ns = namespaces[i % 10]
        if i % 10 == 0:
            selector = ""
        elif i % 10 < 4:
            selector = f"  selector: {{matchLabels: {{tier: t{i % 7}}}}}\n"
        else:
            selector = f"  selector: {{matchLabels: {{app: app{(i * 7) % workloads}}}}}\n"
        action = "DENY" if i % 3 == 0 else "ALLOW"
        body = (
            f"{selector}  action: {action}\n  rules:\n"
            f"  - from: [{{source: {{principals: [cluster.local/ns/{ns}/sa/sa{i}]}}}}]\n"
            f'    to: [{{operation: {{methods: [GET], paths: ["/v{i}/*"]}}}}]\n'
            f'    when: [{{key: "request.headers[x-id]", notValues: [blocked]}}]'
        )
        docs.append(_ap(f"policy{i}", ns, body))
    return "".join(docs).encode()


def bench_compile(workloads: int, policies: int, repeat: int) -> dict[str, object]:
    data = compile_corpus(workloads, policies)
    runs = []
    for _ in range(repeat):
        stages: dict[str, float] = {}
        compiled = compile_sources([("corpus.yaml", data)], timed=stages.__setitem__)
        assert compiled.mesh is not None, compiled.errors[:3]
        validate = stages["snapshot"] + stages["validate"]
        runs.append((stages["load"], validate, stages["compile"], len(compiled.mesh.workloads)))
    best = min(runs, key=lambda r: r[0] + r[1] + r[2])
    return {
        "workloads": best[3],
        "policies": policies,
        "yaml_bytes": len(data),
        "load_s": round(best[0], 3),
        "validate_s": round(best[1], 3),
        "compile_s": round(best[2], 3),
        "total_s": round(best[0] + best[1] + best[2], 3),
        "repeat": repeat,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = parser.parse_args()
    n = 500 if args.quick else args.decisions
    result = {
        "machine": {
            "python": sys.version.split()[0],
            "cpu": platform.machine(),
            "cores": __import__("os").cpu_count(),
        },
        "decision": bench_decisions(n),
        "compile_1000x1000": bench_compile(
            100 if args.quick else 1000, 100 if args.quick else 1000, 1 if args.quick else 3
        ),
    }
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
