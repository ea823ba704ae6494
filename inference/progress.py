"""Progress of running requests: step callbacks, partial images and the live snapshot.

The executor thread reports what the pipeline does (batch started, step done, latents); this
module turns that into per-request :class:`Progress` callbacks on the event loop and a
:class:`ProgressSnapshot` of the running batch. Rules:

- callbacks run on the event loop only (posted with ``call_soon_threadsafe``), never on the
  executor thread, and never after the request was cancelled, failed or answered;
- the first callback of a request is ``started`` (step 0) when its first batch starts;
- step callbacks are rate-limited per request (at most one per ``min_interval`` seconds, plus
  the last step of each pipeline call);
- ``partial_images`` previews come at evenly spaced steps of the base pass, decoded from the
  latents with a linear map (:mod:`inference.preview`) and upscaled/encoded on a preview thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import numpy as np

from inference.batch import Batch, BatchKey, Ticket
from inference.preview import encode_preview, latents_to_rgb
from inference.request import GeneratedImage
from inference.runner import BatchRunner, StepTimes

logger = logging.getLogger(__name__)


class Progress(msgspec.Struct, kw_only=True):
    """One progress report for one request, delivered to ``Engine.generate``'s ``on_progress``.

    ``started`` is True only on the first report, sent with ``step`` 0 when the request's first
    batch starts (queued → running). ``partial``, when set, is preview number ``partial_index``
    (0-based) of ``partial_images``, encoded in the request's output format (base64 too when the
    request wants base64). ``step`` counts denoising steps done out of ``total_steps`` (refiner
    steps included).

    A request whose ``n`` images span several batches gets one ``started`` report, and step
    counts restart with each batch. Previews show the request's first image in its first batch.
    """

    step: int
    total_steps: int
    started: bool = False
    partial_index: int | None = None
    partial: GeneratedImage | None = None


class ProgressSnapshot(msgspec.Struct, kw_only=True):
    """The running batch right now (for AUTOMATIC1111's ``/sdapi/v1/progress`` and the like).

    ``preview`` is the latest cheap preview (PNG) of the batch's first image; previews are made
    only while someone asks for snapshots, so the first call after a quiet spell has none.
    ``eta_seconds`` is None until a step has been timed.
    """

    active: bool
    step: int = 0
    total_steps: int = 0
    fraction: float = 0.0
    eta_seconds: float | None = None
    queued_requests: int = 0
    preview: bytes | None = None


class StepObserver(Protocol):
    """What a runner reports to while a batch runs (executor thread)."""

    def step(self, batch: Batch, step: int, total: int, latents: Any, phase: int) -> None:
        """``step`` of ``total`` of pipeline pass ``phase`` (0 base, 1 refiner) is done."""
        ...


def partial_steps(count: int, total: int) -> list[int]:
    """Steps (1-based) after which each of ``count`` previews is taken, evenly spaced.

    Always ``count`` entries within ``1..total``; with fewer steps than previews some share a step.
    """
    return [max(1, math.ceil(total * (j + 1) / (count + 1))) for j in range(count)]


def expected_steps(key: BatchKey) -> tuple[int, int]:
    """Denoising steps of the first and second pipeline pass, as diffusers will run them.

    The second pass is the refiner after the base; img2img with the refiner is one refiner pass.
    """
    strength = key.img2img_strength
    first = key.steps if strength is None else min(int(key.steps * strength), key.steps)
    refine = key.refine
    if refine is None:
        return first, 0
    if strength is not None:
        return min(int(refine.steps * strength), refine.steps), 0
    if refine.high_noise_frac is not None:
        frac = refine.high_noise_frac
        return max(1, round(key.steps * frac)), max(1, refine.steps - round(refine.steps * frac))
    return first, min(int(refine.steps * refine.strength), refine.steps)


@dataclass
class _Running:
    batch: Batch
    started: float
    base_total: int
    refine_total: int
    done: int = 0
    base_done: int = 0

    @property
    def total(self) -> int:
        return max(self.done, self.base_total + self.refine_total)


class ProgressHub:
    """Bridges executor-thread step reports to event-loop callbacks and snapshots."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        png_level: int = 1,
        min_interval: float = 0.1,
        preview_interval: float = 1.0,
    ) -> None:
        self._loop = loop
        self.png_level = png_level
        self.min_interval = min_interval
        self.preview_interval = preview_interval
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imagegate-preview")
        self._running: _Running | None = None
        self._preview: bytes | None = None
        self._preview_wanted_until = 0.0
        self._last_preview_at = 0.0
        self._seconds_per_step: float | None = None

    # -- executor thread ---------------------------------------------------------------------

    def begin(self, batch: Batch) -> None:
        """A batch starts: remember it and tell its not-yet-started requests (step 0)."""
        base, refine = expected_steps(batch.key)
        run = _Running(batch=batch, started=time.monotonic(), base_total=base, refine_total=refine)
        self._running = run
        self._preview = None
        self._last_preview_at = 0.0  # a new batch gets its first preview at its first step
        for ticket in batch.tickets():
            if ticket.on_progress is None or ticket.progress_started or not _alive(ticket):
                continue
            ticket.progress_started = True
            ticket.last_progress_at = run.started
            self._post(ticket, Progress(step=0, total_steps=run.total, started=True))

    def step(self, batch: Batch, step: int, total: int, latents: Any, phase: int) -> None:
        """A denoising step finished; report it, and make the previews that are due."""
        run = self._running
        if run is None or run.batch is not batch:
            return
        now = time.monotonic()
        run.done += 1
        if phase == 0:
            run.base_done = step
            run.base_total = total
        else:
            run.refine_total = total
        self._seconds_per_step = (now - run.started) / run.done
        done, overall = run.done, run.total
        small: list[np.ndarray] | None = None
        seen: set[int] = set()
        for pos, slot in enumerate(batch.slots):
            ticket = slot.ticket
            if id(ticket) in seen or ticket.on_progress is None or not _alive(ticket):
                continue
            seen.add(id(ticket))
            wanted = ticket.request.partial_images
            if phase == 0 and ticket.partials_sent < wanted:
                due = [j for j, at in enumerate(partial_steps(wanted, total))
                       if j >= ticket.partials_sent and at <= step]
                if due:
                    small = small if small is not None else latents_to_rgb(latents)
                    req = ticket.request
                    job = self._pool.submit(
                        encode_preview, small[pos], width=batch.key.width,
                        height=batch.key.height, fmt=req.output_format,
                        compression=req.output_compression, seed=slot.seed,
                        want_base64=req.want_base64, png_level=self.png_level)
                    for j in due:
                        self._call(self._schedule_partial, ticket, j, done, overall, job)
                    ticket.partials_sent += len(due)
                    ticket.last_progress_at = now
                    continue
            if now - ticket.last_progress_at >= self.min_interval or step == total:
                ticket.last_progress_at = now
                self._post(ticket, Progress(step=done, total_steps=overall))
        if now < self._preview_wanted_until and now - self._last_preview_at >= self.preview_interval:
            self._last_preview_at = now
            small = small if small is not None else latents_to_rgb(latents[:1])
            job = self._pool.submit(encode_preview, small[0], width=batch.key.width,
                                    height=batch.key.height, png_level=self.png_level)
            job.add_done_callback(functools.partial(self._store_preview, run))

    def end(self, batch: Batch) -> None:
        """The batch's pipeline call returned (or raised)."""
        if self._running is not None and self._running.batch is batch:
            self._running = None

    # -- event loop --------------------------------------------------------------------------

    def snapshot(self, queued_requests: int) -> ProgressSnapshot:
        """The running batch now; asking also turns on previews for the next few seconds."""
        now = time.monotonic()
        self._preview_wanted_until = now + 10.0
        run = self._running
        if run is None:
            return ProgressSnapshot(active=False, queued_requests=queued_requests)
        total = run.total
        eta = None
        if self._seconds_per_step is not None:
            elapsed_in_step = now - run.started - self._seconds_per_step * run.done
            eta = max(0.0, self._seconds_per_step * (total - run.done) - max(0.0, elapsed_in_step))
        return ProgressSnapshot(
            active=True,
            step=run.done,
            total_steps=total,
            fraction=min(1.0, run.done / total) if total else 0.0,
            eta_seconds=eta,
            queued_requests=queued_requests,
            preview=self._preview,
        )

    def shutdown(self) -> None:
        """Stop the preview thread after the previews already queued."""
        self._pool.shutdown(wait=True)

    def _post(self, ticket: Ticket, progress: Progress) -> None:
        self._call(self._deliver, ticket, progress)

    def _call(self, fn: Any, *args: Any) -> None:
        # RuntimeError: the loop closed under us (process exit), so nobody is listening.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(fn, *args)

    def _deliver(self, ticket: Ticket, progress: Progress) -> None:
        if ticket.on_progress is None or ticket.progress_closed or not _alive(ticket):
            return
        try:
            ticket.on_progress(progress)
        except Exception:
            logger.exception("a progress callback raised; the request goes on")

    def _schedule_partial(
        self, ticket: Ticket, index: int, step: int, total: int, job: Future[GeneratedImage]
    ) -> None:
        waiter = asyncio.wrap_future(job)
        ticket.partial_waiters.append(waiter)
        waiter.add_done_callback(
            functools.partial(self._partial_done, ticket, index, step, total))

    def _partial_done(
        self, ticket: Ticket, index: int, step: int, total: int, waiter: asyncio.Future
    ) -> None:
        if waiter.cancelled():
            return
        exc = waiter.exception()
        if exc is not None:
            logger.error("encoding a partial image failed", exc_info=exc)
            return
        self._deliver(ticket, Progress(step=step, total_steps=total, partial_index=index,
                                       partial=waiter.result()))

    def _store_preview(self, run: _Running, job: Future[GeneratedImage]) -> None:
        if job.cancelled() or job.exception() is not None:
            return
        if self._running is run:
            self._preview = job.result().data


def _alive(ticket: Ticket) -> bool:
    return not (ticket.abandoned or ticket.failed)


class ObservedRunner:
    """Wraps any :class:`BatchRunner` so batch starts reach the hub (step 0 for every runner).

    A runner with an ``observer`` attribute (the diffusers runner) also gets per-step reports.
    """

    def __init__(self, inner: BatchRunner, hub: ProgressHub) -> None:
        self.inner = inner
        self.hub = hub
        if hasattr(inner, "observer"):
            inner.observer = hub

    @property
    def has_refiner(self) -> bool:
        """Whether the wrapped runner has a refiner."""
        return self.inner.has_refiner

    def run(self, batch: Batch) -> tuple[list[np.ndarray], StepTimes]:
        """Run ``batch`` on the wrapped runner, telling the hub when it starts and ends."""
        self.hub.begin(batch)
        try:
            return self.inner.run(batch)
        finally:
            self.hub.end(batch)

    def count_tokens(self, prompt: str, negative_prompt: str) -> int:
        """Delegates to the wrapped runner."""
        return self.inner.count_tokens(prompt, negative_prompt)
