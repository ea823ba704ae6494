"""Cheap previews of a denoising run, straight from SDXL latents (no VAE).

SDXL's four latent channels map to RGB almost linearly. The factors below are the widely used
SDXL ones (ComfyUI's ``latent_formats.SDXL``): a (4 → 3) matrix plus a bias, giving values in about
[-1, 1]. The map runs at latent resolution (an eighth of the image side) on the executor thread,
where it is a few hundred multiply-adds per pixel; upscaling and encoding happen elsewhere.

The latents a pipeline hands its step callback are the noisy ``x_t``, not the predicted clean
image, so early previews are noisy by nature; they sharpen as denoising proceeds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from inference.encoder import MEDIA_TYPES, b64_string, encode_image
from inference.request import GeneratedImage, OutputFormat

SDXL_LATENT_RGB_FACTORS: tuple[tuple[float, float, float], ...] = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
SDXL_LATENT_RGB_BIAS: tuple[float, float, float] = (0.1084, -0.0175, -0.0011)


def latents_to_rgb(latents: Any) -> list[np.ndarray]:
    """(B, 4, h, w) SDXL latents (torch) as B small (h, w, 3) uint8 RGB arrays."""
    import torch

    lat = latents.detach()
    factors = torch.tensor(SDXL_LATENT_RGB_FACTORS, dtype=torch.float32, device=lat.device)
    bias = torch.tensor(SDXL_LATENT_RGB_BIAS, dtype=torch.float32, device=lat.device)
    rgb = torch.einsum("bchw,cr->bhwr", lat[:, :4].float(), factors) + bias
    as_bytes = ((rgb + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8)
    return list(as_bytes.cpu().numpy())


def upscale(small: np.ndarray, width: int, height: int) -> Image.Image:
    """A latent-resolution preview stretched to the image size (bilinear: it is a preview)."""
    image = Image.fromarray(small, mode="RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return image


def encode_preview(
    small: np.ndarray,
    *,
    width: int,
    height: int,
    fmt: OutputFormat = "png",
    compression: int = 100,
    seed: int = 0,
    want_base64: bool = False,
    png_level: int = 1,
) -> GeneratedImage:
    """Upscale and encode one preview as a :class:`GeneratedImage` (worker thread, not executor)."""
    data = encode_image(upscale(small, width, height), fmt, compression=compression,
                        png_level=png_level)
    b64 = b64_string(data) if want_base64 else None
    return GeneratedImage(data=data, media_type=MEDIA_TYPES[fmt], seed=seed, width=width,
                          height=height, b64=b64)
