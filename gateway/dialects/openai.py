"""OpenAI Images API: ``/v1/images/generations`` and ``/v1/models``.

Both are also served without ``/v1``, because the SDK appends its paths to whatever base URL it
is given.

Wire facts: shared/reference/api-dialects.md §1.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, ClassVar, Literal

import msgspec
from litestar import Request, Response, get, post
from msgspec import Meta

from gateway import access_log
from gateway.context import bearer_token
from gateway.dialects.base import Dialect
from gateway.disconnect import unless_disconnected
from gateway.errors import ApiError, Failure, invalid
from gateway.wire import decode_json, json_response, retry_headers
from inference import GenerationRequest, GenerationResult

# -- wire schemas ----------------------------------------------------------------------------

Quality = Literal["auto", "low", "medium", "high", "standard", "hd"]


class ImageGenerationRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/images/generations``. Unknown fields are ignored, as newer SDKs add them."""

    prompt: Annotated[str, Meta(min_length=1, max_length=32000)]
    model: str | None = None
    n: Annotated[int, Meta(ge=1, le=10)] | None = None
    size: str | None = None
    quality: Quality | None = None
    response_format: Literal["url", "b64_json"] | None = None
    style: Literal["vivid", "natural"] | None = None
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


# -- translation -----------------------------------------------------------------------------

OPENAI_MODELS = ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5",
                 "gpt-image-2", "chatgpt-image-latest")
# At most 5 digits a side: the limits check the value; this keeps int() from a 5,000-digit text.
_SIZE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")
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
        "guidance": "guidance_scale", "init_image": "image",
    }

    def route_handlers(self) -> list[Any]:
        """Generations and models, each under ``/v1`` and bare."""
        opt = {"dialect": self.name}

        @post(["/v1/images/generations", "/images/generations"], status_code=200,
              opt={**opt, "kind": "generate", "schema_in": ImageGenerationRequest,
                   "schema_out": ImagesResponse, "summary": "Create images from a prompt"})
        async def generations(request: Request) -> Response:
            return await self.generations(request)

        @get(["/v1/models", "/models"],
             opt={**opt, "schema_out": ModelList, "summary": "The served model"})
        async def models(request: Request) -> Response:
            self.ctx.authenticate_key(bearer_token(request), self.name)
            return json_response(ModelList(data=self._model_objects()))

        @get(["/v1/models/{model_id:str}", "/models/{model_id:str}"],
             opt={**opt, "schema_out": ModelObject,
                  "summary": "One model: the served one or any accepted OpenAI image model name"})
        async def model(request: Request, model_id: str) -> Response:
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

        return [generations, models, model]

    # -- handlers --------------------------------------------------------------------------

    async def generations(self, request: Request) -> Response:
        """``POST /v1/images/generations``."""
        principal = self.ctx.authenticate_key(bearer_token(request), self.name)
        body = decode_json(await request.body(), ImageGenerationRequest)
        canonical, response_format = self.to_canonical(body, principal.id)
        self.ctx.admit(principal)
        result = await unless_disconnected(request, self.ctx.engine.generate(canonical))
        access_log.note_images(len(result.images))
        self.ctx.record_usage(principal, result, len(result.images))
        return json_response(self.to_response(body, canonical, result, response_format, request))

    def to_canonical(
        self, body: ImageGenerationRequest, client_id: str
    ) -> tuple[GenerationRequest, str]:
        """Translate the wire request; returns the canonical request and the response format."""
        if body.stream:
            raise invalid("streaming image generation is not supported by this server yet; "
                          "send stream=false", field="stream")
        if body.background == "transparent":
            raise invalid("background=transparent is not supported: SDXL makes opaque images",
                          field="background")
        model = self._check_model(body.model)
        width, height = self._size(body.size)
        settings = self.ctx.settings
        steps = body.num_inference_steps
        if steps is None:
            quality = body.quality or "auto"
            steps = settings.quality_table().get(quality, settings.default_steps)
        fmt = body.output_format or "png"
        response_format = body.response_format or (
            "b64_json" if model.startswith(("gpt-image", "chatgpt-image")) else "url"
        )
        canonical = GenerationRequest(
            prompt=body.prompt,
            negative_prompt=body.negative_prompt or "",
            n=body.n or 1,
            width=width,
            height=height,
            steps=steps,
            guidance=body.guidance_scale if body.guidance_scale is not None
            else settings.default_guidance,
            sampler=body.sampler,
            seed=body.seed,
            style=body.style,
            output_format=fmt,
            output_compression=body.output_compression if body.output_compression is not None
            else 100,
            want_base64=response_format == "b64_json",
            client_id=client_id,
        )
        return canonical, response_format

    def to_response(
        self,
        body: ImageGenerationRequest,
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
        usage = ImagesUsage(
            input_tokens=result.prompt_tokens,
            output_tokens=out_tokens,
            total_tokens=result.prompt_tokens + out_tokens,
            input_tokens_details=TokensDetails(text_tokens=result.prompt_tokens, image_tokens=0),
            output_tokens_details=TokensDetails(text_tokens=0, image_tokens=out_tokens),
        )
        return ImagesResponse(
            created=int(time.time()),
            data=data,
            background="opaque",
            output_format=canonical.output_format,
            quality=body.quality,
            size=f"{canonical.width}x{canonical.height}",
            usage=usage,
        )

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

    def _size(self, size: str | None) -> tuple[int, int]:
        info = self.ctx.engine.info
        if size is None or size == "auto":
            if info is None:
                return 1024, 1024
            return info.default_width, info.default_height
        m = _SIZE.match(size.strip().lower())
        if not m:
            raise invalid(f"size must be 'auto' or 'WIDTHxHEIGHT' (e.g. '1024x1024'), got {size!r}",
                          field="size")
        return int(m.group(1)), int(m.group(2))

    def _model_objects(self) -> list[ModelObject]:
        info = self.ctx.engine.info
        if info is None:
            return [ModelObject(id=self.ctx.settings.model, created=0, owned_by="imagegate",
                                description="loading")]
        return [ModelObject(id=info.id, created=info.created, owned_by="imagegate",
                            description=info.description)]

    def render_failure(self, failure: Failure, request: Request) -> Response:
        """``{"error": {message, type, param, code}}`` with the matching HTTP status."""
        err_type, code = _ERROR_TYPES[failure.cause]
        if failure.cause == "quota" and failure.code in ("insufficient_quota", "daily"):
            err_type, code = "insufficient_quota", "insufficient_quota"
        elif failure.cause == "auth" and failure.code is None:
            code = None
        elif failure.code and failure.cause in ("validation", "not_found"):
            code = failure.code
        headers = retry_headers(failure)
        if failure.retryable is False:
            headers["x-should-retry"] = "false"
        body = ErrorEnvelope(error=ErrorBody(message=failure.message, type=err_type,
                                             param=failure.field, code=code,
                                             request_id=access_log.request_id()))
        return json_response(body, failure.status, headers)


DIALECT = OpenAIDialect
