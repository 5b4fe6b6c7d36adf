"""`trustmesh graph` on a generated mesh of 200 workloads; prints one JSON document.

The mesh: 10 namespaces with sidecar injection and mesh-wide STRICT mTLS, 20 workloads per
namespace (one ServiceAccount, Deployment and HTTP Service each), an allow-nothing per
namespace, and per workload one ALLOW for three callers (GET on ``/api/*``) plus, for every
fifth, a namespace-wide ALLOW and a DENY on ``/api/admin*``: 200 × 200 sources (plus the
extra sources) × 1 port ≈ 42,000 edges, a few hundred conditional. Each run is a fresh
`trustmesh graph -o json` process (imports, load, graph, JSON), then the same with
`-o png --show allowed` (grouped, laid out by graphviz-pure); the in-process graph build
is timed alone too. Target: a few seconds.

Usage: python bench/bench_graph.py [--namespaces 10] [--per-namespace 20] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def mesh(namespaces: int, per_namespace: int) -> str:
    docs = [
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: istio-system}\n",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n",
    ]
    for n in range(namespaces):
        ns = f"team{n}"
        docs.append(
            f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n"
            "  labels: {istio-injection: enabled}\n"
        )
        docs.append(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            f"metadata: {{name: allow-nothing, namespace: {ns}}}\nspec: {{}}\n"
        )
        for w in range(per_namespace):
            app = f"svc{w}"
            docs.append(
                "apiVersion: v1\nkind: ServiceAccount\n"
                f"metadata: {{name: {app}, namespace: {ns}}}\n"
            )
            docs.append(
                "apiVersion: apps/v1\nkind: Deployment\n"
                f"metadata: {{name: {app}, namespace: {ns}}}\n"
                "spec:\n  template:\n"
                f"    metadata: {{labels: {{app: {app}}}}}\n"
                f"    spec:\n      serviceAccountName: {app}\n"
                f"      containers: [{{name: app, image: app, ports: [{{containerPort: 8080}}]}}]\n"
            )
            docs.append(
                "apiVersion: v1\nkind: Service\n"
                f"metadata: {{name: {app}, namespace: {ns}}}\n"
                f"spec:\n  selector: {{app: {app}}}\n  ports: [{{name: http, port: 8080}}]\n"
            )
            callers = [
                f"cluster.local/ns/team{(n + k) % namespaces}"
                f"/sa/svc{(w + 3 * k + 1) % per_namespace}"
                for k in range(3)
            ]
            docs.append(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
                f"metadata: {{name: {app}-callers, namespace: {ns}}}\n"
                f"spec:\n  selector: {{matchLabels: {{app: {app}}}}}\n  action: ALLOW\n"
                f"  rules:\n  - from: [{{source: {{principals: {json.dumps(callers)}}}}}]\n"
                '    to: [{operation: {methods: [GET], paths: ["/api/*"]}}]\n'
            )
            if w % 5 == 0:
                docs.append(
                    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
                    f"metadata: {{name: {app}-namespace, namespace: {ns}}}\n"
                    f"spec:\n  selector: {{matchLabels: {{app: {app}}}}}\n  action: ALLOW\n"
                    f"  rules:\n  - from: [{{source: {{namespaces: [{ns}]}}}}]\n"
                )
                docs.append(
                    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
                    f"metadata: {{name: {app}-no-admin, namespace: {ns}}}\n"
                    f"spec:\n  selector: {{matchLabels: {{app: {app}}}}}\n  action: DENY\n"
                    '  rules:\n  - to: [{operation: {paths: ["/api/admin*"]}}]\n'
                )
    return "---\n".join(docs)


def _timed(command: list[str]) -> tuple[float, float, bytes]:
    """Wall seconds, CPU seconds of the child processes (user + system: on a shared machine
    the wall time also counts other work), and stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--namespaces", type=int, default=10)
    parser.add_argument("--per-namespace", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    trustmesh = str(Path(sys.executable).parent / "trustmesh")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mesh.yaml"
        path.write_text(mesh(args.namespaces, args.per_namespace))
        from trustmesh.config import load_config
        from trustmesh.graph.build import build_graph

        loaded = load_config([str(path)])
        assert loaded.mesh is not None, [str(d) for d in loaded.errors]
        builds = []
        for _ in range(args.runs):
            start = time.perf_counter()
            graph = build_graph(loaded.mesh, now=time.time())
            builds.append(time.perf_counter() - start)
        counts: dict[str, int] = {}
        for edge in graph.edges:
            counts[edge.verdict.value] = counts.get(edge.verdict.value, 0) + 1
        json_runs, png_runs = [], []
        for _ in range(args.runs):
            *seconds, out = _timed([trustmesh, "graph", "-f", str(path), "-o", "json"])
            json_runs.append(seconds)
            assert len(json.loads(out)["edges"]) == len(graph.edges)
            png = Path(tmp) / "mesh.png"
            *seconds, _ = _timed(
                [
                    trustmesh,
                    "graph",
                    "-f",
                    str(path),
                    "-o",
                    "png",
                    "--show",
                    "allowed",
                    "--output",
                    str(png),
                ]
            )
            png_runs.append(seconds)
            assert png.read_bytes().startswith(b"\x89PNG")
    print(
        json.dumps(
            {
                "bench": "graph",
                "workloads": args.namespaces * args.per_namespace,
                "namespaces": args.namespaces,
                "edges": len(graph.edges),
                "verdicts": counts,
                "build_seconds_best": round(min(builds), 3),
                "cli_json_seconds_best": round(min(r[0] for r in json_runs), 3),
                "cli_json_cpu_seconds_best": round(min(r[1] for r in json_runs), 3),
                "cli_png_allowed_seconds_best": round(min(r[0] for r in png_runs), 3),
                "cli_png_allowed_cpu_seconds_best": round(min(r[1] for r in png_runs), 3),
                "runs": args.runs,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
