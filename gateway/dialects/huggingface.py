"""Hugging Face text-to-image: Inference Endpoints (``POST /``) and api-inference (``POST /models/{id}``).

``huggingface_hub.InferenceClient(model="http://host:port/…").text_to_image(…)`` posts
``{"inputs": prompt, "parameters": {non-null fields}}`` with ``Accept: image/png`` to exactly the
URL it is given, and opens the raw response bytes as an image. Both URL styles are served:

- ``http://host:port/`` (or ``/predict``): a dedicated Inference Endpoint serving one model;
- ``http://host:port/models/{model_id}``: api-inference style; the id must be the served model's
  (hub ids with a slash work), anything else is a 404. ``GET /models/{id}`` stays OpenAI's.

The response format follows ``Accept``: ``image/png`` (also ``image/*``), ``image/jpeg``,
``image/webp`` give raw bytes; ``application/json`` gives the community custom-handler body
``{"image": "<base64 PNG>"}`` (seed 002). With no preference (no ``Accept`` or ``*/*``, as
``requests`` sends) the body's shape decides: the custom handler's flat form (fields next to
``inputs``, no ``parameters`` object, as on the seed page) gets the JSON body, the
``parameters`` form gets raw PNG.

Wire facts: shared/reference/api-dialects.md §5 and seed 002.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import msgspec
from litestar import Request, Response, post
from msgspec import Meta

from gateway.context import bearer_token
from gateway.dialects.base import Dialect
from gateway.disconnect import unless_disconnected
from gateway.errors import ApiError, Failure, failure_from, invalid
from gateway.wire import decode_json, json_response, retry_headers
from inference import EngineState, GenerationRequest, GenerationResult
from inference.errors import InvalidRequest

MAX_SEED = 2**32 - 1
#: Longest prompt or negative prompt, in characters (CLIP reads 77 tokens; this bounds the work
#: of tokenising and logging what a client sends).
MAX_PROMPT_CHARS = 32000
#: Old-spec ``negative_prompt`` lists: at most this many entries.
MAX_NEGATIVE_PROMPTS = 16

# -- wire schemas ----------------------------------------------------------------------------


class TargetSize(msgspec.Struct, kw_only=True):
    """The 2024 task spec's ``target_size`` (still converted by the endpoint toolkit)."""

    width: int
    height: int


class TextToImageParameters(msgspec.Struct, kw_only=True):
    """``parameters`` of the text-to-image task. Unknown fields are ignored.

    ``inference_steps`` is the seed page's custom-handler name for ``num_inference_steps``; a
    list ``negative_prompt`` and ``target_size`` are the 2024 spec's forms.
    """

    negative_prompt: (
        Annotated[str, Meta(max_length=MAX_PROMPT_CHARS)]
        | Annotated[list[Annotated[str, Meta(max_length=MAX_PROMPT_CHARS)]],
                    Meta(max_length=MAX_NEGATIVE_PROMPTS)]
        | None
    ) = None
    width: int | None = None
    height: int | None = None
    target_size: TargetSize | None = None
    num_inference_steps: Annotated[int, Meta(ge=1)] | None = None
    inference_steps: Annotated[int, Meta(ge=1)] | None = None
    guidance_scale: Annotated[float, Meta(ge=0, le=50)] | None = None
    scheduler: str | None = None
    seed: Annotated[int, Meta(ge=0, le=MAX_SEED)] | None = None


class TextToImageRequest(TextToImageParameters, kw_only=True):
    """The request body: ``inputs`` plus ``parameters``, or the custom handler's flat fields."""

    inputs: Annotated[str, Meta(max_length=MAX_PROMPT_CHARS)]
    parameters: TextToImageParameters | None = None
    # Legacy {use_cache, wait_for_model}: accepted and ignored (nothing is cached; see docs).
    options: dict[str, Any] | None = None


class ImageJson(msgspec.Struct, kw_only=True):
    """The custom-handler response: ``{"image": "<base64 PNG>"}``."""

    image: str


class ErrorBody(msgspec.Struct, kw_only=True):
    """``{"error": "<message>"}``."""

    error: str


class LoadingBody(msgspec.Struct, kw_only=True):
    """The 503 body while the model loads."""

    error: str
    estimated_time: float


# -- translation -----------------------------------------------------------------------------

_ACCEPTED: dict[str, str] = {
    "image/png": "png", "image/*": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg",
    "image/webp": "webp", "application/json": "json", "application/*": "json",
}
_PARAMETER_FIELDS = tuple(f.name for f in msgspec.structs.fields(TextToImageParameters))


def negotiate(accept: str | None) -> str | None:
    """``png``/``jpeg``/``webp``/``json`` from an ``Accept`` header; ``None``: no preference.

    Media ranges are tried in ``q`` order (ties in header order); only unsupported types is a 406.
    """
    if accept is None or not accept.strip():
        return None
    ranges: list[tuple[float, int, str]] = []
    for i, part in enumerate(accept.split(",")):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q > 0 and media:
            ranges.append((-q, i, media.lower()))
    for _, _, media in sorted(ranges):
        if media in _ACCEPTED:
            return _ACCEPTED[media]
        if media == "*/*":
            return None
    raise ApiError("validation", f"Accept {accept!r} names no format this server makes; use "
                   "image/png, image/jpeg, image/webp or application/json",
                   field="Accept", status=406)


def merged_parameters(body: TextToImageRequest) -> TextToImageParameters:
    """The flat (custom-handler) fields overlaid by the non-null ``parameters`` fields."""
    values = {name: getattr(body, name) for name in _PARAMETER_FIELDS}
    if body.parameters is not None:
        for name in _PARAMETER_FIELDS:
            value = getattr(body.parameters, name)
            if value is not None:
                values[name] = value
    return TextToImageParameters(**values)


