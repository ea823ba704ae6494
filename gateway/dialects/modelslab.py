"""ModelsLab / stablediffusionapi.com text2img, img2img and inpaint, as the API and SDK speak.

The HTTP API of the vendor's docs and the ``modelslab-py`` SDK.

Submit: ``POST /api/v6/images/{op}`` (v6 community), ``/api/v3/{op}`` (legacy),
``/api/v1/enterprise/{op}`` (the enterprise pages, seed 003) and
``/api/v1/enterprise/images/{op}`` (where ``modelslab-py`` sends enterprise calls), for ``op`` in
``text2img``, ``img2img`` (``init_image`` + ``strength``) and ``inpaint`` (+ ``mask_image``). The
key is ``"key"`` in the JSON body; numbers may arrive as strings and booleans as
``"yes"``/``"no"``. The call waits up to ``--modelslab-wait-s`` for the images: ``status:
"success"`` with ``output`` URLs, else ``status: "processing"`` with ``eta`` and ``fetch_result``.
img2img and inpaint are admitted (quota counted) before their images are fetched or decoded.

Fetch: ``POST /api/v6/images/fetch/{id}``, ``/api/v3/fetch/{id}``,
``/api/v1/enterprise/images/fetch/{id}`` with ``{key}``, or ``/api/v6/images/fetch`` and
``/api/v1/enterprise/fetch`` with ``{key, request_id}``. ``webhook`` (+ ``track_id``) gets the
vendor's webhook body through the SSRF-safe sender once the job is final.

Errors: ``{"status": "error", "message"}`` with the real HTTP status of the vendor's current
docs (400 validation, 401 key, 429 + ``retry_after``…); legacy ``/api/v3`` bodies also carry
the old ``messege`` spelling. Wire facts: shared/reference/api-dialects.md §6 and seed 003.
Docs: docs/modelslab.md.
"""

from __future__ import annotations

import asyncio
import io
import math
import re
import secrets
from typing import Annotated, Any, ClassVar

import msgspec
from litestar import Request, Response, post
from msgspec import Meta

from auth.keys import Principal
from gateway.async_tasks import AsyncTaskDialect, echo_id, encode_request
from gateway.dialects.a1111 import a1111_clip_skip
from gateway.dialects.alibaba_scc import inline_image
from gateway.errors import ApiError, Failure, invalid
from gateway.fetch import load_image
from gateway.sizes import fit_side, fit_size
from gateway.wire import convert, decode_json, json_response, retry_headers
from inference import GenerationRequest
from inference.request import InitImage, Lora
from inference.tasks import CANCELLED, COMPLETED, FAILED, QUEUED, RUNNING, TIMED_OUT, Job

MAX_SEED = 2**32 - 1
MAX_SAMPLES = 4
MAX_LORAS = 5
DEFAULT_SCHEDULER = "UniPCMultistepScheduler"
DEFAULT_STEPS = 30
# The vendor's img2img/inpaint examples all send 0.7 (its OpenAPI placeholder is 0.5).
DEFAULT_STRENGTH = 0.7
# Schedulers whose Karras-sigma variant the sampler registry has (A1111 names).
KARRAS = {
    "DPMSolverMultistepScheduler": "DPM++ 2M Karras",
    "LMSDiscreteScheduler": "LMS Karras",
    "KDPM2DiscreteScheduler": "DPM2 Karras",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a Karras",
    "DPMSolverSDEScheduler": "DPM++ SDE Karras",
}

# Each family of submit paths and the fetch path its jobs answer with in ``fetch_result``.
FAMILIES = {
    "/api/v6/images/": "/api/v6/images/fetch",
    "/api/v3/": "/api/v3/fetch",
    "/api/v1/enterprise/": "/api/v1/enterprise/fetch",
    "/api/v1/enterprise/images/": "/api/v1/enterprise/images/fetch",
}
OPERATIONS = ("text2img", "img2img", "inpaint")
SUBMIT_PATHS = {f"{prefix}{op}": fetch for op in OPERATIONS for prefix, fetch in FAMILIES.items()}
FETCH_ID_PATHS = ("/api/v6/images/fetch/{job_id:str}", "/api/v3/fetch/{job_id:str}",
                  "/api/v1/enterprise/fetch/{job_id:str}",
                  "/api/v1/enterprise/images/fetch/{job_id:str}")
