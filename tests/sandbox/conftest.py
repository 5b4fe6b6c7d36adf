"""Sandbox tests need root (namespaces, links, nftables); CI runs as root."""

from __future__ import annotations

import os
import shutil

import pytest

requires_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("nft") is None,
    reason="network namespaces and nftables need root and the nft command",
)
