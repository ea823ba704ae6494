"""A deadline on receiving a request body, so a slow client cannot hold a connection for ever.

uvicorn bounds idle keep-alive connections but not a body that trickles in (a byte a second
keeps a connection, and whatever the handler holds, alive for as long as the client likes). The
clock starts when the request's headers have arrived; the body must be complete within
``--body-timeout-s``. After the last body message the deadline no longer applies, so waiting for
``http.disconnect`` while an image is generated (:mod:`gateway.disconnect`) is unaffected.
"""

from __future__ import annotations

import asyncio
import time

from litestar.types import Message, Receive

from gateway.errors import ApiError


def body_timeout_error(seconds: float) -> ApiError:
    """The 408 a client gets when its body did not arrive in time (in its dialect's envelope)."""
    return ApiError("validation", f"the request body did not arrive within {seconds:g} s",
                    status=408)


def with_body_deadline(receive: Receive, seconds: float, started: float) -> Receive:
    """``receive``, raising :func:`body_timeout_error` if the body is late.

    Late: ``started + seconds`` has passed (``started`` is a ``time.monotonic()`` reading) and the
    last body message has not arrived.
    """
    deadline = started + seconds
    body_done = False

    async def receive_in_time() -> Message:
        nonlocal body_done
        if body_done:
            return await receive()
        left = deadline - time.monotonic()
        if left <= 0:
            raise body_timeout_error(seconds)
        try:
            async with asyncio.timeout(left):
                message = await receive()
        except TimeoutError:
            raise body_timeout_error(seconds) from None
        if message["type"] != "http.request" or not message.get("more_body", False):
            body_done = True
        return message

    return receive_in_time
