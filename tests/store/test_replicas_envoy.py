"""Must-show 4: `trustmesh apply` through the store while replicas A and B both run is
enforced at a real Envoy sidecar whose configuration comes from replica B (xDS over
mTLS, certificate from B's CA); the client's certificate comes from A's CA."""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tests.envoy.conftest import eventually, run
from tests.store.replica_rig import SidecarRig, apply_text, sidecar_on_replica_b
from tests.xds.controlplane_rig import DENY_GET
from tests.xds.controlplane_traffic import Connection
from trustmesh.runtime.replica import read_replicas
from trustmesh.store.etcd_server import EtcdCluster

ALLOW_GET = DENY_GET.replace('methods: ["GET"]', 'methods: ["PUT"]')  # same object, GET passes
ROUNDS = 6


async def served_by(rig: SidecarRig) -> dict[str, list[str]]:
    return {n: r["proxies"] for n, r in (await read_replicas(rig.client)).items()}


def test_apply_through_the_store_is_enforced_at_a_sidecar_of_replica_b(
    tmp_path: Path, etcd: EtcdCluster
) -> None:
    async def scenario() -> None:
        async with sidecar_on_replica_b(etcd, tmp_path) as rig:

            async def b_serves_it() -> bool:
                return await served_by(rig) == {"a": [], "b": [rig.node_id]}

            await eventually(b_serves_it, what="B's record lists the sidecar", timeout=10)
            connection = await Connection.open(rig.inbound, rig.sleep_tls)
            try:
                assert (await connection.request())[0] == 200

                async def answers(status: int) -> bool:
                    return (await connection.request())[0] == status

                # The real CLI, through the store (replicas are not told anything).
                policy = tmp_path / "deny.yaml"
                policy.write_text(DENY_GET)
                command = [sys.executable, "-m", "trustmesh", "apply", "-f", str(policy)]
                done = await asyncio.to_thread(
                    subprocess.run,
                    [*command, *etcd.store_args()],
                    capture_output=True, text=True, timeout=60, check=False,
                )  # fmt: skip
                assert done.returncode == 0, done.stderr
                assert (
                    "authorizationpolicy.security.istio.io/deny-method-get created" in done.stdout
                )
                await eventually(lambda: answers(403), what="GET denied at B's sidecar", timeout=10)

                # Both replicas followed the store (A compiled it too, for its proxies).
                async def both_followed() -> bool:
                    records = (await read_replicas(rig.client)).values()
                    return all(r["config"]["generation"] >= 2 for r in records)

                await eventually(both_followed, what="A and B reloaded", timeout=5)

                # apply → enforced, a few times each way (the bench does 50).
                took = []
                for i in range(ROUNDS):
                    text, status = (ALLOW_GET, 200) if i % 2 == 0 else (DENY_GET, 403)
                    started = time.perf_counter()
                    await apply_text(rig.store, text, tmp_path)
                    await eventually(
                        lambda status=status: answers(status),  # type: ignore[misc]
                        what=f"round {i}: {status}",
                        timeout=10,
                    )
                    took.append(time.perf_counter() - started)
                print(
                    f"\napply -> enforced at B's sidecar: median "
                    f"{statistics.median(took) * 1000:.0f} ms, max {max(took) * 1000:.0f} ms"
                )
                assert max(took) < 5.0  # bounded here; the 200 ms target is the bench's
            finally:
                connection.close()

    run(scenario(), timeout=240)
