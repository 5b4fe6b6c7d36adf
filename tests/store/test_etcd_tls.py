"""etcd over TLS with client certificates (issue 11): the client's flags fail closed and
name themselves, and one channel over three TLS members keeps failing over."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from trustmesh.cli.main import app
from trustmesh.store.etcd_client import EtcdTls, connect
from trustmesh.store.etcd_pki import EtcdPki
from trustmesh.store.etcd_server import EtcdCluster
from trustmesh.store.model import StoreError

runner = CliRunner()


def test_the_pki_is_private_and_certificates_are_for_their_use(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    pki = EtcdPki.create(tmp_path / "pki")
    member = pki.member("m0", ["127.0.0.1"])
    client = pki.client("replica-r1")
    assert stat.S_IMODE(os.stat(tmp_path / "pki").st_mode) == 0o700
    for key in (pki.ca_key_path, member.key, client.key):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    served = x509.load_pem_x509_certificate(member.cert.read_bytes())
    sans = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    dialing = x509.load_pem_x509_certificate(client.cert.read_bytes())
    usages = dialing.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH]  # a client cannot serve etcd
    assert EtcdPki.create(tmp_path / "pki").ca_cert_path.read_bytes() == (
        pki.ca_cert_path.read_bytes()
    )  # created once


def test_client_flags_fail_closed_and_name_the_flag(tmp_path: Path) -> None:
    pki = EtcdPki.create(tmp_path / "pki")
    mine = pki.client("operator")
    other = pki.client("other")
    with pytest.raises(StoreError, match="https needs --etcd-cafile --etcd-certfile"):
        connect("https://127.0.0.1:2379", None)
    with pytest.raises(StoreError, match="plaintext but --etcd-certfile is given: use https://"):
        connect("etcd://127.0.0.1:2379", EtcdTls(mine.ca, mine.cert, mine.key))
    with pytest.raises(StoreError, match=r"--etcd-certfile .*/nope\.crt: No such file"):
        EtcdTls(mine.ca, tmp_path / "nope.crt", mine.key).load()
    with pytest.raises(StoreError, match=r"--etcd-keyfile .*: not the key of --etcd-certfile"):
        EtcdTls(mine.ca, mine.cert, other.key).load()
    with pytest.raises(StoreError, match=r"--etcd-cafile .*: not a PEM certificate"):
        EtcdTls(mine.key, mine.cert, mine.key).load()
    with pytest.raises(StoreError, match="--etcd-keyfile missing"):
        EtcdTls.from_options(mine.ca, mine.cert, None)
    with pytest.raises(StoreError, match="same scheme"):
        connect("https://127.0.0.1:1,etcd://127.0.0.1:2", None)


def test_the_cli_names_the_missing_flag_and_writes_nothing(tmp_path: Path) -> None:
    pki = EtcdPki.create(tmp_path / "pki")
    mine = pki.client("operator")
    env = {"TRUSTMESH_ETCD_CAFILE": "", "TRUSTMESH_ETCD_CERTFILE": "", "TRUSTMESH_ETCD_KEYFILE": ""}
    plain = runner.invoke(app, ["get", "ap", "--store", "https://127.0.0.1:1"], env=env)
    assert plain.exit_code == 1 and "--etcd-cafile" in plain.stderr, plain.output
    half = runner.invoke(
        app,
        ["get", "ap", "--store", "https://127.0.0.1:1", "--etcd-certfile", str(mine.cert)],
        env=env,
    )
    assert half.exit_code == 2 and "--etcd-cafile, --etcd-keyfile missing" in half.stderr
    on_files = runner.invoke(
        app,
        [
            "get",
            "ap",
            "--store",
            f"file:{tmp_path}",
            *EtcdTls(mine.ca, mine.cert, mine.key).as_args(),
        ],
        env=env,
    )
    assert on_files.exit_code == 2 and "are for an etcd --store" in on_files.stderr
    for result in (plain, half, on_files):
        assert "Traceback" not in result.output


def test_one_tls_channel_over_three_members_fails_over(tmp_path: Path) -> None:
    cluster = EtcdCluster(tmp_path / "etcd", size=3)
    cluster.start()
    try:

        async def scenario() -> bytes:
            client = cluster.client()  # gRPC picks the first address: m0
            try:
                await client.put(b"/k", b"before")
                cluster.kill("m0")  # the member it is connected to
                # A read is retried on UNAVAILABLE (a write is not: it may have been
                # applied): it lands on m1 or m2, whose certificate is verified too.
                read = await client.get(b"/k")
                assert read is not None and read.value == b"before"
                await client.put(b"/k", b"after")
                got = await client.get(b"/k")
                assert got is not None
                return got.value
            finally:
                await client.close()

        assert asyncio.run(asyncio.wait_for(scenario(), 30)) == b"after"
    finally:
        cluster.stop()
