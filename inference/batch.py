"""What the scheduler queues and the executor runs: tickets, image slots and batches."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from inference.request import GenerationRequest, InitImage, Lora, Refine, image_seed

if TYPE_CHECKING:
    from inference.progress import Progress


class ControlKey(msgspec.Struct, frozen=True):
    """The part of a ControlNet unit that must match within a batch (images may differ)."""

    kind: str
    weight: float
    guidance_start: float
    guidance_end: float


class BatchKey(msgspec.Struct, frozen=True):
    """Everything that must be equal for images to share one pipeline call.

    Prompts, negative prompts, seeds, init images, masks, control images and ``n`` may differ
    within a batch; whether there is a mask, and the ControlNet units' kinds and timings, may not.
    """

    model: str
    width: int
    height: int
    steps: int
    sampler: str
    guidance: float
    clip_skip: int | None
    img2img_strength: float | None
    refine: Refine | None
    loras: tuple[Lora, ...]
    inpaint: bool = False
    control: tuple[ControlKey, ...] = ()

    @classmethod
    def of(cls, request: GenerationRequest, model: str, sampler: str) -> BatchKey:
        """The compatibility key of a (validated, normalised) request."""
        return cls(
            model=model,
            width=request.width,
            height=request.height,
            steps=request.steps,
            sampler=sampler,
            guidance=request.guidance,
            clip_skip=request.clip_skip,
            img2img_strength=request.init_image.strength if request.init_image else None,
            refine=request.refine,
            loras=request.loras,
            inpaint=request.init_image is not None and request.init_image.mask is not None,
            control=tuple(
                ControlKey(u.kind, u.weight, u.guidance_start, u.guidance_end)
                for u in request.control
            ),
        )


@dataclass(eq=False)
class Ticket:
    """One admitted request and the state of its images."""

    request: GenerationRequest
    key: BatchKey
    seed: int
    future: asyncio.Future[Any]
    enqueued_at: float = field(default_factory=time.monotonic)
    # Indices of images not yet handed to the executor.
    pending: list[int] = field(default_factory=list)
    # Decoded arrays (H, W, 3 floats in [0, 1]) by image index, filled by the executor.
    outputs: dict[int, Any] = field(default_factory=dict)
    # Encoded images by index, filled on the event loop as encoder chunks finish.
    encoded: dict[int, Any] = field(default_factory=dict)
    encode_started: float | None = None
    abandoned: bool = False
    failed: bool = False
    # Asked to stop early (Engine.interrupt): a batch whose every request asked stops denoising
    # at its next step and decodes what it has, as AUTOMATIC1111's interrupt does.
    stop_early: bool = False
    started_at: float | None = None
    inference_seconds: float = 0.0
    batch_images: int = 0
    prompt_tokens: int = 0
    # Work units of the whole request (inference.cost), for cost-based admission.
    units: float = 0.0
    # What admission measures the request against: None, the request timeout (queue time
    # included); else a caller's own execution limit (an async job's, timed from its start).
    time_limit_s: float | None = None
    # Progress reporting (inference/progress.py): the caller's callback and what it was sent.
    on_progress: Callable[[Progress], None] | None = None
    progress_started: bool = False
    progress_closed: bool = False
    last_progress_at: float = 0.0
    partials_sent: int = 0
    partial_waiters: list[asyncio.Future[Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.pending and not self.outputs:
            self.pending = list(range(self.request.n))

    @property
    def prompt(self) -> str:
        """The prompt that reaches the model (styles already applied)."""
        return self.request.prompt

    @property
    def init_image(self) -> InitImage | None:
        """The request's init image, if any."""
        return self.request.init_image


@dataclass(eq=False)
class Slot:
    """One image of one ticket inside a batch."""

    ticket: Ticket
    index: int

    @property
    def seed(self) -> int:
        """Image ``i`` of a request with seed ``s`` uses ``s + i`` (:func:`image_seed`)."""
        return image_seed(self.ticket.seed, self.index)


@dataclass(eq=False)
class Batch:
    """Image slots that run in one pipeline call."""

    key: BatchKey
    slots: list[Slot]
    # Run as this many slots (static-shape buckets, inference.buckets); 0 or ≤ len(slots): none.
    pad_to: int = 0

    def input_slots(self) -> list[Slot]:
        """The slots whose inputs go into the pipeline call: real ones, then padding.

        Padding repeats the last real slot, so every input list keeps one shape and the real
        slots' prompts, seeds and images are exactly what they would be unpadded.
        """
        extra = self.pad_to - len(self.slots)
        return self.slots + [self.slots[-1]] * extra if extra > 0 and self.slots else self.slots

    def tickets(self) -> list[Ticket]:
        """Distinct tickets in slot order."""
        seen: dict[int, Ticket] = {}
        for slot in self.slots:
            seen.setdefault(id(slot.ticket), slot.ticket)
        return list(seen.values())

    def all_abandoned(self) -> bool:
        """True when nobody is waiting for any image of this batch any more."""
        return all(slot.ticket.abandoned or slot.ticket.failed for slot in self.slots)

    def all_stopping(self) -> bool:
        """True when every request still waiting on this batch asked to stop early."""
        return all(slot.ticket.stop_early or slot.ticket.abandoned or slot.ticket.failed
                   for slot in self.slots)
