"""The app factory: builds the context, mounts every dialect, and installs the error mapping."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, get, route
from litestar.datastructures import MutableScopeHeaders
from litestar.exceptions import HTTPException
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from auth.keys import KeyStore
from gateway import access_log
from gateway.admin import admin_handlers
from gateway.body_deadline import BodyDeadline
from gateway.context import GatewayContext, bearer_token
from gateway.dialects import discover
from gateway.dialects.base import Dialect
from gateway.disconnect import ClientDisconnected
from gateway.errors import ApiError, Failure, failure_from
from gateway.jobs import JobRunner
from gateway.media import MediaStore
from gateway.openapi import ErrorSpec, openapi_handlers
from gateway.replicas import build_stores
from gateway.settings import Settings
from gateway.wire import json_response
from inference import Engine, EngineState
from inference.tasks import ACTIVE
from observability.metrics import Metrics

logger = logging.getLogger(__name__)


class DialectRouter:
    """Finds the dialect that owns a path, for error envelopes and metrics labels."""

    def __init__(self, dialects: list[Dialect]) -> None:
        self.dialects = dialects
        # Paths nobody owns (/health, /media, unknown routes) answer in OpenAI's envelope, the
        # most widely understood one.
        self.fallback = next((d for d in dialects if d.name == "openai"), dialects[0])
        self.by_name = {d.name: d for d in dialects}

    def for_path(self, path: str) -> Dialect:
        """The dialect with the longest prefix matching ``path``."""
        return self.owner(path) or self.fallback

    def owner(self, path: str) -> Dialect | None:
        """The dialect whose prefix ``path`` has (longest wins), or None for nobody's path."""
        best = max(self.dialects, key=lambda d: d.owns(path))
        return best if best.owns(path) else None

    def for_scope(self, scope: Scope) -> Dialect:
        """The dialect of the route that matched, else the path's owner.

        One path can belong to two dialects by method (``GET /models/{id}`` is OpenAI's,
        ``POST /models/{id}`` Hugging Face's), so a matched handler's ``opt["dialect"]`` wins.
        """
        handler = scope.get("route_handler")
        name = (getattr(handler, "opt", None) or {}).get("dialect")
        return self.by_name.get(name) or self.for_path(scope["path"])


