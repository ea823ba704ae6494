"""Which kernel runs SDXL's attention (``--attention-backend``).

``torch.nn.functional.scaled_dot_product_attention`` picks its CUDA kernel by a fixed priority:
FlashAttention, then memory-efficient, then math, then cuDNN. Because math accepts every input,
the cuDNN kernels are never chosen unless asked for, although on Hopper (H100/H200) they are
reported 1.7-2.3x faster than FlashAttention-2 at the same accuracy (transformers PR #48163,
tritonbench issue #41). Attention over 4096 and 1024 tokens is a large share of an SDXL UNet
step at 1024², so the choice matters for issue 9's throughput goals.

The option sets a *preference*, not a restriction: the chosen backend moves to the front of
torch's priority order and every other backend stays enabled, so a shape the preferred kernel
declines (torch's eligibility checks) falls back exactly as before. A shape it accepts but then
fails to plan for raises instead (cuDNN's "no valid execution plans", reported upstream for some
shapes): warm-up runs every warmed shape before ``/ready``, so such a failure stops the start
rather than a request, and only an unwarmed shape served eagerly could meet it. It is process-wide (torch keeps one order) and must
be set before compiling: the compiled graph bakes in the kernel chosen while tracing, which is
why the compile cache key includes it. ``auto`` leaves torch's order alone.
"""

from __future__ import annotations

import logging
from typing import Literal

logger = logging.getLogger(__name__)

AttentionBackend = Literal["auto", "cudnn", "flash", "efficient", "math"]
ATTENTION_CHOICES: tuple[str, ...] = ("auto", "cudnn", "flash", "efficient", "math")
# torch.nn.attention.SDPBackend member names.
_SDP_NAMES = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION",
              "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
_CUDA_ONLY = ("cudnn", "flash", "efficient")


class AttentionUnavailable(RuntimeError):
    """The requested attention backend cannot run here; the message says why."""


def prefer_attention_backend(backend: str, device: str) -> list[str]:
    """Move ``backend`` to the front of torch's SDPA priority order; returns the new order.

    Raises :class:`AttentionUnavailable` for an unknown name, a CUDA kernel on a non-CUDA
    device, or a kernel this torch build lacks.
    """
    import torch
    from torch.nn.attention import SDPBackend

    if backend not in ATTENTION_CHOICES:
        raise AttentionUnavailable(f"unknown --attention-backend {backend!r}; choose one of "
                                   f"{', '.join(ATTENTION_CHOICES)}")
    current = [SDPBackend(int(v)) for v in torch._C._get_sdp_priority_order()]
    if backend == "auto":
        return [b.name for b in current]
    if backend in _CUDA_ONLY and not device.startswith("cuda"):
        raise AttentionUnavailable(f"--attention-backend {backend} is a CUDA kernel; this server "
                                   f"runs on {device}. Use auto (or math).")
    if backend == "cudnn" and not torch.backends.cudnn.is_available():
        raise AttentionUnavailable("--attention-backend cudnn: this torch build has no cuDNN")
    if backend == "flash" and not torch.backends.cuda.is_flash_attention_available():
        raise AttentionUnavailable("--attention-backend flash: this torch build has no "
                                   "FlashAttention kernels")
    preferred = getattr(SDPBackend, _SDP_NAMES[backend])
    order = [preferred, *(b for b in current if b != preferred)]
    torch._C._set_sdp_priority_order([int(b) for b in order])
    # Preference only: make sure the preferred kernel is not switched off elsewhere.
    getattr(torch.backends.cuda, {"cudnn": "enable_cudnn_sdp", "flash": "enable_flash_sdp",
                                  "efficient": "enable_mem_efficient_sdp",
                                  "math": "enable_math_sdp"}[backend])(True)
    names = [b.name for b in order]
    logger.info("attention backend preference: %s", " > ".join(names))
    return names