FETCH_BODY_PATHS = ("/api/v6/images/fetch", "/api/v1/enterprise/fetch")

_YES = ("yes", "true", "1", "y", "on")
_NO = ("no", "false", "0", "n", "off", "")
BOOL_FIELDS = ("safety_checker", "enhance_prompt", "multi_lingual", "panorama", "self_attention",
               "upscale", "highres_fix", "tomesd", "use_karras_sigmas", "base64", "temp",
               "instant_response")
NUMBER_FIELDS = ("width", "height", "samples", "num_inference_steps", "seed", "guidance_scale",
                 "clip_skip", "strength")
# Older vendor pages' names, read when the current name is absent (img2img and inpaint only).
IMAGE_ALIASES = {"prompt_strength": "strength", "steps": "num_inference_steps"}

# -- wire schemas ----------------------------------------------------------------------------


class Text2ImgRequest(msgspec.Struct, kw_only=True):
    """text2img body after "yes"/"no" and numeric strings are normalised. Extra keys ignored."""

    key: str | None = None
    model_id: str | None = None
    prompt: str = ""
    negative_prompt: str | None = None
    width: int = 512
    height: int = 512
    samples: Annotated[int, Meta(ge=1, le=MAX_SAMPLES)] = 1
    num_inference_steps: int = DEFAULT_STEPS
    safety_checker: bool = False
    safety_checker_type: str | None = None
    enhance_prompt: bool = False
    seed: Annotated[int, Meta(ge=0, le=MAX_SEED)] | None = None
    guidance_scale: Annotated[float, Meta(ge=1, le=20)] = 7.5
    multi_lingual: bool = False
    panorama: bool = False
    self_attention: bool = False
    upscale: bool = False
    highres_fix: bool = False
    embeddings_model: str | None = None
    lora_model: str | None = None
    lora_strength: str | None = None
    clip_skip: Annotated[int, Meta(ge=1, le=8)] = 2
    tomesd: bool = False
    use_karras_sigmas: bool = True
    algorithm_type: str | None = None
    vae: str | None = None
    scheduler: str | None = None
    ip_adapter_id: str | None = None
    base64: bool = False
    temp: bool = False
    instant_response: bool = False
    webhook: str | None = None
    track_id: str | int | None = None


class Img2ImgRequest(Text2ImgRequest, kw_only=True):
    """img2img: text2img's fields plus the init image and the denoising strength.

    ``width``/``height`` left out: the init image's size (the vendor: "the dimensions of the
    generated image will be the same as the dimensions of the init_image").
    """

    init_image: str | None = None
    strength: Annotated[float, Meta(gt=0, le=1)] = DEFAULT_STRENGTH
    width: int | None = None
    height: int | None = None


class InpaintRequest(Img2ImgRequest, kw_only=True):
    """inpaint: img2img's fields plus the mask (white = repaint, black = keep)."""

    mask_image: str | None = None


class FetchRequest(msgspec.Struct, kw_only=True):
    """Body of the fetch routes (``request_id`` where the id is not in the path)."""

    key: str | None = None
    request_id: str | int | None = None
    id: str | int | None = None


class SuccessResponse(msgspec.Struct, kw_only=True):
    """Finished: image URLs (expiring) and the effective parameters."""

    id: int
    output: list[str]
    proxy_links: list[str]
    generationTime: float
    meta: dict[str, Any]
    status: str = "success"
    nsfw_content_detected: bool = False


class ProcessingResponse(msgspec.Struct, kw_only=True):
    """Still queued or running: poll ``fetch_result`` (or wait for the webhook)."""

    id: int
    eta: float
    message: str
    fetch_result: str
    meta: dict[str, Any]
    status: str = "processing"
    output: list[str] = []
    future_links: list[str] = []


