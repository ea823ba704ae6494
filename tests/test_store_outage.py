"""Fault injection: the shared store (Redis) goes away while a server runs, then comes back.

Every Redis command of this process fails while ``Outage`` is on (the server runs in a thread
of the test process, so its clients fail too; the real Redis stays up for other tests). A
request meanwhile gets a 503 in its API's envelope, never a 500; a job that finishes during the
outage keeps its images and outcome until the store is back, and then completes.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests import serving
from tests.test_runpod import SlowRunner, slow_factory

redis = pytest.importorskip("redis")

REDIS_URL = "redis://127.0.0.1:6379/9"
INPUT = {"prompt": "x", "width": 64, "height": 64, "refiner_inference_steps": 4}
DEADLINE_S = 120


class Outage:
    """Makes every Redis command of this process raise ``ConnectionError`` while on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.on = threading.Event()
        self.refused = 0
        for cls, name in ((redis.client.Redis, "execute_command"),
                          (redis.client.Pipeline, "execute"),
                          (redis.client.Pipeline, "immediate_execute_command")):
            monkeypatch.setattr(cls, name, self._failing(getattr(cls, name)))

    def _failing(self, real: Any) -> Any:
        outage = self

        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            if outage.on.is_set():
                outage.refused += 1
                raise redis.exceptions.ConnectionError("injected: Redis is unreachable")
            return real(self, *args, **kwargs)

        return call


@pytest.fixture
def shared_server(tmp_path: Any, monkeypatch: pytest.MonkeyPatch
                  ) -> Iterator[tuple[serving.LiveServer, SlowRunner, Outage]]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis answers at {REDIS_URL}: {exc}")
    prefix = f"imagegate-outage-{uuid.uuid4().hex[:10]}"
    outage = Outage(monkeypatch)
    runner = SlowRunner()
    try:
        with serving.live_server(tmp_path, engine_factory=slow_factory(runner),
                                 redis_url=REDIS_URL, redis_prefix=prefix) as live:
            yield live, runner, outage
    finally:
        outage.on.clear()
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        if keys:
            client.delete(*keys)


def test_requests_during_an_outage_get_503_in_their_own_envelope(
        shared_server: tuple[serving.LiveServer, SlowRunner, Outage]) -> None:
    live, _runner, outage = shared_server
    outage.on.set()
    try:
        run = httpx.post(f"{live.url}/v2/ep/run", json={"input": INPUT}, timeout=DEADLINE_S)
        status = httpx.get(f"{live.url}/v2/ep/status/some-job", timeout=DEADLINE_S)
        openai = httpx.post(f"{live.url}/v1/images/generations", timeout=DEADLINE_S,
                            json={"prompt": "x", "size": "64x64"})
        health = httpx.get(f"{live.url}/health", timeout=DEADLINE_S)
    finally:
        outage.on.clear()
    assert outage.refused > 0, "the outage never reached the store"
    for response in (run, status):
        assert response.status_code == 503, response.text
        assert "storage is unavailable" in response.json()["error"]  # RunPod's {"error": ...}
        assert response.headers.get("retry-after")
    assert openai.status_code == 503, openai.text
    assert openai.json()["error"]["code"] == "storage_unavailable"
    assert health.status_code == 200, "the process itself is up"
    after = httpx.post(f"{live.url}/v2/ep/runsync", json={"input": INPUT}, timeout=DEADLINE_S)
    assert after.json()["status"] == "COMPLETED", after.text


def test_a_job_finishing_during_an_outage_completes_once_the_store_is_back(
        shared_server: tuple[serving.LiveServer, SlowRunner, Outage]) -> None:
    live, runner, outage = shared_server
    batches = live.metric("imagegate_batches_total") or 0
    calls = runner.calls  # warm-up's
    runner.delay = 2.0
    job = httpx.post(f"{live.url}/v2/ep/run", json={"input": INPUT}, timeout=DEADLINE_S).json()
    deadline = time.monotonic() + DEADLINE_S
    while runner.calls == calls:
        assert time.monotonic() < deadline, "the job never reached the engine"
        time.sleep(0.02)
    outage.on.set()  # the batch runs on; its images and outcome cannot be written now
    try:
        while (live.metric("imagegate_batches_total") or 0) <= batches:
            assert time.monotonic() < deadline, "the batch never finished"
            time.sleep(0.02)
        refused = outage.refused
        # The job runner's writes are refused, and retried: give it a few refusals.
        while outage.refused < refused + 3:
            assert time.monotonic() < deadline, "nothing tried to write during the outage"
            time.sleep(0.02)
    finally:
        outage.on.clear()
    while True:
        body = httpx.get(f"{live.url}/v2/ep/status/{job['id']}", timeout=DEADLINE_S).json()
        if body["status"] in ("COMPLETED", "FAILED"):
            break
        assert time.monotonic() < deadline, f"the job never finished: {body}"
        time.sleep(0.05)
    assert body["status"] == "COMPLETED", body
    assert body["output"], body


def test_only_real_outages_are_503s() -> None:
    """A locked or full SQLite database is an outage; a schema mistake is a bug (a logged 500)."""
    import sqlite3

    from gateway.errors import failure_from, is_store_outage

    assert is_store_outage(redis.exceptions.ConnectionError("refused"))
    assert is_store_outage(sqlite3.OperationalError("database is locked"))
    assert is_store_outage(sqlite3.OperationalError("database or disk is full"))
    assert not is_store_outage(sqlite3.OperationalError("no such column: nope"))
    assert failure_from(sqlite3.OperationalError("database is locked")).status == 503
    assert failure_from(sqlite3.OperationalError("no such table: jobs")).status == 500


def test_the_job_loops_log_an_outage_once_not_a_traceback_a_second(
        shared_server: tuple[serving.LiveServer, SlowRunner, Outage],
        caplog: pytest.LogCaptureFixture) -> None:
    import logging

    _live, _runner, outage = shared_server
    caplog.set_level(logging.INFO, logger="gateway.jobs")

    def loop_records() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "gateway.jobs"
                and r.getMessage().startswith(("job dispatch", "job watch"))]

    outage.on.set()
    try:
        # The dispatcher asks every second, the watcher every heartbeat (2 s): many refusals.
        deadline = time.monotonic() + DEADLINE_S
        while outage.refused < 10:
            assert time.monotonic() < deadline, "the job loops never reached the store"
            time.sleep(0.05)
    finally:
        outage.on.clear()
    while not any("answers again" in r.getMessage() for r in loop_records()):
        assert time.monotonic() < deadline, f"no recovery line: {loop_records()}"
        time.sleep(0.05)
    down = [r for r in loop_records() if "unavailable" in r.getMessage()]
    assert 1 <= len(down) <= 2, [r.getMessage() for r in down]  # one per loop at most
    assert not [r for r in loop_records() if r.exc_info], "a traceback per retry"
