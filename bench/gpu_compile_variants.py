"""Which torch.compile recipe pays on this GPU? Bare pipeline, 1024², 20 steps, guidance 5.

Each variant runs in its own process (compiled modules cannot be un-compiled cleanly) on the
same random-weight full-size SDXL, compiled by the server's own code (``inference.compile``), so
a winner here is a setting the server can be started with. For every batch size asked for it
records the compile-and-first-call time, the graphs dynamo compiled for it, and the warm time of
a 20-step call, as one JSON line in ``$OUT/variants.jsonl``.

Variants (``--variants``, comma-separated; default: all but the slow max-autotune one):

- ``eager``: no compile;
- ``blocks-dynamic``: the server's default (regional, shape-generic);
- ``full-dynamic``: ``--compile-scope full`` (whole UNet + VAE decoder, fused QKV, channels-last);
- ``full-static``: ``--compile-scope full --compile-shapes static``;
- ``full-static-cdt``: the same plus inductor's coordinate-descent tuning and no epilogue
  fusion (the rest of the PyTorch team's SDXL recipe; not a server setting yet);
- ``full-batch``: ``--compile-scope full --compile-shapes batch`` (only the batch dimension
  dynamic: one graph per size for every batch from 2 up, no padding);
- ``unet-batch``: ``--compile-scope unet --compile-shapes batch`` (the same for the UNet; the
  VAE decoder stays eager, so a cold start compiles no decoder graph);
- ``full-batch-graphs``: the same with CUDA graphs (``--compile-mode reduce-overhead``; one
  graph recorded per batch size met);
- ``full-static-graphs``: static shapes with CUDA graphs (``--compile-mode reduce-overhead``);
- ``eager-cudnn``, ``full-batch-cudnn``: the same as ``eager`` / ``full-batch`` with
  ``--attention-backend cudnn`` (cuDNN's attention kernels first; torch prefers FlashAttention);
- ``full-static-autotune``: ``--compile-mode max-autotune-no-cudagraphs`` (compiles for many
  minutes per shape).

Each child builds the pipeline and compiles once per batch size asked for, so a whole-UNet
variant at batches 1 and 8 costs two ~96 s compiles (§4.2) plus the build: count on about two
such variants per 600 s call of the device tool. Example::

    OUT=/tmp/gpuout python -m bench.gpu_compile_variants --variants full-dynamic,full-static \\
        --batches 1,8
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from bench import lines

VARIANTS: dict[str, dict[str, str] | None] = {
    "eager": None,
    "eager-cudnn": {"attention": "cudnn"},
    "blocks-dynamic": {"scope": "blocks", "shapes": "dynamic"},
    "full-dynamic": {"scope": "full", "shapes": "dynamic"},
    "full-static": {"scope": "full", "shapes": "static"},
    "full-batch": {"scope": "full", "shapes": "batch"},
    "full-batch-cudnn": {"scope": "full", "shapes": "batch", "attention": "cudnn"},
    "unet-batch": {"scope": "unet", "shapes": "batch"},
    "full-batch-graphs": {"scope": "full", "shapes": "batch", "mode": "reduce-overhead"},
    "full-static-cdt": {"scope": "full", "shapes": "static", "tuning": "cdt"},
    "full-static-graphs": {"scope": "full", "shapes": "static", "mode": "reduce-overhead"},
    "full-static-autotune": {"scope": "full", "shapes": "static",
                             "mode": "max-autotune-no-cudagraphs"},
}
DEFAULT = ("eager,blocks-dynamic,full-dynamic,full-static,full-batch,full-static-cdt,"
           "full-static-graphs")


def emit(**kw: object) -> None:
    """Print one result line and append it to ``$OUT/variants.jsonl``."""
    lines.emit("variants.jsonl", kw)


def run_variant(name: str, batches: list[int], *, dry: bool) -> None:
    """Build the pipeline, compile it as ``name`` says, and time every batch size.

    ``dry``: the built-in tiny model on the CPU at 64², to check the flow without a GPU.
    """
    import torch

    from inference.compile import (
        CompileOptions,
        CompileWatch,
        apply_compile,
        prepare_for_compile,
    )

    spec = VARIANTS[name]
    size, steps = (64, 3) if dry else (1024, 20)
    if dry:
        from diffusers import StableDiffusionXLPipeline

        from inference.tiny import ensure_tiny

        pipe = StableDiffusionXLPipeline.from_pretrained(ensure_tiny(Path("/tmp/igcache-e2e"))
                                                         / "base")
        def sync() -> None:
            return None

        gpu = "cpu (dry)"
    else:
        from bench import gpu_sdxl

        pipe = gpu_sdxl.build(torch.bfloat16)
        sync = torch.cuda.synchronize
        gpu = torch.cuda.get_device_name(0)
    pipe.set_progress_bar_config(disable=True)
    if spec is not None and "attention" in spec and not dry:  # CUDA kernels: not on the CPU
        from inference.attention import prefer_attention_backend

        prefer_attention_backend(spec["attention"], "cuda")
    compiled = spec is not None and "scope" in spec
    if compiled:
        assert spec is not None
        options = CompileOptions(scope=spec["scope"], shapes=spec["shapes"],  # type: ignore[arg-type]
                                 mode=spec.get("mode", "default"))
        prepare_for_compile(pipe, options)
        if spec.get("tuning") == "cdt":
            import torch._inductor.config as ic

            ic.coordinate_descent_tuning = True
            ic.coordinate_descent_check_all_directions = True
            ic.epilogue_fusion = False
        apply_compile(pipe, options)

    def call(batch: int, steps: int) -> float:
        gens = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            pipe(prompt=["a lighthouse at dusk"] * batch, generator=gens,
                 num_inference_steps=steps, width=size, height=size, guidance_scale=5.0,
                 output_type="pt")
        sync()
        return time.perf_counter() - t

    watch = CompileWatch(enabled=compiled)

    def skipped_cudagraphs() -> int:
        # Inductor only warns when it cannot use CUDA graphs ("skipping cudagraphs due to ...").
        from torch._dynamo.utils import counters

        return int(counters["inductor"]["cudagraph_skips"])
    for batch in batches:
        graphs = watch.count()
        first = call(batch, 2)
        graphs = watch.count() - graphs
        call(batch, 2)  # CUDA graphs record on the second call
        seconds = min(call(batch, steps) for _ in range(2))
        emit(variant=name, batch=batch, size=size, steps=steps, first_call_s=round(first, 1),
             graphs=graphs, seconds=round(seconds, 3), images_per_s=round(batch / seconds, 3),
             cudagraph_skips=skipped_cudagraphs(), gpu=gpu,
             torch=torch.__version__, date=time.strftime("%Y-%m-%d"))


def main() -> None:
    """Run each variant in a child process, one after another."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=DEFAULT)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--dry", action="store_true", help="tiny model on the CPU, to check the flow")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.child:
        run_variant(args.child, batches, dry=args.dry)
        return
    for name in args.variants.split(","):
        if name not in VARIANTS:
            sys.exit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    for name in args.variants.split(","):
        t = time.perf_counter()
        code = subprocess.call([sys.executable, "-m", "bench.gpu_compile_variants",
                                "--child", name, "--batches", args.batches]
                               + (["--dry"] if args.dry else []))
        if code:
            emit(variant=name, failed=code, after_s=round(time.perf_counter() - t, 1))


if __name__ == "__main__":
    main()
