"""AUTOMATIC1111 stable-diffusion-webui API (``/sdapi/v1/*``), the most used self-hosted SD API.

Routes: ``txt2img``, ``img2img`` (``mask`` → inpainting), ``samplers``, ``sd-models``,
``options`` (GET; POST only confirms the served checkpoint) and ``progress``.

Wire facts: shared/reference/api-dialects.md §3.2. Request field names and defaults are
A1111's (steps 50, sampler ``Euler``, cfg 7, 512²); unknown fields are ignored as A1111's
pydantic models do. Success: ``{"images": [b64…], "parameters": {echo}, "info": "<JSON string>"}``.
Errors: field validation is FastAPI's 422 ``{"detail": [{loc, msg, type}]}``; everything else
A1111's middleware shape ``{"error", "detail", "body", "errors"}`` with the real status.
Auth: ``Authorization: Bearer <key>``, or HTTP Basic (A1111's ``--api-auth``) with the key as
the password and any user name.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import inspect
import io
import time
from typing import Annotated, Any, ClassVar

import msgspec
from litestar import Request, Response, get, post
from msgspec import Meta

from gateway.context import bearer_token
from gateway.dialects.base import Dialect
from gateway.disconnect import unless_disconnected
from gateway.errors import ApiError, Failure, invalid
from gateway.fetch import load_image
from gateway.wire import decode_json, json_response, retry_headers
from inference import GenerationRequest, GenerationResult, InitImage, Refine
from inference.encoder import b64_string
from inference.errors import UnknownSampler
from inference.images import to_luma

PREFIX = "/sdapi/v1"
MAX_SEED = 2**32 - 1
#: Longest prompt or negative prompt, in characters.
MAX_PROMPT_CHARS = 32000
#: Most images one request may ask for (batch_size × n_iter).
MAX_IMAGES = 16

#: A1111 1.9+ sampler names plus the pre-1.9 "<name> Karras" spellings clients still send, in
#: A1111's menu order. /samplers lists those the engine's registry can run.
A1111_SAMPLERS = (
    "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE",
    "Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DDIM", "PLMS", "UniPC", "LCM",
    "DPM++ 2M Karras", "DPM++ SDE Karras", "DPM++ 2M SDE Karras", "DPM2 Karras",
    "DPM2 a Karras", "LMS Karras",
)
#: k-diffusion aliases A1111 lists (and accepts) for its samplers.
ALIASES: dict[str, tuple[str, ...]] = {
    "DPM++ 2M": ("k_dpmpp_2m",), "DPM++ SDE": ("k_dpmpp_sde",),
    "DPM++ 2M SDE": ("k_dpmpp_2m_sde",), "DPM++ 2M SDE Heun": ("k_dpmpp_2m_sde_heun",),
    "DPM++ 2S a": ("k_dpmpp_2s_a",), "DPM++ 3M SDE": ("k_dpmpp_3m_sde",),
    "Euler a": ("k_euler_a", "k_euler_ancestral"), "Euler": ("k_euler",), "LMS": ("k_lms",),
    "Heun": ("k_heun",), "DPM2": ("k_dpm_2",), "DPM2 a": ("k_dpm_2_a",), "DDIM": ("ddim",),
    "PLMS": ("plms",), "UniPC": ("unipc",), "LCM": ("k_lcm",),
}
_BY_ALIAS = {alias: name for name, aliases in ALIASES.items() for alias in aliases}
#: ``scheduler`` values (1.9+) that leave the sampler's own schedule; ``karras`` picks the
#: Karras-sigma variant. The others (exponential, align_your_steps…) have no equivalent here.
_DEFAULT_SCHEDULERS = ("automatic",)
_SAMPLES_FORMATS = {"png": "png", "jpg": "jpeg", "jpeg": "jpeg", "webp": "webp"}

# -- wire schemas ----------------------------------------------------------------------------

Prompt = Annotated[str, Meta(max_length=MAX_PROMPT_CHARS)]


class Txt2ImgRequest(msgspec.Struct, kw_only=True):
    """``POST /sdapi/v1/txt2img``: A1111's fields and defaults; unknown fields are ignored."""

    prompt: Prompt = ""
    negative_prompt: Prompt = ""
    styles: Annotated[list[str], Meta(max_length=64)] = []
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    sampler_name: str | None = None
    sampler_index: str = "Euler"
    scheduler: str | None = None
    batch_size: Annotated[int, Meta(ge=1)] = 1
    n_iter: Annotated[int, Meta(ge=1)] = 1
    steps: Annotated[int, Meta(ge=1)] = 50
    cfg_scale: Annotated[float, Meta(ge=0, le=50)] = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    denoising_strength: float | None = None
    enable_hr: bool = False
    refiner_checkpoint: str | None = None
    refiner_switch_at: Annotated[float, Meta(gt=0, lt=1)] | None = None
    override_settings: dict[str, Any] = {}
    override_settings_restore_afterwards: bool = True
    script_name: str | None = None
    script_args: list[Any] = []
    alwayson_scripts: dict[str, Any] = {}
    send_images: bool = True
    save_images: bool = False


