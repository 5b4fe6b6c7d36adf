"""``multiport_httpbin.py PORT...``: trustmesh's httpbin stand-in on 0.0.0.0:PORT for every
port given, in one process (a pod's app has one process; the supervisor stops it by pid).
Its ``/ip`` shows the peer the app saw: a captured connection comes from its Envoy
(127.0.0.6), one that bypassed the capture from the client's own address."""

from __future__ import annotations

import asyncio
import sys

from trustmesh.samples import httpbin


async def _serve(ports: list[int]) -> None:
    stop = asyncio.Event()
    await asyncio.gather(*(httpbin.serve("0.0.0.0", port, stop=stop) for port in ports))


def main() -> int:
    asyncio.run(_serve([int(port) for port in sys.argv[1:]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
