"""What every asynchronous task API shares: submit → poll/webhook → result.

RunPod, Alibaba SCC, DashScope and ModelsLab all accept a job, hand back an id, and later
report its state and its images. Everything dialect-neutral about that lives here, so a new
task API is only its wire format.

How a new async dialect plugs in:

1. Subclass :class:`AsyncTaskDialect` (set ``name``, ``prefixes``, ``field_names``) and write
   ``route_handlers`` and ``render_failure`` as for any :class:`~gateway.dialects.base.Dialect`.
2. Submit route: authenticate, decode the body, then
   ``job = await self.tasks.submit(principal, scope=..., payload=..., images=n, ttl_s=...,
   execution_timeout_s=..., webhook=url)``: the webhook URL is SSRF-checked, admission runs
   (503 + Retry-After while draining, 429 when the engine or the job queue is full, the
   client's quota via ``ctx.admit``) and a queued :class:`~inference.tasks.Job` is stored.
3. Poll route: ``job = await self.tasks.own(principal, scope, job_id)`` (404 for anyone
   else's job), then render ``job.status`` (``inference.tasks`` constants) with ``await
   self.tasks.data_uris(job)`` or ``await self.tasks.media_urls(job, request)`` (expiring URLs
   on ``/media``). ``self.tasks.wait``, ``cancel``, ``retry``, ``purge``, ``stats`` and
   ``list_jobs`` (one scope's jobs, newest first, filtered and paged) serve the other verbs.
   Every store call is awaited: it runs on a worker thread, never on the loop.
4. Store the canonical request, checked at submission (``self.tasks.check_request``), as
   ``payload["request"] = encode_request(canonical)``: the default ``prepare`` runs it. A
   dialect that validates only when the job runs (RunPod, as worker-sdxl does) overrides
   ``async prepare(job) -> GenerationRequest`` instead (raise to fail the job:
   ``error_message`` turns the exception into the job's error text). Add ``async
   webhook_body(job) -> bytes`` when the API has webhooks (sent once the job is final, with
   retries, through the SSRF-safe sender; at least once: a delivery cut off by a stop or a
   crash is sent again by the next server, see :mod:`gateway.outbox`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import msgspec
from litestar import Request

from auth.keys import Principal
from gateway.dialects.base import Dialect
from gateway.errors import ApiError, failure_from, invalid
from gateway.fetch import AllowList, FetchPolicy, FetchRefused, resolve_checked
from gateway.task_store_async import AsyncTaskStore
from gateway.webhooks import WebhookSender
from inference import EngineState, GenerationRequest
from inference.encoder import b64_string
from inference.errors import InvalidRequest
from inference.tasks import COMPLETED, FINISHED, QUEUED, Job, StoredImage

logger = logging.getLogger(__name__)

# An id from a client (unknown, so possibly anything) is quoted in messages up to this length.
ECHO_ID_CHARS = 64
# How often one job may be retried by its client (each retry is admitted like a new request).
MAX_RETRIES = 3
# Retry-After for a draining server: long enough for a load balancer to pick another replica.
DRAIN_RETRY_AFTER_S = 5.0


def echo_id(job_id: str) -> str:
    """``job_id`` as a message may quote it: at most :data:`ECHO_ID_CHARS` characters, then …."""
    return job_id if len(job_id) <= ECHO_ID_CHARS else job_id[:ECHO_ID_CHARS] + "…"


class ResultsGone(ApiError):
    """A completed job whose result images are no longer stored: a 404, as for an expired job.

    An operator removed the files, or the expiry sweep deleted them between the read of the
    job and the read of its images. The job cannot be answered any more than an expired one.
    """

    def __init__(self, job_id: str) -> None:
        super().__init__("not_found", f"job {echo_id(job_id)} not found: its results are gone "
                         "(expired or deleted)")


def encode_request(request: GenerationRequest) -> str:
    """``request`` as a job keeps it in ``payload["request"]`` (read back by ``prepare``)."""
    return msgspec.json.encode(request).decode()


def decode_request(job: Job) -> GenerationRequest:
    """The canonical request a job stored with :func:`encode_request`."""
    return msgspec.json.decode(job.payload["request"], type=GenerationRequest)


class TaskService:
    """The shared job machinery one async dialect uses (``dialect.tasks``)."""

    def __init__(self, ctx: Any, dialect: str, handler: Any, *, webhook_retries: int = 2) -> None:
        self.ctx = ctx
        self.dialect = dialect
        self.handler = handler
        s = ctx.settings
        self.fetch_policy = ctx.fetch_policy
        self.webhook_policy = FetchPolicy(allow=AllowList.parse(s.webhook_allow),
                                          timeout_s=s.webhook_timeout_s)
        self.webhooks = WebhookSender(self.webhook_policy, retries=webhook_retries,
                                      retry_delay_s=s.webhook_retry_delay_s)
        self.jobs = ctx.jobs
        self.jobs.register(dialect, handler)
        # A claim on a delivery must outlast its attempts, or another server would send it too.
        self.jobs.outbox.cover(self.webhooks)
        # Jobs whose images are being copied to /media now: concurrent readers share one copy.
        self._copying: dict[str, asyncio.Future[list[str]]] = {}

    @property
    def store(self) -> AsyncTaskStore:
        """The task store (SQLite, or Redis for replicas), its calls run off the event loop."""
        return self.jobs.db

    # -- admission -------------------------------------------------------------------------

    async def admit(self, principal: Principal, images: int) -> None:
        """Refuse work the server cannot take now, then count the request against quotas.

        503 + Retry-After while draining (a load balancer then fails over), 429 when the
        engine's queue or the job queue is full; quota refusals come from ``ctx.admit``.
        """
        engine = self.ctx.engine
        if engine.state in (EngineState.DRAINING, EngineState.STOPPED):
            raise ApiError("shutdown", "the server is shutting down and accepts no new jobs; "
                           "retry on another replica", retry_after=DRAIN_RETRY_AFTER_S)
        if engine.state is EngineState.FAILED:
            raise ApiError("not_ready", "the model failed to load; this server cannot run jobs",
                           retry_after=DRAIN_RETRY_AFTER_S)
        if not engine.has_room(images):
            raise ApiError("overload", f"the queue is full ({engine.queued_images} images "
                           "waiting); retry shortly", retry_after=1.0)
        waiting = await self.store.count((QUEUED,))
        if waiting >= self.ctx.settings.job_queue_max:
            raise ApiError("overload", f"too many queued jobs ({waiting}); retry shortly",
                           retry_after=1.0)
        self.ctx.admit(principal)

    def check_request(self, request: GenerationRequest, field_names: dict[str, str]) -> None:
        """Run the engine's own checks at submission, so a bad request is a 400, not a failed job.

        ``field_names`` maps canonical fields to the dialect's; the message gains the wire
        field's name when the engine's text does not already say it. Skipped while the model
        loads (the engine checks again when the job runs).
        """
        engine = self.ctx.engine
        if engine.info is None:
            return
        try:
            engine.prepare(request)
        except InvalidRequest as exc:
            field = field_names.get(exc.field or "", exc.field)
            canonical = exc.field or ""
            if field and field not in exc.message and not (
                    canonical and exc.message.startswith(canonical)):
                raise invalid(f"{field}: {exc.message}", field=field) from None
            raise

    async def check_webhook(self, url: str, field: str = "webhook") -> None:
        """400 naming ``field`` unless ``url`` passes the SSRF rules for webhooks."""
        try:
            await resolve_checked(url, self.webhook_policy)
        except FetchRefused as exc:
            raise invalid(f"{field}: {exc}", field=field) from None

    async def submit(
        self,
        principal: Principal,
        *,
        scope: str,
        payload: dict[str, Any],
        images: int = 1,
        ttl_s: float | None = None,
        execution_timeout_s: float | None = None,
        webhook: str | None = None,
        webhook_field: str = "webhook",
        job_id: str | None = None,
        admitted: bool = False,
    ) -> Job:
        """Check, admit and store a queued job; ``payload`` gains ``client_id``.

        ``ttl_s``/``execution_timeout_s`` default to the server settings; the caller checks
        client-given values against its vendor's bounds, in its own field names.
        ``admitted``: the caller already ran :meth:`admit` (before fetching the request's
        images, so that a client without quota cannot make the server fetch URLs).
        """
        if webhook is not None:
            await self.check_webhook(webhook, webhook_field)
        if not admitted:
            await self.admit(principal, images)
        settings = self.ctx.settings
        now = time.time()
        job = Job(
            id=job_id or str(uuid.uuid4()),
            dialect=self.dialect,
            scope=scope,
            payload={**payload, "client_id": principal.id},
            created_at=now,
            expires_at=now + (ttl_s if ttl_s is not None else settings.job_ttl_s),
            execution_timeout_s=(execution_timeout_s if execution_timeout_s is not None
                                 else settings.job_execution_timeout_s),
            webhook=webhook,
            images=images,
        )
        return await self.jobs.submit(job)

    # -- lookups and verbs -----------------------------------------------------------------

    async def own(self, principal: Principal, scope: str, job_id: str) -> Job:
        """The job if it belongs to this dialect and ``scope``; else a 404 :class:`ApiError`."""
        job = await self.store.get(job_id)
        if job is None or job.dialect != self.dialect or job.scope != scope:
            raise ApiError("not_found", f"job {echo_id(job_id)} not found (unknown or expired)")
        return self.jobs.view(job)

    async def wait(self, job_id: str, timeout_s: float) -> Job | None:
        """Wait up to ``timeout_s`` for the job to be final; its state then (``None``: expired)."""
        job = await self.jobs.wait(job_id, timeout_s)
        return self.jobs.view(job) if job is not None else None

    async def cancel(self, job: Job) -> Job | None:
        """Cancel ``job`` (from :meth:`own`) if queued or running; a final one comes back unchanged.

        A job already final when it was read stays so (only a client's retry revives one, and
        cancelling as of that read is a consistent answer), so the store is not asked again.
        """
        if job.status in FINISHED:
            return job
        return await self.jobs.cancel(job.id)

    async def retry(self, principal: Principal, job: Job) -> Job | None:
        """Queue a FAILED/TIMED_OUT job again, admitted and counted like a new request.

        ``None`` when the job is not in a retryable state; a 400 once it was retried
        :data:`MAX_RETRIES` times.
        """
        if job.retries >= MAX_RETRIES:
            raise invalid(f"job {job.id} was already retried {job.retries} times "
                          f"(at most {MAX_RETRIES}); submit a new job")
        await self.admit(principal, job.images)
        return await self.jobs.retry(job.id, max_retries=MAX_RETRIES)

    async def purge(self, scope: str) -> int:
        """Remove this scope's queued jobs; how many went."""
        return await self.jobs.purge(self.dialect, scope)

    async def list_jobs(self, scope: str, *, statuses: Sequence[str] | None = None,
                        since: float | None = None, until: float | None = None,
                        payload_match: Mapping[str, str] | None = None, offset: int = 0,
                        limit: int = 100) -> tuple[list[Job], int]:
        """One page of this dialect's jobs in ``scope``, newest first, and the total that match.

        Jobs come as clients see them (:meth:`gateway.jobs.JobRunner.view`).
        """
        jobs, total = await self.store.list_jobs(
            self.dialect, scope, statuses=statuses, since=since, until=until,
            payload_match=payload_match, offset=offset, limit=limit)
        return [self.jobs.view(j) for j in jobs], total

    async def stats(self, scope: str) -> dict[str, int]:
        """Counts by status in this scope, plus ``retried``."""
        return await self.store.stats(self.dialect, scope)

    # -- results ---------------------------------------------------------------------------

    async def images(self, job: Job) -> list[tuple[StoredImage, bytes]]:
        """A completed job's images with their bytes (read off the event loop).

        :class:`ResultsGone` (a 404) when they are no longer stored.
        """
        if job.status != COMPLETED or job.result is None:
            return []
        images = job.result.images
        try:
            data = await self.store.read_images(job.id, images)
        except FileNotFoundError:
            raise ResultsGone(job.id) from None
        return list(zip(images, data, strict=True))

    async def data_uris(self, job: Job) -> list[str]:
        """A completed job's images as ``data:`` URIs (empty for any other state)."""
        return [f"data:{img.media_type};base64," + b64_string(data)
                for img, data in await self.images(job)]

    async def media_urls(self, job: Job, request: Request | str) -> list[str]:
        """A completed job's images as expiring ``/media`` URLs (``--url-ttl-s``).

        ``request`` gives the public base URL; a webhook, which has no request, passes the
        base URL the job was submitted at instead. The media names are remembered on the job,
        so polling does not copy the images again until the URLs are about to expire.
        """
        if job.status != COMPLETED or job.result is None:
            return []
        base = (request.rstrip("/") if isinstance(request, str)
                else self.ctx.public_base_url(request))
        if self._media_fresh(job):
            names = job.media
        else:
            copying = self._copying.get(job.id)
            if copying is None:
                copying = asyncio.ensure_future(self._copy_to_media(job))
                self._copying[job.id] = copying
                copying.add_done_callback(lambda _: self._copying.pop(job.id, None))
            # Shielded: a reader that goes away does not cancel the copy the others wait for.
            names = await asyncio.shield(copying)
        return [f"{base}/media/{name}" for name in names]

    def _media_fresh(self, job: Job) -> bool:
        """Whether the job's remembered media names outlive the URLs handed out now."""
        return bool(job.media) and time.time() < job.media_at + self.ctx.media.ttl_s * 0.9

    async def _copy_to_media(self, job: Job) -> list[str]:
        """Copy the job's images to /media once; the names every reader then answers with."""
        # Read again: another reader (or replica) may have copied since ``job`` was read.
        current = await self.store.get(job.id) or job
        if self._media_fresh(current):
            return current.media
        pairs = await self.images(current)
        media = self.ctx.media
        names = await asyncio.to_thread(
            lambda: [media.put(data, img.media_type) for img, data in pairs])
        # Compare-and-set on the copy being replaced: when two replicas copy at once, the names
        # stored first win and both answer with them (the other copy expires unused).
        stored = await self.store.update(job.id, None, where={"media_at": current.media_at},
                                         media=names, media_at=time.time())
        if stored is None:
            latest = await self.store.get(job.id)
            if latest is not None and self._media_fresh(latest):
                return latest.media
        return names

    # -- webhooks --------------------------------------------------------------------------

    def send_webhook(self, job: Job) -> None:
        """Render and deliver the job's webhook in the background (no-op without one).

        ``job`` is as claimed for this server (the runner's final write, or the outbox's
        resume); the outbox records how the delivery ended.
        """
        if not job.webhook:
            return
        url = job.webhook

        async def render() -> bytes | None:
            try:
                return await self.handler.webhook_body(job)
            except ResultsGone as exc:
                logger.warning("webhook of job %s not sent: %s", job.id, exc)
                return None

        self.webhooks.send_rendered(url, render,
                                    lambda sent: self.jobs.outbox.settle(job, sent))


