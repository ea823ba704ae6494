"""Batch runners: the only code that calls a diffusers pipeline.

A runner is owned by the executor thread and is never called concurrently. It turns a
:class:`~inference.batch.Batch` into one float image array per slot.
"""

from __future__ import annotations

import io
import logging
import time
from typing import Any, Protocol

import msgspec
import numpy as np

from inference.batch import Batch
from inference.errors import Cancelled, FeatureUnavailable, InvalidRequest
from inference.samplers import SamplerRegistry

logger = logging.getLogger(__name__)


class StepTimes(msgspec.Struct, kw_only=True):
    """Timings of one pipeline call, in seconds."""

    denoise: float = 0.0
    steps: int = 0
    decode: float = 0.0
    total: float = 0.0


class BatchRunner(Protocol):
    """What the executor needs from whatever actually makes images."""

    has_refiner: bool

    def run(self, batch: Batch) -> tuple[list[np.ndarray], StepTimes]:
        """One (H, W, 3) uint8 RGB array per slot, in slot order."""
        ...

    def count_tokens(self, prompt: str, negative_prompt: str) -> int:
        """Prompt tokens as the model's tokenizer counts them (executor thread only)."""
        ...


def to_uint8(images: Any) -> list[np.ndarray]:
    """Pipeline output as 8-bit (H, W, 3) arrays, with diffusers' own rounding.

    A torch batch (B, 3, H, W) in [0, 1] is converted where it lives, so on a GPU only a quarter
    of the bytes cross to the host; numpy input (H, W, 3 floats) is converted on the CPU.
    """
    import torch

    if isinstance(images, torch.Tensor):
        as_bytes = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        return list(as_bytes.cpu().numpy())
    return [(np.clip(np.asarray(img), 0.0, 1.0) * 255).round().astype(np.uint8) for img in images]


def decode_init_image(data: bytes, width: int, height: int) -> Any:
    """Decode an init image and resize it to the batch size; raises :class:`InvalidRequest`."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise InvalidRequest(f"init image could not be decoded: {exc}", field="init_image") from exc
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return image


class DiffusersRunner:
    """Runs SDXL base (and optionally the refiner) for one batch at a time."""

    def __init__(
        self,
        base: Any,
        samplers: SamplerRegistry,
        *,
        refiner: Any | None = None,
        device: str = "cpu",
    ) -> None:
        self.base = base
        self.refiner = refiner
        self.samplers = samplers
        self.device = device
        self.has_refiner = refiner is not None
        self._base_scheduler_config = base.scheduler.config
        self._refiner_scheduler = refiner.scheduler if refiner is not None else None
        self._img2img: Any | None = None

    def count_tokens(self, prompt: str, negative_prompt: str) -> int:
        """CLIP tokens of prompt and negative prompt, without the begin/end markers."""
        tok = self.base.tokenizer_2 or self.base.tokenizer
        ids = tok([prompt, negative_prompt or ""], add_special_tokens=False).input_ids
        return sum(len(x) for x in ids)

    def _base_img2img(self) -> Any:
        if self._img2img is None:
            from diffusers import StableDiffusionXLImg2ImgPipeline

            self._img2img = StableDiffusionXLImg2ImgPipeline(**self.base.components)
            self._img2img.set_progress_bar_config(disable=True)
        return self._img2img

    def run(self, batch: Batch) -> tuple[list[np.ndarray], StepTimes]:
        """Run one pipeline call (two with the refiner) for every slot of ``batch``."""
        import torch

        key = batch.key
        if key.loras:
            raise FeatureUnavailable("LoRA adapters are not available on this server", field="loras")
        if key.refine is not None and self.refiner is None:
            raise FeatureUnavailable(
                "this request needs the SDXL refiner, but the server was started without --refiner",
                field="refine",
            )
        prompts = [s.ticket.prompt for s in batch.slots]
        negatives = [s.ticket.request.negative_prompt for s in batch.slots]
        # CPU generators: the same seed gives the same latents on every device and batch.
        generators = [torch.Generator("cpu").manual_seed(s.seed) for s in batch.slots]
        times = StepTimes()
        started = time.perf_counter()
        last_step = [started]

        def on_step(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if batch.all_abandoned():
                raise Cancelled("every request in the batch was cancelled")
            times.steps += 1
            last_step[0] = time.perf_counter()
            return {}

        common: dict[str, Any] = {
            "prompt": prompts,
            "negative_prompt": negatives,
            "generator": generators,
            "callback_on_step_end": on_step,
        }
        with torch.inference_mode():
            if key.img2img_strength is not None:
                images = [
                    decode_init_image(s.ticket.init_image.data, key.width, key.height)  # type: ignore[union-attr]
                    for s in batch.slots
                ]
                if key.refine is not None:
                    out = self._refine(
                        common, images, steps=key.refine.steps, strength=key.img2img_strength
                    )
                else:
                    pipe = self._base_img2img()
                    pipe.scheduler = self.samplers.build(key.sampler, self._base_scheduler_config)
                    out = pipe(
                        image=images,
                        strength=key.img2img_strength,
                        num_inference_steps=key.steps,
                        guidance_scale=key.guidance,
                        clip_skip=key.clip_skip,
                        output_type="pt",
                        **common,
                    ).images
            else:
                self.base.scheduler = self.samplers.build(key.sampler, self._base_scheduler_config)
                refine = key.refine
                base_kwargs: dict[str, Any] = {
                    "width": key.width,
                    "height": key.height,
                    "num_inference_steps": key.steps,
                    "guidance_scale": key.guidance,
                    "clip_skip": key.clip_skip,
                    "output_type": "latent" if refine is not None else "pt",
                }
                if refine is not None and refine.high_noise_frac is not None:
                    base_kwargs["denoising_end"] = refine.high_noise_frac
                out = self.base(**base_kwargs, **common).images
                if refine is not None:
                    if refine.high_noise_frac is not None:
                        out = self._refine(
                            common, out, steps=refine.steps, denoising_start=refine.high_noise_frac
                        )
                    else:
                        out = self._refine(common, out, steps=refine.steps, strength=refine.strength)
        times.denoise = last_step[0] - started
        arrays = to_uint8(out)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        ended = time.perf_counter()
        times.total = ended - started
        times.decode = ended - last_step[0]
        return arrays, times

    def _refine(
        self,
        common: dict[str, Any],
        image: Any,
        *,
        steps: int,
        strength: float = 0.3,
        denoising_start: float | None = None,
    ) -> Any:
        """The refiner pass: img2img at ``strength``, or the expert hand-off at ``denoising_start``."""
        assert self.refiner is not None and self._refiner_scheduler is not None
        # Fresh scheduler per call: schedulers are stateful. Prompts and generators are the base's.
        self.refiner.scheduler = type(self._refiner_scheduler).from_config(
            self._refiner_scheduler.config
        )
        kwargs: dict[str, Any] = {"image": image, "num_inference_steps": steps, "output_type": "pt"}
        if denoising_start is not None:
            kwargs["denoising_start"] = denoising_start
        else:
            kwargs["strength"] = strength
        return self.refiner(**kwargs, **common).images
