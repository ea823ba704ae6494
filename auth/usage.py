"""The usage ledger: requests, images, prompt tokens and executor seconds per client per day.

Kept in SQLite (stdlib ``sqlite3``, WAL mode) so it survives restarts; one row per
(client, UTC day). Each record is committed before ``record`` returns, so before the response
that it accounts for is sent: a ``kill -9`` loses nothing already answered. In WAL mode with
``synchronous=NORMAL`` a commit is an append to the WAL without an fsync (tens of µs); only a
power loss or OS crash can drop the last commits. A write that fails (disk full, locked) is kept
in memory and retried by a background thread every ``flush_interval_s``.

With ``--redis-url`` the ledger lives in Redis instead (:mod:`auth.usage_redis`), shared by
replicas.
"""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

logger = logging.getLogger(__name__)

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

    def __init__(self, path: Path, clock: Callable[[], float] = time.time,
                 flush_interval_s: float = 1.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.clock = clock
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], list[float]] = {}
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=self._flush_loop, args=(flush_interval_s,),
                                         name="imagegate-usage-flush", daemon=True)
        self._flusher.start()

    def record(self, client: str, *, images: int, prompt_tokens: int,
               executor_seconds: float, requests: int = 1) -> None:
        """Add one request's usage to today's row for ``client``, committed before returning."""
        day = dt.datetime.fromtimestamp(self.clock(), dt.UTC).date().isoformat()
        with self._lock:
            row = self._pending.setdefault((client, day), [0, 0, 0, 0.0])
            row[0] += requests
            row[1] += images
            row[2] += prompt_tokens
            row[3] += executor_seconds
        try:
            self.flush()
        except sqlite3.Error:
            logger.exception("usage ledger write failed; kept in memory and retried")

    def flush(self) -> None:
        """Write pending records now."""
        with self._lock:
            pending, self._pending = self._pending, {}
            if not pending:
                return
            try:
                self._write(pending)
            except sqlite3.Error:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                for key, row in pending.items():  # keep them for the next try
                    merged = self._pending.setdefault(key, [0, 0, 0, 0.0])
                    for i, value in enumerate(row):
                        merged[i] += value
                raise

    def _write(self, pending: dict[tuple[str, str], list[float]]) -> None:
        self._db.execute("BEGIN")
        self._db.executemany(
            "INSERT INTO usage (client, day, requests, images, prompt_tokens, executor_seconds)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (client, day) DO UPDATE SET"
            " requests = requests + excluded.requests, images = images + excluded.images,"
            " prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
            " executor_seconds = executor_seconds + excluded.executor_seconds",
            [(c, d, int(r[0]), int(r[1]), int(r[2]), r[3]) for (c, d), r in pending.items()],
        )
        self._db.execute("COMMIT")

    def _flush_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.flush()
            except sqlite3.Error:
                logger.exception("usage ledger flush failed; will retry")

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
        self.flush()
        with self._lock:
            found = self._db.execute(query, params).fetchall()
        return [UsageRow(client=r[0], day=r[1], requests=r[2], images=r[3], prompt_tokens=r[4],
                         executor_seconds=r[5]) for r in found]

    def close(self) -> None:
        """Write what is pending and close the database."""
        self._stop.set()
        self._flusher.join(timeout=5)
        self.flush()
        with self._lock:
            self._db.close()
