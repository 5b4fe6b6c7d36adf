"""The certificate authority: issues SPIFFE leaf certificates from CSRs.

The identity in a certificate is what the *caller* is authorized for (a bootstrap token's
namespace/service account, or the identity of the certificate it renews with), never
what the CSR asks for: a CSR whose SANs differ from that identity is rejected, and the
issued certificate is built from scratch with exactly one URI SAN.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import os
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519

from trustmesh.identity import pki
from trustmesh.identity.revocation import RevocationList, RevocationSource
from trustmesh.identity.rotation import (
    RotationPolicy,
    SlotState,
    SlotTimes,
    retired,
    should_activate,
    should_prepare,
    trusted,
)
from trustmesh.identity.spiffe import SpiffeId
from trustmesh.identity.store import CaStore, DurableLog, StoreError
from trustmesh.identity.tokens import (
    NodeGrant,
    TokenGrant,
    TokenLedger,
    TokenRejected,
    issue_node_token,
    issue_token,
    verify_node_token,
    verify_token,
)

audit = logging.getLogger("trustmesh.ca.audit")

PLUGIN_FILES = ("ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem")


def control_plane_identity(trust_domain: str) -> SpiffeId:
    """The identity in the CA / control plane serving certificates (like istiod's)."""
    return SpiffeId(trust_domain, "istio-system", "trustmesh-ca")


class IssueRejected(ValueError):
    """A refused request: ``code`` is stable, ``message`` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class CaConfig:
    trust_domain: str = "cluster.local"
    trust_domain_aliases: tuple[str, ...] = ()
    key_type: pki.KeyType = pki.KeyType.EC_P256
    default_ttl: dt.timedelta = dt.timedelta(hours=24)
    max_ttl: dt.timedelta = dt.timedelta(days=90)
    root_ttl: dt.timedelta = dt.timedelta(days=3650)
    rotation: RotationPolicy = field(default_factory=RotationPolicy)

    def to_json(self) -> dict[str, Any]:
        return {
            "trust_domain": self.trust_domain,
            "trust_domain_aliases": list(self.trust_domain_aliases),
            "key_type": self.key_type.value,
            "default_ttl_s": self.default_ttl.total_seconds(),
            "max_ttl_s": self.max_ttl.total_seconds(),
            "root_ttl_s": self.root_ttl.total_seconds(),
            "rotation_overlap_s": self.rotation.overlap.total_seconds(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CaConfig:
        return cls(
            trust_domain=data["trust_domain"],
            trust_domain_aliases=tuple(data.get("trust_domain_aliases", ())),
            key_type=pki.KeyType(data["key_type"]),
            default_ttl=dt.timedelta(seconds=data["default_ttl_s"]),
            max_ttl=dt.timedelta(seconds=data["max_ttl_s"]),
            root_ttl=dt.timedelta(seconds=data["root_ttl_s"]),
            rotation=RotationPolicy(overlap=dt.timedelta(seconds=data["rotation_overlap_s"])),
        )


@dataclass
class Slot:
    """A signing key with its certificate, chain and trust anchor."""

    slot_id: str
    state: SlotState
    key: pki.PrivateKey = field(repr=False)
    chain: list[x509.Certificate]  # signing cert first, up to but excluding the root
    root: x509.Certificate
    prepared_at: dt.datetime
    retire_after: dt.datetime | None = None
    forced: bool = False
    plugin: bool = False

    @property
    def cert(self) -> x509.Certificate:
        return self.chain[0]

    @functools.cached_property
    def signer(self) -> pki.LeafSigner:
        """Signs this slot's workload leaves (the fixed parts encoded once)."""
        return pki.LeafSigner(self.key, self.cert)

    @functools.cached_property
    def chain_and_root_pem(self) -> tuple[str, ...]:
        """What follows a leaf in an issued chain: intermediates, then the root."""
        return tuple(pki.cert_to_pem(c).decode() for c in (*self.chain, self.root))

    def times(self) -> SlotTimes:
        return SlotTimes(
            self.slot_id,
            self.state,
            self.cert.not_valid_before_utc,
            self.cert.not_valid_after_utc,
            self.prepared_at,
            self.retire_after,
            self.forced,
        )


@dataclass(frozen=True, slots=True)
class Issued:
    identity: SpiffeId
    serial: int
    not_after: dt.datetime
    chain_pem: tuple[str, ...]  # leaf, intermediates…, root


class CertificateAuthority:
    """Issues, renews and rotates. Every method takes ``now``; nothing reads the clock."""

    def __init__(
        self,
        store: CaStore,
        config: CaConfig,
        slots: list[Slot],
        token_key: ed25519.Ed25519PrivateKey,
    ) -> None:
        self.store = store
        self.config = config
        self.slots = slots
        self.token_key = token_key
        self.used_tokens = {r["jti"] for r in store.records("used-tokens.jsonl")}
        self.revocations: RevocationSource = RevocationList(store.root / "revoked.jsonl")
        self.revocations.current()  # an unreadable record refuses to start, naming the line
        # A replica over a shared store: tokens burnt and serials recorded there instead.
        self.ledger: TokenLedger | None = None
        self.issued_log = DurableLog(store.root / "issued.jsonl")
        self._peers: dict[bytes, _PeerFacts] = {}  # client certificate PEM → what it proves
        self._seen = self._disk_stamp()

    @property
    def revoked(self) -> frozenset[int]:
        """Revoked serials as the record on disk holds them now (another process's too)."""
        return self.revocations.current()

    def _disk_stamp(self) -> tuple[int, int, int, int]:
        # state.json is replaced atomically, so a write shows as a new inode; size and
        # nanosecond mtime catch an in-place edit.
        try:
            info = os.stat(self.store.state_file)
        except FileNotFoundError:
            return (0, 0, 0, 0)
        return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns

    def reload_if_changed(self) -> bool:
        """Pick up signing slots another process (``ca rotate-root``) wrote; one stat."""
        if self._disk_stamp() == self._seen:
            return False
        fresh = CertificateAuthority.load(self.store.root)
        self.slots = fresh.slots
        self.used_tokens |= fresh.used_tokens
        self._seen = self._disk_stamp()
        audit.info("reloaded CA state from disk")
        return True

    # --- creation and loading -------------------------------------------------------------

    @classmethod
    def init(
        cls, directory: Path, config: CaConfig, now: dt.datetime, plugin_certs: Path | None = None
    ) -> CertificateAuthority:
        store = CaStore(directory)
        if store.exists():
            raise StoreError(f"{directory} already holds a CA (state.json exists)")
        store.create()
        token_key = pki.generate_token_key()
        store.write(directory / "token-key.pem", pki.key_to_pem(token_key), secret=True)
        if plugin_certs is not None:
            slot = _plugin_slot(plugin_certs, now)
        else:
            slot = _new_root_slot(config, now, SlotState.ACTIVE)
        ca = cls(store, config, [slot], token_key)
        ca._save()
        audit.info(
            "ca initialized trust_domain=%s slot=%s plugin=%s",
            config.trust_domain,
            slot.slot_id,
            slot.plugin,
        )
        return ca

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        store = CaStore(directory)
        if not store.exists():
            raise StoreError(f"{directory} holds no CA; run `trustmesh ca init` first")
        store.check_permissions()
        state = store.load_state()
        config = CaConfig.from_json(state["config"])
        slots = []
        for entry in state["slots"]:
            folder = store.slot_dir(entry["id"])
            slots.append(
                Slot(
                    slot_id=entry["id"],
                    state=SlotState(entry["state"]),
                    key=pki.load_key(store.read(folder / "ca-key.pem")),
                    chain=pki.load_certs(store.read(folder / "cert-chain.pem")),
                    root=pki.load_certs(store.read(folder / "root-cert.pem"))[0],
                    prepared_at=dt.datetime.fromisoformat(entry["prepared_at"]),
                    retire_after=(
                        dt.datetime.fromisoformat(entry["retire_after"])
                        if entry.get("retire_after")
                        else None
                    ),
                    forced=entry.get("forced", False),
                    plugin=entry.get("plugin", False),
                )
            )
        token_key = pki.load_token_key(store.read(directory / "token-key.pem"))
        return cls(store, config, slots, token_key)

    def _save(self) -> None:
        self._write_state()
        self._seen = self._disk_stamp()

    def _write_state(self) -> None:
        for slot in self.slots:
            folder = self.store.slot_dir(slot.slot_id)
            if not (folder / "ca-key.pem").exists():
                self.store.write(folder / "ca-key.pem", pki.key_to_pem(slot.key), secret=True)
                self.store.write(folder / "ca-cert.pem", pki.cert_to_pem(slot.cert))
                self.store.write(
                    folder / "cert-chain.pem", b"".join(pki.cert_to_pem(c) for c in slot.chain)
                )
                self.store.write(folder / "root-cert.pem", pki.cert_to_pem(slot.root))
        self.store.save_state(
            {
                "config": self.config.to_json(),
                "slots": [
                    {
                        "id": s.slot_id,
                        "state": s.state.value,
                        "prepared_at": s.prepared_at.isoformat(),
                        "retire_after": s.retire_after.isoformat() if s.retire_after else None,
                        "forced": s.forced,
                        "plugin": s.plugin,
                    }
                    for s in self.slots
                ],
            }
        )

    # --- trust ---------------------------------------------------------------------------

    @property
    def active(self) -> Slot:
        return next(s for s in self.slots if s.state is SlotState.ACTIVE)

    def trust_bundle(self, now: dt.datetime) -> list[x509.Certificate]:
        """Every root a peer must trust now: active, prepared, and not-yet-retired old."""
        keep = set(trusted([s.times() for s in self.slots], now))
        roots: list[x509.Certificate] = []
        for slot in self.slots:
            if slot.slot_id in keep and slot.root not in roots:
                roots.append(slot.root)
        return roots

    def bundle_pem(self, now: dt.datetime) -> bytes:
        return b"".join(pki.cert_to_pem(c) for c in self.trust_bundle(now))

    def trust_domains(self) -> tuple[str, ...]:
        return (self.config.trust_domain, *self.config.trust_domain_aliases)

    # --- issuing ---------------------------------------------------------------------------

    def issue(
        self, csr_pem: bytes, identity: SpiffeId, now: dt.datetime, ttl: dt.timedelta | None = None
    ) -> Issued:
        """Sign ``csr_pem`` for ``identity`` (already authenticated by the caller); the
        serial is on disk before this returns."""
        issued, line = self._signed(csr_pem, identity, now, ttl)
        self.issued_log.append_now(line)
        self._audit_issued(issued)
        return issued

    def _signed(
        self, csr_pem: bytes, identity: SpiffeId, now: dt.datetime, ttl: dt.timedelta | None
    ) -> tuple[Issued, bytes]:
        """The certificate and its ``issued.jsonl`` line, not yet recorded."""
        try:
            return self._sign(csr_pem, identity, now, ttl)
        except IssueRejected as exc:
            audit.warning("rejected identity=%s code=%s reason=%s", identity, exc.code, exc.message)
            raise

    def _sign(
        self, csr_pem: bytes, identity: SpiffeId, now: dt.datetime, ttl: dt.timedelta | None
    ) -> tuple[Issued, bytes]:
        if identity.trust_domain != self.config.trust_domain:
            raise IssueRejected("wrong-trust-domain", f"{identity} is not in this trust domain")
        try:
            info = pki.inspect_csr(csr_pem)
        except pki.CsrError as exc:
            raise IssueRejected(exc.code, str(exc)) from None
        if info.key_problem:
            raise IssueRejected("weak-key", info.key_problem)
        if info.requests_ca:
            raise IssueRejected("csr-requests-ca", "CSR asks for CA:true")
        if info.other_sans:
            raise IssueRejected(
                "extra-san", f"CSR asks for other SANs: {', '.join(info.other_sans)}"
            )
        if info.uri_sans not in ((), (identity.uri,)):
            asked = ", ".join(info.uri_sans)
            raise IssueRejected("san-mismatch", f"CSR asks for {asked}, caller is {identity}")
        slot = self.active
        lifetime = min(ttl or self.config.default_ttl, self.config.max_ttl)
        not_after = min(now + lifetime, slot.cert.not_valid_after_utc)
        if not_after <= now:
            raise IssueRejected("ca-expired", "the signing certificate has expired")
        serial, leaf_pem = slot.signer.sign_leaf_pem(
            info.public_key_der,
            uri=identity.uri,
            not_before=now - dt.timedelta(minutes=1),
            not_after=not_after,
        )
        issued = Issued(identity, serial, not_after, (leaf_pem, *slot.chain_and_root_pem))
        line = (
            f'{{"serial": "{serial:x}", "id": "{identity}", "slot": "{slot.slot_id}",'
            f' "not_after": "{not_after.isoformat()}", "at": "{now.isoformat()}"}}\n'
        )
        return issued, line.encode()

    def _audit_issued(self, issued: Issued) -> None:
        if audit.isEnabledFor(logging.INFO):
            audit.info(
                "issued identity=%s serial=%x not_after=%s",
                issued.identity,
                issued.serial,
                issued.not_after.isoformat(),
            )

    def server_certificate(
        self,
        now: dt.datetime,
        hostnames: Sequence[str] = ("trustmesh-ca",),
        ips: Sequence[str] = ("127.0.0.1",),
    ) -> tuple[bytes, bytes]:
        """(key PEM, chain PEM) for the CA's own TLS endpoint, issued by the CA itself."""
        key = pki.generate_key(self.config.key_type)
        slot = self.active
        not_after = min(now + self.config.default_ttl, slot.cert.not_valid_after_utc)
        cert = pki.sign_leaf(
            ca_key=slot.key,
            ca_cert=slot.cert,
            public_key=key.public_key(),
            uri=control_plane_identity(self.config.trust_domain).uri,
            not_before=now - dt.timedelta(minutes=1),
            not_after=not_after,
            dns_names=hostnames,
            ip_addresses=ips,
        )
        chain = b"".join(pki.cert_to_pem(c) for c in (cert, *slot.chain))
        return pki.key_to_pem(key), chain

    # --- authentication of callers ----------------------------------------------------------

    def token(
        self,
        namespace: str,
        service_account: str,
        now: dt.datetime,
        ttl: dt.timedelta = dt.timedelta(minutes=10),
        single_use: bool = True,
    ) -> str:
        return issue_token(
            self.token_key,
            namespace=namespace,
            service_account=service_account,
            now=now,
            ttl=ttl,
            single_use=single_use,
        )

    def node_token(
        self,
        node: str,
        now: dt.datetime,
        ttl: dt.timedelta = dt.timedelta(minutes=10),
        single_use: bool = True,
    ) -> str:
        """A token that lets host ``node`` register its workloads (and nothing else)."""
        return issue_node_token(self.token_key, node=node, now=now, ttl=ttl, single_use=single_use)

    async def redeem_node_token_shared(self, token: str, now: dt.datetime) -> NodeGrant:
        """Verify a node token and, if single use, burn it (shared ledger or directory);
        a workload token is refused (``token-not-node``)."""
        grant = verify_node_token(
            token, self.token_key.public_key(), now=now, already_used=self.used_tokens.__contains__
        )
        if grant.single_use:
            if self.ledger is not None:
                if not await self.ledger.consume_token(grant.token_id, grant.expires):
                    raise TokenRejected("token-reused", "node token was already used")
            elif not await asyncio.to_thread(self._burn, grant.token_id, grant.expires):
                raise TokenRejected("token-reused", "node token was already used")
            self.used_tokens.add(grant.token_id)
        return grant

    def _burn(self, token_id: str, expires: dt.datetime) -> bool:
        """Burn a single-use token in this CA's directory: True for exactly one caller
        across every process serving it (``ca serve --workers``)."""
        record = {"jti": token_id, "exp": expires.isoformat()}
        return self.store.burn_once("used-tokens.jsonl", "jti", record)

    def redeem_token(self, token: str, now: dt.datetime) -> TokenGrant:
        """Verify a bootstrap token and, if single use, burn it (persisted)."""
        grant = verify_token(
            token, self.token_key.public_key(), now=now, already_used=self.used_tokens.__contains__
        )
        if grant.single_use:
            if not self._burn(grant.token_id, grant.expires):
                raise TokenRejected("token-reused", "bootstrap token was already used")
            self.used_tokens.add(grant.token_id)
        return grant

    def use_shared_records(self, ledger: TokenLedger, revocations: RevocationSource) -> None:
        """Keep token redemptions, issued serials and revocations in a store shared by
        replicas (etcd) instead of this CA's directory; the keys stay in the directory."""
        self.ledger = ledger
        self.revocations = revocations

    async def redeem_token_shared(self, token: str, now: dt.datetime) -> TokenGrant:
        """:meth:`redeem_token`, burning the token in the shared ledger when there is one,
        else in the directory from a thread (the lock and fsync never stall the event
        loop): of replicas or worker processes racing on one token, exactly one gets it."""
        grant = verify_token(
            token, self.token_key.public_key(), now=now, already_used=self.used_tokens.__contains__
        )
        if grant.single_use:
            if self.ledger is not None:
                burnt = await self.ledger.consume_token(grant.token_id, grant.expires)
            else:
                burnt = await asyncio.to_thread(self._burn, grant.token_id, grant.expires)
            if not burnt:
                raise TokenRejected("token-reused", "bootstrap token was already used")
            self.used_tokens.add(grant.token_id)
        return grant

    async def issue_recorded(
        self, csr_pem: bytes, identity: SpiffeId, now: dt.datetime, ttl: dt.timedelta | None = None
    ) -> Issued:
        """:meth:`issue`, recording the serial in the shared ledger (when there is one)
        before the certificate is handed out."""
        issued, line = self._signed(csr_pem, identity, now, ttl)
        await self.issued_log.append(line)  # group commit: many serials per fsync
        self._audit_issued(issued)
        if self.ledger is not None:
            await self.ledger.record_issued(
                issued.serial, str(issued.identity), issued.not_after, now
            )
        return issued

    def identity_of_peer(
        self, leaf_pem: bytes, now: dt.datetime, *, verified_by_tls: bool = False
    ) -> SpiffeId:
        """The identity a presented client certificate proves, for renewal only.

        ``verified_by_tls``: the TLS handshake already validated the chain against this
        CA's bundle (the renewal port requires it), so only what can change during a
        long-lived connection is re-checked: validity at ``now``, revocation, and that
        the issuer is still a trusted signing certificate. Otherwise the whole RFC 5280
        path is validated here.
        """
        if verified_by_tls:
            return self._identity_of_verified_peer(leaf_pem, now)
        try:
            leaf = pki.load_certs(leaf_pem)[0]
        except (ValueError, IndexError):
            raise IssueRejected("renewal-bad-cert", "unreadable client certificate") from None
        self._check_not_revoked(leaf.serial_number)
        intermediates = [c for s in self.slots for c in s.chain[1:]] + [
            s.cert for s in self.slots if s.plugin
        ]
        try:
            pki.verify_client_chain(leaf, intermediates, self.trust_bundle(now), now)
        except ValueError as exc:
            raise IssueRejected("renewal-untrusted", str(exc)) from None
        return _peer_identity(leaf)

    def _check_not_revoked(self, serial: int) -> None:
        try:
            revoked = self.revocations.current()
        except StoreError as exc:  # fail closed: nobody renews while revocations are unknown
            raise IssueRejected("renewal-revocations-unreadable", str(exc)) from None
        if serial in revoked:
            raise IssueRejected("renewal-revoked", f"certificate {serial:x} is revoked")

    def _identity_of_verified_peer(self, leaf_pem: bytes, now: dt.datetime) -> SpiffeId:
        """The ``verified_by_tls`` checks, with what never changes for one certificate
        (its serial, validity, SPIFFE ID, which slot issued it) parsed once per PEM; the
        revocation record, the clock and the trusted roots are consulted on every call."""
        facts = self._peers.get(leaf_pem)
        slot_ids = frozenset(slot.slot_id for slot in self.slots)
        if facts is None or not slot_ids <= facts.checked:
            try:
                leaf = pki.load_certs(leaf_pem)[0]
            except (ValueError, IndexError):
                raise IssueRejected("renewal-bad-cert", "unreadable client certificate") from None
            try:
                identity: SpiffeId | IssueRejected = _peer_identity(leaf)
            except IssueRejected as exc:
                identity = exc
            facts = _PeerFacts(
                leaf.serial_number,
                leaf.not_valid_before_utc,
                leaf.not_valid_after_utc,
                identity,
                slot_ids,
                frozenset(s.slot_id for s in self.slots if pki.issued_by(leaf, s.cert)),
            )
            if len(self._peers) >= 4096:
                self._peers.clear()
            self._peers[leaf_pem] = facts
        self._check_not_revoked(facts.serial)
        if not facts.not_before <= now <= facts.not_after:
            raise IssueRejected("renewal-untrusted", "client certificate is not valid now")
        trusted_roots = self.trust_bundle(now)
        if not any(
            slot.slot_id in facts.issuers for slot in self.slots if slot.root in trusted_roots
        ):
            raise IssueRejected("renewal-untrusted", "issuer is no longer trusted")
        if isinstance(facts.identity, IssueRejected):
            raise facts.identity
        return facts.identity

    def revoke(self, serial: int) -> None:
        """Refuse renewals with certificate ``serial`` from now on, in every process."""
        if not isinstance(self.revocations, RevocationList):
            raise StoreError("this CA keeps revocations in a shared store: revoke through it")
        self.revocations.add(serial)
        audit.warning("revoked serial=%x", serial)

    # --- rotation -----------------------------------------------------------------------------

    def rotate_root(self, now: dt.datetime) -> Slot:
        """Operator-started rotation: prepare a new root now, activate after the overlap."""
        if any(s.state is SlotState.PREPARED for s in self.slots):
            raise IssueRejected("rotation-in-progress", "a prepared root already exists")
        slot = _new_root_slot(self.config, now, SlotState.PREPARED, forced=True)
        self.slots.append(slot)
        self._save()
        audit.info("root prepared slot=%s (operator)", slot.slot_id)
        return slot

    def tick(self, now: dt.datetime) -> list[str]:
        """Act on what the rotation functions decide; returns what was done."""
        events: list[str] = []
        times = [s.times() for s in self.slots]
        if not any(s.plugin for s in self.slots) and should_prepare(
            times, now, self.config.rotation
        ):
            slot = _new_root_slot(self.config, now, SlotState.PREPARED)
            self.slots.append(slot)
            events.append(f"prepared {slot.slot_id}")
        times = [s.times() for s in self.slots]
        if should_activate(times, now, self.config.rotation):
            old = self.active
            old.state = SlotState.OLD
            old.retire_after = now + self.config.max_ttl
            new = next(s for s in self.slots if s.state is SlotState.PREPARED)
            new.state = SlotState.ACTIVE
            events.append(f"activated {new.slot_id}, {old.slot_id} is old")
        for slot in list(self.slots):
            if retired(slot.times(), now):
                self.slots.remove(slot)
                shutil.rmtree(self.store.slot_dir(slot.slot_id), ignore_errors=True)
                events.append(f"retired {slot.slot_id}")
        if events:
            self._save()
            for event in events:
                audit.info("root rotation: %s", event)
        return events

    def shorten_retirement(self, slot_id: str, when: dt.datetime) -> None:
        """Retire an OLD root at ``when`` (e.g. once every workload has renewed)."""
        for slot in self.slots:
            if slot.slot_id == slot_id and slot.state is SlotState.OLD:
                slot.retire_after = when
        self._save()


@dataclass(frozen=True, slots=True)
class _PeerFacts:
    """What one client certificate says, independent of the clock and revocations."""

    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    identity: SpiffeId | IssueRejected
    checked: frozenset[str]  # the slots ``issuers`` was computed against
    issuers: frozenset[str]  # those whose signing certificate issued it


def _peer_identity(leaf: x509.Certificate) -> SpiffeId:
    uris = pki.uri_sans(leaf)
    if len(uris) != 1:
        raise IssueRejected("renewal-bad-cert", "client certificate has no single SPIFFE ID")
    try:
        return SpiffeId.parse(uris[0])
    except ValueError as exc:
        raise IssueRejected("renewal-bad-cert", str(exc)) from None


def _new_root_slot(
    config: CaConfig, now: dt.datetime, state: SlotState, forced: bool = False
) -> Slot:
    key = pki.generate_key(config.key_type)
    root = pki.self_signed_root(
        key,
        trust_domain=config.trust_domain,
        organization=config.trust_domain,
        not_before=now - dt.timedelta(minutes=5),
        not_after=now + config.root_ttl,
    )
    slot_id = f"{now:%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"
    return Slot(slot_id, state, key, [root], root, prepared_at=now, forced=forced)


def _plugin_slot(directory: Path, now: dt.datetime) -> Slot:
    """Istio's ``cacerts`` layout: an intermediate signing key under an external root."""
    missing = [f for f in PLUGIN_FILES if not (directory / f).exists()]
    if missing:
        raise StoreError(f"{directory} lacks {', '.join(missing)} (Istio cacerts layout)")
    key = pki.load_key((directory / "ca-key.pem").read_bytes())
    cert = pki.load_certs((directory / "ca-cert.pem").read_bytes())[0]
    root = pki.load_certs((directory / "root-cert.pem").read_bytes())[0]
    chain = [c for c in pki.load_certs((directory / "cert-chain.pem").read_bytes()) if c != root]
    if not chain or chain[0] != cert:
        chain = [cert, *[c for c in chain if c != cert]]
    if not pki.public_keys_match(key, cert):
        raise StoreError("ca-key.pem does not belong to ca-cert.pem")
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    if not constraints.ca:
        raise StoreError("ca-cert.pem is not a CA certificate")
    return Slot(
        f"plugin-{now:%Y%m%dT%H%M%S}",
        SlotState.ACTIVE,
        key,
        chain,
        root,
        prepared_at=now,
        plugin=True,
    )