def _request_middleware(metrics: Metrics, router: DialectRouter, body_timeout_s: float) -> Any:
    """The per-request middleware: request id, nosniff, body deadline, metrics, access line.

    It echoes (or makes) X-Request-Id, adds X-Content-Type-Options: nosniff, bounds the time a
    request body may take to arrive (:mod:`gateway.body_deadline`), counts and times the request
    by route template and dialect, and logs one access line.
    """

    def factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            started = time.perf_counter()
            body = BodyDeadline(scope, receive, body_timeout_s)
            status = [500]
            incoming = dict(scope["headers"]).get(b"x-request-id")
            request_id = _clean_request_id(incoming) or uuid.uuid4().hex
            log = access_log.RequestLog(request_id=request_id, method=scope["method"],
                                        path=scope["path"])
            token = access_log.begin(log)

            async def wrapped_send(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                    headers = MutableScopeHeaders.from_message(message)
                    headers["x-request-id"] = request_id
                    headers["x-content-type-options"] = "nosniff"
                    if not body.complete:
                        headers["connection"] = "close"
                await send(message)

            try:
                await app(scope, body.receive, wrapped_send)
            finally:
                access_log.end(token)
                handler = scope.get("route_handler")
                opt = getattr(handler, "opt", None) or {}
                owner = router.owner(scope["path"])
                # Nobody's path (a scanner's /wp-login.php) must not count against a dialect.
                dialect = opt.get("dialect") or (owner.name if owner else "unmatched")
                route = scope.get("path_template") or "unmatched"
                seconds = time.perf_counter() - started
                if route != "/metrics":
                    metrics.requests.labels(route, dialect, str(status[0])).inc()
                    kind = opt.get("kind", "other")
                    metrics.request_latency.labels(dialect, kind).observe(seconds)
                # Probes and scrapes come every few seconds from every kubelet and Prometheus;
                # at INFO they would drown the requests people read the log for.
                log.line(dialect=dialect, route=route, status=status[0], seconds=seconds,
                         level=logging.DEBUG if opt.get("probe") else logging.INFO)

        return middleware

    return factory


# Probes and caches send HEAD; Litestar answers it without the body.
_GET_HEAD = ["GET", "HEAD"]
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _clean_request_id(raw: bytes | None) -> str | None:
    """A client's X-Request-Id, if it is a plain token (it is echoed into headers and logs)."""
    if not raw:
        return None
    text = raw.decode("latin-1").strip()
    return text if _REQUEST_ID.match(text) else None


def create_app(
    settings: Settings,
    *,
    engine: Engine | None = None,
    metrics: Metrics | None = None,
    keys: KeyStore | None = None,
) -> Litestar:
    """Build the Litestar app. Tests pass their own ``engine`` (e.g. with a fake runner)."""
    metrics = metrics or Metrics()
    engine = engine or Engine(settings.engine_config(), metrics)
    stores = build_stores(settings)
    ctx = GatewayContext(
        settings=settings,
        engine=engine,
        keys=keys or KeyStore.from_config(settings.api_keys, settings.keys_path),
        media=stores.media,
        metrics=metrics,
        quotas=stores.quotas,
        ledger=stores.ledger,
    )
    ctx.jobs = JobRunner(
        stores.tasks, engine, worker_id=settings.replica_id,
        concurrency=settings.job_concurrency, sweep_interval_s=settings.job_sweep_interval_s,
        on_success=ctx.record_job_usage, data_dir=settings.data_path, port=settings.port,
        on_webhook=lambda job, outcome: metrics.webhooks.labels(job.dialect, outcome).inc(),
    )
    dialects = [cls(ctx) for cls in discover()]
    router = DialectRouter(dialects)
    for line in settings.startup_warnings():
        logger.warning(line)

    def on_error(request: Request, exc: Exception) -> Response:
        dialect = router.for_scope(request.scope)
        if isinstance(exc, ClientDisconnected):
            metrics.errors.labels(dialect.name, "cancelled").inc()
            return Response(content=b"", status_code=499)
        failure = failure_from(exc, dialect.field_names)
        handled = (getattr(request.scope.get("route_handler"), "opt", None) or {}).get("dialect")
        label = handled or getattr(router.owner(request.scope["path"]), "name", "unmatched")
        metrics.errors.labels(label, _metric_cause(failure.cause)).inc()
        if failure.cause == "internal":
            failure.message = f"{failure.message}; request id {access_log.request_id() or '-'}"
        try:
            response = dialect.render_failure(failure, request)
        except Exception:  # a broken envelope must still not become a framework default body
            logger.exception("rendering an error in the %s envelope failed", dialect.name)
            response = Response(content={"error": failure.message}, status_code=failure.status)
        _add_missing(response, _extra_headers(exc, failure))
        return response

    def details_allowed(request: Request) -> bool:
        """Model names and load errors may hold file paths: only for callers with a key."""
        if not ctx.keys.enabled:
            return settings.is_loopback()
        try:
            ctx.authenticate_key(bearer_token(request), scope=None)
        except ApiError:
            return False
        return True

    @route("/health", http_method=_GET_HEAD, opt={"dialect": "core", "probe": True, "summary": "Liveness: 200 unless the engine failed",
                         "schema_out": HealthBody})
    async def health() -> Response:
        """Liveness: the process answers; 503 once the model failed to load (restart me)."""
        failed = engine.state is EngineState.FAILED
        return json_response(HealthBody(status="failed" if failed else "ok"),
                             503 if failed else 200)

    @route("/ready", http_method=_GET_HEAD, opt={"dialect": "core", "probe": True, "schema_out": HealthBody,
                        "summary": "Readiness: 200 when loaded, warmed and not draining"})
    async def ready(request: Request) -> Response:
        """Readiness: 200 once the model is loaded and warmed, 503 before and while draining."""
        state = engine.state
        body = HealthBody(status=state.value)
        if details_allowed(request):
            body.model = engine.info.id if engine.info else settings.model
            body.error = engine.error
        elif state is EngineState.FAILED:
            body.error = "the model failed to load; see the server log"
        return json_response(body, 200 if state is EngineState.READY else 503)

    @route("/startup", http_method=_GET_HEAD, opt={"dialect": "core", "probe": True, "schema_out": HealthBody,
                          "summary": "Startup: 200 once the model has loaded and warmed up"})
    async def startup() -> Response:
        """200 from the end of the first warm-up on (draining included), 503 before."""
        state = engine.state
        started = state in (EngineState.READY, EngineState.DRAINING, EngineState.STOPPED)
        return json_response(HealthBody(status=state.value), 200 if started else 503)

    @get("/metrics", opt={"dialect": "core", "probe": True, "media_out": "text/plain",
                          "summary": "Prometheus metrics"})
    async def metrics_route() -> Response:
        """Prometheus text format."""
        engine.sample_accelerator_memory()
        await _sample_jobs(ctx, metrics)
        # As a header: a text/* media type would get a second "; charset=utf-8" appended.
        return Response(content=metrics.render(), headers={"content-type": metrics.content_type})

    @route("/media/{name:str}", http_method=_GET_HEAD, opt={"dialect": "core", "media_out": "image/png",
                                   "summary": "A URL-mode image, until it expires"})
    async def media(name: str) -> Response:
        """Serve a URL-mode image until it expires."""
        found = await asyncio.to_thread(ctx.media.get, name)  # disk or Redis: off the loop
        if found is None:
            raise ApiError("not_found", "image not found or expired")
        data, media_type = found
        # nosniff comes from the request middleware, on every response.
        return Response(content=data, media_type=media_type,
                        headers={"cache-control": f"private, max-age={settings.url_ttl_s}"})

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        loading = asyncio.create_task(_start_engine(engine), name="imagegate-engine-start")
        sweeper = asyncio.create_task(_sweep_media(ctx.media), name="imagegate-media-sweeper")
        try:
            yield
        finally:
            sweeper.cancel()
            if not loading.done():
                loading.cancel()
            await asyncio.gather(loading, sweeper, return_exceptions=True)
            await engine.drain(settings.drain_timeout_s)
            ctx.ledger.close()

    handlers: list[Any] = [health, ready, startup, metrics_route, media, *admin_handlers(ctx)]
    for dialect in dialects:
        handlers.extend(dialect.route_handlers())
    errors = {d.name: ErrorSpec(schema=d.error_schema, in_200=d.errors_in_200)
              for d in dialects if d.error_schema is not None}
    if router.fallback.name in errors:
        errors["default"] = errors[router.fallback.name]
    handlers.extend(openapi_handlers(handlers, errors))
    _answer_head_where_get(handlers)
    app = Litestar(
        route_handlers=handlers,
        exception_handlers={Exception: on_error},
        lifespan=[lifespan, ctx.jobs.lifespan],
        request_max_body_size=settings.max_body_bytes,
        openapi_config=None,
        # Logging is configured once by the CLI (text or JSON); Litestar must not replace it.
        logging_config=None,
        debug=False,
    )
    # Around Litestar's whole ASGI handler, not as route middleware (which only wraps matched
    # handlers): requests the router answers itself (404, 405) get a request id, nosniff, a
    # metric sample and an access line too.
    app.asgi_handler = _request_middleware(metrics, router,
                                           settings.body_timeout_s)(app.asgi_handler)
    app.state.ctx = ctx
    return app


def _answer_head_where_get(handlers: list[Any]) -> None:
    """GET routes answer HEAD too, as HTTP asks of a general-purpose server.

    A HEAD runs the GET handler (the server sends its headers and drops the body), so routes
    whose GET changes something declare ``opt["head"] = False`` and keep answering 405.
    """
    for handler in handlers:
        if set(handler.http_methods) == {"GET"} and handler.opt.get("head", True):
            handler.http_methods = {*handler.http_methods, "HEAD"}


class HealthBody(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``/health``, ``/ready`` and ``/startup``: the engine state; details only for key holders."""

    status: str
    model: str | None = None
    error: str | None = None


def _extra_headers(exc: Exception, failure: Failure) -> dict[str, str]:
    """Headers HTTP asks for on some errors, whatever the dialect's envelope."""
    out: dict[str, str] = {}
    if failure.cause == "method" and isinstance(exc, HTTPException):
        allow = [m.strip() for m in (exc.headers or {}).get("allow", "").split(",") if m.strip()]
        if allow:
            out["allow"] = ", ".join(sorted(allow))
    if failure.status == 401:
        out["www-authenticate"] = 'Bearer realm="imagegate"'
    return out


def _add_missing(response: Response, headers: dict[str, str]) -> None:
    """Add ``headers`` the dialect did not set itself (AUTOMATIC1111 asks for Basic auth)."""
    for name, value in headers.items():
        if name not in response.headers:
            response.headers[name] = value


async def _sample_jobs(ctx: Any, metrics: Metrics) -> None:
    """Refresh ``imagegate_jobs``: each async dialect's queued and running jobs, at scrape time.

    Counted in the store, so with Redis every replica reports the same shared numbers (the
    dashboard takes their max). A store outage leaves the last values: /metrics must answer.
    """
    try:
        counts = await ctx.jobs.db.active_counts()
    except Exception as exc:  # noqa: BLE001 - a scrape must never fail on the store
        logger.debug("imagegate_jobs not refreshed: %s: %s", type(exc).__name__, exc)
        return
    for dialect in sorted(ctx.jobs.handlers):
        for status in ACTIVE:
            metrics.jobs.labels(dialect, status).set(counts.get((dialect, status), 0))


async def _start_engine(engine: Engine) -> None:
    try:
        await engine.start()
    except Exception as exc:
        # /health turns 503 and the server exits non-zero, so an orchestrator restarts it.
        if engine.state is not EngineState.FAILED:  # e.g. a warm-up failure
            engine.state = EngineState.FAILED
            engine.error = engine.error or str(exc)
        logger.exception("model failed to load")


async def _sweep_media(store: MediaStore) -> None:
    while True:
        await asyncio.sleep(60)
        await asyncio.to_thread(store.sweep)


def _metric_cause(cause: str) -> str:
    return {"forbidden": "auth", "not_found": "validation", "method": "validation",
            "too_large": "validation"}.get(cause, cause)
