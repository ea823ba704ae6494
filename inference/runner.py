"""Batch runners: the only code that calls a diffusers pipeline.

A runner is owned by the executor thread and is never called concurrently. It turns a
:class:`~inference.batch.Batch` into one float image array per slot.
"""

from __future__ import annotations

import io
import logging
import time
from typing import TYPE_CHECKING, Any, Literal, Protocol

import msgspec
import numpy as np

from inference.batch import Batch, Slot
from inference.controlnet import control_map
from inference.errors import Cancelled, FeatureUnavailable, InvalidRequest
from inference.images import decode_rgb, to_luma
from inference.lora import LoraAdapters, LoraLibrary
from inference.samplers import SamplerRegistry

if TYPE_CHECKING:
    from inference.progress import StepObserver

logger = logging.getLogger(__name__)


class StepTimes(msgspec.Struct, kw_only=True):
    """Timings of one pipeline call, in seconds."""

    denoise: float = 0.0
    steps: int = 0
    decode: float = 0.0
    total: float = 0.0
    # Slots computed only as padding up to a batch bucket (their images were discarded).
    padded: int = 0


class BatchRunner(Protocol):
    """What the executor needs from whatever actually makes images."""

    has_refiner: bool

    def run(self, batch: Batch) -> tuple[list[np.ndarray], StepTimes]:
        """One (H, W, 3) uint8 RGB array per real slot, in slot order.

        A batch with ``pad_to`` set runs ``batch.input_slots()`` and returns the real slots only.
        """
        ...

    def count_tokens(self, prompt: str, negative_prompt: str) -> int:
        """Prompt tokens as the model's tokenizer counts them (executor thread only)."""
        ...


def to_uint8(images: Any) -> list[np.ndarray]:
    """Pipeline output as 8-bit (H, W, 3) arrays, with diffusers' own rounding.

    A torch batch (B, 3, H, W) in [0, 1] is converted where it lives, so on a GPU only a quarter
    of the bytes cross to the host; numpy input (H, W, 3 floats) is converted on the CPU. The
    scaling is done in float32 whatever the pipeline's dtype: in bfloat16, ``x * 255`` itself
    rounds, and about one pixel value in twelve would come out one off.
    """
    import torch

    if isinstance(images, torch.Tensor):
        as_bytes = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        return list(as_bytes.cpu().numpy())
    return [(np.clip(np.asarray(img), 0.0, 1.0) * 255).round().astype(np.uint8) for img in images]


def decode_init_image(data: bytes, width: int, height: int) -> Any:
    """Decode an init image and resize it to the batch size; raises :class:`InvalidRequest`."""
    return decode_rgb(data, width, height, field="init_image", what="init image")


