"""Root rotation: decisions are pure functions of slots and an injected clock."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509

from trustmesh.identity import pki
from trustmesh.identity.ca import CaConfig, CertificateAuthority
from trustmesh.identity.rotation import (
    RotationPolicy,
    SlotState,
    SlotTimes,
    should_activate,
    should_prepare,
    trusted,
)
from trustmesh.identity.spiffe import SpiffeId

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
SLEEP = SpiffeId("cluster.local", "foo", "sleep")


def slot(
    state: SlotState,
    start: dt.datetime,
    days: int,
    prepared: dt.datetime | None = None,
    forced: bool = False,
) -> SlotTimes:
    return SlotTimes(
        state.value + str(start.day),
        state,
        start,
        start + days * DAY,
        prepared or start,
        forced=forced,
    )


def test_prepare_at_half_life_and_activate_at_eighty_percent_after_overlap() -> None:
    policy = RotationPolicy(overlap=dt.timedelta(days=2))
    active = slot(SlotState.ACTIVE, NOW, 100)
    assert not should_prepare([active], NOW + 49 * DAY, policy)
    assert should_prepare([active], NOW + 50 * DAY, policy)
    prepared = slot(SlotState.PREPARED, NOW + 50 * DAY, 100)
    assert not should_prepare([active, prepared], NOW + 60 * DAY, policy)
    assert not should_activate([active, prepared], NOW + 79 * DAY, policy)
    assert should_activate([active, prepared], NOW + 80 * DAY, policy)
    just_prepared = slot(SlotState.PREPARED, NOW + 79 * DAY, 100)
    assert not should_activate([active, just_prepared], NOW + 80 * DAY, policy)  # overlap
    forced = slot(SlotState.PREPARED, NOW + DAY, 100, forced=True)
    assert not should_activate([active, forced], NOW + 2 * DAY, policy)
    assert should_activate([active, forced], NOW + 3 * DAY, policy)


def test_trusted_keeps_old_roots_until_their_leaves_expire() -> None:
    old = SlotTimes("old", SlotState.OLD, NOW, NOW + 100 * DAY, NOW, retire_after=NOW + 10 * DAY)
    new = slot(SlotState.ACTIVE, NOW, 100)
    assert trusted([old, new], NOW + 9 * DAY) == [new.slot_id, "old"]
    assert trusted([old, new], NOW + 10 * DAY) == [new.slot_id]


def issuer_of(chain: tuple[str, ...]) -> x509.Name:
    return x509.load_pem_x509_certificate(chain[0].encode()).issuer


def test_ca_rotation_overlaps_both_roots_and_drops_the_old_one(tmp_path: Path) -> None:
    config = CaConfig(
        root_ttl=100 * DAY, max_ttl=DAY, rotation=RotationPolicy(overlap=dt.timedelta(hours=6))
    )
    ca = CertificateAuthority.init(tmp_path / "ca", config, NOW)
    first_root = ca.active.root
    assert ca.tick(NOW + 10 * DAY) == []
    events = ca.tick(NOW + 50 * DAY)
    assert [e.split()[0] for e in events] == ["prepared"]
    assert len(ca.trust_bundle(NOW + 50 * DAY)) == 2
    csr = pki.build_csr(pki.generate_key(), [SLEEP.uri])
    assert issuer_of(ca.issue(csr, SLEEP, NOW + 51 * DAY).chain_pem) == first_root.subject
    events = ca.tick(NOW + 80 * DAY)
    assert [e.split()[0] for e in events] == ["activated"]
    new_root = ca.active.root
    assert new_root != first_root
    issued = ca.issue(csr, SLEEP, NOW + 80 * DAY)
    assert issued.chain_pem[-1] == pki.cert_to_pem(new_root).decode()
    assert len(ca.trust_bundle(NOW + 80 * DAY + dt.timedelta(hours=23))) == 2
    assert [e.split()[0] for e in ca.tick(NOW + 81 * DAY)] == ["retired"]
    assert ca.trust_bundle(NOW + 81 * DAY) == [new_root]
    reloaded = CertificateAuthority.load(tmp_path / "ca")
    assert reloaded.trust_bundle(NOW + 81 * DAY) == [new_root]


def test_operator_rotation(tmp_path: Path) -> None:
    config = CaConfig(rotation=RotationPolicy(overlap=dt.timedelta(minutes=30)))
    ca = CertificateAuthority.init(tmp_path / "ca", config, NOW)
    ca.rotate_root(NOW)
    assert ca.tick(NOW + dt.timedelta(minutes=29)) == []
    assert [e.split()[0] for e in ca.tick(NOW + dt.timedelta(minutes=30))] == ["activated"]
