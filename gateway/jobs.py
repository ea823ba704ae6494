"""The job runner: takes queued jobs from the task store and runs them on the engine.

Dialect-neutral. A task dialect registers a :class:`JobHandler` that turns its stored payload
into a canonical request (fetching images, validating) and hears when a job finishes (for
webhooks). Up to ``concurrency`` jobs are on the engine at once, each an asyncio task calling
``engine.generate``; the engine's scheduler batches them. Jobs past that wait in the store as
``queued``. Cancelling a job cancels its task, which drops it from the engine's queue.

A job taken by the runner is ``running`` in the store (so no other replica takes it) but starts
only when the engine starts its first batch: that moment is its ``started_at`` and arms its
execution timeout. Until then it waits, and every view shows it as queued
(:func:`inference.tasks.client_status`). The engine's request deadline (``--request-timeout-s``)
is for synchronous requests: a job gets its own execution timeout instead (the engine admits
it against that; the timing, from the start, is done here). What bounds the wait: the work
ahead of it in the engine's queue (at most ``concurrency`` jobs are handed over at once), and
the job's ttl, when the expiry sweep cancels and deletes it.

The store is synchronous (SQLite or Redis); every call goes through :class:`~gateway.
task_store_async.AsyncTaskStore` (``self.db``), so a slow store never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import msgspec

from gateway import datadir
from gateway.errors import is_store_outage
from gateway.outbox import WebhookHandler, WebhookOutbox
from gateway.task_store_async import AsyncTaskStore
from inference import Engine, EngineState, GenerationRequest, GenerationResult
from inference import errors as ie
from inference.progress import Progress
from inference.tasks import (
    ACTIVE,
    CANCELLED,
    COMPLETED,
    FAILED,
    FINISHED,
    QUEUED,
    RUNNING,
    TIMED_OUT,
    Job,
    SqliteTaskStore,
    StoredResult,
    TaskStore,
    requeue_changes,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
# Jobs read per page when purge looks for taken-but-waiting jobs.
PURGE_PAGE = 500
# A finished job's writes are retried this often while the store is unreachable (doubling).
STORE_RETRY_S = 0.5
STORE_RETRY_MAX_S = 10.0


class JobHandler(WebhookHandler, Protocol):
    """What a task dialect provides to the runner (and its webhook outbox)."""

    async def prepare(self, job: Job) -> GenerationRequest:
        """The canonical request for ``job`` (may fetch inputs); raise to fail the job."""
        ...

    def error_message(self, exc: BaseException) -> str:
        """The job ``error`` text for an exception, in the dialect's field names."""
        ...

    def finished(self, job: Job) -> None:
        """Called once when ``job`` reaches a final state (must not block)."""
        ...


