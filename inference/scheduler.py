"""The batch scheduler: groups queued requests by compatibility key and packs them into batches.

Rules:
- an idle executor takes the oldest waiting group at once (after ``max_wait_ms``, if set, so a
  burst can coalesce); while the executor is busy, arrivals accumulate;
- the oldest waiting group goes first, so no key starves;
- a request's images may span several batches when ``n`` exceeds ``max_batch_images``;
- the queue is bounded in images; past the bound a request is refused at once;
- an abandoned request (deadline passed, client gone) leaves the queue and is never computed;
- batches fill: when the executor frees up right after a batch (back-to-back load), the
  batch's own group waits a short fill window (a fraction of a batch's time) while it holds
  fewer requests than were queued in it when the batch ended plus those the batch answered,
  since under steady load the clients just answered come straight back. An idle executor still
  starts a lone request at once, and a client sending one request after another is its own
  fill target, so it never waits; the one request that does is the first lone one after a
  concurrent batch, which waits out the window for clients that do not come back (at most 1 s;
  1.37-1.49 s against 0.85 s on an H200, docs/benchmarks.md §4.12);
- with static-shape compiled graphs (``buckets``), a batch is either every waiting image (padded
  up to the next bucket by the executor) or the largest bucket they fill, whichever the cost
  model says is cheaper per real image (:mod:`inference.buckets`);
- admission is by cost (pixels × steps, see :mod:`inference.cost`): a request that could not
  finish inside the request timeout, alone or behind the queue, is refused at once with an
  estimate of when to retry, rather than admitted to time out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from concurrent.futures import Future

from inference.batch import Batch, BatchKey, Slot, Ticket
from inference.buckets import BatchBuckets
from inference.cost import CostModel, image_megapixels, image_units
from inference.encoder import EncoderPool
from inference.errors import InferenceError, InvalidRequest, QueueFull, ShuttingDown
from inference.executor import BatchOutcome, Executor
from inference.request import GenerationResult, Timings, image_seed
from observability.metrics import Metrics

logger = logging.getLogger(__name__)

# The automatic fill window's ceiling. On an H200 at 1024² a batch of eight PNG responses
# (~4 MB of base64 each) took its clients longer than 250 ms to read and answer, so batches after
# a full one started half empty (mean 4.8 of 8). The window only runs while fewer requests wait
# than the batch's fill target (see Scheduler._fill_deadline), so a steady load of any size
# never waits for it.
FILL_CAP_S = 1.0


class Scheduler:
    """Asyncio side of the engine: admission, grouping, dispatch and delivery."""

    def __init__(
        self,
        executor: Executor,
        encoder: EncoderPool,
        metrics: Metrics,
        *,
        model: str,
        max_batch_images: int = 8,
        max_wait_ms: float = 0.0,
        max_queue_images: int = 64,
        request_timeout_s: float = 300.0,
        batch_fill_ms: float | None = None,
        cost: CostModel | None = None,
        buckets: BatchBuckets | None = None,
    ) -> None:
        self.executor = executor
        self.encoder = encoder
        self.metrics = metrics
        self.model = model
        self.max_batch_images = max_batch_images
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue_images = max_queue_images
        self.request_timeout_s = request_timeout_s
        # None: automatic (a fifth of a recent batch's time, at most 1 s); 0 turns it off.
        self.batch_fill = None if batch_fill_ms is None else batch_fill_ms / 1000.0
        self.cost = cost or CostModel()
        self.buckets = buckets
        self._queued_units = 0.0
        self._running_units = 0.0
        self._queued_megapixels = 0.0
        self._running_megapixels = 0.0
        # The last batch's group and how many requests it may wait for: see _fill_deadline.
        self._fill_key: BatchKey | None = None
        self._fill_requests = 0
        self._last_batch_end = 0.0
        self._last_batch_seconds = 0.0
        self._groups: dict[BatchKey, deque[Ticket]] = {}
        self._queued_images = 0
        self._queued_requests = 0
        self._wakeup = asyncio.Event()
        self._running: Batch | None = None
        self._accepting = True
        self._task: asyncio.Task[None] | None = None
        self._encoding: set[Future] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the dispatch loop."""
        self._task = asyncio.create_task(self._loop(), name="imagegate-scheduler")

    @property
    def queued_images(self) -> int:
        """Images waiting for a batch."""
        return self._queued_images

    @property
    def queued_requests(self) -> int:
        """Requests with at least one image waiting for a batch."""
        return self._queued_requests

    @property
    def busy(self) -> bool:
        """True while a batch is on the executor."""
        return self._running is not None

    async def drain(self, timeout: float) -> None:
        """Stop admitting; finish running and queued work for up to ``timeout`` seconds; fail the rest.

        At the deadline the running batch is stopped too (at its next denoising step), its
        requests failed as shutting down: an orchestrator's grace period is sized from this
        timeout, and a long batch must not outlive it and be killed mid-write.
        """
        self._accepting = False
        deadline = time.monotonic() + timeout
        while (self._queued_images or self._running) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for group in list(self._groups.values()):
            for ticket in list(group):
                self._fail(ticket, ShuttingDown(
                    "the server is shutting down and this request was not started; retry it"
                ))
        running = self._running
        if running is not None:
            # Failed tickets make the runner stop at its next step (Batch.all_abandoned).
            for ticket in running.tickets():
                self._fail(ticket, ShuttingDown(
                    "the server is shutting down and stopped this request before it finished; "
                    "retry it"))
        while self._running is not None:
            await asyncio.sleep(0.05)
        while self._encoding:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # -- admission ---------------------------------------------------------------------------

    def has_room(self, images: int) -> bool:
        """True when ``images`` more would fit under ``max_queue_images`` right now."""
        return self._queued_images + images <= self.max_queue_images

    def retry_after(self, images: int) -> float:
        """Seconds until ``images`` queued images have run, from the recent rate (≥ 1 s)."""
        if not self.cost.known or images <= 0:
            return 1.0
        count = max(self._queued_images, 1)
        per_image = self.cost.seconds(self._queued_megapixels / count, self._queued_units / count)
        return max(1.0, min(600.0, images * per_image))

    def _queued_batches(self) -> int:
        return sum(math.ceil(sum(len(t.pending) for t in g) / self.max_batch_images)
                   for g in self._groups.values())

    def submit(self, ticket: Ticket) -> None:
        """Queue ``ticket`` or raise :class:`QueueFull` / :class:`ShuttingDown` at once."""
        if not self._accepting:
            raise ShuttingDown("the server is shutting down and accepts no new requests")
        n = len(ticket.pending)
        if n > self.max_queue_images:
            raise InvalidRequest(
                f"n must be at most {self.max_queue_images} (the server's queue size), got {n}",
                field="n")
        units = image_units(ticket.request) * n
        megapixels = image_megapixels(ticket.request) * n
        batches = math.ceil(n / self.max_batch_images)
        own = self.cost.seconds(megapixels, units, batches) if self.cost.known else 0.0
        # A job's limit is what its preparation (fetching inputs) left of its execution timeout.
        limit, limit_text = ((self.request_timeout_s, f"{self.request_timeout_s:g}s request timeout")
                             if ticket.time_limit_s is None
                             else (ticket.time_limit_s,
                                   f"{ticket.time_limit_s:.4g}s left of its execution timeout"))
        if own > limit:
            raise InvalidRequest(
                f"this request would take about {own:.0f}s on this server, more than the "
                f"{limit_text}; ask for fewer or smaller images "
                "or fewer steps", field="n" if n > 1 else "steps")
        if not self.has_room(n):
            raise QueueFull(
                f"the queue is full ({self._queued_images} of {self.max_queue_images} images "
                "waiting); retry shortly",
                retry_after=self.retry_after(self._queued_images + n - self.max_queue_images),
            )
        if self.cost.known:
            ahead = self.cost.seconds(self._queued_megapixels + self._running_megapixels,
                                      self._queued_units + self._running_units,
                                      self._queued_batches())
            # A caller with its own execution limit does not count queue time against it.
            if ticket.time_limit_s is None and ahead + own > self.request_timeout_s:
                raise QueueFull(
                    f"the queue holds about {ahead:.0f}s of work; this request could not finish "
                    f"within the {self.request_timeout_s:g}s request timeout; retry later",
                    retry_after=max(1.0, ahead + own - self.request_timeout_s),
                )
        ticket.units = units
        self._groups.setdefault(ticket.key, deque()).append(ticket)
        self._queued_images += n
        self._queued_units += units
        self._queued_megapixels += megapixels
        self._queued_requests += 1
        self._publish_depth()
        self._wakeup.set()

    def abandon(self, ticket: Ticket) -> None:
        """Nobody waits for ``ticket`` any more: drop its queued images; running ones are discarded."""
        if ticket.abandoned:
            return
        ticket.abandoned = True
        self._dequeue(ticket)

    # -- internals ---------------------------------------------------------------------------

    def _dequeue(self, ticket: Ticket) -> None:
        group = self._groups.get(ticket.key)
        if group is not None and ticket in group:
            group.remove(ticket)
            self._queued_images -= len(ticket.pending)
            self._queued_units -= ticket.units * len(ticket.pending) / max(ticket.request.n, 1)
            self._queued_megapixels -= image_megapixels(ticket.request) * len(ticket.pending)
            self._queued_requests -= 1
            ticket.pending.clear()
            if not group:
                del self._groups[ticket.key]
            self._publish_depth()

    def _publish_depth(self) -> None:
        self.metrics.queue_images.set(self._queued_images)
        self.metrics.queue_requests.set(self._queued_requests)

    def _oldest_group(self) -> BatchKey | None:
        oldest: tuple[float, BatchKey] | None = None
        for key, group in self._groups.items():
            head = group[0].enqueued_at
            if oldest is None or head < oldest[0]:
                oldest = (head, key)
        return oldest[1] if oldest else None

    def _group_images(self, key: BatchKey) -> int:
        return sum(len(t.pending) for t in self._groups.get(key, ()))

    async def _wait_for_work(self) -> BatchKey:
        while True:
            key = self._oldest_group()
            if key is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._group_images(key) < self.max_batch_images:
                ready_at = max(self._groups[key][0].enqueued_at + self.max_wait,
                               self._fill_deadline(key))
                delay = ready_at - time.monotonic()
                if delay > 0:
                    self._wakeup.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), delay)
                    continue
            return key

    def _fill_deadline(self, key: BatchKey) -> float:
        """Until when the next batch of ``key`` may wait for more requests (0: start now).

        Only right after a batch (back-to-back load), only for that batch's own group (the
        clients it answered come back to it, not to another), never while draining (nobody
        comes back), and only while the group holds fewer requests than its fill target: the
        requests queued in it when that batch ended plus those the batch answered, whose clients
        (under a closed-loop load) come straight back and would otherwise miss this batch and
        wait a whole batch time. Counting the answered requests on top of the queued ones is
        what keeps one straggler from locking a load of eight into batches of seven: on an H200
        the clients of the batch after a lone first request came back to find that straggler
        queued, seven of eight was "as many as last time", and every later batch started one
        short (docs/benchmarks.md §4.9). Requests, not images: a client alternating n=4 and n=1
        is back in full with its one image.
        """
        if (key != self._fill_key or not self._last_batch_end or not self._accepting
                or len(self._groups.get(key, ())) >= self._fill_requests):
            return 0.0
        window = self.batch_fill
        if window is None:
            window = min(FILL_CAP_S, 0.2 * self._last_batch_seconds)
        return self._last_batch_end + window

    def _batch_limit(self, key: BatchKey) -> int:
        """How many images the next batch of ``key`` takes."""
        if self.buckets is None:
            return self.max_batch_images
        waiting = self._group_images(key)
        seconds = None
        if self.cost.known:
            head = self._groups[key][0].request
            mp, units = image_megapixels(head), image_units(head)
            seconds = lambda k: self.cost.seconds(mp * k, units * k)  # noqa: E731
        return self.buckets.choose(waiting, seconds)

    def _take_batch(self, key: BatchKey) -> Batch:
        group = self._groups[key]
        slots: list[Slot] = []
        now = time.monotonic()
        limit = self._batch_limit(key)
        while group and len(slots) < limit:
            ticket = group[0]
            room = limit - len(slots)
            take, ticket.pending = ticket.pending[:room], ticket.pending[room:]
            slots.extend(Slot(ticket, i) for i in take)
            self._queued_images -= len(take)
            taken_units = ticket.units * len(take) / max(ticket.request.n, 1)
            self._queued_units -= taken_units
            self._running_units += taken_units
            taken_mp = image_megapixels(ticket.request) * len(take)
            self._queued_megapixels -= taken_mp
            self._running_megapixels += taken_mp
            if ticket.started_at is None:
                ticket.started_at = now
                self.metrics.queue_wait.observe(now - ticket.enqueued_at)
            if not ticket.pending:
                group.popleft()
                self._queued_requests -= 1
        if not group:
            del self._groups[key]
        if not self._groups:
            self._queued_units = self._queued_megapixels = 0.0  # no drift past an empty queue
        self._publish_depth()
        return Batch(key, slots)

    async def _loop(self) -> None:
        while True:
            key = await self._wait_for_work()
            batch = self._take_batch(key)
            self._running = batch
            try:
                outcome = await self.executor.run(batch)
            except Exception:
                logger.exception("executor failed outside the pipeline call")
                outcome = BatchOutcome(failures=[
                    (t, InferenceError("internal error running the batch")) for t in batch.tickets()
                ])
            finally:
                self._running = None
                self._running_units = self._running_megapixels = 0.0
            self._last_batch_end = time.monotonic()
            answered = sum(1 for t in batch.tickets() if not t.pending and not t.abandoned)
            self._fill_key = batch.key
            self._fill_requests = len(self._groups.get(batch.key, ())) + answered
            if outcome.calls:
                self._last_batch_seconds = sum(t.total for _, t in outcome.calls)
            self._deliver(batch, outcome)

    def _deliver(self, batch: Batch, outcome: BatchOutcome) -> None:
        for size, times in outcome.calls:
            self.metrics.batches.inc()
            self.metrics.images.inc(size)
            if times.padded:
                self.metrics.padded_images.inc(times.padded)
            self.metrics.batch_size.observe(size)
            self.metrics.batch_seconds.observe(times.total)
            if times.steps:
                self.metrics.step_seconds.observe(times.denoise / times.steps)
            self.metrics.decode_seconds.observe(times.decode)
        if outcome.oom_splits:
            self.metrics.oom_splits.inc(outcome.oom_splits)
        if outcome.eager_calls:
            self.metrics.eager_batches.inc()
        if outcome.compiles:
            self.metrics.compiles.labels("request").inc(outcome.compiles)
        else:
            first = batch.slots[0].ticket.request if batch.slots else None
            for size, times in outcome.calls:
                if first is not None:
                    computed = size + times.padded  # padding costs like real images
                    self.cost.observe(image_megapixels(first) * computed,
                                      image_units(first) * computed, times.total)
        total = sum(t.total for _, t in outcome.calls)
        for ticket, exc in outcome.failures:
            self._fail(ticket, exc)
        # Executor time is shared out by images, so per-client accounting adds up to wall time.
        share: dict[int, int] = {}
        for slot in batch.slots:
            share[id(slot.ticket)] = share.get(id(slot.ticket), 0) + 1
        for ticket in batch.tickets():
            ticket.inference_seconds += total * share[id(ticket)] / len(batch.slots)
            ticket.batch_images = max(ticket.batch_images, len(batch.slots))
        ready: list[tuple[Ticket, int]] = []
        for slot, array in outcome.images:
            ticket = slot.ticket
            if ticket.abandoned or ticket.failed:
                continue
            ticket.outputs[slot.index] = array
            if ticket.encode_started is None:
                ticket.encode_started = time.monotonic()
            ready.append((ticket, slot.index))
        if ready:
            self._encode(ready)

    def _fail(self, ticket: Ticket, exc: InferenceError) -> None:
        if ticket.failed:
            return
        self._dequeue(ticket)
        ticket.failed = True
        if not ticket.future.done():
            ticket.future.set_exception(exc)

    def _encode(self, work: list[tuple[Ticket, int]]) -> None:
        """Encode every image of a finished batch at once, one pool task per image.

        Images are encoded as soon as their batch is decoded, in parallel across the pool, while
        the executor already runs the next batch; a request resolves when its last image is in.
        """
        loop = asyncio.get_running_loop()
        for ticket, index in work:
            req = ticket.request
            item = (ticket.outputs.pop(index), req.output_format, req.output_compression,
                    image_seed(ticket.seed, index), req.want_base64)
            future = self.encoder.submit_many([item])
            self._encoding.add(future)
            future.add_done_callback(
                lambda f, part=[(ticket, index)]: loop.call_soon_threadsafe(self._encoded, part, f))

    def _encoded(self, part: list[tuple[Ticket, int]], future: Future) -> None:
        """An encode task finished (on the event loop): store images, resolve full tickets."""
        self._encoding.discard(future)
        exc = future.exception()
        if exc is not None:
            logger.error("encoding failed", exc_info=exc)
            for ticket, _ in part:
                self._fail(ticket, InferenceError(f"encoding the image failed: {type(exc).__name__}"))
            return
        for (ticket, index), (image, seconds) in zip(part, future.result(), strict=True):
            self.metrics.encode_seconds.labels(ticket.request.output_format).observe(seconds)
            if ticket.failed or ticket.abandoned:
                continue
            ticket.encoded[index] = image
            if len(ticket.encoded) == ticket.request.n:
                self._resolve(ticket)

    def _resolve(self, ticket: Ticket) -> None:
        req = ticket.request
        now = time.monotonic()
        self.metrics.e2e_seconds.observe(now - ticket.enqueued_at)
        result = GenerationResult(
            images=[ticket.encoded[i] for i in range(req.n)],
            seed=ticket.seed,
            prompt=ticket.prompt,
            negative_prompt=req.negative_prompt,
            prompt_tokens=ticket.prompt_tokens,
            model=self.model,
            timings=Timings(
                queued=(ticket.started_at or now) - ticket.enqueued_at,
                inference=ticket.inference_seconds,
                encode=now - (ticket.encode_started or now),
                total=now - ticket.enqueued_at,
                batch_images=ticket.batch_images,
            ),
        )
        ticket.outputs.clear()
        if not ticket.future.done():
            ticket.future.set_result(result)
