"""Which torch.compile recipe pays on this GPU? Bare pipeline, 1024², 20 steps, batch 8.

Variants, in one process on the same weights: eager; regional (transformer blocks) with static
shapes; whole UNet + VAE decoder with static shapes (the PyTorch SDXL recipe). Each prints one
JSON line to $OUT/variants.jsonl as soon as it is measured, with its compile time.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from bench import gpu_sdxl

OUT = Path(os.environ.get("OUT") or "/tmp/gpuout")
OUT.mkdir(parents=True, exist_ok=True)
T0 = time.perf_counter()


def emit(**kw):
    kw["t"] = round(time.perf_counter() - T0, 1)
    print(json.dumps(kw), flush=True)
    with open(OUT / "variants.jsonl", "a") as f:
        f.write(json.dumps(kw) + "\n")


def run(pipe, batch, steps):
    gens = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.inference_mode():
        pipe(prompt=["a lighthouse at dusk"] * batch, generator=gens, num_inference_steps=steps,
             width=1024, height=1024, guidance_scale=5.0, output_type="pt")
    torch.cuda.synchronize()
    return time.perf_counter() - t


def measure(name, pipe):
    t = time.perf_counter()
    run(pipe, 8, 2)
    warm = time.perf_counter() - t
    b8 = run(pipe, 8, 20)
    emit(variant=name, compile_and_first_s=round(warm, 1), b8_s=round(b8, 3),
         img_s=round(8 / b8, 3))


def main():
    import torch._inductor.config as ic

    pipe = gpu_sdxl.build(torch.bfloat16)
    emit(variant="build", gpu=torch.cuda.get_device_name(0), torch=torch.__version__)
    measure("eager", pipe)
    pipe.fuse_qkv_projections()
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    measure("eager+fused_qkv+channels_last", pipe)
    ic.conv_1x1_as_mm = True
    pipe.unet.compile_repeated_blocks(fullgraph=True, dynamic=False)
    measure("blocks_static", pipe)
    for m in pipe.unet.modules():  # undo the regional compile before compiling the whole UNet
        if hasattr(m, "_compiled_call_impl"):
            m._compiled_call_impl = None
    torch._dynamo.reset()
    pipe.unet = torch.compile(pipe.unet, fullgraph=True, dynamic=False)
    pipe.vae.decode = torch.compile(pipe.vae.decode, fullgraph=True, dynamic=False)
    measure("full_static", pipe)
    emit(variant="done")


if __name__ == "__main__":
    main()
