"""Assertion rewriting for the tests' helper modules (the rigs and case tables), so an
assert failing inside a helper reports its values, as in a test module."""

from collections.abc import Generator

import pytest

pytest.register_assert_rewrite(
    "tests.xds.ads_rig",
    "tests.xds.capture_rig",
    "tests.xds.controlplane_rig",
    "tests.xds.controlplane_traffic",
    "tests.xds.rbac_cases",
    "tests.xds.rbac_rig",
    "tests.xds.translate_rig",
)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Mark a failed test body so fixtures (the netns lab) can print what explains it."""
    report = yield
    if report.when == "call" and report.failed:
        item.rep_call_failed = True  # type: ignore[attr-defined]
    return report
