"""Real Envoy, real certificates: mesh mTLS between two sidecars fed over SDS.

Each sidecar is what the agent runs: a SecretStore, an SdsServer on its own Unix socket
and an Envoy from sidecar_bootstrap(). Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from trustmesh.agent.envoy import EnvoyConfigError, validate_bootstrap
from trustmesh.envoy_bootstrap import (
    Backend,
    DirectResponse,
    InboundListener,
    MtlsMode,
    OutboundListener,
    sidecar_bootstrap,
)

from .conftest import (
    Loopback,
    MiniCA,
    Sidecars,
    add_peer_headers,
    close_after_each_request,
    eventually,
    http_get,
    leaf_of,
    mesh_client_tls,
    run,
    server_leaf,
    spiffe_id,
    stat,
)

pytestmark = pytest.mark.envoy

CLIENT_ID = spiffe_id("shop", "client")
SERVER_ID = spiffe_id("shop", "server")
OTHER_ID = spiffe_id("x", "other")


def _inbound(
    endpoint: tuple[str, int], allowed: frozenset[str], mode: MtlsMode = MtlsMode.STRICT
) -> InboundListener:
    return InboundListener(
        endpoint[0],
        endpoint[1],
        DirectResponse("hello from server\n"),
        mode=mode,
        allowed_peer_ids=allowed,
    )


def _outbound(
    endpoint: tuple[str, int], server: tuple[str, int], expected: str
) -> OutboundListener:
    return OutboundListener(
        endpoint[0], endpoint[1], Backend(*server), expected_server_ids=frozenset({expected})
    )


def test_http_request_crosses_two_sidecars_over_mtls(
    ca: MiniCA, loopback: Loopback, sidecars: Sidecars
) -> None:
    server_at, client_at = loopback.endpoint(), loopback.endpoint()
    client_secret = ca.issue("shop", "client")

    async def scenario() -> None:
        async with (
            sidecars.run(
                "server",
                ca.issue("shop", "server"),
                inbound=_inbound(server_at, frozenset({CLIENT_ID})),
                patch=add_peer_headers,
            ),
            sidecars.run(
                "client", client_secret, outbound=(_outbound(client_at, server_at, SERVER_ID),)
            ),
        ):
            response = await http_get(*client_at, "/hello")
            assert response.status == 200, response
            assert response.body == b"hello from server\n"
            # The server Envoy verified the client's certificate, not just any TLS.
            assert response.headers["x-peer-uri"] == CLIENT_ID
            serial = int(response.headers["x-peer-serial"], 16)
            assert serial == leaf_of(client_secret).serial_number
            # STRICT: plaintext straight to the server's inbound listener gets no answer.
            with pytest.raises((ConnectionError, OSError)):
                await http_get(*server_at, "/hello")

    run(scenario())


def test_client_refuses_server_with_unexpected_identity(
    ca: MiniCA, loopback: Loopback, sidecars: Sidecars
) -> None:
    server_at, client_at = loopback.endpoint(), loopback.endpoint()

    async def scenario() -> None:
        async with (
            sidecars.run(
                "server",
                ca.issue("shop", "server"),
                inbound=_inbound(server_at, frozenset({CLIENT_ID})),
            ) as server,
            sidecars.run(
                "client",
                ca.issue("shop", "client"),
                outbound=(_outbound(client_at, server_at, OTHER_ID),),
            ) as client,
        ):
            response = await http_get(*client_at, "/")
            assert response.status == 503, response
            cluster = f"outbound_{client_at[0]}_{client_at[1]}"
            assert await stat(client.envoy, f"cluster.{cluster}.ssl.fail_verify_san") >= 1
            # The client gave up in the handshake: the server never saw a request.
            assert await stat(server.envoy, f"http.inbound_{server_at[1]}.downstream_rq_total") == 0

    run(scenario())


def test_server_refuses_peer_outside_allowed_ids(
    ca: MiniCA, loopback: Loopback, sidecars: Sidecars, workroot: Path
) -> None:
    server_at, client_at = loopback.endpoint(), loopback.endpoint()
    client_secret, other_secret = ca.issue("shop", "client"), ca.issue("x", "other")

    async def scenario() -> None:
        async with (
            sidecars.run(
                "server",
                ca.issue("shop", "server"),
                inbound=_inbound(server_at, frozenset({OTHER_ID})),
            ) as server,
            sidecars.run(
                "client", client_secret, outbound=(_outbound(client_at, server_at, SERVER_ID),)
            ),
        ):
            response = await http_get(*client_at, "/")
            assert response.status == 503, response
            # The handshake itself fails: the denied peer never reaches the HTTP layer.
            with pytest.raises((ConnectionError, OSError)):
                await http_get(*server_at, "/", tls=mesh_client_tls(client_secret, workroot))
            listener = f"listener.{server_at[0]}_{server_at[1]}"
            assert await stat(server.envoy, f"{listener}.ssl.fail_verify_san") >= 2
            assert await stat(server.envoy, f"http.inbound_{server_at[1]}.downstream_rq_total") == 0
            # Control: the allowed identity, same CA, same listener, gets through.
            allowed = await http_get(*server_at, "/", tls=mesh_client_tls(other_secret, workroot))
            assert allowed.status == 200, allowed
            assert await stat(server.envoy, f"http.inbound_{server_at[1]}.downstream_rq_total") == 1

    run(scenario())


def test_sds_rotation_reaches_new_handshakes_without_restart(
    ca: MiniCA, loopback: Loopback, sidecars: Sidecars, workroot: Path
) -> None:
    server_at, client_at = loopback.endpoint(), loopback.endpoint()
    client_tls = mesh_client_tls(ca.issue("shop", "client"), workroot)

    def instrument(bootstrap: dict[str, Any]) -> None:
        add_peer_headers(bootstrap)
        close_after_each_request(bootstrap)

    async def scenario() -> None:
        async with (
            sidecars.run(
                "server",
                ca.issue("shop", "server"),
                inbound=_inbound(server_at, frozenset({CLIENT_ID})),
                patch=instrument,
            ) as server,
            sidecars.run(
                "client",
                ca.issue("shop", "client"),
                outbound=(_outbound(client_at, server_at, SERVER_ID),),
            ) as client,
        ):
            assert (await http_get(*client_at)).status == 200
            old = await server_leaf(*server_at, client_tls)
            server_pid, client_pid = server.envoy.pid, client.envoy.pid
            pushes = server.sds.pushes

            # Server side: a fresh handshake with the server sidecar gets the new leaf.
            rotated = ca.issue("shop", "server")
            new_serial = leaf_of(rotated).serial_number
            seen = old

            async def server_rotated() -> bool:
                nonlocal seen
                seen = await server_leaf(*server_at, client_tls)
                return seen.serial_number == new_serial

            server.store.update(rotated)
            took = await eventually(server_rotated, what="server serves new leaf", timeout=5)
            print(f"server rotation: push -> new handshake in {took * 1000:.1f} ms")
            assert seen.public_key() != old.public_key()  # a new key, not just a re-signing
            certs = (await server.envoy.admin_get("/certs")).body.decode().lower()
            assert f"{new_serial:x}" in certs
            assert f"{old.serial_number:x}" not in certs
            assert server.sds.pushes > pushes

            # Client side: the server Envoy sees the client's new certificate.
            rotated_client = ca.issue("shop", "client")
            client_serial = leaf_of(rotated_client).serial_number

            async def client_rotated() -> bool:
                response = await http_get(*client_at)
                assert response.status == 200, response
                return int(response.headers["x-peer-serial"], 16) == client_serial

            client.store.update(rotated_client)
            took = await eventually(client_rotated, what="server sees new client leaf", timeout=5)
            print(f"client rotation: push -> server sees new client cert in {took * 1000:.1f} ms")

            # No restart: the same processes did all of it.
            assert (server.envoy.pid, client.envoy.pid) == (server_pid, client_pid)
            assert server.envoy.returncode is None and client.envoy.returncode is None

    run(scenario())


def test_envoy_rejects_a_bad_secret_and_keeps_the_last_good_one(
    ca: MiniCA,
    loopback: Loopback,
    sidecars: Sidecars,
    workroot: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="trustmesh.agent.sds")
    server_at = loopback.endpoint()
    client_tls = mesh_client_tls(ca.issue("shop", "client"), workroot)
    good = ca.issue("shop", "server")

    async def nacked() -> bool:
        return any("rejected" in record.getMessage() for record in caplog.records)

    async def scenario() -> None:
        async with sidecars.run(
            "server", good, inbound=_inbound(server_at, frozenset({CLIENT_ID}))
        ) as server:
            serial = leaf_of(good).serial_number
            assert (await server_leaf(*server_at, client_tls)).serial_number == serial
            # PEM-shaped but not a certificate: only Envoy can tell, and it NACKs.
            garbage = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
            server.store.update(replace(good, cert_chain_pem=garbage))
            await eventually(nacked, what="Envoy NACKs the broken secret", timeout=5)
            assert (await server_leaf(*server_at, client_tls)).serial_number == serial
            assert (await http_get(*server_at, tls=client_tls)).status == 200

            # The stream survived the NACK: the next good secret still arrives.
            rotated = ca.issue("shop", "server")

            async def rotated_in() -> bool:
                leaf = await server_leaf(*server_at, client_tls)
                return leaf.serial_number == leaf_of(rotated).serial_number

            server.store.update(rotated)
            await eventually(rotated_in, what="next good secret served", timeout=5)

    run(scenario())
    rejections = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    print("NACK logged:", rejections[0])


def test_generated_bootstraps_pass_envoy_validate(loopback: Loopback, workroot: Path) -> None:
    server_at, client_at, other_at = loopback.endpoint(), loopback.endpoint(), loopback.endpoint()

    def bootstrap(
        inbound: InboundListener | None, outbound: tuple[OutboundListener, ...] = ()
    ) -> dict[str, Any]:
        return sidecar_bootstrap(
            node_id="sidecar~127.0.0.1~v.test~test.svc.cluster.local",
            cluster="v.test",
            sds_socket=str(workroot / "sds.sock"),
            admin_address="127.0.0.1",
            admin_port=15000,
            inbound=inbound,
            outbound=outbound,
        )

    strict = InboundListener(
        *server_at, Backend("127.0.0.1", 8080), allowed_peer_ids=frozenset({CLIENT_ID})
    )
    two_outbound = (
        _outbound(client_at, server_at, SERVER_ID),
        OutboundListener(
            *other_at,
            Backend("server.shop.svc.cluster.local", 80),
            expected_server_ids=frozenset({SERVER_ID, OTHER_ID}),
            sni="server.shop",
        ),
    )
    bootstraps = {
        "strict-backend": bootstrap(strict),
        "permissive-direct": bootstrap(_inbound(server_at, frozenset(), MtlsMode.PERMISSIVE)),
        "client-two-outbound": bootstrap(None, two_outbound),
    }
    assert bootstrap(strict) == bootstraps["strict-backend"]  # pure: same input, same config

    # The settings envoy-notes found to matter, checked on the generated JSON.
    clusters = {
        c["name"]: c for c in bootstraps["client-two-outbound"]["static_resources"]["clusters"]
    }
    sds_endpoint = clusters["sds-grpc"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert sds_endpoint["endpoint"]["address"] == {"pipe": {"path": str(workroot / "sds.sock")}}
    upstream = clusters[f"outbound_{other_at[0]}_{other_at[1]}"]["transport_socket"]["typed_config"]
    context = upstream["common_tls_context"]
    assert context["tls_params"]["tls_maximum_protocol_version"] == "TLSv1_3"
    assert context["combined_validation_context"]["default_validation_context"] == {
        "match_typed_subject_alt_names": [
            {"san_type": "URI", "matcher": {"exact": SERVER_ID}},
            {"san_type": "URI", "matcher": {"exact": OTHER_ID}},
        ]
    }
    assert (
        upstream["sni"] == "server.shop" and context["alpn_protocols"][0] == "istio-peer-exchange"
    )
    inbound_chain = bootstraps["strict-backend"]["static_resources"]["listeners"][0][
        "filter_chains"
    ]
    assert inbound_chain[0]["transport_socket"]["typed_config"]["require_client_certificate"]

    broken = bootstrap(None, two_outbound[:1])
    tls = broken["static_resources"]["clusters"][1]["transport_socket"]["typed_config"]
    tls["common_tls_context"]["tls_params"]["tls_maximum_protocol_version"] = "TLSv9"

    async def scenario() -> None:
        await asyncio.gather(
            *(
                validate_bootstrap(config, workdir=workroot / name)
                for name, config in bootstraps.items()
            )
        )
        with pytest.raises(EnvoyConfigError, match="TLSv9"):
            await validate_bootstrap(broken, workdir=workroot / "broken")

    run(scenario(), timeout=40)


def test_supervise_restarts_a_killed_envoy(
    ca: MiniCA, loopback: Loopback, sidecars: Sidecars, workroot: Path
) -> None:
    server_at = loopback.endpoint()
    client_tls = mesh_client_tls(ca.issue("shop", "client"), workroot)

    async def scenario() -> None:
        async with sidecars.run(
            "server",
            ca.issue("shop", "server"),
            inbound=_inbound(server_at, frozenset(), MtlsMode.PERMISSIVE),
        ) as server:
            envoy = server.envoy
            assert (await http_get(*server_at)).status == 200  # PERMISSIVE: plaintext too
            stop = asyncio.Event()
            supervisor = asyncio.create_task(envoy.supervise(stop))
            killed = envoy.pid
            assert killed is not None
            os.kill(killed, signal.SIGKILL)

            async def restarted() -> bool:
                return envoy.restarts == 1

            took = await eventually(restarted, what="envoy restarted", timeout=10)
            print(f"supervise: SIGKILL -> ready again in {took:.2f} s")
            assert envoy.pid != killed
            assert (await envoy.admin_get("/ready")).status == 200
            # Served again, including mTLS: the new Envoy re-fetched its secrets over SDS.
            assert (await http_get(*server_at)).status == 200
            assert (await http_get(*server_at, tls=client_tls)).status == 200
            stop.set()
            await supervisor
            assert envoy.returncode is None  # supervision ended; stopping stays explicit

    run(scenario())
