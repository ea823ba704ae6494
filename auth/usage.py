"""The usage ledger: requests, images, prompt tokens and executor seconds per client per day.

Kept in SQLite (stdlib ``sqlite3``, WAL mode) so it survives restarts; one row per
(client, UTC day), updated with an upsert after every successful generation.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    client TEXT NOT NULL,
    day TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    images INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    executor_seconds REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (client, day)
)
"""


class UsageRow(msgspec.Struct, kw_only=True):
    """One client's usage on one UTC day."""

    client: str
    day: str
    requests: int
    images: int
    prompt_tokens: int
    executor_seconds: float


class UsageLedger:
    """A durable per-client, per-day usage table."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)

    def record(self, client: str, *, images: int, prompt_tokens: int,
               executor_seconds: float, requests: int = 1) -> None:
        """Add one request's usage to today's row for ``client``."""
        day = dt.datetime.fromtimestamp(self.clock(), dt.UTC).date().isoformat()
        with self._lock:
            self._db.execute(
                "INSERT INTO usage (client, day, requests, images, prompt_tokens, executor_seconds)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (client, day) DO UPDATE SET"
                " requests = requests + excluded.requests, images = images + excluded.images,"
                " prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
                " executor_seconds = executor_seconds + excluded.executor_seconds",
                (client, day, requests, images, prompt_tokens, executor_seconds),
            )

    def rows(self, client: str | None = None, since: str | None = None) -> list[UsageRow]:
        """Rows, oldest day first, optionally for one client and from ``since`` (YYYY-MM-DD)."""
        query = ("SELECT client, day, requests, images, prompt_tokens, executor_seconds"
                 " FROM usage WHERE 1=1")
        params: list[str] = []
        if client is not None:
            query += " AND client = ?"
            params.append(client)
        if since is not None:
            query += " AND day >= ?"
            params.append(dt.date.fromisoformat(since).isoformat())
        query += " ORDER BY day, client"
        with self._lock:
            found = self._db.execute(query, params).fetchall()
        return [UsageRow(client=r[0], day=r[1], requests=r[2], images=r[3], prompt_tokens=r[4],
                         executor_seconds=r[5]) for r in found]

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()
