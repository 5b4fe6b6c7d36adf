"""Assertion rewriting for the helpers these tests import (the control-plane rig is
imported here before tests/xds/conftest.py would register it)."""

import pytest

pytest.register_assert_rewrite(
    "tests.metrics.promtext",
    "tests.xds.ads_rig",
    "tests.xds.controlplane_rig",
    "tests.xds.controlplane_traffic",
)
