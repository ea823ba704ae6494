"""One access line per request, and the per-request facts handlers add to it.

The middleware in :mod:`gateway.app` opens a :class:`RequestLog` in a context variable for each
HTTP request; code that learns who is calling (authentication) or how many images were made
(the dialect handlers) notes it there. The line never carries prompt text.
"""

from __future__ import annotations

import contextvars
import logging
from dataclasses import dataclass

logger = logging.getLogger("imagegate.access")


@dataclass
class RequestLog:
    """What the access line of one request says."""

    request_id: str
    method: str
    path: str
    client_id: str | None = None
    images: int = 0

    def line(self, *, dialect: str, route: str, status: int, seconds: float,
             level: int = logging.INFO) -> None:
        """Write the access line (logger ``imagegate.access``, at ``level``)."""
        fields = {
            "request_id": self.request_id, "method": self.method, "dialect": dialect,
            "route": route, "client": self.client_id or "-", "status": status,
            "images": self.images, "seconds": round(seconds, 4),
        }
        text = " ".join(f"{k}={v}" for k, v in fields.items())
        logger.log(level, "access %s", text, extra={"fields": fields})


_current: contextvars.ContextVar[RequestLog | None] = contextvars.ContextVar(
    "imagegate_request_log", default=None)


def begin(log: RequestLog) -> contextvars.Token[RequestLog | None]:
    """Make ``log`` the current request's log (the middleware calls this)."""
    return _current.set(log)


def end(token: contextvars.Token[RequestLog | None]) -> None:
    """Forget the current request's log."""
    _current.reset(token)


def note_client(client_id: str) -> None:
    """Record the authenticated client of the current request."""
    log = _current.get()
    if log is not None:
        log.client_id = client_id


def note_images(count: int) -> None:
    """Record how many images the current request produced."""
    log = _current.get()
    if log is not None:
        log.images += count


def request_id() -> str | None:
    """The current request's id (echoed in ``x-request-id``), if inside a request."""
    log = _current.get()
    return log.request_id if log is not None else None
