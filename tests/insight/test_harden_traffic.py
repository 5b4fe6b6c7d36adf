"""``harden --traffic``: the proven least-privilege ALLOWs join the fixes."""

from __future__ import annotations

from pathlib import Path

import orjson
import yaml
from typer.testing import CliRunner

from tests.unit.meshutil import ROOT
from trustmesh.cli.main import app
from trustmesh.insight.records import Protocol, TrafficRecord

BOOKINFO = ROOT / "examples" / "bookinfo"


def _record(source_sa: str, destination: str, path: str) -> TrafficRecord:
    return TrafficRecord(
        destination,
        9080,
        Protocol.HTTP,
        True,
        source_principal=f"cluster.local/ns/default/sa/bookinfo-{source_sa}",
        method="GET",
        path=path,
        verdict="allow",
    )


def test_harden_with_traffic_adds_proven_least_privilege(tmp_path: Path) -> None:
    traffic = tmp_path / "t.jsonl"
    records = [
        _record("productpage", "default/details-v1", "/details/0"),
        _record("reviews", "default/ratings-v1", "/ratings/0"),
    ]
    traffic.write_bytes(b"".join(orjson.dumps(r.as_dict()) + b"\n" for r in records))
    done = CliRunner().invoke(app, ["harden", "-f", str(BOOKINFO), "--traffic", str(traffic)])
    assert done.exit_code == 0, done.output
    documents = [d for d in yaml.safe_load_all(done.stdout) if d]
    policies = {
        d["metadata"]["name"]: d["spec"] for d in documents if d["kind"] == "AuthorizationPolicy"
    }
    assert policies["details-v1-observed"]["rules"] == [
        {
            "from": [
                {"source": {"principals": ["cluster.local/ns/default/sa/bookinfo-productpage"]}}
            ],
            "to": [
                {"operation": {"ports": ["9080"], "methods": ["GET"], "paths": ["/details/{*}"]}}
            ],
        }
    ]
    assert "least privilege from recorded traffic (proven by replay)" in done.stdout
    # one allow-nothing for the namespace (harden's own fix), not two
    assert sum(1 for spec in policies.values() if spec == {}) == 1
    # traffic given: no port-wide ALLOW for implied calls undoes the least privilege
    assert not any(name.endswith("-callers") for name in policies)
    assert "NOT kept" not in done.output
    # implied calls the recording covers are kept for what was recorded; the others listed
    kept = "kept for its recorded requests only: default/productpage-v1 → details:9080"
    assert kept in done.output
    assert "would stop default/productpage-v1 → reviews:9080 → default/reviews-v1" in done.output


def test_harden_refuses_bad_records(tmp_path: Path) -> None:
    traffic = tmp_path / "t.jsonl"
    traffic.write_text('{"schema": "trustmesh.dev/traffic/v1", "port": 1}\n')
    done = CliRunner().invoke(app, ["harden", "-f", str(BOOKINFO), "--traffic", str(traffic)])
    assert done.exit_code == 3 and "t.jsonl:1 destination" in done.output
    assert "apiVersion" not in done.stdout
