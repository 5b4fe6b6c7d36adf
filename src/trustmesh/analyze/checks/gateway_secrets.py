"""What a gateway's credential Secret holds (TM-EDGE-006).

istiod reads a gateway server's ``credentialName`` the way
``pilot/pkg/credentials/kube`` does: ``cert`` + ``key`` (generic Secret) first, else
``tls.crt`` + ``tls.key``; for MUTUAL the client CA from a Secret ``NAME-cacert`` when that
exists (no fallback then), else ``cacert`` / ``ca.crt`` of NAME. A certificate that is not
PEM, has expired or is not yet valid, or a key that is missing or not the certificate's, is
not served: the TLS handshake on that server fails. Certificates are parsed as X.509 and
checked against the real clock (``AnalysisContext.now``).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from cryptography import x509

from trustmesh.analyze.checks.edge_gateways import GatewayIndex, Server
from trustmesh.analyze.checks.raw_objects import RawObject, mapping, raw_objects
from trustmesh.analyze.context import AnalysisContext
from trustmesh.analyze.findings import Issue, Severity
from trustmesh.analyze.registry import rule
from trustmesh.api.diagnostics import Location
from trustmesh.identity.pki import key_pair_problem, load_certs

_PAIRS = (("cert", "key"), ("tls.crt", "tls.key"))
_CA_KEYS = ("cacert", "ca.crt")
_MUTUAL = ("MUTUAL", "OPTIONAL_MUTUAL")


@dataclass(frozen=True, slots=True)
class _Secret:
    """A Secret's values by key (``data`` decoded, ``stringData`` as is)."""

    source: RawObject
    values: Mapping[str, bytes]
    undecodable: tuple[str, ...]

    @classmethod
    def read(cls, source: RawObject) -> _Secret:
        values: dict[str, bytes] = {}
        bad: list[str] = []
        for key, value in mapping(source.get("data")).items():
            try:
                values[str(key)] = base64.b64decode(str(value or ""), validate=True)
            except (binascii.Error, ValueError):
                bad.append(str(key))
        for key, value in mapping(source.get("stringData")).items():
            values[str(key)] = str(value or "").encode()
        return cls(source, values, tuple(bad))

    def where(self, key: str) -> Location:
        part = "stringData" if key in mapping(self.source.get("stringData")) else "data"
        return self.source.at(part, key)

    def filled(self, *keys: str) -> bool:
        return all(self.values.get(k) for k in keys)


@dataclass(frozen=True, slots=True)
class _Clock:
    """Checks a certificate's validity period against ``now``."""

    now: datetime.datetime  # aware, UTC

    def problem(self, cert: x509.Certificate, what: str) -> str | None:
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        subject = cert.subject.rfc4514_string() or "(no subject)"
        if self.now > end:
            return f"{what} ({subject}) expired on {end:%Y-%m-%d %H:%M} UTC"
        if self.now < start:
            return f"{what} ({subject}) is not valid before {start:%Y-%m-%d %H:%M} UTC"
        return None

    def certificates(self, data: bytes, what: str) -> tuple[list[str], bool]:
        """Problems of a PEM certificate bundle, and whether it parsed at all."""
        try:
            with warnings.catch_warnings():  # a non-positive serial: reported by nobody here
                warnings.simplefilter("ignore")
                certs = load_certs(data)
        except ValueError:
            return [f"{what} is not a PEM certificate"], False
        return [p for p in (self.problem(c, what) for c in certs) if p], True


def _server_problems(secret: _Secret, clock: _Clock) -> tuple[list[str], str]:
    """Problems with the certificate and key, and the key the first one is about."""
    if secret.undecodable:
        return [f"data.{k} is not valid base64" for k in secret.undecodable], secret.undecodable[0]
    pair = next((p for p in _PAIRS if secret.filled(*p)), None)
    if pair is None:
        present = next((p for p in _PAIRS if all(k in secret.values for k in p)), None)
        if present is not None:
            return [f"keys {present[0]} and {present[1]} are present but empty"], present[0]
        found = ", ".join(sorted(secret.values)) or "none"
        missing = "tls.crt and tls.key (or cert and key)"
        return [f"it has no {missing}; its keys: {found}"], next(iter(sorted(secret.values)), "")
    cert_key, key_key = pair
    problems, parsed = clock.certificates(secret.values[cert_key], cert_key)
    if parsed:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            leaf = load_certs(secret.values[cert_key])[0]
        wrong = key_pair_problem(secret.values[key_key], leaf)
        if wrong:
            problems.append(f"{key_key} {wrong}")
    return problems, cert_key


