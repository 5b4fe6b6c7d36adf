"""What VirtualService routing at sidecars costs the translation; prints JSON.

A mesh of ``--services`` bookinfo-like services in one namespace, each with three versions
(a Deployment per version, ``app``/``version`` labels), and ``--clients`` client
workloads. Three variants, side by side in one run:

* ``plain``: no routing configuration;
* ``subsets``: a DestinationRule per service with a subset per version (every client then
  gets a cluster per subset, as from istiod);
* ``routed``: plus one VirtualService per service, as Istio's bookinfo tasks write them —
  a header match to v2, a 50/50 weighted split over v1 and v3 with a timeout and retries.

For each variant and layout (``process``: the local-process proxy's inline routes;
``captured``: RDS per port, shared by the clients of a namespace) the configuration is
compiled once, then every sidecar is translated from a fresh compile (nothing memoized
from an earlier round); the best of ``--rounds`` is reported, with its per-proxy cost, the
serialized size of one client's routes and clusters, and the number of routes.

Usage: python bench/bench_routing.py [--services 20] [--clients 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from trustmesh.config import load_config
from trustmesh.xds.translate import CaptureMode, translate


def workloads(services: int, clients: int, *, subsets: bool = True) -> str:
    namespace = "metadata: {name: default, labels: {istio-injection: enabled}}"
    docs = [f"apiVersion: v1\nkind: Namespace\n{namespace}"]
    for i in range(services):
        docs.append(
            f"apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: default}}\n"
            f"spec:\n  selector: {{app: svc-{i}}}\n  ports:\n  - {{name: http, port: 9080}}"
        )
        for v in (1, 2, 3):
            docs.append(
                f"apiVersion: apps/v1\nkind: Deployment\n"
                f"metadata: {{name: svc-{i}-v{v}, namespace: default}}\nspec:\n"
                f"  selector: {{matchLabels: {{app: svc-{i}, version: v{v}}}}}\n"
                f"  template:\n    metadata: {{labels: {{app: svc-{i}, version: v{v}}}}}\n"
                f"    spec:\n      containers:\n      - name: app\n        image: app\n"
                f"        ports: [{{containerPort: 9080}}]"
            )
        if not subsets:
            continue
        docs.append(
            f"apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
            f"metadata: {{name: svc-{i}, namespace: default}}\nspec:\n  host: svc-{i}\n"
            "  subsets:\n"
            + "".join(f"  - {{name: v{v}, labels: {{version: v{v}}}}}\n" for v in (1, 2, 3))
        )
    for c in range(clients):
        docs.append(
            f"apiVersion: v1\nkind: Pod\nmetadata: {{name: client-{c}, namespace: default,"
            f" labels: {{app: client-{c}}}}}\nspec:\n  containers:\n  - name: app\n    image: app"
        )
    return "\n---\n".join(docs) + "\n"


def routes(services: int) -> str:
    return "\n---\n".join(
        f"""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: svc-{i}, namespace: default}}
spec:
  hosts: [svc-{i}]
  http:
  - match:
    - headers: {{end-user: {{exact: jason}}}}
    route:
    - destination: {{host: svc-{i}, subset: v2}}
  - route:
    - destination: {{host: svc-{i}, subset: v1}}
      weight: 50
    - destination: {{host: svc-{i}, subset: v3}}
      weight: 50
    timeout: 2s
    retries: {{attempts: 3, perTryTimeout: 500ms}}
"""
        for i in range(services)
    )


def measure(folder: Path, rounds: int) -> dict[str, Any]:
    loaded = load_config([str(folder)])
    assert not loaded.errors, loaded.errors[:3]
    refs = [w.ref for w in loaded.snapshot.workloads if w.has_sidecar]
    out: dict[str, Any] = {"proxies": len(refs)}
    for layout in ("process", "captured"):
        best = float("inf")
        sample: Any = None
        for _ in range(rounds):
            fresh = load_config([str(folder)])  # a new compiled mesh: nothing memoized
            assert fresh.mesh is not None
            started = time.perf_counter()
            for i, ref in enumerate(refs):
                if layout == "process":
                    resources = translate(
                        fresh.mesh, ref, inbound_address="127.0.0.50",
                        outbound_address="127.0.0.51",
                    )  # fmt: skip
                else:
                    resources = translate(
                        fresh.mesh, ref, inbound_address="127.0.0.50",
                        capture=CaptureMode.TRANSPARENT,
                    )  # fmt: skip
                if i == 0:
                    sample = resources
            best = min(best, time.perf_counter() - started)
        client = sample
        routes_json = json.dumps([*client.routes, *client.listeners])
        out[layout] = {
            "all_proxies_ms": round(best * 1000, 1),
            "per_proxy_ms": round(best * 1000 / len(refs), 2),
            "clusters": len(client.clusters),
            "clusters_kib": round(len(json.dumps(client.clusters)) / 1024, 1),
            "routes_and_listeners_kib": round(len(routes_json) / 1024, 1),
            "routes": routes_json.count('"match"'),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--services", type=int, default=20)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result: dict[str, Any] = {
        "services": args.services,
        "workloads_per_service": 3,
        "clients": args.clients,
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "workloads.yaml").write_text(
            workloads(args.services, args.clients, subsets=False)
        )
        print("plain …", file=sys.stderr)
        result["plain"] = measure(folder, args.rounds)
        (folder / "workloads.yaml").write_text(workloads(args.services, args.clients))
        print("subsets …", file=sys.stderr)
        result["subsets"] = measure(folder, args.rounds)
        (folder / "routes.yaml").write_text(routes(args.services))
        print("routed …", file=sys.stderr)
        result["routed"] = measure(folder, args.rounds)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