class Img2ImgRequest(Txt2ImgRequest, kw_only=True):
    """``POST /sdapi/v1/img2img``: txt2img's fields plus the init image and mask."""

    init_images: Annotated[list[str], Meta(max_length=16)] | None = None
    denoising_strength: Annotated[float, Meta(gt=0, le=1)] = 0.75
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur: int | None = None
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    include_init_images: bool = False


class GenerationInfo(msgspec.Struct, kw_only=True):
    """What ``info`` (a JSON string) decodes to."""

    prompt: str
    all_prompts: list[str]
    negative_prompt: str
    all_negative_prompts: list[str]
    seed: int
    all_seeds: list[int]
    subseed: int
    all_subseeds: list[int]
    subseed_strength: float
    width: int
    height: int
    sampler_name: str
    cfg_scale: float
    steps: int
    batch_size: int
    restore_faces: bool
    face_restoration_model: str | None
    sd_model_name: str
    sd_model_hash: str | None
    sd_vae_name: str | None
    sd_vae_hash: str | None
    seed_resize_from_w: int
    seed_resize_from_h: int
    denoising_strength: float | None
    extra_generation_params: dict[str, Any]
    index_of_first_image: int
    infotexts: list[str]
    styles: list[str]
    job_timestamp: str
    clip_skip: int
    is_using_inpainting_conditioning: bool
    version: str


class GenerationResponse(msgspec.Struct, kw_only=True):
    """txt2img / img2img success body."""

    images: list[str]
    parameters: dict[str, Any]
    info: str


class SamplerItem(msgspec.Struct, kw_only=True):
    """One entry of ``GET /sdapi/v1/samplers``."""

    name: str
    aliases: list[str]
    options: dict[str, str]


class SdModel(msgspec.Struct, kw_only=True):
    """One entry of ``GET /sdapi/v1/sd-models``."""

    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None


class Options(msgspec.Struct, kw_only=True):
    """``GET /sdapi/v1/options``: the settings that mean something here."""

    sd_model_checkpoint: str
    sd_checkpoint_hash: str | None
    sd_vae: str
    samples_format: str
    CLIP_stop_at_last_layers: int
    sdxl_refiner_available: bool


class OptionsUpdate(msgspec.Struct, kw_only=True):
    """``POST /sdapi/v1/options``: only the checkpoint is checked; other settings are ignored."""

    sd_model_checkpoint: str | None = None


class ProgressState(msgspec.Struct, kw_only=True):
    """``state`` of ``/progress``."""

    skipped: bool = False
    interrupted: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(msgspec.Struct, kw_only=True):
    """``GET /sdapi/v1/progress``."""

    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None
    textinfo: str | None


class ValidationItem(msgspec.Struct, kw_only=True):
    """One FastAPI validation error."""

    loc: list[str | int]
    msg: str
    type: str


class ValidationBody(msgspec.Struct, kw_only=True):
    """FastAPI's 422 body."""

    detail: list[ValidationItem]


class ErrorBody(msgspec.Struct, kw_only=True):
    """A1111's exception middleware body."""

    error: str
    detail: str
    body: str
    errors: str


# -- translation -----------------------------------------------------------------------------


class UnsupportedScheduler(ValueError):
    """A1111 1.9's ``scheduler`` names a noise schedule with no equivalent here."""


