"""The agent against a real CA server: enroll, renew, survive a CA outage, follow roots."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from collections.abc import Callable
from pathlib import Path

from trustmesh.agent.sds import SecretStore
from trustmesh.agent.workload import AgentConfig, WorkloadAgent, renewal_time
from trustmesh.identity import pki
from trustmesh.identity.ca import CaConfig, CertificateAuthority
from trustmesh.identity.server import CaServer
from trustmesh.identity.spiffe import SpiffeId

SLEEP = SpiffeId("cluster.local", "foo", "sleep")


async def _until(condition: Callable[[], bool], *, what: str, timeout: float = 10) -> None:
    """Wait for the agent's counters to reach ``condition`` — bounded, so a broken
    agent fails the test instead of hanging it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"no {what} within {timeout} s"
        await asyncio.sleep(0.02)


def test_renewal_time_is_half_life_with_bounded_jitter() -> None:
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)  # calendar: ok, pure arithmetic
    end = start + dt.timedelta(hours=24)
    times = [renewal_time(start, end, 0.5, 0.01, random.Random(i)) for i in range(200)]
    assert min(times) >= start + dt.timedelta(hours=12) - dt.timedelta(minutes=15)
    assert max(times) <= start + dt.timedelta(hours=12) + dt.timedelta(minutes=15)
    assert len(set(times)) > 100


def test_agent_enrolls_renews_rides_out_an_outage_and_follows_root_rotation(tmp_path: Path) -> None:
    async def main() -> None:
        ca = CertificateAuthority.init(tmp_path / "ca", CaConfig(), dt.datetime.now(dt.UTC))
        server = CaServer(ca)
        await server.start()
        store = SecretStore()
        config = AgentConfig(
            identity=SLEEP,
            ca_address=f"127.0.0.1:{server.port}",
            ca_renewal_address=f"127.0.0.1:{server.renewal_port}",
            ca_roots_pem=ca.bundle_pem(dt.datetime.now(dt.UTC)),
            token=ca.token("foo", "sleep", dt.datetime.now(dt.UTC)),
            backoff_initial=0.05,
            backoff_max=0.2,
            bundle_refresh_seconds=3600,
        )
        agent = WorkloadAgent(config, store)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            await asyncio.wait_for(agent.ready.wait(), 10)
            version, first = store.current()  # type: ignore[misc]
            leaf = pki.load_certs(first.cert_chain_pem)[0]
            assert pki.uri_sans(leaf) == [SLEEP.uri]
            assert b"PRIVATE KEY" in first.private_key_pem

            agent.renew_now()
            _, renewed = await asyncio.wait_for(store.wait_newer(version), 10)
            assert renewed.private_key_pem != first.private_key_pem  # a fresh key each time
            assert agent.renewals == 1

            await server.stop()  # the CA goes away …
            agent.renew_now()
            await _until(lambda: agent.failures >= 2, what="two failed renewals")
            assert store.current()[1] == renewed  # type: ignore[index]  # still serving
            restarted = CaServer(
                ca,
                address=f"127.0.0.1:{server.port}",
                renewal_address=f"127.0.0.1:{server.renewal_port}",
            )
            await restarted.start()  # … and comes back on the same ports
            try:
                await _until(lambda: agent.renewals >= 2, what="a renewal after the restart")
                ca.rotate_root(dt.datetime.now(dt.UTC))
                assert await agent.refresh_bundle()
                roots = pki.load_certs(store.current()[1].trust_bundle_pem)  # type: ignore[index]
                assert len(roots) == 2
            finally:
                await restarted.stop()
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
            await server.stop()

    asyncio.run(main())
