"""How long dynamo alone takes to trace the whole full-size SDXL UNet: a warm start's floor.

A warm compile cache skips inductor (its FX graph and AOT autograd caches), not dynamo: every
start still traces the compiled function to find the cached graph. This times that trace with
dynamo's ``eager`` backend (no inductor at all) on the full SDXL base UNet with random weights
(``bench.gpu_sdxl.UNET``), bf16, one image with CFG (batch 2) at a small latent, since the trace
does not scale with tensor sizes: the first compiled call minus a plain eager call. One JSON line
on stdout and in ``$OUT/dynamo_trace.jsonl``. Runs on a CPU (about 10 GB of memory) or a GPU::

    python -m bench.dynamo_trace
"""

from __future__ import annotations

import time

import torch

from bench import lines


def main() -> None:
    """Build the UNet, time an eager call, then the first and second dynamo-compiled calls."""
    from diffusers import UNet2DConditionModel

    from bench.gpu_sdxl import UNET

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**UNET).to(torch.bfloat16).eval().requires_grad_(False)
    batch, latent = 2, 8

    def tensor(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=torch.bfloat16, device=device)

    args = (tensor(batch, 4, latent, latent), torch.tensor(500.0, device=device),
            tensor(batch, 77, 2048))
    kwargs = {"added_cond_kwargs": {"text_embeds": tensor(batch, 1280),
                                    "time_ids": tensor(batch, 6)}, "return_dict": False}

    def timed(fn: object) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(*args, **kwargs)  # type: ignore[operator]
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    with torch.inference_mode():
        timed(unet)
        eager_s = timed(unet)
        compiled = torch.compile(unet, backend="eager", fullgraph=True)
        first_s = timed(compiled)
        second_s = timed(compiled)
    lines.emit("dynamo_trace.jsonl", {
        "torch": torch.__version__, "device": device,
        "params": sum(p.numel() for p in unet.parameters()), "eager_call_s": round(eager_s, 2),
        "first_compiled_call_s": round(first_s, 2), "second_compiled_call_s": round(second_s, 2),
        "trace_s": round(first_s - second_s, 1), "date": time.strftime("%Y-%m-%d")})


if __name__ == "__main__":
    main()
