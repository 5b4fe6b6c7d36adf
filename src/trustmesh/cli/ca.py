"""``trustmesh ca …``: create, serve and operate the certificate authority."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import re
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from trustmesh.cli import render
from trustmesh.cli.store import CaFileOpt, CertFileOpt, KeyFileOpt, StoreTarget, store_target
from trustmesh.cli.store import StateOpt as StoreStateOpt
from trustmesh.identity import pki
from trustmesh.identity.ca import CaConfig, CertificateAuthority, IssueRejected
from trustmesh.identity.server import CaServer
from trustmesh.identity.store import StoreError

app = typer.Typer(help="The SPIFFE certificate authority.", no_args_is_help=True)

DEFAULT_DIR = Path.home() / ".trustmesh" / "ca"
DirOpt = Annotated[Path, typer.Option("--dir", help="CA state directory (0700).")]
_DURATION = re.compile(r"^(\d+)(s|m|h|d)$")


def parse_duration(text: str) -> dt.timedelta:
    match = _DURATION.match(text.strip())
    if not match:
        raise typer.BadParameter(f"{text!r} is not a duration like 30s, 10m, 24h, 90d")
    unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
    return dt.timedelta(**{unit: int(match.group(1))})


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _load(directory: Path) -> CertificateAuthority:
    try:
        return CertificateAuthority.load(directory)
    except (StoreError, ValueError, KeyError) as exc:
        render.usage_error(str(exc))
        raise typer.Exit(1) from None


@app.command()
def init(
    directory: DirOpt = DEFAULT_DIR,
    trust_domain: Annotated[str, typer.Option("--trust-domain")] = "cluster.local",
    alias: Annotated[list[str] | None, typer.Option("--alias", help="Trust-domain alias.")] = None,
    key_type: Annotated[pki.KeyType, typer.Option("--key-type")] = pki.KeyType.EC_P256,
    plugin_certs: Annotated[
        Path | None, typer.Option("--plugin-certs", help="Istio cacerts directory.")
    ] = None,
    default_ttl: Annotated[str, typer.Option("--default-ttl")] = "24h",
    max_ttl: Annotated[str, typer.Option("--max-ttl")] = "90d",
    root_ttl: Annotated[str, typer.Option("--root-ttl")] = "3650d",
) -> None:
    """Create a CA: a self-signed root, or a plug-in intermediate (Istio cacerts layout)."""
    config = CaConfig(
        trust_domain=trust_domain,
        trust_domain_aliases=tuple(alias or ()),
        key_type=key_type,
        default_ttl=parse_duration(default_ttl),
        max_ttl=parse_duration(max_ttl),
        root_ttl=parse_duration(root_ttl),
    )
    try:
        ca = CertificateAuthority.init(directory, config, _now(), plugin_certs)
    except (StoreError, ValueError, OSError) as exc:
        render.usage_error(str(exc))
        raise typer.Exit(1) from None
    root = ca.active.root
    typer.echo(f"CA created in {directory}")
    typer.echo(f"trust domain {trust_domain}; root {root.subject.rfc4514_string()}")
    typer.echo(
        f"root valid until {root.not_valid_after_utc:%Y-%m-%d}; fingerprint {_fingerprint(root)}"
    )


@app.command()
def serve(
    directory: DirOpt = DEFAULT_DIR,
    listen: Annotated[str, typer.Option("--listen", help="Enrollment (token) address.")] = (
        "127.0.0.1:15012"
    ),
    renewal_listen: Annotated[
        str, typer.Option("--renewal-listen", help="Renewal (mTLS) address.")
    ] = "127.0.0.1:15013",
    rotation_interval: Annotated[float, typer.Option("--rotation-interval")] = 60.0,
    workers: Annotated[
        int,
        typer.Option(
            "--workers", min=1, help="Processes serving both ports (SO_REUSEPORT); one per core."
        ),
    ] = 1,
) -> None:
    """Serve CreateCertificate over TLS until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ca = _load(directory)

    async def main() -> None:
        server = CaServer(ca, address=listen, renewal_address=renewal_listen, workers=workers)
        await server.start()
        typer.echo(
            f"serving: enrollment {listen.rsplit(':', 1)[0]}:{server.port}, "
            f"renewal {renewal_listen.rsplit(':', 1)[0]}:{server.renewal_port}"
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await server.run_rotation(stop, rotation_interval)
        finally:
            await server.stop()

    asyncio.run(main())


@app.command()
def token(
    namespace: Annotated[str, typer.Option("--namespace", "-n")] = "",
    service_account: Annotated[str, typer.Option("--service-account", "-s")] = "",
    node: Annotated[
        str, typer.Option("--node", help="A node token: NODE may register its workloads.")
    ] = "",
    ttl: Annotated[str, typer.Option("--ttl")] = "10m",
    reusable: Annotated[bool, typer.Option("--reusable", help="Allow more than one use.")] = False,
    directory: DirOpt = DEFAULT_DIR,
) -> None:
    """Print a bootstrap token for NAMESPACE/SERVICE_ACCOUNT, or a node token (--node)."""
    if bool(node) == bool(namespace or service_account):
        render.usage_error("give either --node NAME or --namespace and --service-account")
        raise typer.Exit(2)
    if not node and not (namespace and service_account):
        render.usage_error("a workload token needs both --namespace and --service-account")
        raise typer.Exit(2)
    ca = _load(directory)
    try:
        if node:
            value = ca.node_token(node, _now(), parse_duration(ttl), not reusable)
        else:
            value = ca.token(namespace, service_account, _now(), parse_duration(ttl), not reusable)
    except ValueError as exc:
        render.usage_error(str(exc))
        raise typer.Exit(2) from None
    typer.echo(value)


@app.command("rotate-root")
def rotate_root(directory: DirOpt = DEFAULT_DIR) -> None:
    """Prepare a new root now; it is trusted at once and signs after the overlap."""
    ca = _load(directory)
    try:
        slot = ca.rotate_root(_now())
    except IssueRejected as exc:
        render.usage_error(exc.message)
        raise typer.Exit(1) from None
    overlap = ca.config.rotation.overlap
    typer.echo(f"prepared root {slot.slot_id}; it starts signing after {overlap} of overlap")


@app.command()
def revoke(
    serial: str,
    directory: DirOpt = DEFAULT_DIR,
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            help="https://HOST:PORT[,...] (with --etcd-*file) or etcd://HOST:PORT[,...]: record "
            "the revocation in the replicas' shared store (every replica refuses the next "
            "renewal); --dir is not read then.",
        ),
    ] = None,
    etcd_cafile: CaFileOpt = None,
    etcd_certfile: CertFileOpt = None,
    etcd_keyfile: KeyFileOpt = None,
    state: StoreStateOpt = None,
) -> None:
    """Refuse renewals authenticated by certificate SERIAL (hex, as `ca inspect` shows it).

    A running CA (``ca serve``, the local mesh's control plane) refuses the very next
    renewal with that certificate: it re-reads the revocation record on every request.
    With ``--store etcd://…`` the record goes to the replicas' store, whose watch brings
    it to every replica.
    """
    text = serial.strip().lower().removeprefix("0x").replace(":", "")
    if not re.fullmatch(r"[0-9a-f]{1,40}", text) or int(text, 16) == 0:
        render.usage_error(f"'{serial}' is not a certificate serial (hex, e.g. 3f9a0c…)")
        raise typer.Exit(2)
    if store is not None or state is not None:
        target = store_target(store, etcd_cafile, etcd_certfile, etcd_keyfile, state)
        if not target.url.startswith(("etcd://", "https://")):
            render.usage_error(
                f"--store {target.url}: revocations are shared through etcd "
                "(https://HOST:PORT or etcd://HOST:PORT)"
            )
            raise typer.Exit(2)
        try:
            revision = asyncio.run(_revoke_in_store(target, int(text, 16)))
        except StoreError as exc:
            render.usage_error(f"cannot record the revocation in {target.url}: {exc}")
            raise typer.Exit(1) from None
        typer.echo(f"revoked {int(text, 16):x} (store revision {revision})")
        return
    ca = _load(directory)
    try:
        ca.revoke(int(text, 16))
    except (StoreError, OSError) as exc:
        render.usage_error(f"cannot record the revocation: {exc}")
        raise typer.Exit(1) from None
    typer.echo(f"revoked {int(text, 16):x}")