def decode_mask(data: bytes, width: int, height: int, rule: str = "auto") -> np.ndarray:
    """A mask as (H, W) repaint weights in [0, 1] at the batch size (rules: :class:`InitImage`).

    Real transparency (some alpha below 255), or any alpha channel under ``rule="alpha"``:
    transparent = repaint. Otherwise white = repaint.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise InvalidRequest(f"mask could not be decoded: {exc}", field="init_image.mask") from exc
    if image.mode == "P":  # a palette has an alpha channel only with transparency info
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA") and (
            rule == "alpha" or image.getchannel("A").getextrema()[0] < 255):
        weights = Image.eval(image.getchannel("A"), lambda a: 255 - a)
    else:
        weights = to_luma(image)
    if weights.size != (width, height):
        weights = weights.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(weights, dtype=np.float32) / 255.0


def composite(generated: np.ndarray, init: Any, mask: np.ndarray) -> np.ndarray:
    """Kept pixels from the init image, repainted ones from the generated image (uint8 RGB)."""
    keep = np.asarray(init, dtype=np.float32)
    weight = mask[..., None]
    out = generated.astype(np.float32) * weight + keep * (1.0 - weight)
    return np.clip(out.round(), 0, 255).astype(np.uint8)


Mode = Literal["txt2img", "img2img", "inpaint"]

_PIPELINES: dict[tuple[Mode, bool], str] = {
    ("img2img", False): "StableDiffusionXLImg2ImgPipeline",
    ("inpaint", False): "StableDiffusionXLInpaintPipeline",
    ("txt2img", True): "StableDiffusionXLControlNetPipeline",
    ("img2img", True): "StableDiffusionXLControlNetImg2ImgPipeline",
    ("inpaint", True): "StableDiffusionXLControlNetInpaintPipeline",
}


class DiffusersRunner:
    """Runs SDXL base (and optionally the refiner) for one batch at a time.

    img2img, inpainting and ControlNet use pipelines built from the base's components, so the
    weights are loaded once. LoRA adapters live in those shared modules and are switched per batch.
    """

    def __init__(
        self,
        base: Any,
        samplers: SamplerRegistry,
        *,
        refiner: Any | None = None,
        device: str = "cpu",
        controlnets: dict[str, Any] | None = None,
        loras: LoraLibrary | None = None,
        compiled: bool = False,
        compile_watch: Any | None = None,
    ) -> None:
        self.base = base
        self.compiled = compiled
        # The engine's compile watch when the compiled UNet counts for itself (inference.aot);
        # None: dynamo's counters (inference.compile.CompileWatch).
        self.compile_watch = compile_watch
        self.refiner = refiner
        self.samplers = samplers
        self.device = device
        self.has_refiner = refiner is not None
        self.controlnets = controlnets or {}
        self.loras = loras or LoraLibrary(None)
        # Set by the engine (inference.progress.ProgressHub): told about every denoising step.
        self.observer: StepObserver | None = None
        self._base_scheduler_config = base.scheduler.config
        self._refiner_scheduler = refiner.scheduler if refiner is not None else None
        self._pipelines: dict[tuple[Mode, tuple[str, ...]], Any] = {}
        self._adapters: LoraAdapters | None = None

    def count_tokens(self, prompt: str, negative_prompt: str) -> int:
        """CLIP tokens of prompt and negative prompt, without the begin/end markers."""
        tok = self.base.tokenizer_2 or self.base.tokenizer
        ids = tok([prompt, negative_prompt or ""], add_special_tokens=False).input_ids
        return sum(len(x) for x in ids)

    def _pipeline(self, mode: Mode, kinds: tuple[str, ...]) -> Any:
        """The pipeline for ``mode`` with ControlNets ``kinds``, built once from the base's parts."""
        if mode == "txt2img" and not kinds:
            return self.base
        key = (mode, kinds)
        if key not in self._pipelines:
            import diffusers

            cls = getattr(diffusers, _PIPELINES[(mode, bool(kinds))])
            parts = dict(self.base.components)
            if kinds:
                nets = [self.controlnets[k] for k in kinds]
                parts["controlnet"] = nets[0] if len(nets) == 1 else nets
            pipe = cls(**parts)
            pipe.set_progress_bar_config(disable=True)
            self._pipelines[key] = pipe
        return self._pipelines[key]

    def _base_img2img(self) -> Any:
        return self._pipeline("img2img", ())

    def _apply_loras(self, batch: Batch) -> None:
        if self._adapters is None:
            if not batch.key.loras:
                return
            self._adapters = LoraAdapters(self.base, self.loras, unload_when_off=self.compiled)
        self._adapters.apply(batch.key.loras)

    def _check(self, batch: Batch) -> None:
        key = batch.key
        if key.refine is not None and self.refiner is None:
            raise FeatureUnavailable(
                "this request needs the SDXL refiner, but the server was started without --refiner",
                field="refine",
            )
        if key.refine is not None and (key.control or key.inpaint):
            raise FeatureUnavailable("the refiner cannot be combined with a mask or ControlNet",
                                     field="refine")
        missing = [c.kind for c in key.control if c.kind not in self.controlnets]
        if missing:
            served = ", ".join(sorted(self.controlnets)) or "none"
            raise FeatureUnavailable(
                f"ControlNet {missing[0]!r} is not served here; served: {served}", field="control")

    def run(self, batch: Batch) -> tuple[list[np.ndarray], StepTimes]:
        """Run one pipeline call (two with the refiner) for every slot of ``batch``."""
        import torch

        key = batch.key
        self._check(batch)
        self._apply_loras(batch)
        slots = batch.input_slots()
        real = len(batch.slots)
        prompts = [s.ticket.prompt for s in slots]
        negatives = [s.ticket.request.negative_prompt for s in slots]
        # CPU generators: the same seed gives the same latents on every device and batch.
        generators = [torch.Generator("cpu").manual_seed(s.seed) for s in slots]
        times = StepTimes(padded=len(slots) - real)
        started = time.perf_counter()
        last_step = [started]
        phase = [0]
        observer = self.observer
        # On a GPU nothing in a step waits for the device, so without this the CPU would queue
        # steps ahead (all of them, with CUDA graphs): step times, progress and ETA would count
        # launches, and a cancel or interrupt could not stop work already queued. The wait costs
        # the launch of the next step's first kernel, microseconds against a step's tens of ms.
        wait_for_step = (torch.cuda.current_stream(self.device).synchronize
                         if self.device.startswith("cuda") else None)

        def on_step(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if wait_for_step is not None:  # first: a cancel arriving meanwhile is seen now
                wait_for_step()
            if batch.all_abandoned():
                raise Cancelled("every request in the batch was cancelled")
            if batch.all_stopping():
                # diffusers skips the remaining steps and decodes the latents it has.
                pipe._interrupt = True
            times.steps += 1
            last_step[0] = time.perf_counter()
            if observer is not None:
                observer.step(batch, step + 1, pipe.num_timesteps, kwargs["latents"], phase[0])
            return {}

        def next_phase(*_: Any) -> None:
            phase[0] += 1

        common: dict[str, Any] = {
            "prompt": prompts,
            "negative_prompt": negatives,
            "generator": generators,
            "callback_on_step_end": on_step,
        }
        masks: list[np.ndarray] = []
        inits: list[Any] = []
        with torch.inference_mode():
            if key.img2img_strength is not None:
                inits = [
                    decode_init_image(s.ticket.init_image.data, key.width, key.height)  # type: ignore[union-attr]
                    for s in slots
                ]
            if key.inpaint:
                masks = [
                    decode_mask(s.ticket.init_image.mask, key.width, key.height,  # type: ignore[union-attr]
                                s.ticket.init_image.mask_rule)  # type: ignore[union-attr]
                    for s in slots
                ]
            if key.control or key.inpaint:
                out = self._run_conditioned(batch, slots, common, inits, masks)
            elif key.img2img_strength is not None:
                if key.refine is not None:
                    out = self._refine(
                        common, inits, steps=key.refine.steps, strength=key.img2img_strength
                    )
                else:
                    pipe = self._base_img2img()
                    pipe.scheduler = self.samplers.build(key.sampler, self._base_scheduler_config)
                    out = pipe(
                        image=inits,
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
                    next_phase()
                    if refine.high_noise_frac is not None:
                        out = self._refine(
                            common, out, steps=refine.steps, denoising_start=refine.high_noise_frac
                        )
                    else:
                        out = self._refine(common, out, steps=refine.steps, strength=refine.strength)
        times.denoise = last_step[0] - started
        arrays = to_uint8(out[:real])
        if masks:
            arrays = [composite(a, i, m) for a, i, m in zip(arrays, inits[:real], masks[:real], strict=True)]
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        ended = time.perf_counter()
        times.total = ended - started
        times.decode = ended - last_step[0]
        return arrays, times

    def _run_conditioned(
        self, batch: Batch, slots: list[Slot], common: dict[str, Any], inits: list[Any],
        masks: list[np.ndarray],
    ) -> Any:
        """Inpainting and/or ControlNet: one call of the matching shared-component pipeline."""
        import torch
        from PIL import Image

        key = batch.key
        mode: Mode = "inpaint" if key.inpaint else "img2img" if inits else "txt2img"
        kinds = tuple(c.kind for c in key.control)
        pipe = self._pipeline(mode, kinds)
        pipe.scheduler = self.samplers.build(key.sampler, self._base_scheduler_config)
        kwargs: dict[str, Any] = {
            "num_inference_steps": key.steps,
            "guidance_scale": key.guidance,
            "clip_skip": key.clip_skip,
            "output_type": "pt",
        }
        if mode != "img2img":
            kwargs["width"], kwargs["height"] = key.width, key.height
        if inits:
            kwargs["image"] = inits
            kwargs["strength"] = key.img2img_strength
        if masks:
            kwargs["mask_image"] = [
                Image.fromarray((m * 255).round().astype(np.uint8), mode="L") for m in masks
            ]
        if kinds:
            # One (B, 3, H, W) tensor per unit: MultiControlNet refuses nested image lists.
            maps = [
                torch.from_numpy(np.stack([
                    control_map(s.ticket.request.control[u].image, kinds[u],
                                preprocess=s.ticket.request.control[u].preprocess,
                                width=key.width, height=key.height)
                    for s in slots
                ]))
                for u in range(len(kinds))
            ]
            single = len(kinds) == 1
            kwargs["image" if mode == "txt2img" else "control_image"] = maps[0] if single else maps
            weights = [float(c.weight) for c in key.control]
            kwargs["controlnet_conditioning_scale"] = weights[0] if single else weights
            kwargs["control_guidance_start"] = [c.guidance_start for c in key.control]
            kwargs["control_guidance_end"] = [c.guidance_end for c in key.control]
        return pipe(**kwargs, **common).images

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
