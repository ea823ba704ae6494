"""Typed engine errors. Each dialect maps these to its own error envelope in one place."""

from __future__ import annotations


class InferenceError(Exception):
    """Base class of every error the engine raises towards the gateway."""

    reason = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(InferenceError):
    """The request cannot be run as given; ``field`` names the canonical field at fault."""

    reason = "validation"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class UnknownSampler(InvalidRequest):
    """The sampler name is not in the registry; the message lists the valid names."""

    def __init__(self, name: str, valid: list[str]) -> None:
        super().__init__(
            f"unknown sampler {name!r}; valid samplers: {', '.join(valid)}", field="sampler"
        )
        self.name = name
        self.valid = valid


class UnknownStyle(InvalidRequest):
    """The style name is not in the style table."""

    def __init__(self, name: str, valid: list[str]) -> None:
        super().__init__(f"unknown style {name!r}; valid styles: {', '.join(valid)}", field="style")


class FeatureUnavailable(InvalidRequest):
    """The request needs something this server was not started with (a refiner, a LoRA…)."""


class QueueFull(InferenceError):
    """Admission refused: the queue already holds ``max_queue_images`` images."""

    reason = "overload"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(InferenceError):
    """The request did not finish before its deadline and was dropped."""

    reason = "timeout"


class Cancelled(InferenceError):
    """The request was cancelled (client went away, or an explicit cancel)."""

    reason = "cancelled"


class NotReady(InferenceError):
    """The model is still loading or warming up."""

    reason = "not_ready"

    def __init__(self, message: str, retry_after: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(NotReady):
    """The server is draining and takes no new work; queued work it could not finish lands here."""

    reason = "shutdown"


class OutOfMemory(InferenceError):
    """The accelerator ran out of memory even for this request on its own."""

    reason = "oom"


class GenerationFailed(InferenceError):
    """The pipeline raised something unexpected; the message is safe to show a client."""

    reason = "internal"
