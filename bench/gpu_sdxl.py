"""Full-size SDXL on a GPU: the public SDXL base architecture with random weights.

Same FLOPs as the real model, no download. Measures eager vs torch.compile at batch 1/2/4/8,
1024², 20 steps, and prints a markdown table (``main`` compiles four static shapes, ~96 s each
on the H200 of §4.2). Needs CUDA; not run in CI. ``build`` is what the GPU benches use (it ran on
the H200 of docs/benchmarks.md §4).
"""

from __future__ import annotations

import time

import torch

from inference.tiny import _byte_level_vocab, _scheduler

UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
VAE = dict(
    block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2, sample_size=1024, scaling_factor=0.13025, force_upcast=False,
)


def build(dtype: torch.dtype, seed: int = 0, device: str = "cuda"):
    """The pipeline on ``device`` in ``dtype``; the same ``seed`` gives the same random weights.

    The networks are created on the GPU where there is one (random initialisation of 3.5
    billion parameters is far quicker there); tokenizer and scheduler are built as usual.
    ``device="meta"`` gives the architecture without memory, for counting (bench/flops.py).
    """
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    vocab = _byte_level_vocab()
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    common = dict(vocab_size=len(vocab), max_position_embeddings=77, hidden_act="gelu",
                  bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                  pad_token_id=vocab["<|endoftext|>"])
    torch.manual_seed(seed)
    init = "cpu" if device == "cuda" and not torch.cuda.is_available() else device
    with torch.device(init):
        te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                           num_attention_heads=12, num_hidden_layers=12,
                                           projection_dim=768, **common))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                         num_attention_heads=20,
                                                         num_hidden_layers=32,
                                                         projection_dim=1280, **common))
        vae, unet = AutoencoderKL(**VAE), UNet2DConditionModel(**UNET)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
        unet=unet, scheduler=_scheduler(), add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def timed(pipe, batch: int, steps: int = 20) -> float:
    gens = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    pipe(prompt=["a photo"] * batch, generator=gens, num_inference_steps=steps,
         width=1024, height=1024, output_type="np")
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    pipe = build(dtype)
    rows = ["| mode | batch | s/image | images/s |", "|---|---:|---:|---:|"]
    for mode in ("eager", "compile"):
        if mode == "compile":
            pipe.unet = torch.compile(pipe.unet, fullgraph=True, dynamic=False)
            pipe.vae.decode = torch.compile(pipe.vae.decode, fullgraph=True, dynamic=False)
        for batch in (1, 2, 4, 8):
            timed(pipe, batch, steps=2)  # warm-up / compile
            took = min(timed(pipe, batch) for _ in range(2))
            rows.append(f"| {mode} | {batch} | {took / batch:.3f} | {batch / took:.2f} |")
            print(rows[-1], flush=True)
    print(f"\n{torch.cuda.get_device_name(0)}, {dtype}, 1024², 20 steps\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
