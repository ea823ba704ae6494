"""A real imagegate server on a free loopback port, in a background thread of the test process.

In-process (rather than a subprocess) so tests can inject fake runners and read the server's
own metrics; still a real socket, so real client SDKs talk to it exactly as to a deployment.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from litestar import Litestar

from auth.keys import KeyStore
from gateway.app import create_app
from gateway.server import header_deadline_protocol
from gateway.settings import Settings
from inference import Engine
from observability.metrics import Metrics


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    """A started server: its base URL, app and settings."""

    url: str
    app: Litestar
    settings: Settings
    server: uvicorn.Server

    @property
    def engine(self) -> Engine:
        return self.app.state.ctx.engine

    @property
    def metrics(self) -> Metrics:
        return self.app.state.ctx.metrics

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """One sample from this server's own registry."""
        return self.metrics.registry.get_sample_value(name, labels or {})


@contextmanager
def live_server(
    tmp_path: Any,
    *,
    engine_factory: Any = None,
    wait_ready: bool = True,
    keys: KeyStore | None = None,
    **overrides: Any,
) -> Iterator[LiveServer]:
    """Start a server with ``overrides`` applied to the settings; stop it on exit.

    ``engine_factory(settings, metrics) -> Engine`` lets a test swap the runner.
    """
    port = free_port()
    values: dict[str, Any] = {
        "port": port,
        # The session's shared cache (tiny-sdxl built once per run), else this server's own:
        # never str(None), which once made a "None" folder in the working directory.
        "cache_dir": str(CACHE_DIR or tmp_path / "cache"),
        "data_dir": str(tmp_path / "data"),
        "min_size": 64,
    }
    values.update(overrides)
    settings = Settings.from_sources(values, environ={})
    metrics = Metrics()
    engine = engine_factory(settings, metrics) if engine_factory else None
    app = create_app(settings, engine=engine, metrics=metrics, keys=keys)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False,
                            server_header=False, lifespan="on", timeout_graceful_shutdown=2,
                            http=header_deadline_protocol(settings.header_timeout_s))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    if wait_ready:
        while httpx.get(url + "/ready").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become ready: " + httpx.get(url + "/ready").text)
            time.sleep(0.05)
    try:
        yield LiveServer(url=url, app=app, settings=settings, server=server)
    finally:
        server.should_exit = True
        thread.join(timeout=60)


# Shared across the session so tiny-sdxl is built once per test run.
CACHE_DIR: Any = None