def _scheduler(value: str | None) -> str:
    return (value or "automatic").strip().lower()


def a1111_sampler(name: str, scheduler: str | None) -> str:
    """An A1111 sampler (menu name or ``k_*`` alias) with 1.9's ``scheduler`` folded in.

    ``DPM++ 2M`` with ``scheduler: karras`` is ``DPM++ 2M Karras``, the spelling the sampler
    registry knows. Raises :class:`UnsupportedScheduler` for a ``scheduler`` other than
    automatic or karras. Whether the registry has the name is the caller's to ask: each API
    refuses an unknown sampler in its own way.
    """
    raw = name.strip()
    resolved = _BY_ALIAS.get(raw.lower(), raw)
    scheduler = _scheduler(scheduler)
    if scheduler == "karras":
        return resolved if resolved.lower().endswith("karras") else f"{resolved} Karras"
    if scheduler not in _DEFAULT_SCHEDULERS:
        raise UnsupportedScheduler(scheduler)
    return resolved


def a1111_clip_skip(value: int | None) -> int | None:
    """A1111's clip_skip (1 = last CLIP layer) as extra layers skipped past SDXL's penultimate.

    SDXL already reads the penultimate layer, which is what A1111's 2 means; 1 and 2 both give
    that, and each step above skips one more layer.
    """
    if value is None or value <= 2:
        return None
    return value - 2


def decode_b64_image(text: str, field: str, max_bytes: int) -> bytes:
    """Base64 (optionally a ``data:`` URI) → bytes, or a 422 naming ``field``."""
    payload = text.partition(",")[2] if text.startswith("data:") else text
    if len(payload) * 3 // 4 > max_bytes:
        raise invalid(f"{field}: the image is larger than the {max_bytes}-byte limit", field=field)
    try:
        return base64.b64decode(payload.strip(), validate=False)
    except (binascii.Error, ValueError):
        raise invalid(f"{field}: Invalid encoded image", field=field) from None


def _init_source(body: Img2ImgRequest) -> str:
    """The first of ``init_images`` (A1111 uses only that one), or A1111's 404 without one."""
    if not body.init_images:
        raise ApiError("not_found", "Init image not found", field="init_images")
    return body.init_images[0]


def invert_mask(data: bytes) -> bytes:
    """The mask with white and black swapped (``inpainting_mask_invert: 1``), as PNG."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as image:
        out = io.BytesIO()
        ImageOps.invert(to_luma(image)).save(out, format="PNG")
    return out.getvalue()


def infotext(prompt: str, negative: str, steps: int, sampler: str, cfg: float, seed: int,
             width: int, height: int, model: str, extra: dict[str, Any]) -> str:
    """A1111's "parameters" text for one image (what PNG-info tools parse)."""
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    pairs = {"Steps": steps, "Sampler": sampler, "CFG scale": f"{cfg:g}", "Seed": seed,
             "Size": f"{width}x{height}", "Model": model, **extra}
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs.items()))
    return "\n".join(lines)


