"""A sandboxed host's registry records (netns ``up --hosts``): the capture mode and the
ClusterIPs travel with the record, and a replica serves Istio's capture layout for them."""

from __future__ import annotations

import json

import grpc
import pytest

from trustmesh.runtime.registration import JoinRefused, parse_join
from trustmesh.runtime.replica import registration_of
from trustmesh.store.model import WorkloadRecord
from trustmesh.xds.translate import CaptureMode

SANDBOXED = WorkloadRecord(
    "foo",
    "sleep",
    "host-2",
    "10.88.1.11",
    "sleep",
    kind="Pod",
    app_address="10.88.1.11",
    capture="transparent",
    service_addresses=(("foo/httpbin", "10.96.0.11"),),
)


def test_a_sandboxed_record_round_trips_and_is_served_with_capture() -> None:
    again = WorkloadRecord.from_json(SANDBOXED.to_json())
    assert again == SANDBOXED
    registration = registration_of(again)
    assert registration.capture is CaptureMode.TRANSPARENT
    assert dict(registration.service_addresses) == {"foo/httpbin": "10.96.0.11"}
    assert registration.node_id == "sidecar~10.88.1.11~sleep.foo~foo.svc.cluster.local"


def test_a_process_record_keeps_the_process_layout() -> None:
    record = WorkloadRecord("foo", "sleep", "host-2", "127.64.0.5", "sleep", kind="Pod")
    assert "capture" not in json.loads(record.to_json())
    assert registration_of(WorkloadRecord.from_json(record.to_json())).capture is (
        CaptureMode.PROCESS
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("capture", "bogus", "capture must be 'transparent'"),
        ("serviceAddresses", {"foo/httpbin": 11}, "serviceAddresses must map"),
        ("serviceAddresses", ["10.96.0.11"], "serviceAddresses must map"),
    ],
)
def test_a_join_with_a_bad_capture_is_refused(field: str, value: object, message: str) -> None:
    record = json.loads(SANDBOXED.to_json()) | {field: value}
    with pytest.raises(JoinRefused) as refused:
        parse_join(json.dumps({"ttl": 30, "workloads": [record]}).encode())
    assert refused.value.status is grpc.StatusCode.INVALID_ARGUMENT
    assert message in str(refused.value)
