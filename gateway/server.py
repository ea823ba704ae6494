"""Running the app under uvicorn with a graceful drain on SIGTERM/SIGINT.

On the first signal the engine stops admitting work (new requests get the dialect's 503 and
``/ready`` turns 503), queued and running work may finish within ``--drain-timeout-s``, what is
still queued after that is answered with a clear shutdown error, and only then does uvicorn stop.
Requests that wait on an async job answer at once with the job's state (as when their wait
runs out); the job itself drains like any work, or goes back to the queue. A second SIGINT
exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from types import FrameType

import uvicorn
from litestar import Litestar

from gateway.settings import Settings
from inference import EngineState

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first exit signal drains the engine before shutting down."""

    def __init__(self, config: uvicorn.Config, app: Litestar, drain_timeout: float) -> None:
        super().__init__(config)
        self._app = app
        self._drain_timeout = drain_timeout
        self._draining = False
        self.model_failed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def on_tick(self, counter: int) -> bool:
        """Also stop when the model failed to load, so an orchestrator restarts the process."""
        if self._app.state.ctx.engine.state is EngineState.FAILED:
            self.model_failed = True
            return True
        return await super().on_tick(counter)

    async def serve(self, sockets=None) -> None:  # noqa: ANN001 - uvicorn's signature
        """Remember the loop so the signal handler can schedule the drain on it."""
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """First signal: drain, then exit. Later signals: uvicorn's own behaviour."""
        if self._draining or self._loop is None:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        logger.info("signal %s: draining (up to %.0fs) before exit",
                    signal.Signals(sig).name, self._drain_timeout)
        self._loop.call_soon_threadsafe(self._start_drain, sig)

    def _start_drain(self, sig: int) -> None:
        # Kept on the server so the task is not garbage-collected while it drains.
        self._drain_task = asyncio.ensure_future(self._drain_then_exit(sig))

    async def _drain_then_exit(self, sig: int) -> None:
        ctx = self._app.state.ctx
        engine = ctx.engine
        # Requests that wait on a job (RunPod runsync, DashScope and ModelsLab sync calls)
        # answer now with the job as it is: uvicorn would cut them off at its shutdown timeout.
        ctx.jobs.release_waiters()
        try:
            await engine.drain(self._drain_timeout)
        finally:
            # Give the responses of just-finished or just-failed requests a moment to be written.
            await asyncio.sleep(0.2)
            self.should_exit = True


def header_deadline_protocol(timeout_s: float) -> type[asyncio.Protocol]:
    """The HTTP protocol of uvicorn, closing a connection whose request headers are too slow.

    uvicorn has no such deadline: its keep-alive timer is cancelled by any byte, so a client
    sending a header byte now and then holds a connection (and a file descriptor) for ever. The
    deadline runs from the connection's opening and from each response's end until the next
    request's headers are in (uvicorn then makes a request cycle, the app is called, and
    :mod:`gateway.body_deadline` bounds the body). It relies on uvicorn's ``cycle`` and
    ``on_response_complete``, shared by its httptools and h11 protocols.
    """
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # no httptools: uvicorn's own fallback
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base  # type: ignore[assignment]

    class HeaderDeadlineProtocol(Base):  # type: ignore[misc, valid-type]
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
            super().connection_made(transport)  # type: ignore[arg-type]
            self._arm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm_header_deadline(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(timeout_s, self._header_deadline_passed)

        def _header_deadline_passed(self) -> None:
            cycle = getattr(self, "cycle", None)
            if cycle is not None and not cycle.response_complete:
                return  # headers are in and a request is running: not this deadline's business
            if not self.transport.is_closing():
                logger.info("closing a connection from %s: no request headers within %gs",
                            (self.client or ("?",))[0], timeout_s)
                self.transport.close()

    return HeaderDeadlineProtocol


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or ``OSError`` (e.g. address in use).

    Bound before the model loads, so a busy port fails fast; uvicorn then serves on it.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def run(settings: Settings, app: Litestar, sock: socket.socket | None = None) -> None:
    """Serve ``app`` (on ``sock`` when given) until a signal drains and stops it."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=5,
        lifespan="on",
        http=header_deadline_protocol(settings.header_timeout_s),
    )
    server = DrainingServer(config, app, settings.drain_timeout_s)
    server.run(sockets=[sock] if sock is not None else None)
    if server.model_failed:
        logger.error("exiting with status 3: the model failed to load (%s)",
                     app.state.ctx.engine.error)
        raise SystemExit(3)
