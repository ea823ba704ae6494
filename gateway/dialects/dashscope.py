"""Alibaba DashScope image synthesis, as the ``dashscope`` SDK speaks it.

With ``dashscope.base_http_api_url = "http://HOST:PORT/api/v1"`` the SDK's
``ImageSynthesis.call`` / ``async_call`` + ``wait`` / ``fetch`` / ``cancel`` work unchanged:

- ``POST /api/v1/services/aigc/text2image/image-synthesis`` with ``X-DashScope-Async: enable``
  queues a task → ``{output: {task_id, task_status: "PENDING"}, request_id}``. Without the
  header (the SDK's ``sync_call``) the call waits for the task and answers its final state.
- ``GET /api/v1/tasks/{task_id}`` → ``output.task_status`` PENDING / RUNNING / SUCCEEDED /
  FAILED / CANCELED / UNKNOWN (a task that does not exist, or is not the caller's, or expired),
  with ``output.results[].url`` (expiring), ``output.task_metrics`` and ``usage.image_count``.
- ``POST /api/v1/tasks/{task_id}/cancel`` cancels a PENDING task.

Errors: a real HTTP status and ``{code, message, request_id}``, the shape the SDK's
``_handle_error_message`` reads. Wire facts: shared/reference/api-dialects.md §3.1 and the
SDK's source (dashscope 2.0.2). Docs: docs/dashscope.md.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar

import msgspec
from litestar import Request, Response, get, post
from msgspec import Meta

from auth.keys import Principal
from gateway.async_tasks import AsyncTaskDialect, encode_request
from gateway.context import bearer_token
from gateway.errors import ApiError, Failure, invalid
from gateway.sizes import parse_size
from gateway.wire import decode_json, json_response, retry_headers
from inference import GenerationRequest
from inference.tasks import CANCELLED, COMPLETED, FAILED, QUEUED, RUNNING, TIMED_OUT, Job

BASE = "/api/v1"
SYNTHESIS_PATH = f"{BASE}/services/aigc/{{task:str}}/image-synthesis"
MAX_SEED = 2**31 - 1  # DashScope's documented seed range
MAX_N = 4
# DashScope's stable-diffusion-xl defaults (size 1024*1024, steps 40, scale 10).
DEFAULT_SIZE = "1024*1024"
DEFAULT_STEPS = 40
DEFAULT_SCALE = 10.0
# DashScope text-to-image model names a client may send; all run the served model.
MODELS = ("stable-diffusion-xl", "stable-diffusion-v1.5", "wanx-v1", "wanx2.1-t2i-turbo",
          "wanx2.1-t2i-plus", "wan2.2-t2i-flash", "wan2.2-t2i-plus")

STATUS = {QUEUED: "PENDING", RUNNING: "RUNNING", COMPLETED: "SUCCEEDED", FAILED: "FAILED",
          CANCELLED: "CANCELED", TIMED_OUT: "FAILED"}

CODES = {
    "validation": "InvalidParameter", "auth": "InvalidApiKey", "forbidden": "AccessDenied",
    "not_found": "NotFound", "method": "MethodNotAllowed", "too_large": "InvalidParameter",
    "overload": "Throttling", "quota": "Throttling.RateQuota", "timeout": "RequestTimeOut",
    "cancelled": "RequestCancelled", "oom": "ServiceUnavailable", "not_ready": "ServiceUnavailable",
    "shutdown": "ServiceUnavailable", "internal": "InternalError",
}

# -- wire schemas ----------------------------------------------------------------------------


class SynthesisInput(msgspec.Struct, kw_only=True):
    """``input``. Image inputs (``ref_img``, ``sketch_image_url``…) are refused by name."""

    prompt: str
    negative_prompt: str | None = None
    ref_img: str | None = None
    sketch_image_url: str | None = None
    base_image_url: str | None = None
    mask_image_url: str | None = None
    images: list[str] | None = None


class SynthesisParameters(msgspec.Struct, kw_only=True):
    """``parameters`` (SDXL's steps/scale plus the wanx fields the SDK sends)."""

    size: str = DEFAULT_SIZE
    n: Annotated[int, Meta(ge=1, le=MAX_N)] = 1
    seed: Annotated[int, Meta(ge=0, le=MAX_SEED)] | None = None
    steps: int = DEFAULT_STEPS
    scale: Annotated[float, Meta(ge=1, le=15)] = DEFAULT_SCALE
    style: str | None = None
    prompt_extend: bool | None = None
    watermark: bool | None = None
    ref_strength: float | None = None
    ref_mode: str | None = None


class SynthesisRequest(msgspec.Struct, kw_only=True):
    """Body of ``image-synthesis``."""

    model: str
    input: SynthesisInput
    parameters: SynthesisParameters | None = None


class TaskResult(msgspec.Struct, kw_only=True):
    """One entry of ``output.results``."""

    url: str


class TaskMetrics(msgspec.Struct, kw_only=True):
    """``output.task_metrics``: images by outcome."""

    TOTAL: int
    SUCCEEDED: int
    FAILED: int


class TaskOutput(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``output`` of a task: status, times, results, or the failure's code and message."""

    task_id: str
    task_status: str
    submit_time: str | None = None
    scheduled_time: str | None = None
    end_time: str | None = None
    results: list[TaskResult] | None = None
    task_metrics: TaskMetrics | None = None
    code: str | None = None
    message: str | None = None


class Usage(msgspec.Struct, kw_only=True):
    """``usage``: images made."""

    image_count: int


class TaskResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Answer of submit and ``GET /tasks/{id}``."""

    request_id: str
    output: TaskOutput
    usage: Usage | None = None


class CancelResponse(msgspec.Struct, kw_only=True):
    """Answer of a successful cancel."""

    request_id: str


class ErrorResponse(msgspec.Struct, kw_only=True):
    """Every error: a real HTTP status and this body."""

    request_id: str
    code: str
    message: str


# -- helpers ---------------------------------------------------------------------------------


def dashscope_size(size: str) -> tuple[int, int]:
    """``"W*H"`` (DashScope's form; ``x`` and blanks around the ``*`` also accepted) → (W, H)."""
    parsed = parse_size(size, "*x", spaces=True)
    if parsed is None:
        raise invalid(f"parameters.size must look like '1024*1024', got {size!r}",
                      field="parameters.size")
    return parsed


def _stamp(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


def _request_id() -> str:
    return str(uuid.uuid4())


# -- the dialect -----------------------------------------------------------------------------


class DashScopeDialect(AsyncTaskDialect):
    """DashScope's asynchronous image-synthesis task API."""

    name = "dashscope"
    prefixes = (f"{BASE}/services/", f"{BASE}/tasks")
    field_names: ClassVar[dict[str, str]] = {
        "prompt": "input.prompt", "negative_prompt": "input.negative_prompt",
        "width": "parameters.size", "height": "parameters.size", "n": "parameters.n",
        "steps": "parameters.steps", "guidance": "parameters.scale", "seed": "parameters.seed",
        "style": "parameters.style",
    }

    def route_handlers(self) -> list[Any]:
        """Submit, task query and cancel."""
        opt = {"dialect": self.name}

        @post(SYNTHESIS_PATH, status_code=200, opt={
            **opt, "kind": "generate", "schema_in": SynthesisRequest, "schema_out": TaskResponse,
            "summary": "Create an image-synthesis task (X-DashScope-Async: enable), or wait "
                       "for it without that header"})
        async def synthesis(request: Request, task: str) -> Response:
            return await self.submit(request, task)

        @get(f"{BASE}/tasks/{{task_id:str}}", opt={
            **opt, "kind": "poll", "schema_out": TaskResponse,
            "summary": "A task's status and, once SUCCEEDED, its image URLs"})
        async def fetch(request: Request, task_id: str) -> Response:
            principal = self._principal(request)
            return json_response(await self.task_body(await self._job(principal, task_id),
                                                      task_id, request))

        @post(f"{BASE}/tasks/{{task_id:str}}/cancel", status_code=200, opt={
            **opt, "schema_out": CancelResponse, "summary": "Cancel a PENDING task"})
        async def cancel(request: Request, task_id: str) -> Response:
            principal = self._principal(request)
            job = await self._job(principal, task_id)
            if job is None or job.status != QUEUED or await self.tasks.cancel(job) is None:
                raise ApiError("validation", "Failed to cancel the task, please confirm if the "
                               "task is in PENDING status.", code="UnsupportedOperation")
            return json_response(CancelResponse(request_id=_request_id()))

        return [synthesis, fetch, cancel]

    # -- submission ------------------------------------------------------------------------

    async def submit(self, request: Request, task: str) -> Response:
        """Authenticate, check, admit and queue; without the async header, wait for the end."""
        principal = self._principal(request)
        if task != "text2image":
            raise invalid(f"task {task!r} is not served here; only text2image image synthesis",
                          field="task")
        body = decode_json(await request.body(), SynthesisRequest)
        canonical = self.to_canonical(body)
        self.tasks.check_request(canonical, self.field_names)
        job = await self.tasks.submit(
            principal, scope=principal.id, images=canonical.n,
            payload={"request": encode_request(canonical)},
        )
        if request.headers.get("x-dashscope-async", "").strip().lower() != "enable":
            done = await self.tasks.wait(job.id, self.ctx.settings.request_timeout_s)
            return json_response(await self.task_body(done, job.id, request))
        return json_response(TaskResponse(
            request_id=_request_id(),
            output=TaskOutput(task_id=job.id, task_status=STATUS[job.status])))

    def to_canonical(self, body: SynthesisRequest) -> GenerationRequest:
        """Translate a submit body (the served model runs whatever DashScope name is sent)."""
        info = self.ctx.engine.info
        served = info.id if info else None
        if body.model not in MODELS and body.model != served:
            raise invalid(f"Model not exist: model {body.model!r} is not served here; use "
                          f"{served or 'none'} or one of {', '.join(MODELS)}", field="model")
        inp = body.input
        for name in ("ref_img", "sketch_image_url", "base_image_url", "mask_image_url", "images"):
            if getattr(inp, name):
                raise invalid(f"input.{name} is not supported: only text-to-image is served",
                              field=f"input.{name}")
        if not inp.prompt.strip():
            raise invalid("input.prompt must not be empty", field="input.prompt")
        params = body.parameters or SynthesisParameters()
        if params.style not in (None, "", "<auto>"):
            raise invalid(f"parameters.style {params.style!r} is not supported; use <auto>",
                          field="parameters.style")
        if params.ref_strength is not None or params.ref_mode is not None:
            raise invalid("parameters.ref_strength and ref_mode need a reference image, which "
                          "is not supported", field="parameters.ref_mode")
        width, height = dashscope_size(params.size)
        return GenerationRequest(
            prompt=inp.prompt, negative_prompt=inp.negative_prompt or "", n=params.n,
            width=width, height=height, steps=params.steps, guidance=params.scale,
            seed=params.seed, output_format="png",
        )

    # -- rendering -------------------------------------------------------------------------

    async def task_body(self, job: Job | None, task_id: str, request: Request) -> TaskResponse:
        """``GET /tasks/{id}``: the task's state (UNKNOWN for no such task, as DashScope)."""
        if job is None:
            return TaskResponse(request_id=_request_id(),
                                output=TaskOutput(task_id=task_id, task_status="UNKNOWN"))
        status = STATUS[job.status]
        out = TaskOutput(task_id=job.id, task_status=status, submit_time=_stamp(job.created_at),
                         scheduled_time=_stamp(job.started_at), end_time=_stamp(job.finished_at))
        usage = None
        if job.status == COMPLETED:
            urls = await self.tasks.media_urls(job, request)
            out.results = [TaskResult(url=u) for u in urls]
            out.task_metrics = TaskMetrics(TOTAL=job.images, SUCCEEDED=len(urls),
                                           FAILED=max(0, job.images - len(urls)))
            usage = Usage(image_count=len(urls))
        elif status == "FAILED":
            out.code = "RequestTimeOut" if job.status == TIMED_OUT else "InternalError"
            out.message = job.error or "the task failed"
            out.task_metrics = TaskMetrics(TOTAL=job.images, SUCCEEDED=0, FAILED=job.images)
        return TaskResponse(request_id=_request_id(), output=out, usage=usage)

    # -- helpers ---------------------------------------------------------------------------

    def _principal(self, request: Request) -> Principal:
        return self.ctx.authenticate_key(bearer_token(request), self.name)

    async def _job(self, principal: Principal, task_id: str) -> Job | None:
        try:
            return await self.tasks.own(principal, principal.id, task_id)
        except ApiError:
            return None

    def render_failure(self, failure: Failure, request: Request) -> Response:
        """``{request_id, code, message}`` with the real HTTP status."""
        code = failure.code if failure.code == "UnsupportedOperation" else CODES.get(
            failure.cause, "InternalError")
        body = ErrorResponse(request_id=_request_id(), code=code, message=failure.message)
        return json_response(body, failure.status, retry_headers(failure))


DIALECT = DashScopeDialect
