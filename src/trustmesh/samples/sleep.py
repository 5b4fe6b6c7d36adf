"""The ``sleep`` sample: a client workload that does nothing until it is stopped.

Like Istio's ``sleep`` (curl in a pod that sleeps forever), it exists to own an identity:
requests are sent *from* it by ``trustmesh request``, not by this process. It listens
nowhere and prints nothing.
"""

from __future__ import annotations

import asyncio

__all__ = ["serve"]


async def serve(*, stop: asyncio.Event) -> None:
    """Idle until ``stop`` is set."""
    await stop.wait()
