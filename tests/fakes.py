"""A fake batch runner: deterministic images from seeds, with gates and injected failures."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from inference import Engine, EngineConfig, ModelInfo
from inference.batch import Batch
from inference.runner import StepTimes
from observability.metrics import Metrics


class QuietHTTPServer(ThreadingHTTPServer):
    """A test site that says nothing when the server under test hangs up mid-answer.

    The server under test does that on purpose (a body past its size limit, a fetch past its
    deadline); the standard handler would print the broken pipe's traceback to stderr.
    """

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FakeRunner:
    """Records every batch; ``gate`` (when set) holds each call until released."""

    has_refiner = False

    def __init__(self, *, delay: float = 0.0, fail: Callable[[Batch], BaseException | None] | None = None):
        self.delay = delay
        self.fail = fail
        self.batches: list[list[tuple[str, int]]] = []
        # Slots each call computed, padding (Batch.pad_to) included.
        self.call_sizes: list[int] = []
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def hold(self) -> None:
        """Make the next calls block until :meth:`release`; ``entered`` marks the next call."""
        self.entered.clear()
        self.gate = threading.Event()

    def release(self) -> None:
        if self.gate is not None:
            self.gate.set()

    def run(self, batch: Batch) -> tuple[list[np.ndarray], StepTimes]:
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(30), "test never released the fake runner"
        if self.fail is not None:
            exc = self.fail(batch)
            if exc is not None:
                raise exc
        if self.delay:
            time.sleep(self.delay)
        self.batches.append([(s.ticket.prompt, s.seed) for s in batch.slots])
        computed = len(batch.input_slots())
        self.call_sizes.append(computed)
        h, w = batch.key.height, batch.key.width
        out = [np.full((h, w, 3), s.seed % 256, dtype=np.uint8) for s in batch.slots]
        return out, StepTimes(denoise=0.01, steps=batch.key.steps, decode=0.001, total=0.011,
                              padded=computed - len(batch.slots))

    def count_tokens(self, prompt: str, negative_prompt: str) -> int:
        return len(prompt.split()) + len(negative_prompt.split())


def fake_engine(runner: FakeRunner, metrics: Metrics | None = None, *, model_id: str = "fake",
                **config: Any) -> Engine:
    """An engine whose runner is ``runner`` (no torch model is loaded), serving ``model_id``."""
    info = ModelInfo(id=model_id, source="fake", description="fake", makes_noise=True,
                     default_width=64, default_height=64, has_refiner=False, created=0)
    cfg = EngineConfig(**{"warmup_batch_sizes": (1,), **config})
    return Engine(cfg, metrics or Metrics(), runner_factory=lambda _cfg: (runner, info))


def engine_factory(runner: FakeRunner, *, model_id: str = "fake", **config: Any
                   ) -> Callable[[Any, Metrics], Engine]:
    """For ``live_server(engine_factory=...)``: the server's settings, the fake runner."""

    def build(settings: Any, metrics: Metrics) -> Engine:
        cfg = settings.engine_config()
        overrides = {f: getattr(cfg, f) for f in ("max_batch_images", "max_wait_ms",
                                                 "max_queue_images", "request_timeout_s")}
        overrides.update(config)
        return fake_engine(runner, metrics, model_id=model_id, **overrides)

    return build


class WebhookReceiver:
    """A webhook receiver on a loopback port: records every POST; answers 500 while ``refusing``."""

    def __init__(self, *, refusing: bool = False) -> None:
        self.posts: list[dict[str, Any]] = []
        self.refusing = refusing
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.posts.append(json.loads(body))
                self.send_response(500 if outer.refusing else 200)
                self.send_header("content-length", "0")
                self.end_headers()

        self.httpd = QuietHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def posts_for(self, job_id: str) -> list[dict[str, Any]]:
        """The bodies posted for the job ``job_id``."""
        return [p for p in self.posts if p.get("id") == job_id]

    def close(self) -> None:
        self.httpd.shutdown()
