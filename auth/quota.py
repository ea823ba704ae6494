"""Per-client request quotas: requests per second and requests per (UTC) day.

Built on the ``limits`` library, so the counters can live in memory (one replica) or in Redis
(``redis://…``, shared by replicas) by changing one storage URI. Checked before a request is
queued; every dialect renders the refusal in its own envelope.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable
from typing import Literal

from limits import RateLimitItem, RateLimitItemPerDay, RateLimitItemPerSecond
from limits.storage import storage_from_string
from limits.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

from auth.keys import Principal


class QuotaExceeded(Exception):
    """A quota refused a request; ``kind`` says which one."""

    def __init__(self, kind: Literal["rps", "daily"], message: str, retry_after: float) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after


def rps_item(rps: float) -> RateLimitItem:
    """``rps`` as a ``limits`` item: N per second, or 1 per ⌈1/rps⌉ seconds below 1."""
    if rps >= 1:
        return RateLimitItemPerSecond(int(rps))
    return RateLimitItemPerSecond(1, max(1, math.ceil(1 / rps)))


class QuotaLimiter:
    """Checks and counts requests against each principal's ``rps`` and ``daily`` limits."""

    def __init__(self, storage_uri: str = "memory://",
                 clock: Callable[[], float] = time.time, key_prefix: str | None = None) -> None:
        # In-memory counters reset when the process restarts; Redis ones do not.
        options = {"key_prefix": key_prefix} if key_prefix and storage_uri.startswith(
            ("redis://", "rediss://", "redis+")) else {}
        self.storage = storage_from_string(storage_uri, **options)
        self._moving = MovingWindowRateLimiter(self.storage)
        self._fixed = FixedWindowRateLimiter(self.storage)
        self.clock = clock

    def admit(self, principal: Principal) -> None:
        """Count one request for ``principal``; raise :class:`QuotaExceeded` if over a limit.

        The per-second limit is checked first and does not spend the daily allowance when it
        refuses. The daily counter is keyed by UTC date, so it resets at midnight UTC.
        """
        if principal.rps is None and principal.daily is None:
            return
        if principal.rps is not None:
            item = rps_item(principal.rps)
            if not self._moving.hit(item, "rps", principal.id):
                reset = self._moving.get_window_stats(item, "rps", principal.id).reset_time
                raise QuotaExceeded(
                    "rps", f"rate limit reached: this key may send {principal.rps:g} requests "
                    "per second",
                    max(0.0, reset - time.time()) or 1.0,
                )
        if principal.daily is not None:
            now = dt.datetime.fromtimestamp(self.clock(), dt.UTC)
            day = now.date().isoformat()
            if not self._fixed.hit(RateLimitItemPerDay(principal.daily), "daily", principal.id,
                                   day):
                midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(),
                                               dt.UTC)
                raise QuotaExceeded(
                    "daily", f"daily limit reached: this key may send {principal.daily} "
                    "requests per day (the count resets at midnight UTC)",
                    (midnight - now).total_seconds(),
                )
