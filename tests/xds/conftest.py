"""Assertion rewriting for the tests' helper modules (the rigs and case tables), so an
assert failing inside a helper reports its values, as in a test module."""

import pytest

pytest.register_assert_rewrite(
    "tests.xds.ads_rig",
    "tests.xds.controlplane_rig",
    "tests.xds.controlplane_traffic",
    "tests.xds.rbac_cases",
    "tests.xds.rbac_rig",
    "tests.xds.translate_rig",
)