class A1111Dialect(Dialect):
    """The AUTOMATIC1111 webui API."""

    name = "a1111"
    prefixes = ("/sdapi/",)
    field_names: ClassVar[dict[str, str]] = {
        "guidance": "cfg_scale", "sampler": "sampler_name", "init_image": "init_images",
        "n": "batch_size", "refine": "refiner_checkpoint",
        "init_image.strength": "denoising_strength", "init_image.mask": "mask",
    }

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.fetch_policy = ctx.fetch_policy
        # Key id -> "interrupted" or "skipped": what /progress's state reports, as A1111 keeps
        # its flag from the interrupt until the next job begins. One entry per key at most.
        self._stopped: dict[str, str] = {}

    def route_handlers(self) -> list[Any]:
        """txt2img, img2img, samplers, sd-models, options (GET/POST), progress, interrupt, skip."""
        opt = {"dialect": self.name}
        gen = {**opt, "kind": "generate", "schema_out": GenerationResponse}

        @post(f"{PREFIX}/txt2img", status_code=200,
              opt={**gen, "schema_in": Txt2ImgRequest, "summary": "AUTOMATIC1111 text-to-image"})
        async def txt2img(request: Request) -> Response:
            return await self.generate(request, Txt2ImgRequest)

        @post(f"{PREFIX}/img2img", status_code=200,
              opt={**gen, "schema_in": Img2ImgRequest,
                   "summary": "AUTOMATIC1111 image-to-image and inpainting (mask)"})
        async def img2img(request: Request) -> Response:
            return await self.generate(request, Img2ImgRequest)

        @get(f"{PREFIX}/samplers", opt={**opt, "schema_out": list[SamplerItem],
                                        "summary": "AUTOMATIC1111 sampler list"})
        async def samplers(request: Request) -> Response:
            self.authenticate(request)
            return json_response(self.sampler_items())

        @get(f"{PREFIX}/sd-models", opt={**opt, "schema_out": list[SdModel],
                                         "summary": "AUTOMATIC1111 checkpoint list"})
        async def sd_models(request: Request) -> Response:
            self.authenticate(request)
            return json_response([self.sd_model()])

        @get(f"{PREFIX}/options", opt={**opt, "schema_out": Options,
                                       "summary": "AUTOMATIC1111 settings (read)"})
        async def get_options(request: Request) -> Response:
            self.authenticate(request)
            return json_response(self.options())

        @post(f"{PREFIX}/options", status_code=200,
              opt={**opt, "schema_in": OptionsUpdate,
                   "summary": "AUTOMATIC1111 settings: confirms the served checkpoint"})
        async def set_options(request: Request) -> Response:
            self.authenticate(request)
            update = decode_json(await request.body(), OptionsUpdate, lax=True)
            if update.sd_model_checkpoint is not None:
                self.check_checkpoint(update.sd_model_checkpoint, "sd_model_checkpoint")
            return json_response(None)

        # GET only: skip_current_image=true skips the running image, which a HEAD must not.
        @get(f"{PREFIX}/progress", opt={**opt, "kind": "poll", "schema_out": ProgressResponse,
                                        "head": False,
                                        "summary": "AUTOMATIC1111 progress of the running batch"})
        async def progress(request: Request) -> Response:
            principal = self.authenticate(request)
            skip = request.query_params.get("skip_current_image", "false").lower() == "true"
            return json_response(await self.progress(skip, self._stopped.get(principal.id)))

        @post(f"{PREFIX}/interrupt", status_code=200,
              opt={**opt, "summary": "AUTOMATIC1111 interrupt: the caller's running generation "
                                      "stops early and answers with what it has"})
        async def interrupt(request: Request) -> Response:
            self.stop_early(self.authenticate(request), "interrupted")
            return json_response({})

        @post(f"{PREFIX}/skip", status_code=200,
              opt={**opt, "summary": "AUTOMATIC1111 skip: as interrupt (one job at a time here)"})
        async def skip(request: Request) -> Response:
            self.stop_early(self.authenticate(request), "skipped")
            return json_response(None)

        return [txt2img, img2img, samplers, sd_models, get_options, set_options, progress,
                interrupt, skip]

    # -- handlers --------------------------------------------------------------------------

    def authenticate(self, request: Request) -> Any:
        """Bearer key, or HTTP Basic with the key as the password."""
        header = request.headers.get("authorization", "")
        scheme, _, value = header.strip().partition(" ")
        key = bearer_token(request)
        if scheme.lower() == "basic":
            try:
                _user, colon, key = base64.b64decode(value.strip(), validate=True
                                                    ).decode("utf-8").partition(":")
            except ValueError:  # binascii.Error, UnicodeDecodeError, non-ASCII header text
                colon = ""
            if (not colon or not key) and self.ctx.keys.enabled:
                # A1111's own answer to Basic credentials it cannot use.
                raise ApiError("auth", "Incorrect username or password (HTTP Basic: send the "
                               "API key as the password)")
        return self.ctx.authenticate_key(key, self.name)

    async def generate(self, request: Request, schema: type[Txt2ImgRequest]) -> Response:
        """Authenticate, decode, translate, admit, load the images, run, answer in A1111's shape.

        Admission (quota included) comes before the init image and mask are loaded: a client
        without quota cannot make this server fetch URLs.
        """
        principal = self.authenticate(request)
        body = decode_json(await request.body(), schema, lax=True)
        img = body if isinstance(body, Img2ImgRequest) else None
        canonical, sampler = self.to_canonical(body, principal.id)
        if img is not None:
            _init_source(img)
        self.ctx.admit(principal)
        self._stopped.pop(principal.id, None)  # a new job begins: A1111 clears the flags
        if img is not None:
            canonical = msgspec.structs.replace(canonical, init_image=await self.init_image(img))
        result = await unless_disconnected(
            request, self.ctx.engine.generate(canonical, tag=self.interrupt_tag(principal)))
        self.ctx.record_usage(principal, result, len(result.images))
        return json_response(self.to_response(body, img, canonical, sampler, result))

    def interrupt_tag(self, principal: Any) -> str:
        """What ``/interrupt`` stops: this key's A1111 generations (never another key's)."""
        return f"{self.name}:{principal.id}"

    def stop_early(self, principal: Any, how: str) -> None:
        """``/interrupt`` and ``/skip``: cut the caller's running generations short.

        A1111 has one job at a time, so interrupt and skip both end it; here each key's running
        generations end (a batch shared with another key's request runs on to the end), and
        its requests still waiting for their first batch are left alone, as A1111 leaves the
        jobs queued behind the current one. ``how`` ("interrupted" or "skipped") is what the
        key's ``/progress`` state says until its next generation begins.
        """
        self._stopped[principal.id] = how
        self.ctx.engine.interrupt(self.interrupt_tag(principal))

    def to_canonical(self, body: Txt2ImgRequest, client_id: str) -> tuple[GenerationRequest, str]:
        """The canonical request and the A1111 sampler name that was used."""
        n = body.batch_size * body.n_iter
        if n > MAX_IMAGES:
            raise invalid(f"batch_size × n_iter must be at most {MAX_IMAGES}, got "
                          f"{body.batch_size} × {body.n_iter}", field="batch_size")
        if body.seed != -1 and not 0 <= body.seed <= MAX_SEED:
            raise invalid(f"seed must be -1 (random) or between 0 and {MAX_SEED}", field="seed")
        if body.enable_hr:
            raise invalid("hires fix (enable_hr) is not supported by this server; generate at "
                          "the final width/height instead", field="enable_hr")
        if body.script_name:
            raise ApiError("validation", f"Script '{body.script_name}' not found",
                           field="script_name", status=422)
        for title in body.alwayson_scripts:
            raise ApiError("validation", f"always on script {title} not found",
                           field="alwayson_scripts", status=422)
        sampler = self.sampler_name(body)
        overrides = body.override_settings
        if "sd_model_checkpoint" in overrides:
            self.check_checkpoint(overrides["sd_model_checkpoint"],
                                  "override_settings.sd_model_checkpoint")
        output_format = "png"
        if "samples_format" in overrides:
            fmt = str(overrides["samples_format"]).lower()
            if fmt not in _SAMPLES_FORMATS:
                raise invalid("samples_format must be png, jpg or webp",
                              field="override_settings.samples_format")
            output_format = _SAMPLES_FORMATS[fmt]
        clip_skip = None
        if "CLIP_stop_at_last_layers" in overrides:
            value = overrides["CLIP_stop_at_last_layers"]
            if not isinstance(value, int) or not 1 <= value <= 12:
                raise invalid("CLIP_stop_at_last_layers must be an integer from 1 to 12",
                              field="override_settings.CLIP_stop_at_last_layers")
            clip_skip = a1111_clip_skip(value)
        refine = None
        if body.refiner_checkpoint and body.refiner_checkpoint.lower() != "none":
            refine = Refine(steps=body.steps, high_noise_frac=body.refiner_switch_at or 0.8)
        canonical = GenerationRequest(
            prompt=body.prompt,
            negative_prompt=body.negative_prompt,
            n=n,
            width=body.width,
            height=body.height,
            steps=body.steps,
            guidance=body.cfg_scale,
            sampler=sampler,  # sampler_name() already resolved it in the registry
            seed=None if body.seed == -1 else body.seed,
            clip_skip=clip_skip,
            output_format=output_format,  # type: ignore[arg-type]
            want_base64=True,
            refine=refine,
            client_id=client_id,
        )
        return canonical, sampler

    def sampler_name(self, body: Txt2ImgRequest) -> str:
        """``sampler_name`` (else ``sampler_index``) with ``scheduler`` applied; 404 if unknown."""
        raw = (body.sampler_name or body.sampler_index).strip()
        try:
            name = a1111_sampler(raw, body.scheduler)
        except UnsupportedScheduler:
            raise invalid(f"scheduler {body.scheduler!r} is not supported; use 'automatic' or "
                          "'karras'", field="scheduler") from None
        try:
            return self.ctx.engine.samplers.canonical_name(name)
        except UnknownSampler:
            if _scheduler(body.scheduler) == "karras":
                raise invalid(f"sampler {raw!r} has no Karras variant here",
                              field="scheduler") from None
            raise ApiError("not_found", f"Sampler not found: {raw!r}; see GET {PREFIX}/samplers",
                           field="sampler_name") from None

    async def init_image(self, body: Img2ImgRequest) -> InitImage:
        """The first of ``init_images`` (base64, data URI or http(s) URL) and the mask, checked."""
        data = await self._image(_init_source(body), "init_images.0")
        mask = None
        if body.mask:
            mask = await self._image(body.mask, "mask")
            if body.inpainting_mask_invert:
                mask = await asyncio.to_thread(invert_mask, mask)
        return InitImage(data=data, strength=body.denoising_strength, mask=mask)

    async def _image(self, value: str, field: str) -> bytes:
        max_bytes = self.fetch_policy.max_bytes
        return await load_image(value, field, self.fetch_policy,
                                lambda text: decode_b64_image(text, field, max_bytes))

    def to_response(self, body: Txt2ImgRequest, img: Img2ImgRequest | None,
                    canonical: GenerationRequest, sampler: str,
                    result: GenerationResult) -> GenerationResponse:
        """``images``, the request echo and the ``info`` JSON string."""
        parameters = msgspec.to_builtins(body)
        if img is not None and not img.include_init_images:
            # As A1111: the (large) input images are not echoed back unless asked for.
            parameters["init_images"] = None
            parameters["mask"] = None
        seeds = [image.seed for image in result.images]
        model = self.sd_model().model_name
        extra: dict[str, Any] = {}
        # Reported in A1111's own terms, as asked (1, A1111's default, when not asked).
        clip_stop = body.override_settings.get("CLIP_stop_at_last_layers") or 1
        if clip_stop > 1:
            extra["Clip skip"] = clip_stop
        if img is not None:
            extra["Denoising strength"] = img.denoising_strength
        texts = [infotext(body.prompt, body.negative_prompt, body.steps, sampler, body.cfg_scale,
                          seed, canonical.width, canonical.height, model, extra)
                 for seed in seeds]
        info = GenerationInfo(
            prompt=body.prompt, all_prompts=[body.prompt] * len(seeds),
            negative_prompt=body.negative_prompt,
            all_negative_prompts=[body.negative_prompt] * len(seeds),
            seed=result.seed, all_seeds=seeds, subseed=-1, all_subseeds=[-1] * len(seeds),
            subseed_strength=0.0, width=canonical.width, height=canonical.height,
            sampler_name=sampler, cfg_scale=body.cfg_scale, steps=body.steps,
            batch_size=body.batch_size, restore_faces=False, face_restoration_model=None,
            sd_model_name=model, sd_model_hash=None, sd_vae_name=None, sd_vae_hash=None,
            seed_resize_from_w=-1, seed_resize_from_h=-1,
            denoising_strength=img.denoising_strength if img is not None else None,
            extra_generation_params=extra, index_of_first_image=0, infotexts=texts,
            styles=body.styles, job_timestamp=time.strftime("%Y%m%d%H%M%S"),
            clip_skip=clip_stop,
            is_using_inpainting_conditioning=bool(img is not None and img.mask),
            version="imagegate",
        )
        images = [image.b64 or "" for image in result.images] if body.send_images else []
        return GenerationResponse(images=images, parameters=parameters,
                                  info=msgspec.json.encode(info).decode("utf-8"))

    # -- reads -----------------------------------------------------------------------------

    def sampler_items(self) -> list[SamplerItem]:
        """A1111 names the engine's registry can run."""
        known = {n.casefold() for n in self.ctx.engine.samplers.names()}
        return [SamplerItem(name=name, aliases=list(ALIASES.get(name, ())),
                            options={"scheduler": "karras"} if name.endswith("Karras") else {})
                for name in A1111_SAMPLERS if name.casefold() in known]

    def sd_model(self) -> SdModel:
        """The one served checkpoint."""
        info = self.ctx.engine.info
        model_id = info.id if info else self.ctx.settings.model
        return SdModel(title=model_id, model_name=model_id, hash=None, sha256=None,
                       filename=info.source if info else model_id, config=None)

    def check_checkpoint(self, value: object, field: str) -> None:
        """Refuse a checkpoint switch: one model is served per process."""
        served = self.sd_model()
        if value not in (served.title, served.model_name):
            raise invalid(f"cannot switch to checkpoint {value!r}: this server serves only "
                          f"{served.title!r} (one model per process)", field=field)

    def options(self) -> Options:
        """The settings clients read (checkpoint, format, clip skip)."""
        info = self.ctx.engine.info
        return Options(sd_model_checkpoint=self.sd_model().title, sd_checkpoint_hash=None,
                       sd_vae="Automatic", samples_format="png", CLIP_stop_at_last_layers=1,
                       sdxl_refiner_available=bool(info and info.has_refiner))

    async def progress(self, skip_current_image: bool, stopped: str | None = None
                       ) -> ProgressResponse:
        """The engine's progress snapshot, where the engine offers one.

        Written against ``Engine.progress()`` (active, step, total_steps, fraction,
        eta_seconds, queued_requests, preview PNG bytes or None); an engine without it reports
        idle with a note in ``textinfo``. ``stopped``: the caller's last interrupt or skip
        since its last generation began, if any.
        """
        probe = getattr(self.ctx.engine, "progress", None)
        if probe is None:
            return ProgressResponse(progress=0.0, eta_relative=0.0,
                                    state=ProgressState(interrupted=stopped == "interrupted",
                                                        skipped=stopped == "skipped"),
                                    current_image=None,
                                    textinfo="progress reporting is not available")
        snap = probe()
        if inspect.isawaitable(snap):
            snap = await snap
        active = bool(getattr(snap, "active", False))
        queued = int(getattr(snap, "queued_requests", 0) or 0)
        preview = getattr(snap, "preview", None)
        current = None
        if preview and not skip_current_image:
            current = b64_string(preview)
        state = ProgressState(
            interrupted=stopped == "interrupted", skipped=stopped == "skipped",
            job="generate" if active else "", job_count=queued + (1 if active else 0),
            sampling_step=int(getattr(snap, "step", 0) or 0),
            sampling_steps=int(getattr(snap, "total_steps", 0) or 0),
        )
        return ProgressResponse(
            progress=float(getattr(snap, "fraction", 0.0) or 0.0) if active else 0.0,
            eta_relative=float(getattr(snap, "eta_seconds", 0.0) or 0.0) if active else 0.0,
            state=state, current_image=current, textinfo=None,
        )

    # -- errors ----------------------------------------------------------------------------

    def render_failure(self, failure: Failure, request: Request) -> Response:
        """FastAPI's 422 list for field validation; A1111's middleware body for the rest."""
        headers = retry_headers(failure)
        if failure.cause == "validation" and failure.status in (400, 422):
            loc: list[str | int] = ["body"]
            for part in (failure.field or "").split("."):
                if part:
                    loc.append(int(part) if part.isdigit() else part)
            kind = "json_invalid" if failure.code == "invalid_json" else "value_error"
            body = ValidationBody(detail=[ValidationItem(loc=loc, msg=failure.message, type=kind)])
            return json_response(body, 422, headers)
        if failure.cause == "auth":
            headers["www-authenticate"] = "Basic"
        error = {"internal": "RuntimeError", "oom": "OutOfMemoryError",
                 "timeout": "TimeoutError"}.get(failure.cause, "HTTPException")
        errors = f"{failure.status}: {failure.message}" if error == "HTTPException" \
            else failure.message
        return json_response(ErrorBody(error=error, detail=failure.message, body="",
                                       errors=errors), failure.status, headers)


DIALECT = A1111Dialect
