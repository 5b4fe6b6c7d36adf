"""``trustmesh top`` without a mesh: rates between snapshots, the table, clear errors."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from typer.testing import CliRunner

from trustmesh.cli.main import app
from trustmesh.metrics.top import PodView, TopSnapshot, rates, table, to_json


def _pod(ref: str, allowed: float, denied: float, **changes: object) -> PodView:
    values: dict[str, object] = {
        "ref": ref,
        "identity": f"spiffe://cluster.local/ns/foo/sa/{ref.split('/')[1]}",
        "up": True,
        "rbac": {"allowed": allowed, "denied": denied},
        "ext_authz": {},
        "synced": True,
        "nack": None,
        "cert_expiry_seconds": 7200.0,
    }
    values.update(changes)
    return PodView(**values)  # type: ignore[arg-type]


def test_rates_are_per_second_and_a_restarted_sidecar_counts_from_zero() -> None:
    before = TopSnapshot(10.0, {}, (_pod("foo/a", 100, 10), _pod("foo/b", 50, 5)))
    after = TopSnapshot(12.0, {}, (_pod("foo/a", 120, 14), _pod("foo/b", 4, 2)))
    assert rates(before, after) == {
        "foo/a": {"allowed": 10.0, "denied": 2.0},
        "foo/b": {"allowed": 2.0, "denied": 1.0},  # counters went down: Envoy restarted
    }
    assert rates(after, after) == {}  # no time passed: no rate


def test_the_table_shows_down_sidecars_nacks_and_expired_certificates() -> None:
    snapshot = TopSnapshot(
        0.0,
        {"connected_proxies": 2, "xds_pushes": 7, "xds_rejects": 1, "certs_issued": 2},
        (
            _pod("foo/httpbin", 4, 3, nack="lds: bad regex", synced=False),
            _pod("foo/sleep", 0, 0, up=False, cert_expiry_seconds=-5.0),
        ),
    )
    console = Console(width=200, record=True)
    console.print(table(snapshot, {"foo/httpbin": {"allowed": 1.5, "denied": 0.5}}))
    text = console.export_text()
    httpbin = next(line for line in text.splitlines() if line.startswith("foo/httpbin"))
    sleep = next(line for line in text.splitlines() if line.startswith("foo/sleep"))
    assert httpbin.split()[:6] == ["foo/httpbin", "yes", "1.5", "0.5", "4", "3"]
    assert "STALE (NACK)" in httpbin and "2h00m" in httpbin
    assert sleep.split()[:2] == ["foo/sleep", "DOWN"] and "EXPIRED" in sleep
    assert "2 proxies connected, 7 pushes" in text and "1 NACKs" in text
    document = to_json(snapshot, {})
    assert document["pods"][0]["xds"] == {"synced": False, "nack": "lds: bad regex"}
    assert document["pods"][1]["sidecar_up"] is False


def test_top_without_a_mesh_or_with_a_bad_output_says_why(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(app, ["top", "--once", "--state", str(tmp_path / "none")])
    assert missing.exit_code == 1
    assert "no mesh was started from" in missing.output
    assert "Traceback" not in missing.output
    bad = runner.invoke(app, ["top", "--once", "-o", "yaml", "--state", str(tmp_path)])
    assert bad.exit_code == 2 and "table or json" in bad.output
