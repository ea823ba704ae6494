"""Alibaba Cloud SCC ("Intelligent Creation Workshop") Stable Diffusion task API.

``POST /scc/sd_txt2img`` and ``/scc/sd_img2img`` queue a task and answer its ``taskId``;
``POST /scc/sd_get_result`` with ``{"taskId"}`` reports ``waiting`` / ``running`` /
``succeeded`` / ``failed`` with expiring image URLs. Bodies use AUTOMATIC1111's field names
(plus the vendor page's ``negtive_prompt`` spelling) and ControlNet units under
``alwayson_scripts.controlnet`` (``units`` as on the vendor page, ``args`` as in A1111).

Choices where the vendor page is silent (docs/alibaba-scc.md): the API key travels as
``Authorization: Bearer <key>`` (the vendor signs with AK/SK, which is not reproduced); the outer
envelope is ``{requestId, code, message, success, data}`` with real HTTP statuses; every input
is checked (and remote images fetched, once the client is admitted) when the task is submitted,
so a bad request is a 400 naming the field rather than a failed task.

Wire facts: shared/reference/api-dialects.md §3 and seed 001. Docs: docs/alibaba-scc.md.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from pathlib import PurePath
from typing import Annotated, Any, ClassVar

import msgspec
from litestar import Request, Response, post
from msgspec import Meta

from auth.keys import Principal
from gateway.async_tasks import AsyncTaskDialect, decode_request, encode_request
from gateway.context import bearer_token
from gateway.dialects.a1111 import UnsupportedScheduler, a1111_clip_skip, a1111_sampler
from gateway.errors import Failure, invalid
from gateway.fetch import FetchRefused, decode_data_uri, load_image
from gateway.wire import decode_json, json_response, retry_headers
from inference import GenerationRequest, InitImage
from inference.request import ControlUnit
from inference.tasks import CANCELLED, COMPLETED, FAILED, QUEUED, RUNNING, TIMED_OUT, Job

MAX_SEED = 2**32 - 1
# batch_size × n_iter: the images one task may ask for.
MAX_IMAGES = 8
MAX_CONTROL_UNITS = 3
# A1111's CLIP_stop_at_last_layers slider goes to 12.
MAX_CLIP_SKIP = 12
# A1111 UI defaults (the vendor page gives none).
DEFAULT_STEPS = 20
DEFAULT_CFG = 7.0
DEFAULT_SAMPLER = "Euler"
DEFAULT_STRENGTH = 0.75

STATUS = {QUEUED: "waiting", RUNNING: "running", COMPLETED: "succeeded", FAILED: "failed",
          CANCELLED: "failed", TIMED_OUT: "failed"}

# Failure cause → the envelope's ``code``.
CODES = {
    "validation": "InvalidParameter", "auth": "InvalidApiKey", "forbidden": "Forbidden",
    "not_found": "NotFound", "method": "MethodNotAllowed", "too_large": "RequestTooLarge",
    "overload": "Throttling", "quota": "QuotaExceeded", "timeout": "Timeout",
    "cancelled": "Cancelled", "oom": "ServiceUnavailable", "not_ready": "ServiceUnavailable",
    "shutdown": "ServiceUnavailable", "unavailable": "ServiceUnavailable",
    "internal": "InternalError",
}

# ControlNet kinds a preprocessor ``module`` or a ``model`` file name can name.
_CONTROL_KINDS = ("canny", "depth", "openpose", "lineart", "softedge", "scribble", "mlsd",
                  "normal", "seg", "tile", "inpaint", "shuffle", "ip-adapter", "reference")
_NO_MODULE = ("", "none")
_VAE_OK = ("", "automatic", "auto", "sdxl_vae.safetensors")

# -- wire schemas ----------------------------------------------------------------------------


class ControlNetUnit(msgspec.Struct, kw_only=True):
    """One ControlNet unit (vendor page fields, plus A1111's ``image`` and ``enabled``)."""

    module: str | None = None
    model: str | None = None
    input_image: str | None = None
    image: str | None = None
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    enabled: bool = True


class ControlNetScript(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``alwayson_scripts.controlnet``: ``units`` (vendor page) or ``args`` (A1111)."""

    units: list[ControlNetUnit] | None = None
    args: list[ControlNetUnit] | None = None


class AlwaysOnScripts(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``alwayson_scripts``: only ControlNet is available."""

    controlnet: ControlNetScript | None = None


class Txt2ImgRequest(msgspec.Struct, kw_only=True):
    """Body of ``sd_txt2img``. Unknown A1111 fields are ignored, as A1111 does."""

    prompt: str = ""
    negative_prompt: str | None = None
    negtive_prompt: str | None = None
    stable_diffusion_model: str | None = None
    sd_vae: str | None = None
    clip_skip: Annotated[int, Meta(ge=1, le=MAX_CLIP_SKIP)] | None = None
    batch_size: Annotated[int, Meta(ge=1, le=MAX_IMAGES)] = 1
    n_iter: Annotated[int, Meta(ge=1, le=MAX_IMAGES)] = 1
    steps: int = DEFAULT_STEPS
    cfg_scale: Annotated[float, Meta(ge=0, le=30)] = DEFAULT_CFG
    width: int | None = None
    height: int | None = None
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    seed: Annotated[int, Meta(ge=-1, le=MAX_SEED)] = -1
    restore_faces: bool | None = None
    enable_hr: bool | None = None
    tiling: bool | None = None
    alwayson_scripts: AlwaysOnScripts | None = None


class Img2ImgRequest(Txt2ImgRequest, kw_only=True):
    """Body of ``sd_img2img``: ``init_images`` (one image) and ``denoising_strength``."""

    init_images: Annotated[list[str], Meta(min_length=1, max_length=1)]
    denoising_strength: Annotated[float, Meta(gt=0, le=1)] = DEFAULT_STRENGTH
    mask: str | None = None


class GetResultRequest(msgspec.Struct, kw_only=True):
    """Body of ``sd_get_result``."""

    taskId: Annotated[str, Meta(min_length=1, max_length=200)]


class TaskData(msgspec.Struct, kw_only=True):
    """``data`` of a submit answer."""

    taskId: str
    status: str


class SubmitResponse(msgspec.Struct, kw_only=True):
    """Answer of ``sd_txt2img`` / ``sd_img2img``."""

    requestId: str
    data: TaskData
    code: str = "Success"
    message: str = "success"
    success: bool = True


class ResultData(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``data`` of ``sd_get_result``; ``errorMessage`` only for failed tasks."""

    taskId: str
    status: str
    images: list[str]
    parameters: dict[str, Any]
    info: dict[str, Any]
    errorMessage: str | None = None


class ResultResponse(msgspec.Struct, kw_only=True):
    """Answer of ``sd_get_result``."""

    requestId: str
    data: ResultData
    code: str = "Success"
    message: str = "success"
    success: bool = True


class ErrorResponse(msgspec.Struct, kw_only=True):
    """Every error: a real HTTP status and this body."""

    requestId: str
    code: str
    message: str
    success: bool = False


# -- translation helpers ---------------------------------------------------------------------


def control_kind(module: str | None, model: str | None, field: str) -> tuple[str, bool]:
    """The canonical ControlNet kind and whether to preprocess, from ``module`` and ``model``.

    A preprocessor module (``canny``, ``depth_midas``…) names the kind and asks for
    preprocessing; module ``none`` means the image already is the control map, so the kind
    comes from the model's file name (``diffusers_xl_canny_mid`` → ``canny``).
    """
    mod = (module or "").strip().casefold()
    model_kind = _kind_in(model)
    if mod in _NO_MODULE:
        if model_kind is None:
            raise invalid(f"{field}.model must name a ControlNet kind ({', '.join(_CONTROL_KINDS)}) "
                          "when module is none", field=f"{field}.model")
        return model_kind, False
    kind = _kind_in(mod) or mod.split("_", 1)[0]
    if model_kind is not None and model_kind != kind:
        raise invalid(f"{field}.model {model!r} is a {model_kind} ControlNet but module "
                      f"{module!r} makes a {kind} map", field=f"{field}.model")
    return kind, True


def _kind_in(name: str | None) -> str | None:
    text = (name or "").casefold()
    if text in ("", "none"):
        return None
    return next((k for k in _CONTROL_KINDS if k in text), None)


def sampler_for(body: Txt2ImgRequest) -> str:
    """The sampler name as A1111 resolves it (``k_*`` aliases, ``scheduler: karras`` folded in).

    An unknown name is left to the engine's check at submission (a 400 naming sampler_name).
    """
    try:
        return a1111_sampler(body.sampler_name or body.sampler_index or DEFAULT_SAMPLER,
                             body.scheduler)
    except UnsupportedScheduler:
        raise invalid(f"scheduler {body.scheduler!r} is not supported; use automatic or karras "
                      "(or a sampler_name such as 'DPM++ 2M Karras')", field="scheduler") from None


def inline_image(value: str, max_bytes: int) -> bytes:
    """Image bytes from a ``data:`` URI or raw base64 (A1111's form), strictly decoded."""
    if value.startswith("data:"):
        return decode_data_uri(value, max_bytes)
    if (len(value) * 3) // 4 > max_bytes + 3:
        raise FetchRefused(f"the image is larger than the {max_bytes}-byte limit")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise FetchRefused("not valid base64, a data: URI or an http(s) URL") from None


def request_info(request: GenerationRequest) -> dict[str, Any]:
    """The request's part of ``sd_get_result``'s ``info`` (A1111's names)."""
    return {
        "prompt": request.prompt, "negative_prompt": request.negative_prompt,
        "width": request.width, "height": request.height, "steps": request.steps,
        "cfg_scale": request.guidance, "sampler_name": request.sampler, "batch_size": request.n,
    }


class _PendingImage(msgspec.Struct, frozen=True):
    """A ControlNet unit, checked, whose image is loaded once the client is admitted."""

    unit: ControlUnit
    source: str
    field: str


# -- the dialect -----------------------------------------------------------------------------


class AlibabaSccDialect(AsyncTaskDialect):
    """Alibaba Cloud SCC sd_txt2img / sd_img2img / sd_get_result."""

    name = "alibaba"
    prefixes = ("/scc/",)
    field_names: ClassVar[dict[str, str]] = {
        "guidance": "cfg_scale", "sampler": "sampler_name", "n": "batch_size",
        "init_image": "init_images", "init_image.strength": "denoising_strength",
        "init_image.mask": "mask", "control": "alwayson_scripts.controlnet",
        "model": "stable_diffusion_model", "refine": "refiner",
    }

    def route_handlers(self) -> list[Any]:
        """The two submit routes and the result query."""
        opt = {"dialect": self.name}

        @post("/scc/sd_txt2img", status_code=200, opt={
            **opt, "kind": "generate", "schema_in": Txt2ImgRequest, "schema_out": SubmitResponse,
            "summary": "Queue a text-to-image task (AUTOMATIC1111 fields, ControlNet units)"})
        async def txt2img(request: Request) -> Response:
            return await self.submit(request, Txt2ImgRequest)

        @post("/scc/sd_img2img", status_code=200, opt={
            **opt, "kind": "generate", "schema_in": Img2ImgRequest, "schema_out": SubmitResponse,
            "summary": "Queue an image-to-image task (init_images, denoising_strength, mask)"})
        async def img2img(request: Request) -> Response:
            return await self.submit(request, Img2ImgRequest)

        @post("/scc/sd_get_result", status_code=200, opt={
            **opt, "kind": "poll", "schema_in": GetResultRequest, "schema_out": ResultResponse,
            "summary": "A task's status and, once it succeeded, its image URLs"})
        async def get_result(request: Request) -> Response:
            principal = self._principal(request)
            body = decode_json(await request.body(), GetResultRequest)
            job = await self.tasks.own(principal, principal.id, body.taskId)
            return json_response(await self.result_body(job, request))

        return [txt2img, img2img, get_result]

    # -- submission ------------------------------------------------------------------------

    async def submit(self, request: Request, schema: type[Txt2ImgRequest]) -> Response:
        """Authenticate, decode and check, admit, load the images, check them, and queue.

        Admission (quota included) comes before any image is decoded or fetched: a client
        without quota cannot make this server fetch URLs. A request without images is checked
        in full before admission, as every other task API does.
        """
        principal = self._principal(request)
        body = decode_json(await request.body(), schema)
        canonical = self.to_canonical(body)
        units = self.control_units(body)
        with_images = isinstance(body, Img2ImgRequest) or bool(units)
        if not with_images:
            self.tasks.check_request(canonical, self.field_names)
        await self.tasks.admit(principal, canonical.n)
        if with_images:
            canonical = await self.load_images(body, canonical, units)
            self.tasks.check_request(canonical, self.field_names)
        job = await self.tasks.submit(
            principal, scope=principal.id, images=canonical.n, admitted=True,
            payload={"request": encode_request(canonical), "info": request_info(canonical),
                     "parameters": self.parameters(body),
                     "resource_config": request.headers.get("x-sp-resource-config-id")},
        )
        return json_response(SubmitResponse(requestId=_request_id(),
                                            data=TaskData(taskId=job.id, status=STATUS[job.status])))

    def to_canonical(self, body: Txt2ImgRequest) -> GenerationRequest:
        """Translate a submit body, without its images (:meth:`load_images` adds them)."""
        if body.restore_faces:
            raise invalid("restore_faces is not supported: this server has no face restoration "
                          "model; send restore_faces false or leave it out", field="restore_faces")
        if body.enable_hr:
            raise invalid("enable_hr (hires fix) is not supported; ask for the final size "
                          "directly", field="enable_hr")
        if body.tiling:
            raise invalid("tiling is not supported", field="tiling")
        if body.batch_size * body.n_iter > MAX_IMAGES:
            raise invalid(f"batch_size × n_iter must be at most {MAX_IMAGES} images per task, got "
                          f"{body.batch_size * body.n_iter}", field="batch_size")
        self._check_model(body.stable_diffusion_model)
        vae = (body.sd_vae or "").strip().casefold()
        if vae not in _VAE_OK:
            raise invalid(f"sd_vae {body.sd_vae!r} is not available; this server decodes with "
                          "its model's own SDXL VAE (Automatic or sdxl_vae.safetensors)",
                          field="sd_vae")
        info = self.ctx.engine.info
        # Only a missing size means the model's default: 0 is a size, refused like any other.
        width = body.width if body.width is not None else (info.default_width if info else 1024)
        height = (body.height if body.height is not None
                  else (info.default_height if info else 1024))
        negative = body.negative_prompt if body.negative_prompt is not None else body.negtive_prompt
        return GenerationRequest(
            prompt=body.prompt,
            negative_prompt=negative or "",
            n=body.batch_size * body.n_iter,
            width=width,
            height=height,
            steps=body.steps,
            guidance=body.cfg_scale,
            sampler=sampler_for(body),
            seed=None if body.seed == -1 else body.seed,
            clip_skip=a1111_clip_skip(body.clip_skip),
            output_format="png",
        )

    async def load_images(self, body: Txt2ImgRequest, canonical: GenerationRequest,
                          units: list[_PendingImage]) -> GenerationRequest:
        """``canonical`` with the init image, mask and ControlNet images decoded or fetched."""
        init_image = None
        if isinstance(body, Img2ImgRequest):
            data = await self.image(body.init_images[0], "init_images[0]")
            mask = await self.image(body.mask, "mask") if body.mask else None
            init_image = InitImage(data=data, strength=body.denoising_strength, mask=mask)
        control = [msgspec.structs.replace(p.unit, image=await self.image(p.source, p.field))
                   for p in units]
        return msgspec.structs.replace(canonical, init_image=init_image, control=tuple(control))

    def control_units(self, body: Txt2ImgRequest) -> list[_PendingImage]:
        """``alwayson_scripts.controlnet`` units, checked (disabled ones dropped), images unread."""
        script = body.alwayson_scripts.controlnet if body.alwayson_scripts else None
        if script is None:
            return []
        key = "units" if script.units is not None else "args"
        units = (script.units if script.units is not None else script.args) or []
        if len(units) > MAX_CONTROL_UNITS:
            raise invalid(f"at most {MAX_CONTROL_UNITS} ControlNet units per task",
                          field=f"alwayson_scripts.controlnet.{key}")
        out: list[_PendingImage] = []
        for i, unit in enumerate(units):
            field = f"alwayson_scripts.controlnet.{key}[{i}]"
            if not unit.enabled:
                continue
            if not 0 <= unit.weight <= 2:
                raise invalid(f"{field}.weight must be between 0 and 2", field=f"{field}.weight")
            if not 0 <= unit.guidance_start < unit.guidance_end <= 1:
                raise invalid(f"{field}: guidance_start and guidance_end must satisfy "
                              "0 <= guidance_start < guidance_end <= 1",
                              field=f"{field}.guidance_start")
            source = unit.input_image or unit.image
            if not source:
                raise invalid(f"{field}.input_image is required", field=f"{field}.input_image")
            kind, preprocess = control_kind(unit.module, unit.model, field)
            out.append(_PendingImage(
                ControlUnit(kind=kind, image=b"", weight=unit.weight,
                            guidance_start=unit.guidance_start, guidance_end=unit.guidance_end,
                            preprocess=preprocess),
                source, f"{field}.input_image"))
        return out

    async def image(self, value: str, field: str) -> bytes:
        """Image bytes from raw base64 (A1111), a ``data:`` URI or an http(s) URL (SSRF-safe)."""
        policy = self.tasks.fetch_policy
        return await load_image(value, field, policy,
                                lambda text: inline_image(text, policy.max_bytes))

    def _check_model(self, name: str | None) -> None:
        if not name or not name.strip():
            return
        info = self.ctx.engine.info
        served = {info.id} if info else set()
        if info is not None:
            served |= {PurePath(info.source).name, PurePath(info.source).stem}
        wanted = name.strip()
        if wanted in served or PurePath(wanted).stem in served:
            return
        raise invalid(f"stable_diffusion_model {name!r} is not served here; served: "
                      f"{info.id if info else 'none'}", field="stable_diffusion_model")

    @staticmethod
    def parameters(body: Txt2ImgRequest) -> dict[str, Any]:
        """The request echoed in results, without its (large) images."""
        echo = {k: v for k, v in msgspec.to_builtins(body).items() if v is not None}
        echo.pop("init_images", None)
        echo.pop("mask", None)
        scripts = echo.get("alwayson_scripts") or {}
        for units in (scripts.get("controlnet") or {}).values():
            for unit in units or []:
                for key in ("input_image", "image"):
                    if unit.get(key):
                        unit[key] = "<image>"
        return echo

    # -- rendering -------------------------------------------------------------------------

    async def result_body(self, job: Job, request: Request) -> ResultResponse:
        """``sd_get_result``'s answer for ``job``."""
        # Kept apart at submission: the stored request holds every image, base64-encoded.
        # Tasks queued by an older version have no "info" yet.
        saved = job.payload.get("info")
        info = dict(saved) if saved is not None else request_info(decode_request(job))
        if job.result is not None:
            info["seed"] = job.result.seed
            info["all_seeds"] = [img.seed for img in job.result.images]
            info["sd_model_name"] = job.result.model
        data = ResultData(
            taskId=job.id, status=STATUS[job.status],
            images=await self.tasks.media_urls(job, request),
            parameters=job.payload.get("parameters") or {}, info=info,
            errorMessage=job.error if job.status in (FAILED, CANCELLED, TIMED_OUT) else None,
        )
        if data.status == "failed" and data.errorMessage is None:
            data.errorMessage = "the task was cancelled"
        return ResultResponse(requestId=_request_id(), data=data)

    # -- helpers ---------------------------------------------------------------------------

    def _principal(self, request: Request) -> Principal:
        return self.ctx.authenticate_key(bearer_token(request), self.name)

    def render_failure(self, failure: Failure, request: Request) -> Response:
        """``{requestId, code, message, success: false}`` with the real HTTP status."""
        body = ErrorResponse(requestId=_request_id(), code=CODES.get(failure.cause, "InternalError"),
                             message=failure.message)
        return json_response(body, failure.status, retry_headers(failure))


def _request_id() -> str:
    return str(uuid.uuid4()).upper()


DIALECT = AlibabaSccDialect
