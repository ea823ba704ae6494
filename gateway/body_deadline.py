"""A deadline on receiving a request body, so a slow client cannot hold a connection for ever.

Every body passes through here first, so a compressed one (``Content-Encoding``) is refused
here too, with a 415 in the dialect's envelope.

uvicorn bounds idle keep-alive connections but not a body that trickles in (a byte a second
keeps a connection, and whatever the handler holds, alive for as long as the client likes). The
clock starts when the request's headers have arrived; the body must be complete within
``--body-timeout-s``. After the last body message the deadline no longer applies, so waiting for
``http.disconnect`` while an image is generated (:mod:`gateway.disconnect`) is unaffected.

A response that starts while the body is still incomplete (this deadline's 408, or any answer
given before the body was read) closes the connection: otherwise the server would go on
reading, and discarding, whatever the client still sends.
"""

from __future__ import annotations

import asyncio
import time

from litestar.types import Message, Receive, Scope

from gateway.errors import ApiError


def body_timeout_error(seconds: float) -> ApiError:
    """The 408 a client gets when its body did not arrive in time (in its dialect's envelope)."""
    return ApiError("validation", f"the request body did not arrive within {seconds:g} s",
                    status=408)


def _content_coding(scope: Scope) -> str | None:
    """The request's ``Content-Encoding`` unless it is absent or ``identity``."""
    for name, value in scope["headers"]:
        if name == b"content-encoding":
            coding = value.decode("latin-1").strip().lower()
            return None if coding in ("", "identity") else coding
    return None


def _announces_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            return value.strip() not in (b"0", b"")
    return False


class BodyDeadline:
    """Wraps one request's ``receive``; :attr:`complete` says whether its body has arrived."""

    def __init__(self, scope: Scope, receive: Receive, seconds: float) -> None:
        self._receive = receive
        self.seconds = seconds
        # Started now: the request's headers have just arrived.
        self.deadline = time.monotonic() + seconds
        # A request without a body (most GETs) never needs to call receive to be complete.
        self.complete = not _announces_body(scope)
        # No route reads a compressed body: saying so beats "not valid JSON" (RFC 9110 15.5.16).
        self.coding = None if self.complete else _content_coding(scope)

    async def receive(self) -> Message:
        """The next message; raises :func:`body_timeout_error` if the body is late."""
        if self.complete:
            return await self._receive()
        if self.coding is not None:
            raise ApiError("validation", f"Content-Encoding {self.coding!r} is not supported; "
                           "send the body uncompressed", status=415, field="Content-Encoding")
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise body_timeout_error(self.seconds)
        try:
            async with asyncio.timeout(left):
                message = await self._receive()
        except TimeoutError:
            raise body_timeout_error(self.seconds) from None
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.complete = True
        return message
