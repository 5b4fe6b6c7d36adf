"""Shared piece of the bidirectional gRPC servers (SDS, ADS): reading a request stream.

Each stream has one task that only reads requests into the stream's inbox; the loop that
owns the stream state consumes the inbox. Any read failure ends the stream (the proxy
reconnects), signalled by ``closed`` in the inbox.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any


async def pump_requests(
    requests: AsyncIterator[Any], inbox: asyncio.Queue[Any], closed: object, log: logging.Logger
) -> None:
    try:
        async for request in requests:
            inbox.put_nowait(request)
    except Exception as error:  # any read failure just ends the stream; the proxy reconnects
        log.debug("stream read ended: %r", error)
    finally:
        inbox.put_nowait(closed)
