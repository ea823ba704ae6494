"""The usage ledger in Redis, shared by replicas (``--redis-url``).

Same interface as :class:`auth.usage.UsageLedger`. One hash per (UTC day, client) under
``P:usage:<day>:<client>`` with the four counters, and a set ``P:usage:index`` of the rows;
each record is one MULTI/EXEC before the response is sent, so an answered request is counted
even if the replica dies right after.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable

import redis

from auth.usage import UsageRow


class RedisUsageLedger:
    """A per-client, per-day usage table in Redis."""

    def __init__(self, client: redis.Redis, prefix: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.r = client
        self.prefix = prefix.rstrip(":")
        self.clock = clock

    def record(self, client: str, *, images: int, prompt_tokens: int,
               executor_seconds: float, requests: int = 1) -> None:
        """Add one request's usage to today's row for ``client``."""
        day = dt.datetime.fromtimestamp(self.clock(), dt.UTC).date().isoformat()
        key = f"{self.prefix}:usage:{day}:{client}"
        pipe = self.r.pipeline(transaction=True)
        pipe.hincrby(key, "requests", requests)
        pipe.hincrby(key, "images", images)
        pipe.hincrby(key, "prompt_tokens", prompt_tokens)
        pipe.hincrbyfloat(key, "executor_seconds", executor_seconds)
        pipe.sadd(f"{self.prefix}:usage:index", f"{day}\t{client}")
        pipe.execute()

    def flush(self) -> None:
        """Nothing is held back: every record is written at once."""

    def rows(self, client: str | None = None, since: str | None = None) -> list[UsageRow]:
        """Rows, oldest day first, optionally for one client and from ``since`` (YYYY-MM-DD)."""
        start = dt.date.fromisoformat(since).isoformat() if since is not None else ""
        wanted = []
        for raw in self.r.smembers(f"{self.prefix}:usage:index"):
            day, _, who = raw.decode().partition("\t")
            if (client is None or who == client) and day >= start:
                wanted.append((day, who))
        wanted.sort()
        out = []
        for day, who in wanted:
            h = {k.decode(): v.decode()
                 for k, v in self.r.hgetall(f"{self.prefix}:usage:{day}:{who}").items()}
            out.append(UsageRow(client=who, day=day, requests=int(h.get("requests", 0)),
                                images=int(h.get("images", 0)),
                                prompt_tokens=int(h.get("prompt_tokens", 0)),
                                executor_seconds=float(h.get("executor_seconds", 0.0))))
        return out

    def close(self) -> None:
        """Nothing to release (the connection belongs to the caller)."""
