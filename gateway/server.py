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
    )
    server = DrainingServer(config, app, settings.drain_timeout_s)
    server.run(sockets=[sock] if sock is not None else None)
    if server.model_failed:
        logger.error("exiting with status 3: the model failed to load (%s)",
                     app.state.ctx.engine.error)
        raise SystemExit(3)
