"""Stop work for clients that went away.

Litestar 2 only notices disconnects for streaming responses, so a plain POST handler races its
work against ``http.disconnect`` itself (vLLM's ``with_cancellation`` pattern). Safe only after
the body has been read, which every dialect handler does first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from litestar import Request

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before the answer was ready."""


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it and raise :class:`ClientDisconnected`.

    One listener task per request; the work itself runs in the handler's own task, which the
    listener cancels on disconnect (cheaper than racing two tasks with ``asyncio.wait``).
    """
    handler = asyncio.current_task()
    assert handler is not None
    gone = False

    async def listen() -> None:
        nonlocal gone
        await _wait_for_disconnect(request)
        gone = True
        handler.cancel()

    listener = asyncio.create_task(listen())
    try:
        return await work
    except asyncio.CancelledError:
        if gone:
            raise ClientDisconnected() from None
        raise
    finally:
        listener.cancel()
