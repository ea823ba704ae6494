"""OpenAI Images API: ``/v1/images/generations``, ``/edits``, ``/variations`` and ``/v1/models``.

All are also served without ``/v1``, because the SDK appends its paths to whatever base URL it
is given. ``stream=true`` answers with Server-Sent Events (partial images, then one completed
event per image). Docs: docs/openai.md.

Wire facts: shared/reference/api-dialects.md §1.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, ClassVar, Literal

import msgspec
from litestar import Request, Response, get, post
from litestar.datastructures import UploadFile
from litestar.exceptions import ClientException
from litestar.response import Stream
from msgspec import Meta

from auth.keys import Principal
from gateway import access_log
from gateway.context import bearer_token
from gateway.dialects.base import Dialect
from gateway.disconnect import unless_disconnected
from gateway.errors import ApiError, Failure, failure_from, invalid
from gateway.fetch import FetchRefused, check_image, fetch_image
from gateway.sizes import fit_size, parse_size
from gateway.wire import convert, decode_json, json_response, retry_headers
from inference import GenerationRequest, GenerationResult, InitImage
from inference.progress import Progress

# -- wire schemas ----------------------------------------------------------------------------

Quality = Literal["auto", "low", "medium", "high", "xhigh", "max", "standard", "hd"]


class _ImageOptions(msgspec.Struct, kw_only=True):
    """Fields that generations and edits share. Unknown fields are ignored, as newer SDKs add them."""

    model: str | None = None
    n: Annotated[int, Meta(ge=1, le=10)] | None = None
    size: str | None = None
    quality: Quality | None = None
    response_format: Literal["url", "b64_json"] | None = None
    user: str | None = None
    background: Literal["transparent", "opaque", "auto"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: Annotated[int, Meta(ge=0, le=100)] | None = None
    moderation: Literal["low", "auto"] | None = None
    stream: bool | None = None
    partial_images: Annotated[int, Meta(ge=0, le=3)] | None = None
    # imagegate extensions, sent through the SDK's extra_body.
    negative_prompt: Annotated[str, Meta(max_length=32000)] | None = None
    seed: Annotated[int, Meta(ge=0, le=2**32 - 1)] | None = None
    num_inference_steps: Annotated[int, Meta(ge=1)] | None = None
    guidance_scale: Annotated[float, Meta(ge=0, le=50)] | None = None
    sampler: str | None = None


class ImageGenerationRequest(_ImageOptions, kw_only=True):
    """``POST /v1/images/generations``."""

    prompt: Annotated[str, Meta(min_length=1, max_length=32000)]
    style: Literal["vivid", "natural"] | None = None


class ImageEditRequest(_ImageOptions, kw_only=True):
    """The non-file fields of ``POST /v1/images/edits`` (multipart form fields).

    The files are the form parts ``image`` (or ``image[]``) and ``mask``. ``input_fidelity``
    is accepted and ignored: the whole input image always conditions an SDXL edit.
    ``strength`` (extension) is how far the edited area moves from the input (1.0: repainted
    from scratch); defaults are in :data:`EDIT_STRENGTH`.
    """

    prompt: Annotated[str, Meta(min_length=1, max_length=32000)]
    input_fidelity: Literal["high", "low"] | None = None
    strength: Annotated[float, Meta(gt=0, le=1)] | None = None


class ImageRef(msgspec.Struct, kw_only=True):
    """An image of the JSON edit form: ``image_url`` (http(s) or data URL) or ``file_id``."""

    image_url: str | None = None
    file_id: str | None = None


class ImageEditJSONRequest(ImageEditRequest, kw_only=True):
    """``POST /v1/images/edits`` with a JSON body (``images`` by URL, as the 2026 spec allows)."""

    images: Annotated[list[ImageRef], Meta(min_length=1, max_length=16)]
    mask: ImageRef | None = None


class ImageVariationRequest(msgspec.Struct, kw_only=True):
    """The non-file fields of ``POST /v1/images/variations`` (the file is the ``image`` part).

    ``prompt``, ``strength`` and the other sampling fields are imagegate extensions; a variation
    is img2img of the image with an empty prompt at ``strength`` :data:`VARIATION_STRENGTH`.
    """

    model: str | None = None
    n: Annotated[int, Meta(ge=1, le=10)] | None = None
    size: str | None = None
    response_format: Literal["url", "b64_json"] | None = None
    user: str | None = None
    prompt: Annotated[str, Meta(max_length=32000)] | None = None
    negative_prompt: Annotated[str, Meta(max_length=32000)] | None = None
    seed: Annotated[int, Meta(ge=0, le=2**32 - 1)] | None = None
    num_inference_steps: Annotated[int, Meta(ge=1)] | None = None
    guidance_scale: Annotated[float, Meta(ge=0, le=50)] | None = None
    sampler: str | None = None
    strength: Annotated[float, Meta(gt=0, le=1)] | None = None


class ImageData(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One entry of ``data``."""

    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    # imagegate: the seed this image was made with (the SDK keeps unknown keys).
    seed: int | None = None