class FailedResponse(msgspec.Struct, kw_only=True):
    """The job ran and failed (or was cancelled, or timed out)."""

    id: int
    message: str
    status: str = "failed"
    output: list[str] = []


class WebhookSuccess(msgspec.Struct, kw_only=True):
    """Webhook body of a finished job."""

    id: int
    output: list[str]
    generationTime: float
    meta: dict[str, Any]
    track_id: str | int | None
    status: str = "success"


class WebhookFailed(msgspec.Struct, kw_only=True):
    """Webhook body of a failed job."""

    id: int
    message: str
    track_id: str | int | None
    status: str = "failed"


class ErrorResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Every error; ``messege`` (the legacy typo) only on /api/v3."""

    status: str
    message: str
    messege: str | None = None
    retry_after: int | None = None


# -- translation helpers ---------------------------------------------------------------------


def normalise(raw: dict[str, Any]) -> dict[str, Any]:
    """Legacy forms → typed JSON: "yes"/"no" booleans, "" or "null" numbers, numeric strengths."""
    out = dict(raw)
    for name in BOOL_FIELDS:
        value = out.get(name)
        if isinstance(value, str):
            text = value.strip().casefold()
            if name == "upscale" and re.fullmatch(r"[0-9]{1,3}", text):
                out[name] = int(text) > 1  # some clients send the factor ("2")
            elif text in _YES:
                out[name] = True
            elif text in _NO:
                out[name] = False
            else:
                raise invalid(f"{name} must be yes or no, got {value!r}", field=name)
        elif value is None and name in out:
            del out[name]
    for name in NUMBER_FIELDS:
        value = out.get(name)
        if _absent(value):
            out.pop(name, None)
    strength = out.get("lora_strength")
    if isinstance(strength, bool):
        raise invalid("lora_strength must be a number or comma-separated numbers",
                      field="lora_strength")
    if isinstance(strength, int | float):
        out["lora_strength"] = str(strength)
    return out


def image_aliases(raw: dict[str, Any]) -> dict[str, Any]:
    """``prompt_strength`` → ``strength`` and ``steps`` → ``num_inference_steps`` when absent.

    Absent as :func:`normalise` reads it: missing, null, ``""`` or ``"null"``.
    """
    out = dict(raw)
    for old, new in IMAGE_ALIASES.items():
        if _absent(out.get(new)) and not _absent(out.get(old)):
            out[new] = out[old]
    return out


def _absent(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().casefold() in ("", "null"))


def output_size(width: int | None, height: int | None, image: tuple[int, int], *, area: int,
                min_size: int, max_size: int) -> tuple[int, int]:
    """The img2img output size: as asked, else from the init image (``image``).

    Neither given: the init image's own size (shrunk to ``area`` if larger, multiples of 8).
    One given: the other follows the init image's aspect ratio. Both: as asked (the engine
    checks them).
    """
    if width is not None and height is not None:
        return width, height
    if width is None and height is None:
        return fit_size(*image, area=area, min_size=min_size, max_size=max_size)
    iw, ih = image
    if width is not None:
        return width, fit_side(width * ih / iw, min_size, max_size)
    assert height is not None
    return fit_side(height * iw / ih, min_size, max_size), height


def sampler_for(scheduler: str | None, karras: bool, algorithm_type: str | None) -> str:
    """ModelsLab's scheduler class name (+ Karras sigmas) as a sampler registry name."""
    if algorithm_type not in (None, "", "none"):
        raise invalid(f"algorithm_type {algorithm_type!r} is not supported; use none",
                      field="algorithm_type")
    name = (scheduler or DEFAULT_SCHEDULER).strip()
    if karras and name in KARRAS:
        return KARRAS[name]
    return name


