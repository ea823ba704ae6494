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
- ``GET /api/v1/tasks`` (the SDK's ``ImageSynthesis.list``) lists the caller's own tasks,
  newest first: ``{request_id, data: [{task_id, status, model_name, gmt_create, …}], total,
  total_page, page_no, page_size}``, filtered by ``start_time``/``end_time``
  (``YYYYMMDDhhmmss``, server local time, at most 24 hours apart; default the last 24 hours),
  ``model_name``, ``status``, ``api_key_id``, ``task_id``, and paged by ``page_no`` /
  ``page_size`` (1–100).

Errors: a real HTTP status and ``{code, message, request_id}``, the shape the SDK's
``_handle_error_message`` reads. Wire facts: shared/reference/api-dialects.md §3.1, the
SDK's source (dashscope 2.0.2) and, for the list, DashScope's "manage asynchronous tasks" page.
Docs: docs/dashscope.md.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from typing import Annotated, Any, ClassVar

import msgspec
from litestar import Request, Response, get, post
from msgspec import Meta

from auth.keys import Principal
from gateway.async_tasks import AsyncTaskDialect, ResultsGone, echo_id, encode_request
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

# The task list: DashScope's page_size default; its maximum is not documented, so 100.
LIST_PAGE_SIZE = 10
LIST_MAX_PAGE_SIZE = 100
# start_time/end_time: YYYYMMDDhhmmss, at most this far apart (DashScope's rule); the default
# window is the last LIST_WINDOW_S.
LIST_WINDOW_S = 24 * 3600
LIST_TIME = re.compile(r"[0-9]{14}")
LIST_NAME = re.compile(r"[^\s\x00-\x1f\x7f]{1,128}")
LIST_REGION = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")
LIST_INT = re.compile(r"[0-9]{1,9}")
LIST_PARAMS = ("start_time", "end_time", "model_name", "api_key_id", "region", "status",
               "page_no", "page_size", "task_id")
# What ``user_api_unique_key`` reads for a task of this API (DashScope's format).
UNIQUE_KEY = "apikey:v1:aigc:text2image:image-synthesis:{model}"

STATUS = {QUEUED: "PENDING", RUNNING: "RUNNING", COMPLETED: "SUCCEEDED", FAILED: "FAILED",
          CANCELLED: "CANCELED", TIMED_OUT: "FAILED"}

# A ``status`` filter → the stored statuses it means (UNKNOWN: tasks no longer known, none).
LIST_STATUS: dict[str, tuple[str, ...]] = {
    "PENDING": (QUEUED,), "RUNNING": (RUNNING,), "SUCCEEDED": (COMPLETED,),
    "FAILED": (FAILED, TIMED_OUT), "CANCELED": (CANCELLED,), "UNKNOWN": (),
}

CODES = {
    "validation": "InvalidParameter", "auth": "InvalidApiKey", "forbidden": "AccessDenied",
    "not_found": "NotFound", "method": "MethodNotAllowed", "too_large": "InvalidParameter",
    "overload": "Throttling", "quota": "Throttling.RateQuota", "timeout": "RequestTimeOut",
    "cancelled": "RequestCancelled", "oom": "ServiceUnavailable", "not_ready": "ServiceUnavailable",
    "shutdown": "ServiceUnavailable", "unavailable": "ServiceUnavailable",
    "internal": "InternalError",
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


class TaskListQuery(msgspec.Struct, kw_only=True):
    """Query string of ``GET /tasks``, for the OpenAPI document.

    Parsed by hand (:meth:`DashScopeDialect.list_query`); an empty value counts as not given.
    """

    start_time: str | None = None
    end_time: str | None = None
    model_name: str | None = None
    api_key_id: str | None = None
    region: str | None = None
    status: str | None = None
    page_no: int = 1
    page_size: Annotated[int, Meta(ge=1, le=LIST_MAX_PAGE_SIZE)] = LIST_PAGE_SIZE
    task_id: str | None = None


class TaskSummary(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One task of the list. Times are Unix milliseconds, as DashScope's list gives them."""

    task_id: str
    status: str
    api_key_id: str
    gmt_create: int
    model_name: str | None = None
    start_time: int | None = None
    end_time: int | None = None
    request_id: str | None = None
    user_api_unique_key: str | None = None


class TaskListResponse(msgspec.Struct, kw_only=True):
    """Answer of ``GET /tasks``: one page of the caller's tasks, newest first."""

    request_id: str
    data: list[TaskSummary]
    total: int
    total_page: int
    page_no: int
    page_size: int


class ListQuery(msgspec.Struct, kw_only=True):
    """A checked ``GET /tasks`` query: store filters and paging."""

    since: float | None
    until: float | None
    explicit_window: bool
    statuses: tuple[str, ...] | None
    model: str | None
    api_key_id: str | None
    task_id: str | None
    page_no: int
    page_size: int


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


def _ms(t: float | None) -> int | None:
    return None if t is None else int(t * 1000)


def _list_time(value: str, name: str) -> float:
    """``YYYYMMDDhhmmss`` in the server's local time (as ``submit_time`` is shown) → Unix s."""
    if LIST_TIME.fullmatch(value):
        try:
            return time.mktime(time.strptime(value, "%Y%m%d%H%M%S"))
        except (ValueError, OverflowError):
            pass
    raise invalid(f"{name} must be a time as YYYYMMDDhhmmss (e.g. 20230420193058), got "
                  f"{value[:40]!r}", field=name)


def _list_int(value: str, name: str, low: int, high: int) -> int:
    n = int(value) if LIST_INT.fullmatch(value) else None
    if n is None or not low <= n <= high:
        raise invalid(f"{name} must be an integer from {low} to {high}, got {value[:40]!r}",
                      field=name)
    return n


def _list_match(job: Job, q: ListQuery) -> bool:
    """Whether one task passes ``q``'s filters (its time window only when given explicitly)."""
    if q.statuses is not None and job.status not in q.statuses:
        return False
    payload = job.payload if isinstance(job.payload, dict) else {}
    if q.model is not None and payload.get("model") != q.model:
        return False
    if not q.explicit_window:
        return True
    return (q.since is None or job.created_at >= q.since) and (
        q.until is None or job.created_at < q.until)


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
        """Submit, task query, cancel and the task list."""
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

        @get(f"{BASE}/tasks", opt={
            **opt, "kind": "poll", "query_in": TaskListQuery, "schema_out": TaskListResponse,
            "summary": "The caller's tasks, newest first, filtered and paged"})
        async def list_tasks(request: Request) -> Response:
            return json_response(await self.list_tasks(request))

        return [synthesis, fetch, cancel, list_tasks]

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
        request_id = _request_id()
        settings = self.ctx.settings
        waiting = request.headers.get("x-dashscope-async", "").strip().lower() != "enable"
        job = await self.tasks.submit(
            principal, scope=principal.id, images=canonical.n,
            payload={"request": encode_request(canonical), "model": body.model,
                     "request_id": request_id},
            # A caller that waits gives up after the request timeout: its task should not run
            # on, unwatched, for longer than that.
            execution_timeout_s=(min(settings.request_timeout_s, settings.job_execution_timeout_s)
                                 if waiting else None),
        )
        if waiting:
            done = await self.tasks.wait(job.id, settings.request_timeout_s)
            return json_response(await self.task_body(done, job.id, request, request_id))
        return json_response(TaskResponse(
            request_id=request_id,
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

    # -- the task list ---------------------------------------------------------------------

    async def list_tasks(self, request: Request) -> TaskListResponse:
        """``GET /tasks``: one page of the caller's own tasks, newest first."""
        principal = self._principal(request)
        q = self.list_query(request)
        offset = (q.page_no - 1) * q.page_size
        if q.statuses == () or (q.api_key_id is not None and q.api_key_id != principal.id):
            jobs, total = [], 0  # UNKNOWN tasks are gone; other keys' tasks are not listed
        elif q.task_id is not None:
            # Only that task, if it is the caller's and passes the other filters (the default
            # 24-hour window aside: naming a task is enough).
            job = await self._job(principal, q.task_id)
            found = [job] if job is not None and _list_match(job, q) else []
            jobs, total = found[offset:offset + 1], len(found)
        else:
            jobs, total = await self.tasks.list_jobs(
                principal.id, statuses=q.statuses, since=q.since, until=q.until,
                payload_match=None if q.model is None else {"model": q.model},
                offset=offset, limit=q.page_size)
        return TaskListResponse(
            request_id=_request_id(), data=[self.task_summary(j, principal) for j in jobs],
            total=total, total_page=math.ceil(total / q.page_size), page_no=q.page_no,
            page_size=q.page_size)

    def list_query(self, request: Request) -> ListQuery:
        """Check every known query parameter (400 naming it); unknown ones are ignored."""
        given: dict[str, str] = {}
        for name in LIST_PARAMS:
            values = [v for v in request.query_params.getall(name, []) if v != ""]
            if len(values) > 1:
                raise invalid(f"{name} was given {len(values)} times; give it once", field=name)
            if values:
                given[name] = values[0]
        start = _list_time(given["start_time"], "start_time") if "start_time" in given else None
        end = _list_time(given["end_time"], "end_time") if "end_time" in given else None
        if start is not None and end is not None:
            if start > end:
                raise invalid("start_time must not be later than end_time", field="start_time")
            if end - start > LIST_WINDOW_S:
                raise invalid("the time range from start_time to end_time must not exceed 24 "
                              "hours", field="end_time")
        # end_time counts its whole second; a missing end defaults to start + 24 h, a missing
        # start to end - 24 h, and with neither the window is the last 24 hours.
        until = end + 1 if end is not None else (start + LIST_WINDOW_S if start is not None
                                                 else None)
        if start is not None:
            since: float | None = start
        elif until is not None:
            since = until - LIST_WINDOW_S
        else:
            since = time.time() - LIST_WINDOW_S
        statuses = None
        if "status" in given:
            key = given["status"].upper()
            if key not in LIST_STATUS:
                raise invalid(f"status must be one of {', '.join(LIST_STATUS)}, got "
                              f"{given['status'][:40]!r}", field="status")
            statuses = LIST_STATUS[key]
        for name in ("model_name", "api_key_id", "task_id"):
            if name in given and not LIST_NAME.fullmatch(given[name]):
                raise invalid(f"{name} must be 1-128 characters without blanks, got "
                              f"{given[name][:40]!r}", field=name)
        if "region" in given and not LIST_REGION.fullmatch(given["region"]):
            raise invalid(f"region must look like cn-beijing, got {given['region'][:40]!r}",
                          field="region")
        return ListQuery(
            since=since, until=until, explicit_window=start is not None or end is not None,
            statuses=statuses, model=given.get("model_name"), api_key_id=given.get("api_key_id"),
            task_id=given.get("task_id"),
            page_no=_list_int(given.get("page_no", "1"), "page_no", 1, 10**9),
            page_size=_list_int(given.get("page_size", str(LIST_PAGE_SIZE)), "page_size", 1,
                                LIST_MAX_PAGE_SIZE))

    def task_summary(self, job: Job, principal: Principal) -> TaskSummary:
        """One entry of the list (``region`` and account ids: no such thing here)."""
        payload = job.payload if isinstance(job.payload, dict) else {}
        model = payload.get("model")
        return TaskSummary(
            task_id=job.id, status=STATUS[job.status], api_key_id=principal.id,
            gmt_create=int(job.created_at * 1000), model_name=model,
            start_time=_ms(job.started_at), end_time=_ms(job.finished_at),
            request_id=payload.get("request_id"),
            user_api_unique_key=UNIQUE_KEY.format(model=model) if model else None)

    # -- rendering -------------------------------------------------------------------------

    async def task_body(self, job: Job | None, task_id: str, request: Request,
                        request_id: str | None = None) -> TaskResponse:
        """``GET /tasks/{id}``: the task's state (UNKNOWN for no such task, as DashScope)."""
        request_id = request_id or _request_id()
        unknown = TaskResponse(request_id=request_id,
                               output=TaskOutput(task_id=echo_id(task_id), task_status="UNKNOWN"))
        if job is None:
            return unknown
        status = STATUS[job.status]
        out = TaskOutput(task_id=job.id, task_status=status, submit_time=_stamp(job.created_at),
                         scheduled_time=_stamp(job.started_at), end_time=_stamp(job.finished_at))
        usage = None
        if job.status == COMPLETED:
            try:
                urls = await self.tasks.media_urls(job, request)
            except ResultsGone:
                return unknown  # as for an expired task: its results are gone
            out.results = [TaskResult(url=u) for u in urls]
            out.task_metrics = TaskMetrics(TOTAL=job.images, SUCCEEDED=len(urls),
                                           FAILED=max(0, job.images - len(urls)))
            usage = Usage(image_count=len(urls))
        elif status == "FAILED":
            out.code = "RequestTimeOut" if job.status == TIMED_OUT else "InternalError"
            out.message = job.error or "the task failed"
            out.task_metrics = TaskMetrics(TOTAL=job.images, SUCCEEDED=0, FAILED=job.images)
        return TaskResponse(request_id=request_id, output=out, usage=usage)

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
