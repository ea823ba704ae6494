"""How much arithmetic one SDXL image is: counted FLOPs of the full-size architecture.

Issue 9's speed targets are images per second on one GPU. Dividing them by the work per image
gives the arithmetic rate the GPU must sustain, which says how far from the hardware's peak a
target sits, and how much of it a measured figure already uses. This counts that work on the
full SDXL base architecture (``bench.gpu_sdxl``, built on torch's ``meta`` device: no weights,
no memory, runs on any CPU in seconds) with ``torch.utils.flop_counter.FlopCounterMode``, which
counts a multiply-add as two FLOPs and attention as its two batched matmuls.

Per image at each size: the UNet once per step at batch 2 (classifier-free guidance runs the
conditional and unconditional halves together), the VAE decoder once, and the two text encoders
once for the prompt (SDXL's pipeline zeroes an empty negative prompt instead of encoding it; a
negative prompt doubles this small share). Scheduler arithmetic is not counted: it is
elementwise work on one latent per step. One JSON line per size on stdout and in
``$OUT/flops.jsonl``::

    python -m bench.flops --sizes 1024,768 --steps 20
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import lines

# Text-encoder sequence length (CLIP's 77 tokens) and the SDXL UNet's pooled-text width.
TOKENS = 77
POOLED = 1280


def counted(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """FLOPs of one call of ``fn``, in total and by aten op."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops(), by_op


def per_image(pipe: Any, size: int, steps: int) -> dict[str, Any]:
    """Counted FLOPs of one ``size``² image with CFG at ``steps`` steps, by component."""
    latent = size // pipe.vae_scale_factor
    dtype = pipe.unet.dtype

    def meta(*shape: int) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dtype, device="meta")

    unet, unet_ops = counted(lambda: pipe.unet(
        meta(2, 4, latent, latent), torch.zeros(2, device="meta"),
        encoder_hidden_states=meta(2, TOKENS, pipe.unet.config.cross_attention_dim),
        added_cond_kwargs={"text_embeds": meta(2, POOLED), "time_ids": meta(2, 6)}))
    decode, _ = counted(lambda: pipe.vae.decode(meta(1, 4, latent, latent)))
    ids = torch.zeros(1, TOKENS, dtype=torch.long, device="meta")
    text, _ = counted(lambda: (pipe.text_encoder(ids), pipe.text_encoder_2(ids)))
    total = steps * unet + decode + text
    return {
        "size": size, "steps": steps, "unet_step_tflop": round(unet / 1e12, 3),
        "unet_tflop": round(steps * unet / 1e12, 2), "decode_tflop": round(decode / 1e12, 3),
        "text_tflop": round(text / 1e12, 4), "image_tflop": round(total / 1e12, 2),
        "unet_share": round(steps * unet / total, 4),
        "unet_by_op_tflop": {op: round(n / 1e12, 3) for op, n in
                             sorted(unet_ops.items(), key=lambda kv: -kv[1])},
    }


def main() -> None:
    """Count each size and emit a line per size."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1024,768",
                        help="square image sides, comma-separated (default 1024,768)")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    from bench import gpu_sdxl

    pipe = gpu_sdxl.build(torch.bfloat16, device="meta")
    params = sum(p.numel() for p in pipe.unet.parameters())
    for size in (int(s) for s in args.sizes.split(",")):
        lines.emit("flops.jsonl", {
            **per_image(pipe, size, args.steps), "unet_params": params,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")})


if __name__ == "__main__":
    main()