def parse_loras(models: str | None, strengths: str | None) -> tuple[Lora, ...]:
    """``lora_model`` "a,b" + ``lora_strength`` "0.6,0.8" (one value applies to all)."""
    names = [n.strip() for n in (models or "").split(",") if n.strip()]
    if not names:
        if strengths not in (None, ""):
            raise invalid("lora_strength needs lora_model", field="lora_strength")
        return ()
    if len(names) > MAX_LORAS:
        raise invalid(f"at most {MAX_LORAS} LoRA models per request", field="lora_model")
    raw = [s.strip() for s in (strengths or "").split(",") if s.strip()]
    try:
        values = [float(s) for s in raw]
    except ValueError:
        raise invalid(f"lora_strength must be comma-separated numbers, got {strengths!r}",
                      field="lora_strength") from None
    if not values:
        values = [1.0] * len(names)
    elif len(values) == 1:
        values = values * len(names)
    elif len(values) != len(names):
        raise invalid(f"lora_strength has {len(values)} values for {len(names)} lora_model "
                      "entries", field="lora_strength")
    for v in values:
        if not 0.1 <= v <= 1:
            raise invalid("lora_strength values must be between 0.1 and 1", field="lora_strength")
    return tuple(Lora(name=n, weight=w) for n, w in zip(names, values, strict=True))


def _new_id() -> str:
    # The vendor's ids are integers; 15 digits keep them unique and JSON-safe.
    return str(10**14 + secrets.randbelow(9 * 10**14))


def _int_id(job_id: str) -> int:
    return int(job_id) if job_id.isdigit() else 0


# -- the dialect -----------------------------------------------------------------------------