class TokensDetails(msgspec.Struct, kw_only=True):
    """Token breakdown, as GPT image models report it."""

    text_tokens: int
    image_tokens: int


class ImagesUsage(msgspec.Struct, kw_only=True):
    """``usage`` of an images response."""

    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: TokensDetails
    output_tokens_details: TokensDetails


class ImagesResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The success body."""

    created: int
    data: list[ImageData]
    background: str | None = None
    output_format: str | None = None
    quality: str | None = None
    size: str | None = None
    usage: ImagesUsage | None = None


class ModelObject(msgspec.Struct, kw_only=True):
    """One entry of ``GET /v1/models``."""

    id: str
    created: int
    owned_by: str
    object: str = "model"
    description: str = ""


class ModelList(msgspec.Struct, kw_only=True):
    """``GET /v1/models``."""

    data: list[ModelObject]
    object: str = "list"


class ErrorBody(msgspec.Struct, kw_only=True):
    """The inside of OpenAI's error envelope; all four keys always present."""

    message: str
    type: str
    param: str | None
    code: str | None
    # imagegate: the request's id (also in the x-request-id header); the SDK keeps extra keys.
    request_id: str | None = None


class ErrorEnvelope(msgspec.Struct, kw_only=True):
    """``{"error": {...}}``."""

    error: ErrorBody


class StreamEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One Server-Sent Event's data: a partial image, or a finished image with its usage.

    ``type`` is ``image_generation.partial_image`` / ``image_generation.completed`` (or the
    ``image_edit.`` pair): openai-python picks the event class by it, not by the SSE event name.
    """

    type: str
    b64_json: str
    created_at: int
    size: str
    quality: str
    background: str
    output_format: str
    partial_image_index: int | None = None
    usage: ImagesUsage | None = None


# -- translation -----------------------------------------------------------------------------

OPENAI_MODELS = ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5",
                 "gpt-image-2", "chatgpt-image-latest")
# Default strength of an edit (1.0 repaints the masked area from scratch, as OpenAI's inpainting
# does; without a mask the whole image is the edit, so some of it must survive) and of a
# variation (half the schedule: composition and colours stay, details change).
EDIT_STRENGTH = {"mask": 1.0, "no_mask": 0.7}
VARIATION_STRENGTH = 0.6
_STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
_ERROR_TYPES: dict[str, tuple[str, str | None]] = {
    "validation": ("invalid_request_error", "invalid_value"),
    "auth": ("invalid_request_error", "invalid_api_key"),
    "forbidden": ("permission_error", "permission_denied"),
    "not_found": ("invalid_request_error", "not_found"),
    "method": ("invalid_request_error", "method_not_allowed"),
    "too_large": ("invalid_request_error", "request_too_large"),
    "overload": ("rate_limit_error", "server_overloaded"),
    "quota": ("requests", "rate_limit_exceeded"),
    "timeout": ("server_error", "timeout"),
    "cancelled": ("server_error", "cancelled"),
    "oom": ("server_error", "out_of_memory"),
    "not_ready": ("server_error", "model_loading"),
    "shutdown": ("server_error", "shutting_down"),
    "unavailable": ("server_error", "storage_unavailable"),
    "internal": ("server_error", None),
}


def image_tokens(width: int, height: int) -> int:
    """Output tokens of one image: one per 16×16 pixel patch.

    That is 4096 for 1024², close to gpt-image-1's 4160 for a high-quality square.
    """
    return (width // 16) * (height // 16)


class OpenAIDialect(Dialect):
    """The OpenAI Images API."""

    name = "openai"
    error_schema = ErrorEnvelope
    prefixes = ("/v1/images", "/images", "/v1/models", "/models", "/v1")
    field_names: ClassVar[dict[str, str]] = {
        "width": "size", "height": "size", "steps": "num_inference_steps",
        "guidance": "guidance_scale", "init_image": "image", "init_image.strength": "strength",
        "init_image.mask": "mask",
    }

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.fetch_policy = ctx.fetch_policy

    def route_handlers(self) -> list[Any]:
        """Generations, edits, variations and models, each under ``/v1`` and bare."""
        opt = {"dialect": self.name}
        gen = {**opt, "kind": "generate", "schema_out": ImagesResponse}

        @post(["/v1/images/generations", "/images/generations"], status_code=200,
              opt={**gen, "schema_in": ImageGenerationRequest,
                   "summary": "OpenAI image generation (JSON, or SSE with stream=true)"})
        async def generations(request: Request) -> Response:
            return await self.generations(request)

        @post(["/v1/images/edits", "/images/edits"], status_code=200,
              opt={**gen, "schema_in": ImageEditRequest, "media_in": "multipart/form-data",
                   "summary": "OpenAI image edit: inpainting with a mask, img2img without "
                              "(multipart, or JSON with image URLs; SSE with stream=true)"})
        async def edits(request: Request) -> Response:
            return await self.edits(request)

        @post(["/v1/images/variations", "/images/variations"], status_code=200,
              opt={**gen, "schema_in": ImageVariationRequest, "media_in": "multipart/form-data",
                   "summary": "OpenAI image variation: img2img of the image with an empty prompt"})
        async def variations(request: Request) -> Response:
            return await self.variations(request)

        @get(["/v1/models", "/models"],
             opt={**opt, "schema_out": ModelList, "summary": "OpenAI model list"})
        async def models(request: Request) -> Response:
            self.ctx.authenticate_key(bearer_token(request), self.name)
            return json_response(ModelList(data=self._model_objects()))

        # Hub ids (org/name) arrive with their slash decoded, so they need a two-segment path.
        @get(["/v1/models/{model_id:str}", "/models/{model_id:str}",
              "/v1/models/{org:str}/{name:str}", "/models/{org:str}/{name:str}"],
             opt={**opt, "schema_out": ModelObject, "summary": "OpenAI model by id"})
        async def model(request: Request) -> Response:
            params = request.path_params
            model_id = params.get("model_id") or f"{params['org']}/{params['name']}"
            self.ctx.authenticate_key(bearer_token(request), self.name)
            served = self._model_objects()[0]
            if model_id == served.id:
                return json_response(served)
            if model_id in OPENAI_MODELS:
                # Generation accepts these names (all map to the served model), so SDK calls
                # like models.retrieve("dall-e-3") must find them too.
                return json_response(ModelObject(
                    id=model_id, created=served.created, owned_by="imagegate",
                    description=f"alias of {served.id}"))
            raise ApiError("not_found", f"model {model_id!r} not found", field="model",
                           code="model_not_found")

        return [generations, edits, variations, models, model]

    # -- handlers --------------------------------------------------------------------------

    async def generations(self, request: Request) -> Response:
        """``POST /v1/images/generations``."""
        principal = self.ctx.authenticate_key(bearer_token(request), self.name)
        body = decode_json(await request.body(), ImageGenerationRequest)
        canonical, response_format = self.to_canonical(body, principal.id, prompt=body.prompt,
                                                       style=body.style)
        return await self._answer(request, principal, body, canonical, response_format,
                                  "image_generation")

    async def edits(self, request: Request) -> Response:
        """``POST /v1/images/edits``: multipart files, or JSON with image URLs."""
        principal = self.ctx.authenticate_key(bearer_token(request), self.name)
        content_type = request.headers.get("content-type", "").lower()
        admitted = False
        if content_type.startswith("application/json"):
            body: ImageEditRequest = decode_json(await request.body(), ImageEditJSONRequest)
            # Quota first: a client over its allowance must not make this server fetch URLs.
            self.ctx.admit(principal)
            admitted = True
            image, mask = await self._json_images(body)  # type: ignore[arg-type]
        else:
            fields, files = await self._form(request)
            body = convert(fields, ImageEditRequest)
            image = _one_image(files)
            if files.get("markup"):
                raise invalid("markup is not supported: send a mask (transparent = repaint) "
                              "instead", field="markup")
            masks = files.get("mask", [])
            if len(masks) > 1:
                raise invalid("send at most one mask", field="mask")
            mask = masks[0] if masks else None
            # Quota before decoding the uploads: that costs CPU and memory per pixel.
            self.ctx.admit(principal)
            admitted = True
        width, height = await self._check_image(image, "image")
        if mask is not None:
            mask_size = await self._check_image(mask, "mask")
            if mask_size != (width, height):
                raise invalid(f"mask is {mask_size[0]}x{mask_size[1]} but image is "
                              f"{width}x{height}; they must be the same size", field="mask")
        strength = body.strength or EDIT_STRENGTH["mask" if mask is not None else "no_mask"]
        # OpenAI: transparent pixels mark the edit, so an opaque mask keeps everything.
        init = InitImage(data=image, strength=strength, mask=mask, mask_rule="alpha")
        canonical, response_format = self.to_canonical(
            body, principal.id, prompt=body.prompt, init_image=init,
            auto_size=self._auto_size(width, height))
        return await self._answer(request, principal, body, canonical, response_format,
                                  "image_edit", admitted=admitted)

    async def variations(self, request: Request) -> Response:
        """``POST /v1/images/variations``: img2img of ``image`` with an empty prompt."""
        principal = self.ctx.authenticate_key(bearer_token(request), self.name)
        fields, files = await self._form(request)
        body = convert(fields, ImageVariationRequest)
        image = _one_image(files)
        self.ctx.admit(principal)  # quota before decoding the upload
        width, height = await self._check_image(image, "image")
        init = InitImage(data=image, strength=body.strength or VARIATION_STRENGTH)
        options = _ImageOptions(
            model=body.model, n=body.n, size=body.size, response_format=body.response_format,
            user=body.user, negative_prompt=body.negative_prompt, seed=body.seed,
            num_inference_steps=body.num_inference_steps, guidance_scale=body.guidance_scale,
            sampler=body.sampler)
        canonical, response_format = self.to_canonical(
            options, principal.id, prompt=body.prompt or "", init_image=init,
            auto_size=self._auto_size(width, height))
        return await self._answer(request, principal, options, canonical, response_format, None,
                                  admitted=True)

    async def _answer(
        self,
        request: Request,
        principal: Principal,
        body: _ImageOptions,
        canonical: GenerationRequest,
        response_format: str,
        stream_kind: str | None,
        *,
        admitted: bool = False,
    ) -> Response:
        """Admit (unless the route already did), run, and answer as JSON or as SSE (``stream``)."""
        if not admitted:
            self.ctx.admit(principal)
        if body.stream and stream_kind is not None:
            return await self._stream(request, principal, body, canonical, stream_kind)
        result = await unless_disconnected(request, self.ctx.engine.generate(canonical))
        self.ctx.record_usage(principal, result, len(result.images))
        return json_response(self.to_response(body, canonical, result, response_format, request))

    def to_canonical(
        self,
        body: _ImageOptions,
        client_id: str,
        *,
        prompt: str,
        style: str | None = None,
        init_image: InitImage | None = None,
        auto_size: tuple[int, int] | None = None,
    ) -> tuple[GenerationRequest, str]:
        """Translate the wire request; returns the canonical request and the response format.

        ``auto_size`` is the size for ``size`` unset or ``auto`` (edits: the input's size).
        """
        if body.background == "transparent":
            raise invalid("background=transparent is not supported: SDXL makes opaque images",
                          field="background")
        model = self._check_model(body.model)
        width, height = self._size(body.size, auto_size)
        settings = self.ctx.settings
        steps = body.num_inference_steps
        if steps is None:
            table = settings.quality_table()
            quality = body.quality or "auto"
            if quality in ("xhigh", "max") and quality not in table:
                quality = "high"  # newer SDK levels: the best configured one
            steps = table.get(quality, settings.default_steps)
        fmt = body.output_format or "png"
        response_format = body.response_format or (
            "b64_json" if model.startswith(("gpt-image", "chatgpt-image")) else "url"
        )
        canonical = GenerationRequest(
            prompt=prompt,
            negative_prompt=body.negative_prompt or "",
            n=body.n or 1,
            width=width,
            height=height,
            steps=steps,
            guidance=body.guidance_scale if body.guidance_scale is not None
            else settings.default_guidance,
            sampler=body.sampler,
            seed=body.seed,
            style=style,
            output_format=fmt,
            output_compression=body.output_compression if body.output_compression is not None
            else 100,
            # Streamed events always carry base64, whatever response_format says.
            want_base64=response_format == "b64_json" or bool(body.stream),
            init_image=init_image,
            partial_images=(body.partial_images or 0) if body.stream else 0,
            client_id=client_id,
        )
        return canonical, response_format

    def to_response(
        self,
        body: _ImageOptions,
        canonical: GenerationRequest,
        result: GenerationResult,
        response_format: str,
        request: Request,
    ) -> ImagesResponse:
        """Build the success body, storing images for URL mode."""
        data: list[ImageData] = []
        base = self.ctx.public_base_url(request)
        for image in result.images:
            if response_format == "b64_json":
                data.append(ImageData(b64_json=image.b64, seed=image.seed))
            else:
                name = self.ctx.media.put(image.data, image.media_type)
                data.append(ImageData(url=f"{base}/media/{name}", seed=image.seed))
        out_tokens = image_tokens(canonical.width, canonical.height) * len(result.images)
        return ImagesResponse(
            created=int(time.time()),
            data=data,
            background="opaque",
            output_format=canonical.output_format,
            quality=body.quality,
            size=f"{canonical.width}x{canonical.height}",
            usage=_usage(result.prompt_tokens, out_tokens),
        )

    # -- streaming -------------------------------------------------------------------------

    async def _stream(
        self,
        request: Request,
        principal: Principal,
        body: _ImageOptions,
        canonical: GenerationRequest,
        kind: str,
    ) -> Response:
        """Start the generation and answer with its events.

        Errors found before the first byte (validation, a full queue, not ready) are ordinary
        JSON errors; later ones are an ``error`` event. Litestar cancels the event iterator when
        the client disconnects, which cancels the generation and frees its batch slot.
        """
        events: asyncio.Queue[Progress | None] = asyncio.Queue()

        def on_progress(progress: Progress) -> None:
            if progress.partial is not None:
                events.put_nowait(progress)

        work = asyncio.create_task(self.ctx.engine.generate(canonical, on_progress))
        # One loop turn runs generate() up to its first await: by then validation and
        # admission to the queue have either failed (raise it as JSON) or succeeded.
        await asyncio.sleep(0)
        if work.done():
            work.result()
        work.add_done_callback(lambda _: events.put_nowait(None))
        meta = {
            "size": f"{canonical.width}x{canonical.height}",
            "quality": body.quality if body.quality in ("low", "medium", "high") else "auto",
            "background": "opaque",
            "output_format": canonical.output_format,
        }

        async def sse() -> AsyncIterator[bytes]:
            try:
                while (progress := await events.get()) is not None:
                    assert progress.partial is not None
                    yield _sse(StreamEvent(
                        type=f"{kind}.partial_image", b64_json=progress.partial.b64 or "",
                        partial_image_index=progress.partial_index or 0,
                        created_at=int(time.time()), **meta))
                try:
                    result = work.result()
                except Exception as exc:  # noqa: BLE001 - after the first byte: an event
                    failure = failure_from(exc, self.field_names)
                    self.ctx.metrics.errors.labels(self.name, failure.cause).inc()
                    yield _sse(self._error_body(failure), event="error")
                    return
                self.ctx.record_usage(principal, result, len(result.images))
                per_image = image_tokens(canonical.width, canonical.height)
                for i, image in enumerate(result.images):
                    # Input tokens count once (on the first image), so the events sum to the
                    # request's usage.
                    prompt_tokens = result.prompt_tokens if i == 0 else 0
                    yield _sse(StreamEvent(
                        type=f"{kind}.completed", b64_json=image.b64 or "",
                        created_at=int(time.time()), usage=_usage(prompt_tokens, per_image),
                        **meta))
            finally:
                # Reached on disconnect too (Litestar cancels the iterator): cancelling the
                # generation drops its queued images and discards its running ones.
                if not work.done():
                    work.cancel()
                elif not work.cancelled():
                    work.exception()  # retrieved, so asyncio does not log it again

        return Stream(sse(), media_type="text/event-stream", headers=_STREAM_HEADERS)

    # -- inputs ----------------------------------------------------------------------------

    async def _form(self, request: Request) -> tuple[dict[str, Any], dict[str, list[bytes]]]:
        """Multipart form fields (strings) and files (bytes, by part name; ``x[]`` → ``x``)."""
        content_type = request.headers.get("content-type", "").lower()
        if not content_type.startswith("multipart/form-data"):
            raise invalid("send the image as multipart/form-data (field 'image')",
                          field="image")
        try:
            form = await request.form()
        except ClientException as exc:
            if "Too Large" not in str(exc.detail):
                raise
            # Litestar's part limit, reported in its words as a 400 "Request Entity Too Large".
            raise invalid(f"the form has too many parts (at most "
                          f"{request.app.multipart_form_part_limit}); an edit needs image, mask "
                          "and a few fields") from None
        except (UnicodeError, LookupError) as exc:
            # Litestar decodes every part without a filename as text in its charset: an image
            # sent that way (curl -F 'image=<in.png') lands here, and so does an unknown
            # charset (LookupError; its KeyError and IndexError subclasses are bugs).
            if isinstance(exc, KeyError | IndexError):
                raise
            name = _failed_part(exc)
            advice = ("send text fields as UTF-8" if name not in (None, "image", "mask") else
                      "send images as file parts, with a filename (curl -F 'image=@in.png')")
            raise invalid(f"{name or 'a form field'}: not text in its charset ({exc}); "
                          f"{advice}", field=name) from None
        fields: dict[str, Any] = {}
        files: dict[str, list[bytes]] = {}
        for raw_name, value in form.multi_items():
            name = raw_name[:-2] if raw_name.endswith("[]") else raw_name
            if isinstance(value, UploadFile):
                files.setdefault(name, []).append(await value.read())
            else:
                fields[name] = value
        return fields, files

    async def _json_images(self, body: ImageEditJSONRequest) -> tuple[bytes, bytes | None]:
        """Fetch ``images[0]`` and ``mask`` of the JSON form (URLs and data URLs)."""
        if len(body.images) > 1:
            raise invalid(_MANY_IMAGES.format(len(body.images)), field="images")
        image = await self._fetch(body.images[0], "images.0")
        mask = await self._fetch(body.mask, "mask") if body.mask is not None else None
        return image, mask

    async def _fetch(self, ref: ImageRef, field: str) -> bytes:
        if ref.file_id is not None:
            raise invalid(f"{field}.file_id: file ids are not supported here (there is no "
                          "Files API); send image_url with an http(s) or data: URL",
                          field=f"{field}.file_id")
        if not ref.image_url:
            raise invalid(f"{field}: give image_url", field=f"{field}.image_url")
        try:
            return await fetch_image(ref.image_url, self.fetch_policy)
        except FetchRefused as exc:
            raise invalid(f"{field}.image_url: {exc}", field=f"{field}.image_url") from None

    async def _check_image(self, data: bytes, field: str) -> tuple[int, int]:
        """The image's size, or a 400 naming ``field`` (not an image, too many pixels)."""
        try:
            return await asyncio.to_thread(check_image, data, self.fetch_policy.max_pixels)
        except FetchRefused as exc:
            raise invalid(f"{field}: {exc}", field=field) from None

    def _auto_size(self, width: int, height: int) -> tuple[int, int]:
        """The output size for an input image of ``width`` x ``height``.

        Its own size, shrunk to the model's default area if larger, in multiples of 8 within
        the server's size bounds.
        """
        info = self.ctx.engine.info
        area = info.default_width * info.default_height if info else 1024 * 1024
        s = self.ctx.settings
        return fit_size(width, height, area=area, min_size=s.min_size, max_size=s.max_size)

    def _error_body(self, failure: Failure) -> ErrorEnvelope:
        err_type, code = _ERROR_TYPES[failure.cause]
        if failure.cause == "quota" and failure.code in ("insufficient_quota", "daily"):
            err_type, code = "insufficient_quota", "insufficient_quota"
        elif failure.cause == "auth" and failure.code is None:
            code = None
        elif failure.code and failure.cause in ("validation", "not_found"):
            code = failure.code
        return ErrorEnvelope(error=ErrorBody(message=failure.message, type=err_type,
                                             param=failure.field, code=code,
                                             request_id=access_log.request_id()))

    # -- helpers ---------------------------------------------------------------------------

    def _check_model(self, model: str | None) -> str:
        info = self.ctx.engine.info
        served = info.id if info else self.ctx.settings.model
        if model is None or model == served or model in OPENAI_MODELS:
            return model or served
        raise invalid(
            f"model {model!r} is not served here; use {served!r} or one of the OpenAI image "
            f"model names ({', '.join(OPENAI_MODELS)}), which all map to it",
            field="model",
        )

    def _size(self, size: str | None, auto: tuple[int, int] | None = None) -> tuple[int, int]:
        info = self.ctx.engine.info
        if size is None or size == "auto":
            if auto is not None:
                return auto
            if info is None:
                return 1024, 1024
            return info.default_width, info.default_height
        parsed = parse_size(size)
        if parsed is None:
            raise invalid(f"size must be 'auto' or 'WIDTHxHEIGHT' (e.g. '1024x1024'), got {size!r}",
                          field="size")
        return parsed

    def _model_objects(self) -> list[ModelObject]:
        info = self.ctx.engine.info
        if info is None:
            return [ModelObject(id=self.ctx.settings.model, created=0, owned_by="imagegate",
                                description="loading")]
        return [ModelObject(id=info.id, created=info.created, owned_by="imagegate",
                            description=info.description)]

    def render_failure(self, failure: Failure, request: Request) -> Response:
        """``{"error": {message, type, param, code}}`` with the matching HTTP status."""
        headers = retry_headers(failure)
        if failure.retryable is False:
            headers["x-should-retry"] = "false"
        return json_response(self._error_body(failure), failure.status, headers)


def _usage(prompt_tokens: int, out_tokens: int) -> ImagesUsage:
    return ImagesUsage(
        input_tokens=prompt_tokens,
        output_tokens=out_tokens,
        total_tokens=prompt_tokens + out_tokens,
        input_tokens_details=TokensDetails(text_tokens=prompt_tokens, image_tokens=0),
        output_tokens_details=TokensDetails(text_tokens=0, image_tokens=out_tokens),
    )


def _sse(data: msgspec.Struct, event: str | None = None) -> bytes:
    """One Server-Sent Event; the event name defaults to the data's ``type``."""
    name = event or getattr(data, "type", None)
    head = f"event: {name}\n".encode() if name else b""
    return head + b"data: " + msgspec.json.encode(data) + b"\n\n"


_MANY_IMAGES = ("this server edits one image per request, got {}: SDXL cannot combine several "
                "reference images; send one image")


def _one_image(files: dict[str, list[bytes]]) -> bytes:
    """The single ``image`` part of a form, or a 400 naming ``image``."""
    images = files.get("image", [])
    if not images:
        raise invalid("image is required: send it as a multipart file part named 'image'",
                      field="image")
    if len(images) > 1:
        raise invalid(_MANY_IMAGES.format(len(images)), field="image")
    if not images[0]:
        raise invalid("image is an empty file", field="image")
    return images[0]


def _failed_part(exc: BaseException) -> str | None:
    """The name of the form part whose text ``exc`` failed to decode, if the parser says."""
    tb = exc.__traceback__
    while tb is not None:
        segment = tb.tb_frame.f_locals.get("segment")
        name = getattr(segment, "name", None)
        if isinstance(name, str):
            return name[:-2] if name.endswith("[]") else name
        tb = tb.tb_next
    return None


DIALECT = OpenAIDialect