class JobRunner:
    """Runs stored jobs on the engine; owns the dispatcher and the expiry sweeper."""

    def __init__(
        self,
        store: TaskStore,
        engine: Engine,
        *,
        concurrency: int = 8,
        sweep_interval_s: float = 30.0,
        worker_id: str | None = None,
        on_success: Callable[[GenerationRequest, GenerationResult], None] | None = None,
        data_dir: Path | None = None,
        port: int | None = None,
        heartbeat_s: float = 2.0,
        on_webhook: Callable[[Job, str], None] | None = None,
    ) -> None:
        # The synchronous store, for code that runs off the loop; everything on the loop uses
        # ``db``, which runs the same calls on worker threads.
        self.store = store
        self.db = AsyncTaskStore(store)
        # The data dir is locked while the store is open (one server per data dir).
        self.data_dir = data_dir
        self.port = port
        # Shared stores (Redis): how often this server says it is alive and looks for jobs of
        # dead servers; a server silent for 5 heartbeats is dead.
        self.heartbeat_s = heartbeat_s
        self.engine = engine
        self.concurrency = max(1, concurrency)
        self.sweep_interval_s = sweep_interval_s
        self.worker_id = worker_id or secrets.token_hex(7)
        # Called with each completed job's request and result (the usage ledger).
        self.on_success = on_success
        self.handlers: dict[str, JobHandler] = {}
        # Webhook deliveries: claimed with a job's final write, resumed after a stop, settled.
        # ``on_webhook``: called with each delivery's job and outcome (metrics).
        self.outbox = WebhookOutbox(self.db, self.worker_id, self.handlers,
                                    on_outcome=on_webhook)
        self._active: dict[str, asyncio.Task[None]] = {}
        # Every job task until it ends, recording included (``_active`` forgets a job before
        # its final write), so close() can wait for those writes before closing the store.
        self._tasks: set[asyncio.Task[None]] = set()
        # Jobs claimed from the queue whose task is not made yet, and those of them cancelled
        # meanwhile (the claim and the cancel are both awaited, so they may interleave).
        self._claiming: set[str] = set()
        self._cancelled_claims: set[str] = set()
        # When the engine started each active job's first batch (Unix s); the rest wait in its
        # queue. Also written to the store, but a view must not wait for that write.
        self._started: dict[str, float] = {}
        # Those store writes, kept until done (a task nobody references may be collected).
        self._writes: set[asyncio.Future[Any]] = set()
        self._done: dict[str, asyncio.Event] = {}
        self._cancelling: set[str] = set()
        self._wake: asyncio.Event | None = None
        self._loops: list[asyncio.Task[None]] = []
        self._closing = False
        # Set when the server starts to drain: waiters answer with the job as it is then.
        self._waiters_released = False
        # Loops that reached the store: True while it is unreachable (one warning per outage).
        self._store_down: dict[str, bool] = {}

    def register(self, dialect: str, handler: JobHandler) -> None:
        """Route jobs of ``dialect`` to ``handler``."""
        self.handlers[dialect] = handler

    @property
    def running(self) -> int:
        """Jobs on the engine right now."""
        return len(self._active)

    # -- lifecycle -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        """Open the store, fail interrupted jobs, run the loops; stop them on exit."""
        await self.start()
        try:
            yield
        finally:
            await self.close()

    async def start(self) -> None:
        """Lock the data dir, open the store, reclaim jobs of dead servers, start the loops.

        Queued jobs are left as they are and run; running jobs whose server is gone go back to
        the queue once (see :func:`inference.tasks.requeue_changes`).
        """
        if self.data_dir is not None:
            datadir.acquire(self.data_dir, self.port)
        try:
            await self.db.open()
        except BaseException:
            if self.data_dir is not None:
                datadir.release(self.data_dir)
            raise
        await self.db.heartbeat(self.worker_id, self.heartbeat_s * 5)
        # Nothing runs here yet, so a job "running" under this worker id was left by an earlier
        # run of this server under the same (fixed) --replica-id: reclaim it, heartbeat or not.
        await self._reclaim(dead=(self.worker_id,))
        # Webhooks left pending by a stopped server (this one's previous run included) are sent
        # again; a store that fails here is tried again by the loops.
        try:
            await self.outbox.resume(dead=(self.worker_id,), at_start=True)
        except Exception as exc:  # noqa: BLE001 - logged there; the loops retry
            self._store_failed("webhook outbox", exc)
        self._wake = asyncio.Event()
        self._closing = False
        self._waiters_released = False
        self._loops = [
            asyncio.create_task(self._dispatch(), name="imagegate-jobs-dispatch"),
            asyncio.create_task(self._sweep(), name="imagegate-jobs-sweep"),
        ]
        if getattr(self.store, "shared", False):
            self._loops.append(asyncio.create_task(self._watch(), name="imagegate-jobs-watch"))

    async def _reclaim(self, dead: tuple[str, ...] = ()) -> None:
        requeued, failed = await self.db.reclaim(dead=dead)
        if requeued or failed:
            logger.warning("jobs of a stopped server: %d re-queued, %d failed (interrupted twice)",
                           requeued, failed)
            self._kick()

    async def close(self) -> None:
        """Stop the loops, re-queue jobs still running (for the next server), close."""
        self._closing = True
        self.release_waiters()
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        for task in self._active.values():
            task.cancel()
        await asyncio.gather(*self._tasks, *self._writes, return_exceptions=True)
        # Before the store closes: a delivery still in flight (or waiting for a retry) would
        # record its end in a closed store. Cut off, it stays pending for the next server.
        await self.outbox.stop_senders()
        await self.db.close()
        if self.data_dir is not None:
            datadir.release(self.data_dir)

    # -- operations ------------------------------------------------------------------------

    async def submit(self, job: Job) -> Job:
        """Store a new queued job and wake the dispatcher."""
        # The event exists before the job does: the dispatcher may start it (and setdefault
        # its own event) as soon as the insert lands.
        self._done[job.id] = asyncio.Event()
        try:
            await self.db.create(job)
        except BaseException:
            self._done.pop(job.id, None)
            raise
        self._kick()
        return job

    async def wait(self, job_id: str, timeout_s: float) -> Job | None:
        """Wait up to ``timeout_s`` for the job to finish; return its current state.

        A job run here wakes the waiter at once; one run by another replica is seen by polling.
        Once the server drains (:meth:`release_waiters`) every wait ends at once with the job as
        it is, answered as when the wait times out: the server would otherwise cut the request
        off at its shutdown timeout, with a bare 500.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        poll = 0.25 if getattr(self.store, "shared", False) else 1.0
        while True:
            job = await self.db.get(job_id)
            remaining = deadline - loop.time()
            if (job is None or job.status in FINISHED or remaining <= 0
                    or self._waiters_released):
                return job
            event = self._done.get(job_id)
            # A job running here sets its event when it ends: no need to poll the store for it.
            step = remaining if job_id in self._active else min(remaining, poll)
            with contextlib.suppress(TimeoutError):
                if event is not None:
                    await asyncio.wait_for(event.wait(), step)
                else:
                    await asyncio.sleep(step)

    def release_waiters(self) -> None:
        """End every :meth:`wait`, now and from now on (the server begins to drain)."""
        self._waiters_released = True
        for event in self._done.values():
            # Not popped: the job's own end still sets and forgets its event.
            event.set()

    async def cancel(self, job_id: str, *, waiting_only: bool = False) -> Job | None:
        """Cancel a queued or running job; a finished one is returned unchanged.

        A job running on another replica (shared store) is marked here; that replica sees
        the change within a heartbeat and drops the work. ``waiting_only``: only a job taken by
        some server but not started yet (``None`` for any other).
        """
        started = self._started.get(job_id)
        if waiting_only and started is not None:
            return None
        # The webhook (if any) is claimed for this server, which sends it (:meth:`_finish`).
        changes: dict[str, Any] = {"status": CANCELLED, "finished_at": time.time(),
                                   **self.outbox.claim()}
        if started is not None:
            changes["started_at"] = started  # its own write may still be on the way
        job = await self.db.update(job_id, (RUNNING,) if waiting_only else ACTIVE,
                                   where={"started_at": None} if waiting_only else None,
                                   **changes)
        if job is None:
            return None if waiting_only else await self.db.get(job_id)
        task = self._active.get(job_id)
        if task is not None:
            self._cancelling.add(job_id)
            task.cancel()
        elif job_id in self._claiming:
            self._cancelled_claims.add(job_id)
        self._finish(job)
        return job

    async def retry(self, job_id: str, max_retries: int | None = None) -> Job | None:
        """Queue a FAILED or TIMED_OUT job again under the same id; ``None`` if not allowed."""
        current = await self.db.get(job_id)
        if current is None or (max_retries is not None and current.retries >= max_retries):
            return None
        # The count read above must still hold: a concurrent retry that ran and failed again
        # meanwhile would otherwise have its increment overwritten (one retry too many).
        job = await self.db.update(
            job_id, (FAILED, TIMED_OUT), where={"retries": current.retries}, status=QUEUED,
            error=None, result=None, started_at=None, finished_at=None, worker_id=None,
            created_at=time.time(), retries=current.retries + 1,
        )
        if job is not None:
            self._done[job_id] = asyncio.Event()
            self._kick()
        return job

    def view(self, job: Job) -> Job:
        """``job`` as clients should see it.

        A job taken by a server (this one or another) but not started by its engine yet is
        still queued (:func:`inference.tasks.client_status`), with no worker: it is waiting,
        and purge treats it as queued. One this server's engine started whose start is not in
        the store yet gets its start time from here.
        """
        if job.status != RUNNING or job.started_at is not None:
            return job
        started = self._started.get(job.id)
        if started is not None and job.worker_id == self.worker_id:
            return msgspec.structs.replace(job, started_at=started)
        return msgspec.structs.replace(job, status=QUEUED, worker_id=None)

    async def purge(self, dialect: str, scope: str) -> int:
        """Remove the queued jobs of one dialect and scope; return how many.

        Jobs some server took but whose engine has not started them count as queued: they are
        cancelled (on any replica: its runner drops a job cancelled elsewhere).
        """
        ids = await self.db.purge_queued(dialect, scope)
        for job_id in ids:
            self._release(job_id)
        waiting: list[str] = []
        offset = 0
        while True:
            page, total = await self.db.list_jobs(dialect, scope, statuses=(QUEUED,),
                                                  offset=offset, limit=PURGE_PAGE)
            waiting += [job.id for job in page if job.status == RUNNING]
            offset += len(page)
            if not page or offset >= total:
                break
        cancelled = 0
        for job_id in waiting:
            if await self.cancel(job_id, waiting_only=True) is not None:
                cancelled += 1
        return len(ids) + cancelled

    # -- internals -------------------------------------------------------------------------

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _dispatch(self) -> None:
        assert self._wake is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)
            self._wake.clear()
            if self.engine.state is not EngineState.READY:
                continue  # jobs stay queued while the model loads (or for the next server)
            free = self.concurrency - len(self._active)
            if free <= 0:
                continue
            try:
                for job in await self.db.queued(free):
                    await self._start(job)
            except Exception as exc:  # noqa: BLE001 - logged there; the loop goes on
                self._store_failed("job dispatch", exc)
            else:
                self._store_answered("job dispatch")

    async def _start(self, job: Job) -> None:
        self._claiming.add(job.id)
        # Taken, not started: started_at stays unset until the engine starts the job.
        claim = asyncio.ensure_future(self.db.update(
            job.id, (QUEUED,), status=RUNNING, worker_id=self.worker_id))
        try:
            started = await asyncio.shield(claim)
        except asyncio.CancelledError:
            # Stopping mid-claim: the write still lands on its thread; a job it claimed goes
            # back to the queue as it was (it never ran, so no requeue is counted).
            if await claim is not None:
                await self.db.update(job.id, (RUNNING,), owner=self.worker_id, status=QUEUED,
                                     worker_id=None)
            raise
        finally:
            self._claiming.discard(job.id)
            # Cancelled between the claim and now: already final and announced.
            cancelled = job.id in self._cancelled_claims
            self._cancelled_claims.discard(job.id)
        if started is None or cancelled:
            return
        self._done.setdefault(job.id, asyncio.Event())
        task = asyncio.create_task(self._execute(started), name=f"imagegate-job-{job.id}")
        self._active[job.id] = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, job: Job) -> None:
        handler = self.handlers.get(job.dialect)
        changes: dict[str, Any]
        try:
            if handler is None:
                raise RuntimeError(f"no handler for {job.dialect} jobs")
            try:
                request, result = await self._run(handler, job)
            except TimeoutError:
                changes = {"status": TIMED_OUT, "error": (
                    f"the job did not finish within its execution timeout of "
                    f"{job.execution_timeout_s:g}s")}
            except ie.ShuttingDown:
                changes = self._requeue(job)  # this server drains: another one runs it
            else:
                images = [(img.data, img.media_type, img.seed, img.width, img.height)
                          for img in result.images]
                stored = await self._persist(
                    job, "save the images of", lambda: self.db.save_images(
                        job.id, images, job.expires_at))
                changes = {"status": COMPLETED, "result": StoredResult(
                    images=stored, seed=result.seed, model=result.model,
                    prompt_tokens=result.prompt_tokens)}
                if self.on_success is not None:
                    self.on_success(request, result)
        except asyncio.CancelledError:
            if job.id in self._cancelling or not self._closing:
                changes = {"status": CANCELLED}
            else:
                # Shutting down: back to the queue for the next server (once, if it started).
                await self._record(job, self._requeue(job))
                raise
        except Exception as exc:  # noqa: BLE001 - any failure becomes the job's error
            message = handler.error_message(exc) if handler else str(exc)
            changes = {"status": FAILED, "error": message}
        await self._record(job, changes)

    async def _run(self, handler: JobHandler, job: Job
                   ) -> tuple[GenerationRequest, GenerationResult]:
        """Prepare and generate ``job`` within its execution timeout (TimeoutError past it).

        The timeout is a budget for the job's own work: preparing it (validation, fetching
        inputs) and running it on the engine. Waiting in the engine's queue in between does not
        count: the deadline is off from the hand-over until the engine reports the start.
        """
        loop = asyncio.get_running_loop()
        budget = job.execution_timeout_s
        began = loop.time()
        async with asyncio.timeout_at(began + budget) as deadline:
            request = await handler.prepare(job)
            left = budget - (loop.time() - began)
            if left <= 0:  # preparing (fetching inputs) spent the budget
                raise TimeoutError
            deadline.reschedule(None)

            def on_start() -> None:
                if deadline.expired():
                    return
                deadline.reschedule(loop.time() + left)

            # Admission measures the job against what preparing left of its budget.
            result = await self._generate(request, job, on_start, left)
        return request, result

    def _requeue(self, job: Job) -> dict[str, Any]:
        """:func:`requeue_changes` for a job of this runner, with its real start (if any)."""
        started = self._started.get(job.id, job.started_at)
        return requeue_changes(msgspec.structs.replace(job, started_at=started))

    async def _record(self, job: Job, changes: dict[str, Any]) -> None:
        """Write a job's end (final, or back to the queue); never leaves it running here.

        Outages are waited out (:meth:`_persist`). Any other failure to write is logged and the
        job is failed with a plain reason instead: its outcome (images included) may be what
        the store refuses, and a job left ``running`` under a live server is never reclaimed.
        Only when this server stops (or the job expires) meanwhile is it left running, for the
        next server to re-queue as after a crash.
        """
        # Forgotten before the write: once it is awaited, the job must no longer count as
        # active (a cancel meanwhile finds no task to cancel, and purge skips it).
        self._active.pop(job.id, None)
        self._cancelling.discard(job.id)
        started = self._started.pop(job.id, None)
        if started is not None and changes.get("status") != QUEUED:
            # The real start, even when its own write has not landed (or never will).
            changes = {"started_at": started, **changes}
        if changes.get("status") != QUEUED:
            changes = {"finished_at": time.time(), **changes}
        try:
            try:
                final = await self._write_end(job, changes)
            except Exception as exc:
                if is_store_outage(exc):
                    raise  # given up: this server stops, or the job expired
                logger.error("could not record the outcome of job %s; failing it instead",
                             job.id, exc_info=exc)
                final = await self._write_end(job, {
                    "status": FAILED, "finished_at": time.time(), "result": None,
                    "error": "the server could not record this job's outcome; retry it"})
        except Exception as exc:  # noqa: BLE001 - logged; the job task must end cleanly
            logger.error("job %s is left running, for the next server to re-queue: %s: %s",
                         job.id, type(exc).__name__, exc)
            final = None
        if final is not None and final.status != QUEUED:
            self._finish(final)
        else:
            # Back in the queue, cancelled meanwhile (already final and announced), or not
            # written: whoever waits looks at the store again.
            self._release(job.id)
        self._kick()

    async def _write_end(self, job: Job, changes: dict[str, Any]) -> Job | None:
        claim = bool(job.webhook) and changes.get("status") in FINISHED

        def write() -> Awaitable[Job | None]:
            # Claimed in the final write itself: this server sends it (:meth:`_finish`). Made
            # at each try: a write held up by an outage must not land with a lease already run
            # out, or another server would send the same webhook at once.
            return self.db.update(job.id, (RUNNING,), owner=self.worker_id,
                                  **{**changes, **(self.outbox.claim() if claim else {})})

        return await self._persist(job, "record the outcome of", write)

    async def _persist(self, job: Job, what: str, write: Callable[[], Awaitable[T]]) -> T:
        """``write()``, retried while the store is unreachable (a Redis outage).

        A finished job's images and outcome are kept in memory and written once the store is
        back, rather than lost with the job stuck as running under this live server. Given up
        (the error raised) when this server stops or the job expires: a job left running is then
        re-queued by the next server, as after a crash.
        """
        delay = STORE_RETRY_S
        while True:
            try:
                return await write()
            except Exception as exc:
                if not is_store_outage(exc) or self._closing or time.time() >= job.expires_at:
                    raise
                logger.warning("could not %s job %s (%s: %s); retrying in %.1fs", what, job.id,
                               type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, STORE_RETRY_MAX_S)

    def _release(self, job_id: str) -> None:
        """Wake whoever waits for ``job_id`` (runsync) and forget the event."""
        event = self._done.pop(job_id, None)
        if event is not None:
            event.set()

    def _finish(self, job: Job) -> None:
        self._release(job.id)
        handler = self.handlers.get(job.dialect)
        if handler is not None:
            try:
                handler.finished(job)
            except Exception:
                logger.exception("job finish hook failed")

    async def _generate(self, request: GenerationRequest, job: Job,
                        on_start: Callable[[], None], time_limit_s: float) -> GenerationResult:
        """``engine.generate``, waiting (not failing) while the engine's queue is full.

        When the engine starts the job (its ``started`` report): the start time is recorded
        (here at once, in the store in the background) and ``on_start`` is called. The engine
        gets what preparing left of the job's own execution timeout for admission (a job that
        could not finish in it even alone fails at once), not the server's request timeout: a
        job may run longer than a synchronous request. That rest is enforced here, from the start.
        """

        def on_progress(progress: Progress) -> None:
            if progress.started and job.id not in self._started:
                self._started[job.id] = time.time()
                self._write_start(job.id)
                on_start()

        while True:
            try:
                return await self.engine.generate(request, on_progress=on_progress,
                                                  time_limit_s=time_limit_s)
            except ie.QueueFull as exc:
                await asyncio.sleep(min(max(exc.retry_after, 0.1), 1.0))

    def _write_start(self, job_id: str) -> None:
        """Store the job's start so every replica's views see it (best effort).

        The final write carries the start too, so a lost or late write here changes nothing
        that lasts: a late one finds the job final and is refused by the compare-and-set.
        """
        write = asyncio.ensure_future(self.db.update(
            job_id, (RUNNING,), owner=self.worker_id, started_at=self._started[job_id]))
        self._writes.add(write)

        def done(fut: asyncio.Future[Any]) -> None:
            self._writes.discard(fut)
            if not fut.cancelled() and fut.exception() is not None:
                logger.warning("could not record the start of job %s: %s", job_id,
                               fut.exception())

        write.add_done_callback(done)

    async def _watch(self) -> None:
        """Shared stores: heartbeat, reclaim dead servers' jobs, stop jobs cancelled elsewhere."""
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self.db.heartbeat(self.worker_id, self.heartbeat_s * 5)
                await self._reclaim()
                for job_id, task in list(self._active.items()):
                    job = await self.db.get(job_id)
                    if job is None or job.status != RUNNING or job.worker_id != self.worker_id:
                        self._cancelling.add(job_id)
                        task.cancel()
                self._kick()
            except Exception as exc:  # noqa: BLE001 - logged there; the loop goes on
                self._store_failed("job watch", exc)
            else:
                self._store_answered("job watch")

    def _store_failed(self, loop: str, exc: Exception) -> None:
        """Log a loop's failure: an outage once (the loop retries every second), a bug each time."""
        if not is_store_outage(exc):
            logger.error("%s failed", loop, exc_info=exc)
        elif not self._store_down.get(loop):
            self._store_down[loop] = True
            logger.warning("%s: the task store is unavailable (%s: %s); retrying until it "
                           "answers", loop, type(exc).__name__, exc)

    def _store_answered(self, loop: str) -> None:
        if self._store_down.pop(loop, False):
            logger.warning("%s: the task store answers again", loop)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            try:
                await self.sweep()
            except Exception:
                logger.exception("job expiry sweep failed")
            # Webhooks of dead servers (or lost claims). Here, not in the watch loop: a pass
            # reads every pending delivery's job, and the heartbeat must not wait for it.
            try:
                await self.outbox.resume()
            except Exception as exc:  # noqa: BLE001 - logged there; the loop goes on
                self._store_failed("webhook outbox", exc)
            else:
                self._store_answered("webhook outbox")

    async def sweep(self) -> int:
        """Delete expired jobs (cancelling any still running) and their files."""
        expired = await self.db.expired()
        for job in expired:
            task = self._active.get(job.id)
            if task is not None:
                self._cancelling.add(job.id)
                task.cancel()
            await self.db.delete(job.id)
            self._release(job.id)
        return len(expired)


def job_store(data_path: Path, results_dir: str = "") -> SqliteTaskStore:
    """The SQLite store under ``data_path`` (results in ``results_dir`` or ``data_path/results``)."""
    results = Path(results_dir).expanduser() if results_dir else data_path / "results"
    return SqliteTaskStore(data_path / "tasks.sqlite3", results)
