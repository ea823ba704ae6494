"""The executor: one thread per device that owns the pipeline and runs one batch at a time.

diffusers pipelines and schedulers are not thread-safe, so nothing else ever touches the runner.
The async side awaits :meth:`Executor.run` without blocking the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from inference.batch import Batch, Slot, Ticket
from inference.buckets import BatchBuckets
from inference.compile import CompileWatch
from inference.errors import Cancelled, GenerationFailed, InferenceError, OutOfMemory
from inference.runner import BatchRunner, StepTimes

logger = logging.getLogger(__name__)

T = TypeVar("T")


def is_oom(exc: BaseException) -> bool:
    """True for an accelerator out-of-memory error (torch's type, or its message on old builds)."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _bind_device(device: str) -> None:
    """Make ``device`` the executor thread's current CUDA device (torch keeps one per thread).

    Without it, device-less calls on that thread (a stream wait, CUDA-graph pools, anything
    that takes the current device) would use GPU 0 when the model lives on ``cuda:1``.
    """
    if device.startswith("cuda"):
        import torch

        index = torch.device(device).index
        # Plain "cuda" means the current device (0), and set_device refuses a device with no
        # index: only an explicit cuda:N needs binding.
        if index is not None:
            torch.cuda.set_device(index)


def _free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class BatchOutcome:
    """What came back from one dispatched batch, possibly run as several smaller calls."""

    images: list[tuple[Slot, np.ndarray]] = field(default_factory=list)
    failures: list[tuple[Ticket, InferenceError]] = field(default_factory=list)
    calls: list[tuple[int, StepTimes]] = field(default_factory=list)
    oom_splits: int = 0
    # torch.compile graphs compiled while this batch ran (should be 0 after warm-up).
    compiles: int = 0
    # Calls of compiled code in this batch that no warmed graph matched, so ran eagerly
    # (LoRA, ControlNet, an unwarmed size...): correct, but at eager speed.
    eager_calls: int = 0


class Executor:
    """Runs batches on a single dedicated thread."""

    def __init__(self, runner: BatchRunner, *, name: str = "imagegate-executor",
                 watch: CompileWatch | None = None, buckets: BatchBuckets | None = None,
                 device: str = "cpu") -> None:
        self.runner = runner
        self.watch = watch or CompileWatch(enabled=False)
        # Static-shape graphs: every call is padded up to one of these batch sizes.
        self.buckets = buckets
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name,
                                          initializer=_bind_device, initargs=(device,))

    async def run(self, batch: Batch, *, warmup: bool = False) -> BatchOutcome:
        """Run ``batch`` on the executor thread and return what each slot got.

        Outside warm-up the batch runs under the compile watch's serving stance: whatever the
        warmed graphs do not cover runs eagerly rather than compiling on a user's request.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._run_watched, batch, warmup)

    def _run_watched(self, batch: Batch, warmup: bool) -> BatchOutcome:
        before, missed = self.watch.count(), self.watch.misses()
        if warmup:
            outcome = self._run_sync(batch)
        else:
            with self.watch.serving():
                outcome = self._run_sync(batch)
        outcome.compiles = self.watch.count() - before
        outcome.eager_calls = self.watch.misses() - missed
        if outcome.compiles:
            log = logger.info if warmup else logger.warning
            log("torch.compile: %d graph(s) compiled %s for %dx%d batch %d", outcome.compiles,
                "in warm-up" if warmup else "ON THE REQUEST PATH", batch.key.width,
                batch.key.height, len(batch.slots))
        if outcome.eager_calls:
            logger.info("torch.compile: %d call(s) matched no warmed graph and ran eagerly for "
                        "%dx%d batch %d%s", outcome.eager_calls, batch.key.width,
                        batch.key.height, len(batch.slots),
                        " (LoRA)" if batch.key.loras else "")
        return outcome

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the executor thread, between batches (the one thread the pipeline has)."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn)

    def shutdown(self) -> None:
        """Stop the thread once the running batch (if any) is done."""
        self._thread.shutdown(wait=True)

    def _run_sync(self, batch: Batch) -> BatchOutcome:
        outcome = BatchOutcome()
        for ticket in batch.tickets():
            if not ticket.prompt_tokens:
                ticket.prompt_tokens = self.runner.count_tokens(
                    ticket.prompt, ticket.request.negative_prompt
                )
        self._run_split(batch, outcome)
        return outcome

    def _run_split(self, batch: Batch, outcome: BatchOutcome) -> None:
        """Run ``batch``; on OOM retry it as two halves, failing only single images that still OOM."""
        if batch.all_abandoned():
            return
        if self.buckets is not None:
            batch.pad_to = self.buckets.fit(len(batch.slots))
        try:
            arrays, times = self.runner.run(batch)
        except Cancelled:
            return
        except InferenceError as exc:
            outcome.failures.extend((t, exc) for t in batch.tickets())
            return
        except Exception as exc:
            if is_oom(exc):
                _free_accelerator_memory()
                if len(batch.slots) == 1:
                    msg = (f"out of accelerator memory generating one {batch.key.width}x"
                           f"{batch.key.height} image; try a smaller size")
                    outcome.failures.append((batch.slots[0].ticket, OutOfMemory(msg)))
                    return
                outcome.oom_splits += 1
                half = len(batch.slots) // 2
                logger.warning("out of memory on a batch of %d images; retrying as %d + %d",
                               len(batch.slots), half, len(batch.slots) - half)
                self._run_split(Batch(batch.key, batch.slots[:half]), outcome)
                self._run_split(Batch(batch.key, batch.slots[half:]), outcome)
                return
            logger.exception("pipeline call failed for a batch of %d images", len(batch.slots))
            err = GenerationFailed(f"image generation failed: {type(exc).__name__}")
            outcome.failures.extend((t, err) for t in batch.tickets())
            return
        outcome.calls.append((len(batch.slots), times))
        outcome.images.extend(zip(batch.slots, arrays, strict=True))
