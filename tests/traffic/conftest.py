"""Assertion rewriting for the rig these tests import (tests/traffic is collected before
tests/xds/conftest.py would register it)."""

import pytest

pytest.register_assert_rewrite("tests.xds.translate_rig")
