"""cuDNN's convolution autotuner (``--cudnn-benchmark``).

With ``torch.backends.cudnn.benchmark`` on, cuDNN times its convolution algorithms the first time
it meets an input shape and keeps the fastest for that shape. SDXL's UNet and VAE are mostly
convolutions, so the pick matters: on an H200, eager, it took one batch-1 image from 1.387 s to
1.213 s and a batch of 8 from 6.387 s to 6.279 s (one sample each, docs/benchmarks.md §4.7).
The timing itself costs each new shape's first run some time; warm-up pays it for the warmed
shapes before ``/ready``, and an unwarmed size pays it on its first request. Compiled graphs
call cuDNN for their convolutions too, so the setting applies to them as well. Off by default
until a served measurement says it pays; CUDA only.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


class ConvAutotuneUnavailable(RuntimeError):
    """``--cudnn-benchmark`` cannot apply here; the message says why."""


def enable_conv_autotune(device: str) -> None:
    """Turn on cuDNN's convolution autotuner for this process (it is process-wide).

    Raises :class:`ConvAutotuneUnavailable` off CUDA or without cuDNN, rather than ignoring the
    setting: an operator who asked for it should learn that it does nothing here.
    """
    import torch

    if not device.startswith("cuda"):
        raise ConvAutotuneUnavailable(f"--cudnn-benchmark tunes cuDNN's GPU convolutions; this "
                                      f"server runs on {device}. Leave it off.")
    if not torch.backends.cudnn.is_available():
        raise ConvAutotuneUnavailable("--cudnn-benchmark: this torch build has no cuDNN")
    torch.backends.cudnn.benchmark = True
    logger.info("cuDNN convolution autotuner on (each new input shape is timed once)")
