"""The canonical generation request and result.

Every API dialect translates its wire format into :class:`GenerationRequest` and reads a
:class:`GenerationResult` back. Nothing here knows which dialect made the request.
"""

from __future__ import annotations

from typing import Literal

import msgspec

OutputFormat = Literal["png", "jpeg", "webp"]
#: Seeds are 32-bit: what every API with a documented seed range accepts.
MAX_SEED = 2**32 - 1


def image_seed(seed: int, index: int) -> int:
    """The seed of image ``index`` of a request seeded ``seed``: ``seed + index``, wrapped.

    Wrapped to 32 bits so that every seed a result reports is one a request may give back
    (seed 4294967295 with two images: 4294967295 and 0).
    """
    return (seed + index) % (MAX_SEED + 1)


class InitImage(msgspec.Struct, frozen=True, kw_only=True):
    """An image to start from (img2img, edits, variations), already decoded to encoded bytes.

    ``data`` is the encoded image file (PNG, JPEG, WebP…). Fetching from URLs happens in the
    gateway, so the engine only ever sees bytes.

    ``mask`` (encoded image bytes too) turns img2img into inpainting; it is resized to the output
    size. Which pixels are repainted:

    - a mask with real transparency (an alpha channel with at least one pixel below 255), as
      OpenAI's edit endpoint sends it: **transparent = repaint**, opaque = keep (repaint weight
      is ``1 - alpha/255``, so soft edges blend);
    - any other mask (grayscale, RGB, or RGBA that is fully opaque): **white = repaint**, black
      = keep (weight = luminance/255);
    - with ``mask_rule="alpha"`` (APIs whose masks mean transparency, such as OpenAI's), any mask
      with an alpha channel follows the alpha rule, so a fully opaque one repaints nothing; a
      mask without one still falls back to white = repaint.

    Kept pixels are copied from the init image into the result, so they come back unchanged.
    ``strength`` is how far the repainted area moves from the init image (1.0: from scratch).
    """

    data: bytes
    strength: float = 0.3
    mask: bytes | None = None
    mask_rule: Literal["auto", "alpha"] = "auto"


class ControlUnit(msgspec.Struct, frozen=True, kw_only=True):
    """One ControlNet unit: a conditioning image, its preprocessor and when/how strongly it acts.

    ``kind`` names the ControlNet (``canny``; ``depth`` where served). ``preprocess`` False
    means ``image`` already is the control map (edges, depth), so it is used as given.
    ``guidance_start``/``guidance_end`` are fractions of the denoising schedule.
    """

    kind: str
    image: bytes
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    preprocess: bool = True


class Refine(msgspec.Struct, frozen=True, kw_only=True):
    """How to run the SDXL refiner after (or instead of) the base model.

    ``high_noise_frac`` set: ensemble of experts, the base stops at that fraction of its schedule
    and the refiner continues from there for ``steps``. Unset: the refiner runs as img2img on the
    base output at ``strength`` (worker-sdxl's behaviour).
    """

    steps: int = 50
    strength: float = 0.3
    high_noise_frac: float | None = None


class Lora(msgspec.Struct, frozen=True, kw_only=True):
    """One LoRA adapter by operator-configured name, with its weight."""

    name: str
    weight: float = 1.0


class GenerationRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One generation, as every dialect describes it to the engine.

    ``seed`` is the seed of image 0; image ``i`` uses ``seed + i`` (:func:`image_seed`). ``None``
    means the engine draws one and reports it in the result.
    """

    prompt: str
    negative_prompt: str = ""
    n: int = 1
    width: int = 1024
    height: int = 1024
    steps: int = 25
    guidance: float = 5.0
    sampler: str | None = None
    seed: int | None = None
    model: str | None = None
    style: str | None = None
    clip_skip: int | None = None
    output_format: OutputFormat = "png"
    # 0-100 quality for JPEG/WebP (100 = best); PNG is lossless and ignores it.
    output_compression: int = 100
    # Whether the encoder pool should also produce base64 text for each image.
    want_base64: bool = False
    init_image: InitImage | None = None
    refine: Refine | None = None
    loras: tuple[Lora, ...] = ()
    control: tuple[ControlUnit, ...] = ()
    # Partial images wanted while denoising (OpenAI streaming's partial_images, previews),
    # delivered through the progress callback of Engine.generate.
    partial_images: int = 0
    # Who asked, for logs and the usage ledger; never used for batching decisions.
    client_id: str | None = None
    request_id: str | None = None


class GeneratedImage(msgspec.Struct, kw_only=True):
    """One encoded output image."""

    data: bytes
    media_type: str
    seed: int
    width: int
    height: int
    b64: str | None = None


class Timings(msgspec.Struct, kw_only=True):
    """Where the time went, in seconds."""

    queued: float = 0.0
    # This request's share of executor time: each batch's time split by its images.
    inference: float = 0.0
    encode: float = 0.0
    total: float = 0.0
    batch_images: int = 1


class GenerationResult(msgspec.Struct, kw_only=True):
    """What the engine hands back for one request."""

    images: list[GeneratedImage]
    seed: int
    prompt: str
    negative_prompt: str
    prompt_tokens: int
    timings: Timings
    model: str
