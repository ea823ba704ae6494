"""Opt-in weight/activation quantization of the UNet (``--quantize fp8``).

FP8 uses torchao's float8 dynamic-activation, float8-weight recipe with per-row scales: the
UNet's linear layers run as FP8 matmuls on Hopper-class tensor cores (compute capability 8.9 or
newer), convolutions stay in bf16. It is refused, with a clear message, on hardware without FP8
matmuls, on the CPU, and when torchao is not installed (it is an optional extra: ``pip install
imagegate[fp8]``). Quality against bf16 is measured by ``bench/gpu_e2e.py`` (PSNR and mean
absolute pixel difference on fixed seeds) and recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

logger = logging.getLogger(__name__)

Quantize = Literal["none", "fp8"]
QUANTIZE_CHOICES: tuple[str, ...] = ("none", "fp8")


class QuantizeUnavailable(RuntimeError):
    """The requested quantization cannot run here; the message says why."""


def check_fp8(device: str) -> None:
    """Raise :class:`QuantizeUnavailable` unless FP8 matmuls can run on ``device``."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise QuantizeUnavailable(
            "--quantize fp8 needs an NVIDIA GPU with FP8 tensor cores (Ada or Hopper, compute "
            f"capability 8.9+); this server runs on {device}")
    index = torch.device(device).index or 0
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(index)
        raise QuantizeUnavailable(
            f"--quantize fp8 needs FP8 tensor cores (compute capability 8.9+); {name} has "
            f"{major}.{minor}. Serve in bf16 (drop --quantize).")
    try:
        import torchao  # noqa: F401
    except ImportError as exc:
        raise QuantizeUnavailable(
            "--quantize fp8 needs the torchao package: pip install 'imagegate[fp8]'") from exc


def quantize_unet(pipe: Any, mode: Quantize, device: str) -> None:
    """Quantize ``pipe.unet`` in place (before compile); a no-op for ``none``."""
    if mode == "none":
        return
    if mode != "fp8":
        raise QuantizeUnavailable(f"unknown --quantize {mode!r}; choose one of "
                                  f"{', '.join(QUANTIZE_CHOICES)}")
    check_fp8(device)
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        PerRow,
        quantize_,
    )

    def big_linear(module: Any, fqn: str) -> bool:
        # Small projections (time embeddings) gain nothing and lose precision.
        import torch

        return (isinstance(module, torch.nn.Linear) and module.in_features >= 512
                and module.out_features >= 512)

    quantize_(pipe.unet, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=big_linear)
    logger.info("UNet linear layers quantized to FP8 (torchao, per-row scales)")