def _ca_problems(
    secrets: Mapping[tuple[str, str], _Secret], namespace: str, name: str, clock: _Clock
) -> tuple[list[str], _Secret | None, str]:
    """Problems with the client CA of a MUTUAL server; no CA at all is TM-EDGE-004's."""
    companion = secrets.get((namespace, f"{name}-cacert"))
    holder = companion or secrets.get((namespace, name))
    if holder is None:
        return [], None, ""
    key = next((k for k in _CA_KEYS if holder.filled(k)), None)
    if key is None:
        if companion is None:
            return [], None, ""  # no CA key and no companion: TM-EDGE-004 reports it
        found = ", ".join(sorted(companion.values)) or "none"
        return (
            [
                f"Secret {companion.source.ref} exists, so istiod reads it only from there, "
                f"and it has no cacert or ca.crt (its keys: {found})"
            ],
            companion,
            next(iter(sorted(companion.values)), ""),
        )
    problems, _ = clock.certificates(holder.values[key], f"the client CA {key}")
    return problems, holder, key


def _credential_issue(
    server: Server,
    path: tuple[str | int, ...],
    secret: _Secret,
    problems: list[str],
    key: str,
    client_ca_of: str = "",
) -> Issue:
    if client_ca_of:
        head = f"the client CA for credentialName {client_ca_of} cannot be used"
        effect = "the server cannot verify client certificates and TLS handshakes fail"
    else:
        head = f"Secret {secret.source.ref} cannot be served"
        effect = "istiod does not send it and TLS handshakes on this server fail"
    return Issue(
        message=f"Gateway {server.ref} servers[{server.index}] (port {server.number}): "
        f"{head}: {'; '.join(problems)} — {effect}",
        location=secret.where(key) if key else server.location(*path),
        resource=server.gateway.key,
        workloads=server.workloads,
        fix=f"kubectl -n {secret.source.namespace} create secret tls {secret.source.name} "
        "--cert=<valid cert.pem> --key=<its key.pem> --dry-run=client -o yaml | kubectl apply -f -",
    )


def _assumed(issue: Issue, namespace: str) -> Issue:
    """The same finding when the gateway workload is not among the inputs."""
    return dataclasses.replace(
        issue,
        message=f"{issue.message} (if the gateway runs in {namespace}: no gateway workload "
        "among the inputs matches its selector)",
        severity=Severity.WARNING,
    )


@rule(
    "TM-EDGE-006",
    title="Gateway credential Secret that cannot be served",
    severity=Severity.ERROR,
    family="edge",
    rationale="A credentialName Secret whose certificate is not PEM, expired or not yet valid, "
    "whose key is missing or belongs to another certificate, or whose client CA (MUTUAL) is "
    "unusable, is not sent to the gateway: the server cannot complete a TLS handshake, or "
    "cannot verify clients.",
)
def gateway_secret_contents(ctx: AnalysisContext) -> Iterator[Issue]:
    secrets = {(s.namespace, s.name): _Secret.read(s) for s in raw_objects(ctx, "Secret")}
    if not secrets:
        return
    clock = _Clock(ctx.now)
    index = GatewayIndex(ctx)
    for server in index.servers:
        if not server.terminates:
            continue
        deployed = index.workload_namespaces(server)
        for path, name in server.credentials():
            # Without the gateway workload among the inputs, where it runs is unknown: every
            # namespace holding a Secret of that name is a candidate.
            namespaces = deployed or sorted(
                {server.gateway.namespace} | {ns for ns, n in secrets if n == name}
            )
            for namespace in namespaces:
                target_ns, _, short = name.rpartition("/")
                if target_ns and target_ns != namespace:
                    continue  # cross-namespace reference: TM-EDGE-005
                secret = secrets.get((namespace, short))
                if secret is None:
                    continue  # missing: TM-EDGE-005
                problems, key = _server_problems(secret, clock)
                if problems:
                    issue = _credential_issue(server, path, secret, problems, key)
                    yield issue if deployed else _assumed(issue, namespace)
                if server.mode not in _MUTUAL or server.tls.get("caCertificates"):
                    continue
                ca_problems, holder, ca_key = _ca_problems(secrets, namespace, short, clock)
                if ca_problems and holder is not None:
                    issue = _credential_issue(
                        server, path, holder, ca_problems, ca_key, client_ca_of=name
                    )
                    yield issue if deployed else _assumed(issue, namespace)