async def _revoke_in_store(target: StoreTarget, serial: int) -> int:
    from trustmesh.store.ca_records import EtcdCaRecords
    from trustmesh.store.etcd_client import connect

    client = connect(target.url, target.tls)
    try:
        return await EtcdCaRecords(client).revoke(serial, _now())
    finally:
        await client.close()


@app.command()
def inspect(
    source: Annotated[str, typer.Argument(help="PEM file with one or more certificates, or -")],
    output: Annotated[str, typer.Option("-o", "--output")] = "text",
) -> None:
    """Summarize a certificate or chain: SPIFFE ID, issuer, validity, key, fingerprint."""
    data = sys.stdin.buffer.read() if source == "-" else _read(source)
    try:
        certs = pki.load_certs(data)
    except ValueError as exc:
        render.usage_error(f"{source}: no PEM certificate found ({exc})")
        raise typer.Exit(1) from None
    summaries = [_summary(c) for c in certs]
    if output == "json":
        typer.echo(json.dumps(summaries, indent=2))
        return
    for index, summary in enumerate(summaries):
        typer.echo(f"certificate {index}:")
        for key, value in summary.items():
            typer.echo(f"  {key:<12} {value}")


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        render.usage_error(f"{path}: {exc.strerror}")
        raise typer.Exit(1) from None


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":")


def _summary(cert: x509.Certificate) -> dict[str, object]:
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        key_text = f"ECDSA {key.curve.name}"
    elif isinstance(key, rsa.RSAPublicKey):
        key_text = f"RSA {key.key_size}"
    else:
        key_text = type(key).__name__
    try:
        ca_flag = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        ca_flag = False
    now = _now()
    state = "valid"
    if now < cert.not_valid_before_utc:
        state = "not yet valid"
    elif now > cert.not_valid_after_utc:
        state = "expired"
    return {
        "spiffe_id": ", ".join(pki.uri_sans(cert)) or "-",
        "subject": cert.subject.rfc4514_string() or "-",
        "issuer": cert.issuer.rfc4514_string() or "-",
        "serial": f"{cert.serial_number:x}",
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "status": state,
        "is_ca": ca_flag,
        "key": key_text,
        "sha256": _fingerprint(cert),
        "spki_sha256": hashlib.sha256(
            key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        ).hexdigest(),
    }