class HuggingFaceDialect(Dialect):
    """Hugging Face Inference API / Inference Endpoints, text-to-image task."""

    name = "hf"
    # Not "/", which would claim every unknown path, nor /models, OpenAI's for GET: the routes'
    # opt["dialect"] picks this envelope for everything raised inside them. /predict is ours
    # alone, so a wrong method there is answered in this envelope too.
    prefixes = ("/predict",)
    field_names: ClassVar[dict[str, str]] = {
        "prompt": "inputs", "steps": "num_inference_steps", "guidance": "guidance_scale",
        "sampler": "scheduler",
    }

    def route_handlers(self) -> list[Any]:
        """``POST /``, ``POST /predict`` and ``POST /models/{id}`` (also ``{org}/{name}``)."""
        opt = {
            "dialect": self.name, "kind": "generate", "schema_in": TextToImageRequest,
            "schema_out": ImageJson, "media_out": "image/png",
        }

        @post(["/", "/predict"], status_code=200,
              opt={**opt, "summary": "Hugging Face Inference Endpoint: text-to-image"})
        async def endpoint(request: Request) -> Response:
            return await self.generate(request, None)

        @post("/models/{model_id:str}", status_code=200,
              opt={**opt, "summary": "Hugging Face Inference API: text-to-image by model id"})
        async def by_model(request: Request, model_id: str) -> Response:
            return await self.generate(request, model_id)

        @post("/models/{org:str}/{name:str}", status_code=200,
              opt={**opt, "summary": "Hugging Face Inference API: text-to-image by namespaced "
                   "model id"})
        async def by_namespaced_model(request: Request, org: str, name: str) -> Response:
            return await self.generate(request, f"{org}/{name}")

        return [endpoint, by_model, by_namespaced_model]

    # -- handlers --------------------------------------------------------------------------

    async def generate(self, request: Request, model_id: str | None) -> Response:
        """Authenticate, check the model id, generate one image, answer by ``Accept``."""
        principal = self.ctx.authenticate_key(bearer_token(request), self.name)
        if model_id is not None and model_id != self._served_id():
            raise ApiError("not_found", f"Model {model_id} does not exist; this server serves "
                           f"{self._served_id()}", field="model", code="model_not_found")
        wanted = negotiate(request.headers.get("accept"))
        body = decode_json(await request.body(), TextToImageRequest)
        if wanted is None:
            wanted = "json" if body.parameters is None else "png"
        canonical = self.to_canonical(body, wanted, principal.id)
        self.ctx.admit(principal)
        try:
            result = await unless_disconnected(request, self.ctx.engine.generate(canonical))
        except InvalidRequest as exc:
            # The steps came as the custom-handler form's inference_steps: name that field.
            params = merged_parameters(body)
            if exc.field != "steps" or params.num_inference_steps is not None \
                    or params.inference_steps is None:
                raise
            failure = failure_from(exc, {**self.field_names, "steps": "inference_steps"})
            raise invalid(failure.message, field=failure.field) from None
        self.ctx.record_usage(principal, result, len(result.images))
        return self.to_response(result, wanted)

    def to_canonical(self, body: TextToImageRequest, wanted: str,
                     client_id: str) -> GenerationRequest:
        """Translate the wire request; sizes and steps are bounded by the engine's limits."""
        params = merged_parameters(body)
        settings = self.ctx.settings
        info = self.ctx.engine.info
        width, height = params.width, params.height
        if params.target_size is not None:
            width = width if width is not None else params.target_size.width
            height = height if height is not None else params.target_size.height
        negative = params.negative_prompt
        if isinstance(negative, list):
            negative = ", ".join(n for n in negative if n)
        steps = params.num_inference_steps or params.inference_steps or settings.default_steps
        return GenerationRequest(
            prompt=body.inputs,
            negative_prompt=negative or "",
            n=1,  # the task makes one image per call
            width=width if width is not None else (info.default_width if info else 1024),
            height=height if height is not None else (info.default_height if info else 1024),
            steps=steps,
            guidance=params.guidance_scale if params.guidance_scale is not None
            else settings.default_guidance,
            sampler=params.scheduler,
            seed=params.seed,
            output_format="png" if wanted == "json" else wanted,  # type: ignore[arg-type]
            want_base64=wanted == "json",
            client_id=client_id,
        )

    @staticmethod
    def to_response(result: GenerationResult, wanted: str) -> Response:
        """Raw image bytes, or ``{"image": b64}`` for the custom-handler form."""
        image = result.images[0]
        headers = {"x-compute-time": f"{result.timings.total:.3f}", "x-seed": str(image.seed)}
        if wanted == "json":
            return json_response(ImageJson(image=image.b64 or ""), headers=headers)
        return Response(content=image.data, media_type=image.media_type, headers=headers)

    def _served_id(self) -> str:
        info = self.ctx.engine.info
        return info.id if info else self.ctx.settings.model

    def render_failure(self, failure: Failure, request: Request) -> Response:
        """``{"error": "<message>"}``; while loading, 503 with ``estimated_time`` as HF does."""
        headers = retry_headers(failure)
        if failure.cause == "not_ready" and self.ctx.engine.state in (
                EngineState.LOADING, EngineState.WARMING):
            body: Any = LoadingBody(error=f"Model {self._served_id()} is currently loading",
                                    estimated_time=failure.retry_after or 5.0)
            return json_response(body, failure.status, headers)
        message = failure.message
        if failure.field and failure.cause == "validation" and failure.field not in message:
            message = f"{failure.field}: {message}"
        return json_response(ErrorBody(error=message), failure.status, headers)


DIALECT = HuggingFaceDialect
