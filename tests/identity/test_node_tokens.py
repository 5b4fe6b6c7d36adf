"""Node tokens (``trustmesh ca token --node``): bound to one host, single use, and never
interchangeable with a workload's bootstrap token."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest
from typer.testing import CliRunner

from trustmesh.cli.main import app
from trustmesh.identity import pki
from trustmesh.identity.ca import CaConfig, CertificateAuthority
from trustmesh.identity.tokens import TokenRejected, issue_node_token, verify_node_token

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca", CaConfig(), NOW)


def redeem(ca: CertificateAuthority, token: str, now: dt.datetime = NOW) -> object:
    return asyncio.run(ca.redeem_node_token_shared(token, now))


def code_of(ca: CertificateAuthority, token: str, now: dt.datetime = NOW) -> str:
    with pytest.raises(TokenRejected) as caught:
        redeem(ca, token, now)
    return caught.value.code


def test_a_node_token_registers_only_on_its_own_node(ca: CertificateAuthority) -> None:
    grant = asyncio.run(ca.redeem_node_token_shared(ca.node_token("host-1", NOW), NOW))
    assert grant.node == "host-1" and grant.single_use
    grant.check_host("host-1", "foo/httpbin")
    with pytest.raises(TokenRejected) as caught:
        grant.check_host("host-2", "foo/httpbin")
    assert caught.value.code == "token-wrong-node" and "host-2" in str(caught.value)


def test_a_node_token_is_single_use_across_a_restart(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    token = ca.node_token("host-1", NOW)
    redeem(ca, token)
    assert code_of(ca, token) == "token-reused"
    reopened = CertificateAuthority.load(tmp_path / "ca")
    assert code_of(reopened, token) == "token-reused"
    reusable = ca.node_token("host-1", NOW, single_use=False)
    redeem(ca, reusable)
    redeem(ca, reusable)


def test_the_two_kinds_of_token_never_stand_in_for_each_other(ca: CertificateAuthority) -> None:
    assert code_of(ca, ca.token("foo", "sleep", NOW)) == "token-not-node"
    with pytest.raises(TokenRejected) as caught:
        ca.redeem_token(ca.node_token("host-1", NOW), NOW)
    assert caught.value.code == "token-is-node"


def test_node_tokens_expire_and_need_the_cas_key(ca: CertificateAuthority) -> None:
    token = ca.node_token("host-1", NOW, ttl=dt.timedelta(minutes=5))
    assert code_of(ca, token, NOW + dt.timedelta(minutes=6)) == "token-expired"
    forged = issue_node_token(pki.generate_token_key(), node="host-1", now=NOW)
    assert code_of(ca, forged) == "token-signature"
    with pytest.raises(ValueError, match="DNS-1123"):
        ca.node_token("Host_1", NOW)
    with pytest.raises(TokenRejected):
        verify_node_token("a.b", ca.token_key.public_key(), now=NOW, already_used=lambda _: False)


def test_cli_prints_a_node_token_and_refuses_mixed_kinds(tmp_path: Path) -> None:
    CertificateAuthority.init(tmp_path / "ca", CaConfig(), dt.datetime.now(dt.UTC))
    runner = CliRunner()
    done = runner.invoke(app, ["ca", "token", "--node", "host-1", "--dir", str(tmp_path / "ca")])
    assert done.exit_code == 0, done.output
    ca = CertificateAuthority.load(tmp_path / "ca")
    grant = asyncio.run(ca.redeem_node_token_shared(done.output.strip(), dt.datetime.now(dt.UTC)))
    assert grant.node == "host-1"
    mixed = runner.invoke(
        app,
        ["ca", "token", "--node", "h", "-n", "foo", "-s", "sleep", "--dir", str(tmp_path / "ca")],
    )
    assert mixed.exit_code == 2 and "either --node" in mixed.output
