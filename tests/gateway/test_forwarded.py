"""Envoy's client address behind numTrustedProxies proxies (pure; checked live in
test_gateway_policy)."""

from __future__ import annotations

import ipaddress

import pytest

from trustmesh.policy.forwarded import trusted_client_address

PEER = ipaddress.ip_address("127.0.0.1")


@pytest.mark.parametrize(
    ("lines", "hops", "expected"),
    [
        ((), 0, "127.0.0.1"),
        (("203.0.113.7",), 0, "127.0.0.1"),  # no trusted proxy: the header is ignored
        (("203.0.113.7",), 1, "203.0.113.7"),
        (("203.0.113.7, 198.51.100.9",), 1, "198.51.100.9"),  # a forged entry in front
        (("203.0.113.7", "198.51.100.9"), 1, "198.51.100.9"),  # two header lines
        (("203.0.113.7, 198.51.100.9",), 2, "203.0.113.7"),
        (("198.51.100.9",), 2, "127.0.0.1"),  # fewer entries than trusted hops: the peer
        (("not-an-ip",), 1, "127.0.0.1"),
        (("2001:db8::1",), 1, "2001:db8::1"),
    ],
)
def test_trusted_client_address(lines: tuple[str, ...], hops: int, expected: str) -> None:
    assert trusted_client_address(lines, PEER, hops) == ipaddress.ip_address(expected)
