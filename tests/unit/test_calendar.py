"""No test may rot with the calendar.

A fixed instant is fine for pure code (the clock is injected), but wherever a real TLS
handshake, a JWT library or Envoy checks validity against the real clock, certificates and
tokens must be valid around the real now. This guard scans the suite: a test module that
reaches something real that checks time may not construct a fixed calendar instant.
"""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]

# What makes a module meet a real clock: gRPC/TLS servers and clients, Envoy, the mesh.
_REAL_CLOCK = re.compile(
    r"\bimport grpc\b|\bCaServer\b|\bCaClient\b|\bimport ssl\b|envoy_rig|\bstart_envoy\b"
    r"|\bEnvoyProcess\b|\bWorkloadAgent\b|tests\.e2e|tests\.envoy|\bcontrolplane_rig\b"
)
_FIXED_INSTANT = re.compile(r"\bdatetime\(\s*\d{4}\s*,|\bdate\(\s*\d{4}\s*,|\b1_[0-9]{3}_000_000\b")


def test_no_fixed_instant_where_a_real_clock_checks_validity() -> None:
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        if path == Path(__file__).resolve():
            continue
        text = path.read_text()
        if not _REAL_CLOCK.search(text):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if _FIXED_INSTANT.search(line) and "calendar: ok" not in line:
                offenders.append(f"{path.relative_to(TESTS)}:{number}: {line.strip()}")
    assert not offenders, "fixed instants next to a real clock:\n" + "\n".join(offenders)