class ModelsLabDialect(AsyncTaskDialect):
    """ModelsLab / stablediffusionapi text2img, img2img and inpaint with fetch and webhooks."""

    name = "modelslab"
    prefixes = ("/api/v6/", "/api/v3/", "/api/v1/enterprise/")
    field_names: ClassVar[dict[str, str]] = {
        "steps": "num_inference_steps", "guidance": "guidance_scale", "sampler": "scheduler",
        "n": "samples", "loras": "lora_model", "clip_skip": "clip_skip",
        "init_image": "init_image", "init_image.strength": "strength",
        "init_image.mask": "mask_image",
    }

    def route_handlers(self) -> list[Any]:
        """Submit routes (four paths per operation) and fetch routes (id in path or body)."""
        opt = {"dialect": self.name}

        def paths(op: str) -> list[str]:
            return [path for path in SUBMIT_PATHS if path.endswith(f"/{op}")]

        @post(paths("text2img"), status_code=200, opt={
            **opt, "kind": "generate", "schema_in": Text2ImgRequest,
            "schema_out": SuccessResponse,
            "summary": "Text to image: success with output URLs, or processing with "
                       "fetch_result"})
        async def text2img(request: Request) -> Response:
            return await self.text2img(request)

        @post(paths("img2img"), status_code=200, opt={
            **opt, "kind": "generate", "schema_in": Img2ImgRequest,
            "schema_out": SuccessResponse,
            "summary": "Image to image (init_image, strength): success with output URLs, or "
                       "processing with fetch_result"})
        async def img2img(request: Request) -> Response:
            return await self.from_image(request, Img2ImgRequest)

        @post(paths("inpaint"), status_code=200, opt={
            **opt, "kind": "generate", "schema_in": InpaintRequest,
            "schema_out": SuccessResponse,
            "summary": "Inpainting (init_image, mask_image: white = repaint): success with "
                       "output URLs, or processing with fetch_result"})
        async def inpaint(request: Request) -> Response:
            return await self.from_image(request, InpaintRequest)

        @post(list(FETCH_ID_PATHS), status_code=200, opt={
            **opt, "kind": "poll", "schema_in": FetchRequest, "schema_out": SuccessResponse,
            "summary": "Fetch a queued result by id"})
        async def fetch_by_path(request: Request, job_id: str) -> Response:
            body = decode_json(await request.body(), FetchRequest)
            return await self.fetch(request, body, job_id)

        @post(list(FETCH_BODY_PATHS), status_code=200, opt={
            **opt, "kind": "poll", "schema_in": FetchRequest, "schema_out": SuccessResponse,
            "summary": "Fetch a queued result by request_id"})
        async def fetch_by_body(request: Request) -> Response:
            body = decode_json(await request.body(), FetchRequest)
            job_id = body.request_id if body.request_id is not None else body.id
            if job_id is None or str(job_id).strip() == "":
                self._principal(body.key)
                raise invalid("request_id is required", field="request_id")
            return await self.fetch(request, body, str(job_id))

        return [text2img, img2img, inpaint, fetch_by_path, fetch_by_body]

    # -- submission ------------------------------------------------------------------------

    async def text2img(self, request: Request) -> Response:
        """Authenticate by body key, check, queue, and wait a little for the images."""
        raw = decode_json(await request.body(), dict[str, Any])
        key = raw.get("key")
        principal = self._principal(key if isinstance(key, str) else None)
        body = convert(normalise(raw), Text2ImgRequest)
        canonical = self.to_canonical(body)
        self.tasks.check_request(canonical, self.field_names)
        return await self.queue(request, principal, body, canonical)

    async def from_image(self, request: Request, schema: type[Img2ImgRequest]) -> Response:
        """img2img / inpaint: check everything that needs no image, admit, then load the images.

        Admission (quota included) comes before any image is fetched or decoded, so a client
        without quota cannot make this server fetch URLs; the request is checked again with its
        images (strength against steps, the size taken from the init image).
        """
        raw = decode_json(await request.body(), dict[str, Any])
        key = raw.get("key")
        principal = self._principal(key if isinstance(key, str) else None)
        body = convert(normalise(image_aliases(raw)), schema)
        sources = image_sources(body)
        any_side = self._any_size()
        draft = self.to_canonical(body, size=(
            any_side if body.width is None else body.width,
            any_side if body.height is None else body.height))
        self.tasks.check_request(draft, self.field_names)
        if body.webhook:
            await self.tasks.check_webhook(body.webhook)
        await self.tasks.admit(principal, draft.n)
        canonical = await self.with_images(body, sources)
        self.tasks.check_request(canonical, self.field_names)
        return await self.queue(request, principal, body, canonical, admitted=True)

    async def with_images(self, body: Img2ImgRequest, sources: dict[str, str]
                          ) -> GenerationRequest:
        """The canonical request with its init image (and mask) loaded and sized."""
        images = {field: await self.image(value, field, inline=body.base64)
                  for field, value in sources.items()}
        data, size = images["init_image"]
        mask = images.get("mask_image")
        if mask is not None and mask[1] != size:
            raise invalid(f"mask_image is {mask[1][0]}x{mask[1][1]} but init_image is "
                          f"{size[0]}x{size[1]}; they must be the same size",
                          field="mask_image")
        info = self.ctx.engine.info
        s = self.ctx.settings
        width, height = output_size(
            body.width, body.height, size,
            area=info.default_width * info.default_height if info else 1024 * 1024,
            min_size=s.min_size, max_size=s.max_size)
        canonical = self.to_canonical(body, size=(width, height))
        init = InitImage(data=data, strength=body.strength,
                         mask=mask[0] if mask is not None else None)
        return msgspec.structs.replace(canonical, init_image=init)

    async def image(self, value: str, field: str, *, inline: bool
                    ) -> tuple[bytes, tuple[int, int]]:
        """The image in ``field`` and its size; a refusal is a 400 naming ``field``.

        An http(s) URL is fetched under the SSRF rules; with ``base64`` on, the value may also
        be inline (base64 or a ``data:`` URI). Either way it must decode as an image.
        """
        policy = self.tasks.fetch_policy
        if not inline and not value.startswith(("http://", "https://")):
            raise invalid(f"{field} must be an http(s) URL; to send the image inline (base64 or "
                          "a data: URI) set base64 to true", field=field)
        data = await load_image(value, field, policy,
                                lambda text: inline_image(text, policy.max_bytes))
        return data, await asyncio.to_thread(_image_size, data)

    def _any_size(self) -> int:
        # A valid side for checking a request before its init image (and so its size) is known.
        s = self.ctx.settings
        return fit_side(-(-s.min_size // 8) * 8, s.min_size, s.max_size)

    async def queue(self, request: Request, principal: Principal, body: Text2ImgRequest,
                    canonical: GenerationRequest, *, admitted: bool = False) -> Response:
        """Store the job and wait a little for it (``instant_response``: not at all)."""
        base = self.ctx.public_base_url(request)
        fetch_base = SUBMIT_PATHS.get(request.url.path.rstrip("/"), "/api/v6/images/fetch")
        job = await self.tasks.submit(
            principal, scope=principal.id, images=canonical.n, webhook=body.webhook or None,
            job_id=_new_id(), admitted=admitted,
            payload={"request": encode_request(canonical), "base_url": base,
                     "fetch": fetch_base, "meta": self.meta(body, canonical),
                     "track_id": body.track_id},
        )
        wait = 0.0 if body.instant_response else self.ctx.settings.modelslab_wait_s
        done = await self.tasks.wait(job.id, wait) if wait > 0 else job
        return json_response(await self.job_body(done or job, request))

    def to_canonical(self, body: Text2ImgRequest,
                     size: tuple[int, int] | None = None) -> GenerationRequest:
        """Translate; features this server lacks are refused by name, cosmetic ones ignored.

        ``size`` overrides ``width``/``height`` (img2img: taken from the init image). On
        img2img and inpaint ``base64`` means the input images may be inline (output stays URLs).
        """
        if not body.prompt.strip():
            raise invalid("prompt is required", field="prompt")
        refused = (("panorama", body.panorama), ("upscale", body.upscale),
                   ("highres_fix", body.highres_fix),
                   ("base64", body.base64 and not isinstance(body, Img2ImgRequest)),
                   ("embeddings_model", body.embeddings_model), ("vae", body.vae),
                   ("ip_adapter_id", body.ip_adapter_id))
        for name, value in refused:
            if value:
                raise invalid(f"{name} is not supported by this server; leave it out (or 'no')",
                              field=name)
        width, height = size or (body.width, body.height)
        return GenerationRequest(
            prompt=body.prompt,
            negative_prompt=body.negative_prompt or "",
            n=body.samples,
            width=width,
            height=height,
            steps=body.num_inference_steps,
            guidance=body.guidance_scale,
            sampler=sampler_for(body.scheduler, body.use_karras_sigmas, body.algorithm_type),
            seed=body.seed,
            clip_skip=a1111_clip_skip(body.clip_skip),
            output_format="png",
            loras=parse_loras(body.lora_model, body.lora_strength),
        )

    def meta(self, body: Text2ImgRequest, canonical: GenerationRequest) -> dict[str, Any]:
        """The effective parameters, in the vendor's ``meta`` names (seed filled in later)."""
        info = self.ctx.engine.info
        meta: dict[str, Any] = {
            "prompt": canonical.prompt, "negative_prompt": canonical.negative_prompt,
            "model_id": info.id if info else body.model_id, "W": canonical.width,
            "H": canonical.height, "n_samples": canonical.n, "steps": canonical.steps,
            "guidance_scale": canonical.guidance, "seed": canonical.seed,
            "scheduler": body.scheduler or DEFAULT_SCHEDULER,
            "use_karras_sigmas": "yes" if body.use_karras_sigmas else "no",
            "clip_skip": body.clip_skip, "lora": body.lora_model,
            "lora_strength": body.lora_strength, "safety_checker": "no",
            "enhance_prompt": "no", "upscale": "no", "vae": None,
        }
        if isinstance(body, Img2ImgRequest):
            meta["strength"] = body.strength
            for name in ("init_image", "mask_image"):
                value = getattr(body, name, None)
                if value:  # URLs echoed; inline images are not copied into every answer
                    meta[name] = value if value.startswith(("http://", "https://")) else None
        return meta

    # -- fetch -----------------------------------------------------------------------------

    async def fetch(self, request: Request, body: FetchRequest, job_id: str) -> Response:
        """A job's current body, for its owner only (404 otherwise)."""
        principal = self._principal(body.key)
        try:
            job = await self.tasks.own(principal, principal.id, job_id.strip())
        except ApiError:
            raise ApiError("not_found", f"no request with id {echo_id(job_id)} (unknown or expired)",
                           field="id") from None
        return json_response(await self.job_body(job, request))

    # -- JobHandler ------------------------------------------------------------------------

    async def webhook_body(self, job: Job) -> bytes:
        """The vendor's webhook body: success with output URLs, or failed with a message."""
        track = job.payload.get("track_id")
        if job.status == COMPLETED:
            urls = await self.tasks.media_urls(job, job.payload["base_url"])
            return msgspec.json.encode(WebhookSuccess(
                id=_int_id(job.id), output=urls, generationTime=_generation_time(job),
                meta=self._meta(job), track_id=track))
        return msgspec.json.encode(WebhookFailed(id=_int_id(job.id), message=_error(job),
                                                 track_id=track))

    # -- rendering -------------------------------------------------------------------------

    async def job_body(self, job: Job, request: Request) -> Any:
        """The success / processing / failed body for ``job``."""
        if job.status == COMPLETED:
            urls = await self.tasks.media_urls(job, request)
            return SuccessResponse(id=_int_id(job.id), output=urls, proxy_links=urls,
                                   generationTime=_generation_time(job), meta=self._meta(job))
        if job.status in (QUEUED, RUNNING):
            base = self.ctx.public_base_url(request)
            return ProcessingResponse(
                id=_int_id(job.id), eta=self.eta(job),
                message="Your request is processing; fetch the result at fetch_result",
                fetch_result=f"{base}{job.payload.get('fetch', '/api/v6/images/fetch')}/{job.id}",
                meta=self._meta(job))
        return FailedResponse(id=_int_id(job.id), message=_error(job))

    def eta(self, job: Job) -> float:
        """Seconds until the queue ahead of this job and the job itself have run (a guess)."""
        # The scheduler's recent-rate estimate is what admission uses for Retry-After.
        scheduler = getattr(self.ctx.engine, "_scheduler", None)
        if scheduler is None:
            return 1.0
        waiting = self.ctx.engine.queued_images + (job.images if job.status == QUEUED else 0)
        return float(math.ceil(scheduler.retry_after(max(waiting, job.images))))

    @staticmethod
    def _meta(job: Job) -> dict[str, Any]:
        meta = dict(job.payload.get("meta") or {})
        if job.result is not None:
            meta["seed"] = job.result.seed
            meta["model_id"] = job.result.model or meta.get("model_id")
        return meta

    # -- helpers ---------------------------------------------------------------------------

    def _principal(self, key: str | None) -> Principal:
        if self.ctx.keys.enabled and not key:
            raise ApiError("auth", 'missing API key: send it as "key" in the JSON body')
        return self.ctx.authenticate_key(key, self.name)

    def render_failure(self, failure: Failure, request: Request) -> Response:
        """``{"status": "error", "message"}`` with the real HTTP status."""
        legacy = request.url.path.startswith("/api/v3/")
        retry = math.ceil(failure.retry_after) if failure.retry_after is not None else None
        body = ErrorResponse(status="error", message=failure.message, messege=failure.message if legacy else None,
                             retry_after=retry)
        return json_response(body, failure.status, retry_headers(failure))


def image_sources(body: Img2ImgRequest) -> dict[str, str]:
    """The image fields an img2img / inpaint body must carry, present and non-empty (400s)."""
    fields = ["init_image"] + (["mask_image"] if isinstance(body, InpaintRequest) else [])
    out: dict[str, str] = {}
    for name in fields:
        value = (getattr(body, name) or "").strip()
        if not value:
            raise invalid(f"{name} is required: an image URL (or, with base64 true, base64 or "
                          "a data: URI)", field=name)
        out[name] = value
    return out


def _image_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.size


def _generation_time(job: Job) -> float:
    if job.started_at is None or job.finished_at is None:
        return 0.0
    return round(job.finished_at - job.started_at, 3)


def _error(job: Job) -> str:
    if job.status == CANCELLED:
        return job.error or "the request was cancelled"
    if job.status == TIMED_OUT:
        return job.error or "the request timed out"
    if job.status == FAILED:
        return job.error or "the request failed"
    return "the request is not finished"


DIALECT = ModelsLabDialect
