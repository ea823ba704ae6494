"""The task store as the event loop may use it: every call runs on a worker thread.

Both task stores (:class:`inference.tasks.SqliteTaskStore`, :class:`inference.tasks_redis.
RedisTaskStore`) are synchronous. Called on the event loop, one slow call (a paused Redis, a
busy disk) would freeze every request, health checks included. :class:`AsyncTaskStore` wraps
a store once and gives the runner and the task dialects awaitable versions of its calls.

The calls run on a small pool of their own rather than asyncio's default executor: a store that
hangs then fills only this pool, and DNS lookups, image checks and media reads that use the
default executor keep working. Both stores may be called from any thread (SQLite opens its
connection with ``check_same_thread=False`` and serialises behind a lock; redis-py's client is
thread-safe).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from inference.tasks import (
    INTERRUPTED_REASON,
    MAX_REQUEUES,
    MAX_WEBHOOK_ROUNDS,
    Job,
    StoredImage,
    TaskStore,
    claim_webhooks,
    settle_webhook,
)

T = TypeVar("T")

#: Threads that run store calls. More than one, so a slow image read or write does not hold up
#: status polls; few, because SQLite serialises behind one lock anyway.
WORKERS = 4


class AsyncTaskStore:
    """Awaitable versions of a :class:`~inference.tasks.TaskStore`'s calls."""

    def __init__(self, store: TaskStore, workers: int = WORKERS) -> None:
        self.store = store
        self.workers = max(1, workers)
        self._pool: ThreadPoolExecutor | None = None
        # The heartbeat has a thread of its own: a replica whose heartbeat waits behind slow
        # calls (task lists of a busy key) would look dead to the others, which would re-run
        # its jobs.
        self._beat: ThreadPoolExecutor | None = None
        # Task lists read many jobs; one at a time, so they never hold every worker thread.
        self._lists: asyncio.Semaphore | None = None

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._pool is None:
            # Made on first use (and again after close), so a runner can be started twice.
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="imagegate-tasks")
        return await self._run(self._pool, fn, *args, **kwargs)

    @staticmethod
    async def _run(pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any, **kwargs: Any
                   ) -> T:
        # The caller's context (request id, client) travels along, as with asyncio.to_thread.
        ctx = contextvars.copy_context()
        call = functools.partial(ctx.run, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(pool, call)

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Create or open the store."""
        await self._call(self.store.open)

    async def close(self) -> None:
        """Release the store and stop the worker threads."""
        try:
            await self._call(self.store.close)
        finally:
            for pool in (self._pool, self._beat):
                if pool is not None:
                    pool.shutdown(wait=False)
            self._pool = self._beat = None

    # -- jobs ------------------------------------------------------------------------------

    async def create(self, job: Job) -> None:
        """Insert a new job."""
        await self._call(self.store.create, job)

    async def get(self, job_id: str, now: float | None = None) -> Job | None:
        """The job, or ``None`` when unknown or expired."""
        return await self._call(self.store.get, job_id, now)

    async def update(self, job_id: str, expect: Sequence[str] | None = None, *,
                     owner: str | None = None, where: Mapping[str, Any] | None = None,
                     **changes: Any) -> Job | None:
        """Compare-and-set (:meth:`inference.tasks.TaskStore.update`): the new job or ``None``."""
        return await self._call(self.store.update, job_id, expect, owner=owner, where=where,
                                **changes)

    async def queued(self, limit: int) -> list[Job]:
        """The oldest queued jobs, oldest first."""
        return await self._call(self.store.queued, limit)

    async def active_counts(self) -> dict[tuple[str, str], int]:
        """Queued and running jobs (as stored) by (dialect, status)."""
        return await self._call(self.store.active_counts)

    async def count(self, statuses: Sequence[str], dialect: str | None = None,
                    scope: str | None = None) -> int:
        """How many jobs are in ``statuses`` (optionally of one dialect and scope)."""
        return await self._call(self.store.count, statuses, dialect, scope)

    async def stats(self, dialect: str, scope: str) -> dict[str, int]:
        """Counts by status, plus ``retried``."""
        return await self._call(self.store.stats, dialect, scope)

    async def purge_queued(self, dialect: str, scope: str) -> list[str]:
        """Delete the queued jobs of one dialect and scope; return their ids."""
        return await self._call(self.store.purge_queued, dialect, scope)

    async def list_jobs(self, dialect: str, scope: str, *, statuses: Sequence[str] | None = None,
                        since: float | None = None, until: float | None = None,
                        payload_match: Mapping[str, str] | None = None, offset: int = 0,
                        limit: int = 100) -> tuple[list[Job], int]:
        """One page of one dialect and scope's jobs, newest first, and the total that match."""
        if self._lists is None:
            self._lists = asyncio.Semaphore(1)
        async with self._lists:
            return await self._call(self.store.list_jobs, dialect, scope, statuses=statuses,
                                    since=since, until=until, payload_match=payload_match,
                                    offset=offset, limit=limit)

    async def expired(self, now: float | None = None) -> list[Job]:
        """Jobs whose ``expires_at`` has passed."""
        return await self._call(self.store.expired, now)

    async def delete(self, job_id: str) -> None:
        """Remove a job and its result files."""
        await self._call(self.store.delete, job_id)

    # -- replicas --------------------------------------------------------------------------

    async def heartbeat(self, worker_id: str, ttl_s: float) -> None:
        """Say that ``worker_id`` is alive for the next ``ttl_s`` seconds (own thread)."""
        if self._beat is None:
            self._beat = ThreadPoolExecutor(1, thread_name_prefix="imagegate-heartbeat")
        await self._run(self._beat, self.store.heartbeat, worker_id, ttl_s)

    async def reclaim(self, max_requeues: int = MAX_REQUEUES, reason: str = INTERRUPTED_REASON,
                      dead: Collection[str] = ()) -> tuple[int, int]:
        """Re-queue (or fail) running jobs of dead workers; (requeued, failed)."""
        return await self._call(self.store.reclaim, max_requeues, reason, dead)

    # -- webhook outbox --------------------------------------------------------------------

    async def claim_webhooks(self, worker_id: str, lease_s: float, dead: Collection[str] = (),
                             max_rounds: int = MAX_WEBHOOK_ROUNDS,
                             dialects: Collection[str] | None = None
                             ) -> tuple[list[Job], list[Job]]:
        """Claim pending webhooks no live server sends (:func:`inference.tasks.claim_webhooks`)."""
        return await self._call(claim_webhooks, self.store, worker_id, lease_s, dead,
                                max_rounds, dialects)

    async def settle_webhook(self, job: Job, worker_id: str, sent: bool) -> Job | None:
        """Record the end of a claimed delivery (:func:`inference.tasks.settle_webhook`)."""
        return await self._call(settle_webhook, self.store, job, worker_id, sent)

    # -- results ---------------------------------------------------------------------------

    async def save_images(self, job_id: str, images: Sequence[tuple[bytes, str, int, int, int]],
                          expires_at: float | None = None) -> list[StoredImage]:
        """Write result images (data, media type, seed, width, height); see the protocol."""
        return await self._call(self.store.save_images, job_id, images, expires_at)

    async def read_images(self, job_id: str, images: Sequence[StoredImage]) -> list[bytes]:
        """The bytes of several stored result images, read in one trip to a worker thread."""
        store = self.store
        return await self._call(lambda: [store.read_image(job_id, img) for img in images])
