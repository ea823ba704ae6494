"""The app factory: builds the context, mounts every dialect, and installs the error mapping."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from litestar import Litestar, Request, Response, get
from litestar.datastructures import MutableScopeHeaders
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from auth.keys import KeyStore
from gateway.admin import admin_handlers
from gateway.context import GatewayContext
from gateway.dialects import discover
from gateway.dialects.base import Dialect
from gateway.disconnect import ClientDisconnected
from gateway.errors import ApiError, failure_from
from gateway.jobs import JobRunner
from gateway.media import MediaStore
from gateway.replicas import build_stores
from gateway.settings import Settings
from inference import Engine, EngineState
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
        best = max(self.dialects, key=lambda d: d.owns(path))
        return best if best.owns(path) else self.fallback

    def for_scope(self, scope: Scope) -> Dialect:
        """The dialect of the route that matched, else the path's owner.

        One path can belong to two dialects by method (``GET /models/{id}`` is OpenAI's,
        ``POST /models/{id}`` Hugging Face's), so a matched handler's ``opt["dialect"]`` wins.
        """
        handler = scope.get("route_handler")
        name = (getattr(handler, "opt", None) or {}).get("dialect")
        return self.by_name.get(name) or self.for_path(scope["path"])


def _metrics_middleware(metrics: Metrics, router: DialectRouter) -> Any:
    """Count requests by route template, dialect and status; time them; echo X-Request-Id."""

    def factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            started = time.perf_counter()
            status = [500]
            incoming = dict(scope["headers"]).get(b"x-request-id")
            request_id = incoming.decode("latin-1")[:128] if incoming else uuid.uuid4().hex

            async def wrapped_send(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                    MutableScopeHeaders.from_message(message)["x-request-id"] = request_id
                await send(message)

            try:
                await app(scope, receive, wrapped_send)
            finally:
                handler = scope.get("route_handler")
                opt = getattr(handler, "opt", None) or {}
                dialect = opt.get("dialect") or router.for_path(scope["path"]).name
                route = scope.get("path_template") or "unmatched"
                if route != "/metrics":
                    metrics.requests.labels(route, dialect, str(status[0])).inc()
                    kind = opt.get("kind", "other")
                    metrics.request_latency.labels(dialect, kind).observe(
                        time.perf_counter() - started)

        return middleware

    return factory


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
    )
    dialects = [cls(ctx) for cls in discover()]
    router = DialectRouter(dialects)

    def on_error(request: Request, exc: Exception) -> Response:
        dialect = router.for_scope(request.scope)
        if isinstance(exc, ClientDisconnected):
            metrics.errors.labels(dialect.name, "cancelled").inc()
            return Response(content=b"", status_code=499)
        failure = failure_from(exc, dialect.field_names)
        metrics.errors.labels(dialect.name, _metric_cause(failure.cause)).inc()
        return dialect.render_failure(failure, request)

    @get("/health", opt={"dialect": "core"})
    async def health() -> dict[str, str]:
        """Liveness: the process and its event loop answer."""
        return {"status": "ok"}

    @get("/ready", opt={"dialect": "core"})
    async def ready() -> Response:
        """Readiness: 200 once the model is loaded and warmed, 503 before and while draining."""
        state = engine.state
        body = {"status": state.value, "model": engine.info.id if engine.info else settings.model}
        if engine.error:
            body["error"] = engine.error
        return Response(content=body, status_code=200 if state is EngineState.READY else 503)

    @get("/metrics", opt={"dialect": "core"})
    async def metrics_route() -> Response:
        """Prometheus text format."""
        engine.sample_accelerator_memory()
        return Response(content=metrics.render(), media_type=metrics.content_type)

    @get("/media/{name:str}", opt={"dialect": "core"})
    async def media(name: str) -> Response:
        """Serve a URL-mode image until it expires."""
        found = ctx.media.get(name)
        if found is None:
            raise ApiError("not_found", "image not found or expired")
        data, media_type = found
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

    handlers: list[Any] = [health, ready, metrics_route, media, *admin_handlers(ctx)]
    for dialect in dialects:
        handlers.extend(dialect.route_handlers())
    app = Litestar(
        route_handlers=handlers,
        exception_handlers={Exception: on_error},
        middleware=[_metrics_middleware(metrics, router)],
        lifespan=[lifespan, ctx.jobs.lifespan],
        request_max_body_size=settings.max_body_bytes,
        openapi_config=None,
        debug=False,
    )
    app.state.ctx = ctx
    return app


async def _start_engine(engine: Engine) -> None:
    try:
        await engine.start()
    except Exception:
        logger.exception("model failed to load")


async def _sweep_media(store: MediaStore) -> None:
    while True:
        await asyncio.sleep(60)
        await asyncio.to_thread(store.sweep)


def _metric_cause(cause: str) -> str:
    return {"forbidden": "auth", "not_found": "validation", "method": "validation",
            "too_large": "validation"}.get(cause, cause)