class AsyncTaskDialect(Dialect):
    """Base of a task API.

    Subclasses add routes and, if they have webhooks, ``webhook_body``; ``prepare`` only when
    a job does not store its checked canonical request. ``self.tasks`` does the rest (see the
    module docstring).
    """

    #: Delivery attempts after the first for a webhook that does not answer 2xx.
    webhook_retries: ClassVar[int] = 2

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.tasks = TaskService(ctx, self.name, self, webhook_retries=self.webhook_retries)

    async def prepare(self, job: Job) -> GenerationRequest:
        """The canonical request for a stored job; raise to fail the job.

        By default the request checked at submission and stored as ``payload["request"]``
        (:func:`encode_request`), charged to the submitting client.
        """
        return msgspec.structs.replace(decode_request(job), client_id=job.payload.get("client_id"),
                                       request_id=job.id)

    def error_message(self, exc: BaseException) -> str:
        """The job's error text for ``exc``, in this dialect's field names."""
        return failure_from(exc, self.field_names).message

    async def webhook_body(self, job: Job) -> bytes | None:
        """The body POSTed to ``job.webhook`` once the job is final (``None``: send nothing)."""
        return None

    def finished(self, job: Job) -> None:
        """Runner hook: a job reached a final state (its webhook is claimed for this server)."""
        self.tasks.send_webhook(job)

    def send_webhook(self, job: Job) -> None:
        """Outbox hook: deliver a final job's webhook again (claimed for this server)."""
        self.tasks.send_webhook(job)
