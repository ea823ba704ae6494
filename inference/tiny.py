"""The built-in ``tiny-sdxl`` model: real SDXL classes, miniature configs, fixed-seed random weights.

It exists so that a fresh machine (and CI) can serve and test the whole stack with no download.
It keeps SDXL's latent geometry (VAE scale factor 8, 4 latent channels, the same added-time
conditioning), so ``width``/``height`` mean what they mean for the real model. It makes noise images.

The model is built once, written with ``save_pretrained`` and then loaded back through the same
code path as any operator-supplied diffusers folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

TINY_MODEL_ID = "tiny-sdxl"
TINY_REFINER_ID = "tiny-sdxl-refiner"
# The adapter tiny-sdxl serves from its own LoRA folder when --lora-dir is not given.
TINY_LORA = "tiny-lora"
# Bump when the configs below change, so stale cached copies are rebuilt rather than reused.
TINY_VERSION = "5"
NOISE_WARNING = (
    "tiny-sdxl is a built-in miniature SDXL with random weights: it makes noise images, "
    "not pictures. Serve real SDXL weights for real images."
)

_HIDDEN = 32
_TIME_EMBED = 8


def _byte_level_vocab() -> dict[str, int]:
    """CLIP's byte alphabet (GPT-2 ``bytes_to_unicode``), plain and word-final, plus the two specials.

    With no merges every input string tokenizes without ``<unk>``; nothing is downloaded.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    chars = [chr(c) for c in codes]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}


def _tokenizer():  # noqa: ANN202 - transformers type imported lazily
    from transformers import CLIPTokenizer

    # transformers 5 ignores vocab_file=/merges_file=; the in-memory form is the one that works.
    return CLIPTokenizer(vocab=_byte_level_vocab(), merges=[], model_max_length=77)


def _text_config():  # noqa: ANN202
    from transformers import CLIPTextConfig

    vocab = _byte_level_vocab()
    return CLIPTextConfig(
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        hidden_size=_HIDDEN,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(vocab),
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=_HIDDEN,
    )


def _vae():  # noqa: ANN202
    from diffusers import AutoencoderKL

    # Four blocks give SDXL's scale factor of 8; tiny channel counts keep 1024² decodes cheap.
    return AutoencoderKL(
        block_out_channels=[8, 16, 16, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=1024,
        scaling_factor=0.13025,
        force_upcast=False,
    )


def _unet(*, refiner: bool):  # noqa: ANN202
    from diffusers import UNet2DConditionModel

    # Base: two text encoders (cross-attn 32+32) and six time ids; refiner: encoder 2 only and
    # five time ids (the aesthetic score replaces the crop/target pair), as in real SDXL.
    cross_dim = _HIDDEN if refiner else 2 * _HIDDEN
    time_ids = 5 if refiner else 6
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        # 32² latents: the default size of tiny-sdxl is 256², quick on a CPU.
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=_TIME_EMBED,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=time_ids * _TIME_EMBED + _HIDDEN,
        cross_attention_dim=cross_dim,
        norm_num_groups=8,
    )


def _controlnet():  # noqa: ANN202
    from diffusers import ControlNetModel

    # Mirrors the base UNet's down path, so its residuals fit; the conditioning embedding halves
    # the control image three times, matching the VAE's factor 8.
    return ControlNetModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        in_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        conditioning_embedding_out_channels=(8, 16, 16, 32),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=_TIME_EMBED,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * _TIME_EMBED + _HIDDEN,
        cross_attention_dim=2 * _HIDDEN,
        norm_num_groups=8,
    )


def _randomize_zero_convs(controlnet) -> None:  # noqa: ANN001
    """A fresh ControlNet's output convolutions are zero (no effect); give them small weights."""
    import torch

    with torch.no_grad():
        for module in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                       controlnet.controlnet_cond_embedding.conv_out):
            for param in module.parameters():
                param.normal_(0.0, 0.05)


def _save_tiny_lora(unet, folder: Path) -> None:  # noqa: ANN001
    """A rank-4 LoRA on the UNet's attention projections, with random (non-zero) weights."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionXLPipeline.save_lora_weights(
        str(folder), unet_lora_layers=layers, weight_name=f"{TINY_LORA}.safetensors")


def _scheduler():  # noqa: ANN202
    from diffusers import EulerDiscreteScheduler

    # SDXL base 1.0's shipped scheduler config.
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
    )


def build_tiny(target: Path) -> None:
    """Build tiny-sdxl and its refiner with fixed seeds and write them as diffusers folders.

    Also ``controlnet-canny/`` (a tiny ControlNet served as ``canny``) and ``loras/`` (one
    adapter, ``tiny-lora``), so every feature can be exercised without real weights.
    """
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = _unet(refiner=False)
        torch.manual_seed(1)
        vae = _vae()
        torch.manual_seed(2)
        text_encoder = CLIPTextModel(_text_config())
        torch.manual_seed(3)
        text_encoder_2 = CLIPTextModelWithProjection(_text_config())
        torch.manual_seed(4)
        refiner_unet = _unet(refiner=True)
        torch.manual_seed(5)
        controlnet = _controlnet()
        _randomize_zero_convs(controlnet)

    tokenizer = _tokenizer()
    base = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=_scheduler(),
        add_watermarker=False,
    )
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=vae,
        text_encoder=None,
        text_encoder_2=text_encoder_2,
        tokenizer=None,
        tokenizer_2=tokenizer,
        unet=refiner_unet,
        scheduler=_scheduler(),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        base.save_pretrained(tmp / "base", safe_serialization=True)
        refiner.save_pretrained(tmp / "refiner", safe_serialization=True)
        controlnet.save_pretrained(tmp / "controlnet-canny", safe_serialization=True)
        with torch.random.fork_rng():
            torch.manual_seed(6)
            # After the base is saved: the adapter goes into the saved LoRA file only.
            _save_tiny_lora(unet, tmp / "loras")
        (tmp / "imagegate-tiny.json").write_text(json.dumps({"version": TINY_VERSION}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_tiny(cache_dir: Path) -> Path:
    """Return the tiny-sdxl folder, building it on first use.

    It holds ``base/``, ``refiner/``, ``controlnet-canny/`` and ``loras/``.
    """
    target = cache_dir / f"tiny-sdxl-v{TINY_VERSION}"
    marker = target / "imagegate-tiny.json"
    if marker.exists():
        return target
    logger.info("building the built-in tiny-sdxl model into %s", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    build_tiny(target)
    return target
