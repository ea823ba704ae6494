"""RunPod serverless queue API, speaking runpod-workers/worker-sdxl's input and output.

Routes live under ``/v2/{endpoint_id}/`` so the ``runpod`` SDK works with
``RUNPOD_ENDPOINT_BASE_URL=http://HOST:PORT/v2``. Admission, job storage, ownership, results and
webhooks come from the shared async machinery (:mod:`gateway.async_tasks`); this module is the
wire format only.

Wire facts: shared/reference/api-dialects.md §4. Docs: docs/runpod.md.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from typing import Any, ClassVar

import msgspec
from litestar import Request, Response, get, post

from auth.keys import Principal
from gateway.async_tasks import AsyncTaskDialect, echo_id
from gateway.context import bearer_token
from gateway.errors import ApiError, Failure, failure_from, invalid
from gateway.fetch import FetchRefused, fetch_image
from gateway.wire import decode_json, json_response, retry_headers
from inference import GenerationRequest, InitImage, Refine
from inference.tasks import (
    CANCELLED,
    COMPLETED,
    FAILED,
    QUEUED,
    RUNNING,
    TIMED_OUT,
    Job,
)

# -- wire schemas ----------------------------------------------------------------------------


class Policy(msgspec.Struct, kw_only=True):
    """``policy``: execution timeout and time-to-live, in milliseconds."""

    executionTimeout: int | None = None
    ttl: int | None = None
    lowPriority: bool | None = None


class RunRequest(msgspec.Struct, kw_only=True):
    """Body of ``/run`` and ``/runsync``.

    ``input`` is validated when the job runs (as a worker would), so a bad input is a FAILED
    job, not an HTTP error.
    """

    input: dict[str, Any]
    webhook: str | None = None
    policy: Policy | None = None
    s3Config: dict[str, Any] | None = None


STATUS = {QUEUED: "IN_QUEUE", RUNNING: "IN_PROGRESS", COMPLETED: "COMPLETED", FAILED: "FAILED",
          CANCELLED: "CANCELLED", TIMED_OUT: "TIMED_OUT"}

# worker-sdxl's schema (schemas.py): name → (accepted JSON types, default).
SCHEDULERS = ("PNDM", "KLMS", "DDIM", "K_EULER", "K_EULER_ANCESTRAL", "DPMSolverMultistep",
              "DPMSolverSinglestep")
_INT = (int,)
_FLOAT = (int, float)
_STR = (str,)
SCHEMA: dict[str, tuple[tuple[type, ...], Any]] = {
    "prompt": (_STR, None),
    "negative_prompt": (_STR, None),
    "height": (_INT, 1024),
    "width": (_INT, 1024),
    "seed": (_INT, None),
    "scheduler": (_STR, "DDIM"),
    "num_inference_steps": (_INT, 25),
    "refiner_inference_steps": (_INT, 50),
    "guidance_scale": (_FLOAT, 7.5),
    "strength": (_FLOAT, 0.3),
    "image_url": (_STR, None),
    "num_images": (_INT, 1),
    "high_noise_frac": (_FLOAT, None),
}
_TYPE_NAMES = {_INT: "int", _FLOAT: "float", _STR: "str"}

# worker-sdxl documents no prompt limit. The CLIP encoders read 77 tokens per chunk; 2,000
# characters is ~400-500 tokens (6-7 chunks), far past what changes an SDXL image, and keeps a
# megabyte "prompt" from costing seconds of executor time.
MAX_PROMPT_CHARS = 2000
# RunPod's policy bounds (operation-reference): executionTimeout 5 s–7 days, ttl 10 s–7 days.
_WEEK_MS = 7 * 24 * 3600 * 1000
MIN_TTL_MS, MAX_TTL_MS = 10_000, _WEEK_MS
MIN_EXEC_MS, MAX_EXEC_MS = 5_000, _WEEK_MS
# Completed jobs whose output /stream has handed out, remembered (oldest forgotten first) so
# the chunk goes out once; a forgotten job would stream its output again.
_STREAMED_MAX = 10_000


class InputError(Exception):
    """The job input failed validation; the message lists every problem."""


def validate_input(raw: dict[str, Any], max_steps: int = 150) -> dict[str, Any]:
    """worker-sdxl's validation: unknown keys, types and constraints; defaults filled in.

    Step-like fields are bounded by ``max_steps`` (``--max-steps``), prompts by
    :data:`MAX_PROMPT_CHARS`.

    Raises :class:`InputError` with every problem, each naming its field.
    """
    errors: list[str] = []
    out: dict[str, Any] = {}
    for key in raw:
        if key not in SCHEMA:
            errors.append(f"Unexpected input. {key} is not a valid input option.")
    for key, (types, default) in SCHEMA.items():
        value = raw.get(key)
        if value is None:
            out[key] = default
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            errors.append(f"{key} should be {_TYPE_NAMES[types]} type, not {type(value).__name__}.")
            out[key] = default
            continue
        out[key] = float(value) if types is _FLOAT else value
    checks = (
        ("num_images", lambda v: 0 < v < 3, "must be 1 or 2"),
        ("num_inference_steps", lambda v: 1 <= v <= max_steps,
         f"must be between 1 and {max_steps}"),
        ("refiner_inference_steps", lambda v: 1 <= v <= max_steps,
         f"must be between 1 and {max_steps}"),
        ("prompt", lambda v: len(v) <= MAX_PROMPT_CHARS,
         f"at most {MAX_PROMPT_CHARS} characters"),
        ("negative_prompt", lambda v: len(v) <= MAX_PROMPT_CHARS,
         f"at most {MAX_PROMPT_CHARS} characters"),
        ("guidance_scale", lambda v: 0 <= v <= 100, "must be between 0 and 100"),
        ("strength", lambda v: 0 < v <= 1, "must be greater than 0 and at most 1"),
        ("high_noise_frac", lambda v: 0 < v < 1, "must be between 0 and 1 (exclusive)"),
        ("scheduler", lambda v: v in SCHEDULERS, "must be one of " + ", ".join(SCHEDULERS)),
        ("seed", lambda v: 0 <= v <= 2**32 - 1, "must be between 0 and 4294967295"),
    )
    for key, ok, rule in checks:
        if out.get(key) is not None and key in raw and not ok(out[key]):
            errors.append(f"{key} does not meet the constraints ({rule}).")
    if not errors:
        if not (out["prompt"] or "").strip() and not out["image_url"]:
            errors.append("prompt is required unless image_url is given.")
        refine_steps = out["refiner_inference_steps"]
        if out["image_url"] or out["high_noise_frac"] is None:
            if int(refine_steps * out["strength"]) < 1:
                errors.append(
                    f"refiner_inference_steps × strength must give at least one refiner step "
                    f"(got {refine_steps} × {out['strength']:g})."
                )
        else:
            frac = out["high_noise_frac"]
            if int(out["num_inference_steps"] * frac) < 1:
                errors.append(f"num_inference_steps × high_noise_frac must give at least one "
                              f"base step (got {out['num_inference_steps']} × {frac:g}).")
            if int(refine_steps * (1 - frac)) < 1:
                errors.append(f"refiner_inference_steps × (1 - high_noise_frac) must give at "
                              f"least one refiner step (got {refine_steps} × {1 - frac:g}).")
    if errors:
        raise InputError(" ".join(errors))
    return out


def _ms(seconds: float | None) -> int:
    return max(0, round((seconds or 0.0) * 1000))


# -- the dialect -----------------------------------------------------------------------------


class RunPodDialect(AsyncTaskDialect):
    """RunPod's serverless queue API with worker-sdxl's schema."""

    name = "runpod"
    prefixes = ("/v2/",)
    field_names: ClassVar[dict[str, str]] = {
        "steps": "num_inference_steps", "guidance": "guidance_scale", "sampler": "scheduler",
        "n": "num_images", "init_image": "image_url", "refine": "refiner",
    }

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self._streamed: OrderedDict[str, bool] = OrderedDict()

    def route_handlers(self) -> list[Any]:
        """The queue API under ``/v2/{endpoint_id}``."""
        opt = {"dialect": self.name}
        base = "/v2/{endpoint_id:str}"

        @post(f"{base}/run", status_code=200, opt={**opt, "kind": "generate"})
        async def run(request: Request, endpoint_id: str) -> Response:
            job = await self.submit(request, endpoint_id)
            return json_response({"id": job.id, "status": STATUS[job.status]})

        @post(f"{base}/runsync", status_code=200, opt={**opt, "kind": "generate"})
        async def runsync(request: Request, endpoint_id: str) -> Response:
            wait_ms = request.query_params.get("wait")
            try:
                wait = int(wait_ms) if wait_ms is not None else 90_000
            except ValueError:
                raise invalid("wait must be an integer number of milliseconds",
                              field="wait") from None
            wait = min(max(wait, 1_000), 300_000)
            job = await self.submit(request, endpoint_id)
            done = await self.tasks.wait(job.id, wait / 1000)
            if done is None:
                raise ApiError("not_found", f"job {job.id} expired (policy.ttl) before it finished")
            full = done.status not in (QUEUED, RUNNING)
            return json_response(await self.status_body(done, full=full))

        @get(f"{base}/status/{{job_id:str}}", opt={**opt, "kind": "poll"})
        async def status(request: Request, endpoint_id: str, job_id: str) -> Response:
            job = await self._own_job(request, endpoint_id, job_id)
            return json_response(await self.status_body(job))

        # GET only: a read delivers the output once, and a HEAD (a monitor, a cache) must not.
        @get(f"{base}/stream/{{job_id:str}}",
             opt={**opt, "kind": "poll", "head": False,
                  "summary": "RunPod job stream: the final output as one chunk, delivered once"})
        async def stream(request: Request, endpoint_id: str, job_id: str) -> Response:
            job = await self._own_job(request, endpoint_id, job_id)
            return json_response(await self.stream_body(job))

        @post(f"{base}/cancel/{{job_id:str}}", status_code=200, opt=opt)
        async def cancel(request: Request, endpoint_id: str, job_id: str) -> Response:
            job = await self.tasks.cancel(await self._own_job(request, endpoint_id, job_id))
            if job is None:
                raise ApiError("not_found", f"job {echo_id(job_id)} not found")
            return json_response({"id": job.id, "status": STATUS[job.status]})

        @post(f"{base}/retry/{{job_id:str}}", status_code=200, opt=opt)
        async def retry(request: Request, endpoint_id: str, job_id: str) -> Response:
            principal = self._principal(request)
            current = await self.tasks.own(principal, self._scope(principal.id, endpoint_id),
                                           job_id)
            if current.status not in (FAILED, TIMED_OUT):
                raise invalid(f"job {job_id} is {STATUS[current.status]}; only FAILED or "
                              "TIMED_OUT jobs can be retried")
            job = await self.tasks.retry(principal, current)
            if job is None:
                latest = await self.tasks.own(principal, current.scope, job_id)
                raise invalid(f"job {job_id} is {STATUS[latest.status]}; only FAILED or "
                              "TIMED_OUT jobs can be retried")
            return json_response({"id": job.id, "status": STATUS[job.status]})

        @post(f"{base}/purge-queue", status_code=200, opt=opt)
        async def purge_queue(request: Request, endpoint_id: str) -> Response:
            principal = self._principal(request)
            removed = await self.tasks.purge(self._scope(principal.id, endpoint_id))
            return json_response({"removed": removed, "status": "completed"})

        @get(f"{base}/health", opt=opt)
        async def health(request: Request, endpoint_id: str) -> Response:
            principal = self._principal(request)
            stats = await self.tasks.stats(self._scope(principal.id, endpoint_id))
            return json_response(self.health_body(stats))

        return [run, runsync, status, stream, cancel, retry, purge_queue, health]

    # -- submission ------------------------------------------------------------------------

    async def submit(self, request: Request, endpoint_id: str) -> Job:
        """Authenticate, check the envelope, admit and store a queued job."""
        principal = self._principal(request)
        body = decode_json(await request.body(), RunRequest)
        if body.s3Config:
            raise invalid("s3Config is not supported: results are returned inline as data URIs",
                          field="s3Config")
        policy = body.policy or Policy()
        ttl_s = exec_s = None
        if policy.ttl is not None:
            if not MIN_TTL_MS <= policy.ttl <= MAX_TTL_MS:
                raise invalid(f"policy.ttl must be between {MIN_TTL_MS} and {MAX_TTL_MS} ms",
                              field="policy.ttl")
            ttl_s = policy.ttl / 1000
        if policy.executionTimeout is not None:
            if not MIN_EXEC_MS <= policy.executionTimeout <= MAX_EXEC_MS:
                raise invalid(f"policy.executionTimeout must be between {MIN_EXEC_MS} and "
                              f"{MAX_EXEC_MS} ms", field="policy.executionTimeout")
            exec_s = policy.executionTimeout / 1000
        n = body.input.get("num_images", 1)
        images = n if isinstance(n, int) and 0 < n < 3 else 1
        return await self.tasks.submit(
            principal, scope=self._scope(principal.id, endpoint_id),
            payload={"input": body.input}, images=images, ttl_s=ttl_s,
            execution_timeout_s=exec_s, webhook=body.webhook, job_id=f"{uuid.uuid4()}-u1",
        )

    # -- JobHandler ------------------------------------------------------------------------

    async def prepare(self, job: Job) -> GenerationRequest:
        """Validate the stored input and build the canonical request (fetching image_url)."""
        inp = validate_input(job.payload.get("input") or {}, self.ctx.settings.max_steps)
        init_image = None
        if inp["image_url"]:
            try:
                data = await fetch_image(inp["image_url"], self.tasks.fetch_policy)
            except FetchRefused as exc:
                raise InputError(f"image_url: {exc}") from None
            init_image = InitImage(data=data, strength=inp["strength"])
        # worker-sdxl always runs the refiner: after the base for text-to-image, alone for
        # image-to-image. high_noise_frac set: expert hand-off (base stops there, the refiner
        # continues); unset: refiner img2img at strength, as the original worker.
        refine = Refine(
            steps=inp["refiner_inference_steps"],
            strength=inp["strength"],
            high_noise_frac=None if init_image else inp["high_noise_frac"],
        )
        return GenerationRequest(
            prompt=inp["prompt"] or "",
            negative_prompt=inp["negative_prompt"] or "",
            n=inp["num_images"],
            width=inp["width"],
            height=inp["height"],
            steps=inp["num_inference_steps"],
            guidance=inp["guidance_scale"],
            sampler=inp["scheduler"],
            seed=inp["seed"],
            output_format="png",
            init_image=init_image,
            refine=refine,
            client_id=job.payload.get("client_id"),
            request_id=job.id,
        )

    def error_message(self, exc: BaseException) -> str:
        """Job ``error`` text, naming worker-sdxl's fields."""
        if isinstance(exc, InputError):
            return str(exc)
        return failure_from(exc, self.field_names).message

    async def webhook_body(self, job: Job) -> bytes:
        """The webhook POST body: the full ``/status`` body."""
        return msgspec.json.encode(await self.status_body(job))

    # -- rendering -------------------------------------------------------------------------

    async def status_body(self, job: Job, *, full: bool = True) -> dict[str, Any]:
        """The ``/status`` body; ``full=False`` gives the short ``{id, status}`` form."""
        body: dict[str, Any] = {"id": job.id, "status": STATUS[job.status]}
        if not full:
            return body
        # Delay: submission to the engine's start (the whole life of a job that never started);
        # execution: the start to the end. A job waiting in the engine's queue is not started.
        if job.started_at is not None:
            body["delayTime"] = _ms(job.started_at - job.created_at)
            if job.finished_at is not None:
                body["executionTime"] = _ms(job.finished_at - job.started_at)
        elif job.finished_at is not None:
            body["delayTime"] = _ms(job.finished_at - job.created_at)
        if job.worker_id:
            body["workerId"] = job.worker_id
        if job.status == COMPLETED and job.result is not None:
            images = await self.tasks.data_uris(job)
            body["output"] = {"images": images, "image_url": images[0] if images else None,
                              "seed": job.result.seed}
        if job.error is not None:
            body["error"] = job.error
        return body

    async def stream_body(self, job: Job) -> dict[str, Any]:
        """``/stream``: ``{id, status, stream: [{"output": chunk}]}``.

        The runpod SDK's ``Job.stream()`` yields every chunk it is given and stops once the
        status is final and the stream is empty, so each chunk goes out once: the completed
        output (the ``/status`` output) on the first read after completion, nothing after.
        Which jobs were delivered is remembered per process (see docs/runpod.md).
        """
        body: dict[str, Any] = {"id": job.id, "status": STATUS[job.status], "stream": []}
        if job.status == COMPLETED and job.result is not None and job.id not in self._streamed:
            self._streamed[job.id] = True  # before the await: a concurrent read gets nothing
            full = await self.status_body(job)
            body["stream"] = [{"output": full.get("output")}]
            while len(self._streamed) > _STREAMED_MAX:
                self._streamed.popitem(last=False)
        if job.error is not None:
            body["error"] = job.error
        return body

    def health_body(self, stats: dict[str, int]) -> dict[str, Any]:
        """``/health``: job counts for this endpoint and the one worker (this server)."""
        engine = self.ctx.engine
        running = 1 if self.tasks.jobs.running else 0
        ready = engine.ready
        return {
            "jobs": {
                "completed": stats[COMPLETED], "failed": stats[FAILED] + stats[TIMED_OUT],
                "inProgress": stats[RUNNING], "inQueue": stats[QUEUED],
                "retried": stats["retried"],
            },
            "workers": {
                "idle": 1 if ready and not running else 0,
                "initializing": 0 if ready or engine.error else 1,
                "ready": 1 if ready else 0,
                "running": running if ready else 0,
                "throttled": 0,
                "unhealthy": 1 if engine.error else 0,
            },
        }

    # -- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _scope(client_id: str, endpoint_id: str) -> str:
        return f"{client_id}/{endpoint_id}"

    def _principal(self, request: Request) -> Principal:
        return self.ctx.authenticate_key(bearer_token(request), self.name)

    async def _own_job(self, request: Request, endpoint_id: str, job_id: str) -> Job:
        principal = self._principal(request)
        return await self.tasks.own(principal, self._scope(principal.id, endpoint_id), job_id)

    def render_failure(self, failure: Failure, request: Request) -> Response:
        """API errors: a real HTTP status and ``{"error": message}``.

        404 bodies also carry ``"status": "FAILED"``: the runpod SDK's async job reads
        ``status`` from every poll body (a KeyError without it), and only a final state ends
        its ``stream()``/``output()`` loops; a job that is gone will never finish.
        """
        body: dict[str, Any] = {"error": failure.message}
        if failure.status == 404:
            body["status"] = "FAILED"
        return json_response(body, failure.status, retry_headers(failure))


DIALECT = RunPodDialect
